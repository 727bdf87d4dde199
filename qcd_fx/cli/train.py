"""``qcd-fx train``: (optionally transform, then) train a model on a data spec (digits, an image
folder, a tensor file, a factory) with one of the bundled optimizers, optionally distilling. Registered on :data:`qcd_fx.cli.app` when this module is imported."""

from __future__ import annotations

import math
import os
from typing import Annotated, Optional

import typer

from ..errors import TrainingError, UsageError
from .app import app, friendly, out, progress
from .common import resolve_model
from .options import AllowOpt, DebugOpt, ModelArg, TrustOpt, WeightsOpt


def launcher(nproc: int, max_restarts: int = 0) -> tuple[list[str], dict[str, str]]:
    """The ``torch.distributed.run`` command (without the program) and environment that start
    ``nproc`` local workers, one thread each: elastic (``c10d`` rendezvous on loopback, a free port),
    restarting the whole group up to ``max_restarts`` times when a worker dies. Every attempt
    bootstraps its process group from a fresh store (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``):
    a restarted group must not read the addresses its dead predecessor left in a shared store."""
    import socket
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--local-addr=127.0.0.1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    return cmd, env


def _launch(nproc: int, max_restarts: int = 0) -> int:
    """Re-run this command in ``nproc`` local workers through PyTorch's launcher (:func:`launcher`),
    one thread each. The launcher is elastic: when a worker dies it restarts the whole group up to
    ``max_restarts`` times (the workers then resume from ``--checkpoint``)."""
    import subprocess
    import sys

    args, skip = [], False
    for i, a in enumerate(sys.argv[1:]):
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith(("--nproc=", "--max-restarts=")):
            continue
        if a == "--max-restarts":
            skip = True
            continue
        args.append(a)
    cmd, env = launcher(nproc, max_restarts)
    return subprocess.call([*cmd, "-m", "qcd_fx.cli", *args], env=env)


@app.command("train")
@friendly
def train_command(
    model: ModelArg = None,
    optimizer: Annotated[str, typer.Option("--optimizer", "-O", help="sgd, adam, cce, cce-seed or qimad")] = "cce",
    data: Annotated[
        str, typer.Option("--data", help="training data: digits, imagefolder:DIR, tensors:FILE (.pt/.npz with x and y), or module:factory")
    ] = "digits",
    image_size: Annotated[Optional[int], typer.Option("--image-size", help="imagefolder: resize and centre-crop to this side (default 224)")] = None,
    val_split: Annotated[float, typer.Option("--val-split", help="fraction held out for validation where the data has no validation part")] = 0.2,
    teacher: Annotated[Optional[str], typer.Option("--teacher", help="distil from this MODEL (e.g. the unpruned original)")] = None,
    distill: Annotated[float, typer.Option("--distill", help="weight of the teacher's soft targets in the loss (with --teacher)")] = 0.5,
    temperature: Annotated[float, typer.Option("--temperature", help="distillation temperature (with --teacher)")] = 2.0,
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
    nproc: Annotated[
        int,
        typer.Option(
            "--nproc", help="worker processes on this machine (torch.distributed, gloo; one thread each): data-parallel, or QIMAD's agents split over them"
        ),
    ] = 1,
    checkpoint: Annotated[Optional[str], typer.Option("--checkpoint", help="write a checkpoint here after every epoch; resume from it when it exists")] = None,
    max_restarts: Annotated[
        int, typer.Option("--max-restarts", help="with --nproc: restart the workers up to this many times when one fails (they resume from --checkpoint)")
    ] = 0,
    debug: DebugOpt = False,
) -> None:
    """Train MODEL (or --example) on --data and print the validation accuracy per epoch."""
    import torch

    from .. import distributed

    if nproc < 1:
        raise UsageError(f"--nproc {nproc} must be >= 1")
    if max_restarts < 0:
        raise UsageError(f"--max-restarts {max_restarts} must be >= 0")
    if max_restarts and nproc < 2 and "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        raise UsageError(f"--max-restarts {max_restarts} restarts the workers of --nproc N; it needs --nproc 2 or more")
    if checkpoint is not None:
        ckpt_dir = os.path.dirname(os.path.abspath(checkpoint))
        if not os.path.isdir(ckpt_dir):
            raise UsageError(f"--checkpoint {checkpoint}: directory {ckpt_dir} does not exist")
        if os.path.isdir(checkpoint):
            raise UsageError(f"--checkpoint {checkpoint} is a directory; give a file name")
    if distributed.init_from_env("gloo"):  # a worker of --nproc or torchrun: one thread, rank 0 writes
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        if not distributed.is_main():
            output, quiet = None, True
        if batch_size % distributed.world():
            raise UsageError(f"--batch-size {batch_size} (the global batch) must be a multiple of the {distributed.world()} processes")

    from .. import io
    from ..datasets import check_fits, load_data
    from ..passes import Pipeline
    from ..train import OPTIMIZERS, output_paths, train_on_data

    if optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if not (0 <= distill <= 1) or not (math.isfinite(temperature) and temperature > 0):
        raise UsageError(f"--distill must be in [0, 1] and --temperature > 0, got {distill} and {temperature}")
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
        if checkpoint is not None and os.path.abspath(checkpoint) in {os.path.abspath(p) for p in paths.values()}:
            raise UsageError(f"--checkpoint {checkpoint} is one of the output files of -o {output}; give it another name")
    if nproc > 1 and not distributed.active():  # everything checked: start the workers
        if batch_size % nproc:
            raise UsageError(f"--batch-size {batch_size} (the global batch) must be a multiple of --nproc {nproc}")
        if checkpoint is not None and os.path.exists(checkpoint):  # unreadable: one line here, not one per worker and restart
            from ..train.checkpoint import load as load_checkpoint

            load_checkpoint(checkpoint)
        raise SystemExit(_launch(nproc, max_restarts))
    with progress(not quiet) as step:
        step("loading data")
        dataset = load_data(data, image_size=image_size, val_split=val_split, seed=seed)
        step("loading model")
        torch.manual_seed(seed)
        module, name, _, _ = resolve_model(model, example, weights, trust_pickle, allow)
        module.eval()
        inputs = (check_fits(module, dataset)(dataset.example(1)).clone(),)
        teacher_module = None
        if teacher is not None:
            step("loading teacher")
            teacher_module = resolve_model(teacher, False, None, trust_pickle, allow)[0].eval()
            check_fits(teacher_module, dataset)
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
        history = train_on_data(
            module, dataset, optimizer, epochs, batch_size=batch_size, lr=lr, seed=seed, out_prefix=output, overwrite=force,
            progress=not quiet, save_model=lambda m, p: io.save(m, p, input_shapes=shapes, allow=allow),
            teacher=teacher_module, distill=distill, temperature=temperature, checkpoint=checkpoint,
        )  # fmt: skip
    except FloatingPointError as e:
        raise TrainingError(f"training diverged: {e}; nothing was written") from None
    main = distributed.is_main()
    distributed.finish()  # every rank waits here until rank 0 has written the outputs
    if not main:
        return
    acc = history.final_val_accuracy
    split = dataset.val_name
    out.print(
        f"{name}, {optimizer}, {epochs} epoch{'' if epochs == 1 else 's'}: {split} accuracy {100 * acc:.2f}%" if acc is not None else f"no {split} accuracy",
        highlight=False,
    )
    for kind, path in history.meta.get("outputs", {}).items():
        out.print(f"{kind} written to {path}", highlight=False)
