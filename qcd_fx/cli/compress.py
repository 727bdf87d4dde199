"""``qcd-fx compress``: prune to a MACs target, fine-tune with distillation from the original on
the user's data, export to ONNX with parity, and print what it bought."""

from __future__ import annotations

import json
import math
from typing import Annotated, Optional

import typer

from ..errors import UsageError
from .app import app, friendly, out, progress
from .common import resolve_model
from .options import AllowOpt, DebugOpt, ModelArg, TrustOpt, WeightsOpt

EXAMPLE_EPOCHS = 5


@app.command("compress")
@friendly
def compress_command(
    model: ModelArg = None,
    data: Annotated[str, typer.Option("--data", help="digits, imagefolder:DIR, tensors:FILE or module:factory (see qcd-fx train --help)")] = "digits",
    target_macs: Annotated[float, typer.Option("--target-macs", help="keep this fraction of the MACs (e.g. 0.5)")] = 0.5,
    target_latency: Annotated[
        Optional[float], typer.Option("--target-latency", help="instead: keep this fraction of the latency predicted for this machine (cached layer table)")
    ] = None,
    steps: Annotated[int, typer.Option("--steps", help="prune in this many rounds, fine-tuning after each")] = 1,
    epochs: Annotated[int, typer.Option("--epochs", "-e", help="fine-tuning epochs after each round")] = 3,
    optimizer: Annotated[str, typer.Option("--optimizer", "-O", help="sgd, adam, cce, cce-seed or qimad")] = "adam",
    lr: Annotated[Optional[float], typer.Option("--lr", help="learning rate (default: the optimizer's)")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="mini-batch size")] = 64,
    distill: Annotated[float, typer.Option("--distill", help="weight of the original model's soft targets while fine-tuning")] = 0.5,
    temperature: Annotated[float, typer.Option("--temperature", help="distillation temperature")] = 2.0,
    image_size: Annotated[Optional[int], typer.Option("--image-size", help="imagefolder: side of the resized images (default 224)")] = None,
    val_split: Annotated[float, typer.Option("--val-split", help="validation fraction where the data has none")] = 0.2,
    seed: Annotated[int, typer.Option("--seed", help="seed of shuffling and optimizers")] = 0,
    output: Annotated[Optional[str], typer.Option("-o", "--output", help="write OUT.pt, OUT.onnx, OUT.report.json and OUT.curve.png")] = None,
    example: Annotated[bool, typer.Option("--example", help="the bundled digits CNN, trained 5 epochs on digits first")] = False,
    force: Annotated[bool, typer.Option("--force", help="overwrite existing output files")] = False,
    weights: WeightsOpt = None,
    trust_pickle: TrustOpt = False,
    allow: AllowOpt = [],  # noqa: B006 - typer needs a literal default
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no per-epoch lines")] = False,
    debug: DebugOpt = False,
) -> None:
    """Prune MODEL to --target-macs, fine-tune it on --data with distillation from the original,
    export it to ONNX (checked in onnxruntime) and print a before/after table."""
    import torch

    from .. import io
    from ..compress import compress, onnx_latency, plot_rounds
    from ..datasets import load_data
    from ..errors import require

    if not (math.isfinite(target_macs) and 0 < target_macs < 1):
        raise UsageError(f"--target-macs {target_macs} must be a fraction in (0, 1)")
    if target_latency is not None and not (math.isfinite(target_latency) and 0 < target_latency < 1):
        raise UsageError(f"--target-latency {target_latency} must be a fraction in (0, 1)")
    if steps < 1 or epochs < 0 or batch_size < 1:
        raise UsageError("--steps and --batch-size must be >= 1, --epochs >= 0")
    if not (0 <= distill <= 1) or not (math.isfinite(temperature) and temperature > 0):
        raise UsageError(f"--distill must be in [0, 1] and --temperature > 0, got {distill} and {temperature}")
    require(("onnx", "onnxruntime"), "onnx", "qcd-fx compress")
    paths = {}
    if output is not None:
        prefix = output[:-3] if output.endswith(".pt") else output
        paths = {"model": f"{prefix}.pt", "onnx": f"{prefix}.onnx", "report": f"{prefix}.report.json", "curve": f"{prefix}.curve.png"}
        sources = [p for p in (model, weights) if p]
        for what, p in paths.items():
            io.check_output_path(p, inputs=sources, force=force, what=what)
        require("matplotlib", "data", "the accuracy-against-MACs plot")
    with io.OutputFiles() as files:
        tmp = {k: files.reserve(p, k) for k, p in paths.items()}
        with progress(not quiet) as step:
            step("loading data")
            dataset = load_data(data, image_size=image_size, val_split=val_split, seed=seed)
            step("loading model")
            torch.manual_seed(seed)
            if example and data != "digits":
                raise UsageError("--example trains the digits CNN on --data digits")
            module, name, _, _ = resolve_model(model, example, weights, trust_pickle, allow)
            if example:  # the bundled CNN starts untrained: train it first, so there is accuracy to keep
                from ..train import fit, make_optimizer

                step(f"training the digits CNN ({EXAMPLE_EPOCHS} epochs) before compressing it")
                train_loader, val_loader = dataset.loaders(batch_size, seed=seed)
                fit(module, train_loader, make_optimizer("adam", module.parameters(), seed=seed), EXAMPLE_EPOCHS,
                    val_loader=val_loader, progress=not quiet, val_name=dataset.val_name)  # fmt: skip
            result = compress(
                module, dataset, target_macs=target_macs, target_latency=target_latency, steps=steps, epochs=epochs, optimizer=optimizer, lr=lr,
                batch_size=batch_size, distill=distill, temperature=temperature, seed=seed, progress=not quiet, on_step=step,
            )  # fmt: skip
            step("exporting to ONNX and checking it in onnxruntime")
            from ..export import export_onnx

            x1 = dataset.example(1)
            onnx_path = tmp.get("onnx")
            report = export_onnx(result.graph_module, (x1,), onnx_path)
            result.onnx = report.to_dict() if hasattr(report, "to_dict") else json.loads(report.to_json())
            if onnx_path:
                result.after.onnx_ms_batch1 = onnx_latency(onnx_path, x1)
        out.print(result.table())
        if not paths:
            out.print("nothing written; add -o OUT to save the model, its ONNX file, the report and the plot", highlight=False)
            return
        io.save(result.graph_module, tmp["model"], input_shapes=[list(x1.shape)], allow=allow)
        with open(tmp["report"], "w") as f:
            json.dump({"model": name, "data": data, **result.to_dict()}, f, indent=2)
        plot_rounds(result.rounds, tmp["curve"], title=f"{name} on {data}")
        files.commit()
    for kind, p in paths.items():
        out.print(f"{kind} written to {p}", highlight=False, markup=False, soft_wrap=True)


__all__ = ["compress_command"]
