"""``qcd-fx export`` and ``qcd-fx run``: ONNX export verified against onnxruntime, and latency.

Registered on :data:`qcd_fx.cli.app` when this module is imported (``qcd_fx.cli`` imports it;
it never imports the package back). Like every qcd-fx command: one line on stderr and a non-zero exit for every bad
input, ``--debug`` for the traceback, outputs written atomically (a failed export leaves no
file).
"""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from ..errors import UsageError
from .app import app, friendly, out, progress
from .common import example_inputs, parse_shape, resolve_model
from .options import AllowOpt, CaptureOpt, DebugOpt, DtypeOpt, InputShapeOpt, ModelArg, TrustOpt, WeightsOpt

LeafOpt = Annotated[list[str], typer.Option("--leaf", help="keep this module (path, glob or class name) opaque when tracing")]
ForceOpt = Annotated[bool, typer.Option("--force", help="overwrite existing output files")]


def check_onnx_output(path: str, inputs: list[str], force: bool) -> str:
    """Validate an ONNX output path before any work (for ``export`` and ``transform --onnx``)."""
    from .. import io
    from ..errors import require
    from ..export.core import ONNX_MODULES

    if not path.endswith(".onnx"):
        raise UsageError(f"ONNX output {path!r} must end in .onnx")
    require(ONNX_MODULES, "onnx", "ONNX export")
    io.check_output_path(path, inputs=inputs, force=force, what="ONNX output")
    if os.path.exists(path + ".data") and not force:
        raise UsageError(f"{path + '.data'!r} exists (external weights of an earlier export); pass --force to overwrite it or choose another path")
    return path


def export_after_transform(
    gm,
    inputs: tuple,
    path: str,
    *,
    opset: int | None = None,
    check: bool = True,
    dynamic_batch: bool = True,
    dry_run: bool = False,
    console=None,
    verbose: bool = False,
):
    """Export a transformed GraphModule to ``path`` (verified unless ``check=False``) and print
    one line about it; with ``dry_run`` export and verify but write nothing. Returns the
    :class:`~qcd_fx.export.ExportReport`. For ``qcd-fx transform --onnx OUT.onnx``."""
    from ..export import export_onnx

    console = console or out
    report = export_onnx(gm, inputs, None if dry_run else path, dynamic_batch=dynamic_batch, opset=opset, check=check, verbose=verbose)
    if dry_run:
        console.print(f"ONNX export verified, not written (dry run): {report.summary()}", highlight=False, markup=False, soft_wrap=True)
    else:
        console.print(f"ONNX model written to {path}: {report.summary()}", highlight=False, markup=False, soft_wrap=True)
    return report


def _graph_module(module, leaf: list[str], inputs=None, capture: str = "auto"):
    import torch

    from ..tracing import trace

    if isinstance(module, torch.fx.GraphModule):
        return module
    return trace(module, inputs, leaf, capture=capture)


@app.command("export")
@friendly
def export_command(
    model: ModelArg = None,
    output: Annotated[Optional[str], typer.Argument(help="the .onnx file to write", show_default=False)] = None,
    input_shape: InputShapeOpt = [],  # noqa: B006 - typer needs a literal default
    dtype: DtypeOpt = None,
    capture: CaptureOpt = "auto",
    opset: Annotated[Optional[int], typer.Option("--opset", help="ONNX opset (default: the exporter's, 20)")] = None,
    no_check: Annotated[bool, typer.Option("--no-check", help="skip onnx.checker and the onnxruntime-vs-PyTorch comparison")] = False,
    static_batch: Annotated[bool, typer.Option("--static-batch", help="keep the batch axis fixed at the example's size")] = False,
    report: Annotated[Optional[str], typer.Option("--report", help="write the export report as JSON here")] = None,
    example: Annotated[bool, typer.Option("--example", help="use the bundled digits CNN (input 1,1,8,8)")] = False,
    leaf: LeafOpt = [],  # noqa: B006
    weights: WeightsOpt = None,
    trust_pickle: TrustOpt = False,
    allow: AllowOpt = [],  # noqa: B006
    force: ForceOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Export MODEL (a qcd-fx GraphModule file or any MODEL `transform` takes) to ONNX, verified against onnxruntime."""
    import torch

    from .. import io
    from ..capture import check_capture
    from ..export import export_onnx

    check_capture(capture)
    if example and model and output is None:  # `export --example OUT.onnx`: the one argument is the output
        model, output = None, model
    if not output:
        raise UsageError("missing OUT.onnx (qcd-fx export MODEL OUT.onnx)")
    sources = [model] if model and os.path.exists(model) else []
    if weights:
        sources.append(weights)
    check_onnx_output(output, sources, force)
    if report:
        io.check_output_path(report, inputs=sources + [output], force=force, what="report")
    with io.OutputFiles() as files:
        report_tmp = files.reserve(report, "report") if report else None
        with progress() as step:
            step("loading model")
            module, name, default_shape, _ = resolve_model(model, example, weights, trust_pickle, allow)
            inputs = example_inputs(input_shape, default_shape, name, dtype, module)
            if not isinstance(module, torch.fx.GraphModule):
                module.eval()
            gm = _graph_module(module, leaf, inputs, capture)
            step("exporting to ONNX" + ("" if no_check else " and checking with onnxruntime"))
            result = export_onnx(gm, inputs, output, dynamic_batch=not static_batch, opset=opset, check=not no_check, verbose=debug)
        if report_tmp:
            with open(report_tmp, "w") as f:
                f.write(result.to_json())
        files.commit()
    out.print(f"ONNX model written to {output}: {result.summary()}", highlight=False, markup=False, soft_wrap=True)
    if report:
        out.print(f"report written to {report}", highlight=False, markup=False, soft_wrap=True)


@app.command("run")
@friendly
def run_command(
    onnx_file: Annotated[Optional[str], typer.Argument(help="the .onnx file to run", show_default=False)] = None,
    input_shape: InputShapeOpt = [],  # noqa: B006
    model: Annotated[
        Optional[str], typer.Option("--model", help="also time this MODEL (qcd-fx GraphModule file or any MODEL) in PyTorch eager and compare outputs")
    ] = None,
    repeats: Annotated[int, typer.Option("--repeats", help="timed runs of each runtime (median reported)")] = 20,
    warmup: Annotated[int, typer.Option("--warmup", help="untimed runs first")] = 3,
    threads: Annotated[int, typer.Option("--threads", help="intra-op threads, the same for onnxruntime and PyTorch")] = 1,
    leaf: LeafOpt = [],  # noqa: B006
    weights: WeightsOpt = None,
    trust_pickle: TrustOpt = False,
    allow: AllowOpt = [],  # noqa: B006
    debug: DebugOpt = False,
) -> None:
    """Run an ONNX file in onnxruntime and print its median latency (next to PyTorch eager with --model)."""
    from ..export.run import run_onnx

    if not onnx_file:
        raise UsageError("missing ONNX file (qcd-fx run OUT.onnx)")
    from ..errors import require

    require(("onnx", "onnxruntime"), "onnx", "qcd-fx run")
    gm = default_shape = None
    name = "the model"
    if model:
        module, name, default_shape, _ = resolve_model(model, False, weights, trust_pickle, allow)
        gm = _graph_module(module, leaf).eval()
    result = run_onnx(
        onnx_file, [parse_shape(s) for s in input_shape], module=gm, module_name=name, default_shapes=default_shape,
        repeats=repeats, warmup=warmup, threads=threads,
    )  # fmt: skip
    inputs, latency, parity = result.inputs, result.latency, result.parity
    shapes = ", ".join("x".join(map(str, t.shape)) for t in inputs)
    plural = "thread" if threads == 1 else "threads"
    out.print(f"{onnx_file}: inputs {shapes}; median of {repeats} runs, {threads} {plural}", highlight=False, markup=False, soft_wrap=True)
    out.print(f"  onnxruntime (CPU)  {latency['onnxruntime'] * 1e3:10.3f} ms", highlight=False, markup=False, soft_wrap=True)
    if "pytorch" in latency:
        ratio = latency["onnxruntime"] / latency["pytorch"]
        out.print(f"  PyTorch eager      {latency['pytorch'] * 1e3:10.3f} ms", highlight=False, markup=False, soft_wrap=True)
        out.print(f"  onnxruntime/eager  {ratio:10.3f}", highlight=False, markup=False, soft_wrap=True)
        verdict = "match" if parity.ok else "DIFFER"
        out.print(f"  outputs {verdict}: max abs diff {parity.max_abs:.3g}, max rel {parity.max_rel:.3g}", highlight=False, markup=False, soft_wrap=True)


__all__ = ["check_onnx_output", "export_after_transform", "export_command", "run_command"]
