"""``qcd-fx export`` and ``qcd-fx run``: ONNX export verified against onnxruntime, and latency.

Registered on :data:`qcd_fx.cli.app` when this module is imported (``qcd_fx.cli`` imports it;
it never imports the package back). Like every qcd-fx command: one line on stderr and a non-zero exit for every bad
input, ``--debug`` for the traceback, outputs written atomically (a failed export leaves no
file).
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Optional

import typer

from .app import app, friendly, out, progress
from .common import example_inputs, parse_shape, resolve_model
from .options import AllowOpt, DebugOpt, InputShapeOpt, ModelArg, TrustOpt, WeightsOpt
from ..errors import InputShapeError, ModelLoadError, UsageError, first_line

LeafOpt = Annotated[list[str], typer.Option("--leaf", help="keep this module (path, glob or class name) opaque when tracing")]
ForceOpt = Annotated[bool, typer.Option("--force", help="overwrite existing output files")]


def check_onnx_output(path: str, inputs: list[str], force: bool) -> str:
    """Validate an ONNX output path before any work (for ``export`` and ``transform --onnx``)."""
    from .. import io

    if not path.endswith(".onnx"):
        raise UsageError(f"ONNX output {path!r} must end in .onnx")
    io.check_output_path(path, inputs=inputs, force=force, what="ONNX output")
    if os.path.exists(path + ".data") and not force:
        raise UsageError(f"{path + '.data'!r} exists (external weights of an earlier export); pass --force to overwrite it or choose another path")
    return path


def export_after_transform(gm, inputs: tuple, path: str, *, opset: int | None = None, check: bool = True, dynamic_batch: bool = True, dry_run: bool = False, console=None):
    """Export a transformed GraphModule to ``path`` (verified unless ``check=False``) and print
    one line about it; with ``dry_run`` export and verify but write nothing. Returns the
    :class:`~qcd_fx.export.ExportReport`. For ``qcd-fx transform --onnx OUT.onnx``."""
    from ..export import export_onnx

    console = console or out
    report = export_onnx(gm, inputs, None if dry_run else path, dynamic_batch=dynamic_batch, opset=opset, check=check)
    if dry_run:
        console.print(f"ONNX export verified, not written (dry run): {report.summary()}", highlight=False, markup=False, soft_wrap=True)
    else:
        console.print(f"ONNX model written to {path}: {report.summary()}", highlight=False, markup=False, soft_wrap=True)
    return report


def _graph_module(module, leaf: list[str]):
    import torch

    from ..tracing import trace

    if isinstance(module, torch.fx.GraphModule):
        return module
    return trace(module, leaf)


@app.command("export")
@friendly
def export_command(
    model: ModelArg = None,
    output: Annotated[Optional[str], typer.Argument(help="the .onnx file to write", show_default=False)] = None,
    input_shape: InputShapeOpt = [],  # noqa: B006 - typer needs a literal default
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
    from .. import io
    from ..export import export_onnx

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
    with progress() as step:
        step("loading model")
        module, name, default_shape, _ = resolve_model(model, example, weights, trust_pickle, allow)
        gm = _graph_module(module, leaf)
        inputs = example_inputs(input_shape, default_shape, name)
        step("exporting to ONNX" + ("" if no_check else " and checking with onnxruntime"))
        result = export_onnx(gm, inputs, output, dynamic_batch=not static_batch, opset=opset, check=not no_check)
    out.print(f"ONNX model written to {output}: {result.summary()}", highlight=False, markup=False, soft_wrap=True)
    if report:
        with io.atomic_path(report) as tmp, open(tmp, "w") as f:
            f.write(result.to_json())
        out.print(f"report written to {report}", highlight=False, markup=False, soft_wrap=True)


_NUMPY_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(bool)": "bool",
}


def _run_inputs(session, shapes: list[str], default: Any, path: str) -> list:
    """Inputs for every ONNX input: floats ~ N(0, 1) (same generator as `transform`), integers
    and booleans zero (valid indices and masks)."""
    import torch

    metas = session.get_inputs()
    if shapes:
        if len(shapes) != len(metas):
            names = ", ".join(m.name for m in metas)
            raise UsageError(f"{path!r} takes {len(metas)} input(s) ({names}); got {len(shapes)} --input-shape")
        parsed = [parse_shape(s) for s in shapes]
    elif default and len(default) == len(metas):
        parsed = [tuple(s) for s in default]
    else:
        parsed = []
        for m in metas:
            dims = list(m.shape)
            free = [str(d) for d in dims[1:] if not isinstance(d, int)]
            if free:
                raise UsageError(f"--input-shape is required: input '{m.name}' of {path!r} has symbolic axes {free}")
            parsed.append(tuple([1 if not isinstance(dims[0], int) else dims[0]] + dims[1:]) if dims else ())
    gen = torch.Generator().manual_seed(0)
    tensors = []
    for m, shape in zip(metas, parsed):
        expected = list(m.shape)
        if len(expected) != len(shape) or any(isinstance(e, int) and e != s for e, s in zip(expected, shape)):
            want = "x".join(str(e) if isinstance(e, int) else str(e) for e in expected)
            raise InputShapeError(f"input '{m.name}' of {path!r} has shape {want}; got {'x'.join(map(str, shape))}")
        dtype = _NUMPY_TYPES.get(m.type)
        if dtype is None:
            raise UsageError(f"input '{m.name}' of {path!r} has type {m.type}, which `qcd-fx run` cannot generate")
        if dtype.startswith("float"):
            tensors.append(torch.randn(shape, generator=gen).to(getattr(torch, dtype)))
        else:
            tensors.append(torch.zeros(shape, dtype=getattr(torch, dtype)))
    return tensors


@app.command("run")
@friendly
def run_command(
    onnx_file: Annotated[Optional[str], typer.Argument(help="the .onnx file to run", show_default=False)] = None,
    input_shape: InputShapeOpt = [],  # noqa: B006
    model: Annotated[Optional[str], typer.Option("--model", help="also time this MODEL (qcd-fx GraphModule file or any MODEL) in PyTorch eager and compare outputs")] = None,
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
    import torch

    from ..export import compare_outputs, interleaved_latency, onnxruntime_session, output_names

    if not onnx_file:
        raise UsageError("missing ONNX file (qcd-fx run OUT.onnx)")
    if repeats < 1 or warmup < 0 or threads < 1:
        raise UsageError("--repeats and --threads must be >= 1, --warmup >= 0")
    if not os.path.exists(onnx_file):
        raise ModelLoadError(f"ONNX file {onnx_file!r} does not exist")
    if os.path.isdir(onnx_file):
        raise ModelLoadError(f"{onnx_file!r} is a directory, not an ONNX file")
    try:
        session = onnxruntime_session(onnx_file, threads=threads)
    except Exception as e:
        raise ModelLoadError(f"onnxruntime cannot load {onnx_file!r}: {first_line(e)}") from None
    gm = default_shape = None
    if model:
        module, name, default_shape, _ = resolve_model(model, False, weights, trust_pickle, allow)
        gm = _graph_module(module, leaf).eval()
    inputs = _run_inputs(session, input_shape, default_shape, onnx_file)
    feed = {m.name: t.numpy() for m, t in zip(session.get_inputs(), inputs)}
    try:
        got = session.run(None, feed)
    except Exception as e:
        raise InputShapeError(f"onnxruntime fails to run {onnx_file!r} on inputs {', '.join('x'.join(map(str, t.shape)) for t in inputs)}: {first_line(e)}") from None

    fns = {"onnxruntime": lambda: session.run(None, feed)}
    parity = None
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if gm is not None:
            with torch.no_grad():
                try:
                    expected = gm(*inputs)
                except Exception as e:
                    raise InputShapeError(f"{model} fails on the inputs {', '.join('x'.join(map(str, t.shape)) for t in inputs)}: {first_line(e)}") from None
                leaves = [t for t in torch.utils._pytree.tree_flatten(expected)[0] if isinstance(t, torch.Tensor)]
                if len(leaves) != len(got):
                    raise UsageError(f"{model} returns {len(leaves)} tensors but {onnx_file!r} {len(got)}; is it the model the file was exported from?")
                parity = compare_outputs(got, leaves, output_names(expected), 1e-4, 1e-5, None)

                def eager():
                    with torch.no_grad():
                        gm(*inputs)

                fns["pytorch"] = eager
        latency = interleaved_latency(fns, repeats=repeats, warmup=warmup)
    finally:
        torch.set_num_threads(previous_threads)

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
