"""``qcd-fx train``: (optionally transform, then) train a model on the digits data with one of
the bundled optimizers. Registered on :data:`qcd_fx.cli.app` when this module is imported."""

from __future__ import annotations

import math
from typing import Annotated, Optional

import typer

from ..errors import TrainingError, UsageError
from .app import app, friendly, out, progress
from .common import resolve_model
from .options import AllowOpt, DebugOpt, ModelArg, TrustOpt, WeightsOpt


def _digits_layout(module) -> tuple:
    """One example input in the layout ``module`` takes: ``(1, 1, 8, 8)`` images or ``(1, 64)``."""
    from ..data import load_digits_split
    from ..train import digits_input

    x0 = load_digits_split().x_test[:2]
    try:
        feed = digits_input(module, x0)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return (feed(x0)[:1].clone(),)


@app.command("train")
@friendly
def train_command(
    model: ModelArg = None,
    optimizer: Annotated[str, typer.Option("--optimizer", "-O", help="sgd, adam, cce, cce-seed or qimad")] = "cce",
    data: Annotated[str, typer.Option("--data", help="training data; 'digits' (scikit-learn's 8x8 digits, 80/20 split)")] = "digits",
    epochs: Annotated[int, typer.Option("--epochs", "-e", help="passes over the training split")] = 15,
    passes: Annotated[Optional[str], typer.Option("--passes", "-p", help="transform first with this pipeline spec, e.g. 'qci{rank=8},csc'")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="learning rate (default: the optimizer's tuned default)")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="mini-batch size")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="seed of the initial weights (--example), shuffling and optimizer")] = 0,
    output: Annotated[Optional[str], typer.Option("-o", "--output", help="write OUT.pt (model), OUT.history.json and OUT.curve.png")] = None,
    example: Annotated[bool, typer.Option("--example", help="train the bundled digits CNN")] = False,
    weights: WeightsOpt = None,
    trust_pickle: TrustOpt = False,
    allow: AllowOpt = [],  # noqa: B006 - typer needs a literal default
    force: Annotated[bool, typer.Option("--force", help="overwrite existing output files")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no per-epoch lines")] = False,
    debug: DebugOpt = False,
) -> None:
    """Train MODEL (or --example) on the digits data and print the test accuracy per epoch."""
    import torch

    from .. import io
    from ..passes import Pipeline
    from ..train import OPTIMIZERS, output_paths, train_on_digits

    if optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if data != "digits":
        raise UsageError(f"--data {data!r} is not a known data set; known: digits")
    if epochs < 1:
        raise UsageError(f"--epochs {epochs} must be a positive integer")
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size} must be a positive integer")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise UsageError(f"--lr {lr} must be a positive number")
    if seed < 0:
        raise UsageError(f"--seed {seed} must be >= 0")
    pipeline = Pipeline.parse(passes) if passes is not None else None
    if output is not None:
        inputs_src = [p for p in (model, weights) if p]
        try:
            paths = output_paths(output, overwrite=force)
        except ValueError as e:
            raise UsageError(str(e)) from None
        except FileExistsError as e:
            raise UsageError(str(e).replace("overwrite=True (--force)", "--force")) from None
        for p in paths.values():
            io.check_output_path(str(p), inputs=inputs_src, force=force)
    with progress(not quiet) as step:
        step("loading model")
        torch.manual_seed(seed)
        module, name, _, _ = resolve_model(model, example, weights, trust_pickle, allow)
        module.eval()
        inputs = _digits_layout(module)
        if pipeline is not None:
            result = pipeline.run(module, inputs, on_step=step)
            result.report.model = name
            result.report.print(out)
            module = result.graph_module
        elif not isinstance(module, torch.fx.GraphModule):
            from ..tracing import trace

            module = trace(module)
    shapes = [list(t.shape) for t in inputs]
    try:
        history = train_on_digits(
            module, optimizer, epochs, batch_size=batch_size, lr=lr, seed=seed, out_prefix=output, overwrite=force,
            progress=not quiet, save_model=lambda m, p: io.save(m, p, input_shapes=shapes, allow=allow),
        )  # fmt: skip
    except FloatingPointError as e:
        raise TrainingError(f"training diverged: {e}; nothing was written") from None
    acc = history.final_val_accuracy
    out.print(f"{name}, {optimizer}, {epochs} epoch{'' if epochs == 1 else 's'}: test accuracy {100 * acc:.2f}%" if acc is not None else "no test accuracy", highlight=False)
    for kind, path in history.meta.get("outputs", {}).items():
        out.print(f"{kind} written to {path}", highlight=False)
