"""``qcd-fx transform`` and ``qcd-fx passes``."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from ..errors import UsageError
from .app import app, friendly, out, progress
from .common import calibration_batches, example_inputs, resolve_model
from .options import AllowOpt, CaptureOpt, DebugOpt, DtypeOpt, InputShapeOpt, ModelArg, TrustOpt, WeightsOpt

DEFAULT_PASSES = "qci,csc"


@app.command()
@friendly
def transform(
    model: ModelArg = None,
    output: Annotated[Optional[str], typer.Option("-o", "--output", help="where to save the transformed model: .pt (qcd-fx GraphModule) or .pt2 (torch.export program plain PyTorch loads)")] = None,
    passes: Annotated[str, typer.Option("--passes", "-p", help="pipeline spec, e.g. 'qci{min_width=64},csc{target=activations}'")] = DEFAULT_PASSES,
    input_shape: InputShapeOpt = [],  # noqa: B006 - typer needs a literal default
    dtype: DtypeOpt = None,
    capture: CaptureOpt = "auto",
    report: Annotated[Optional[str], typer.Option("--report", help="write the report as JSON here")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="run and verify everything, write nothing")] = False,
    example: Annotated[bool, typer.Option("--example", help="use the bundled digits CNN (input 1,1,8,8)")] = False,
    leaf: Annotated[list[str], typer.Option("--leaf", help="keep this module (path, glob or class name) opaque when tracing")] = [],  # noqa: B006
    weights: WeightsOpt = None,
    trust_pickle: TrustOpt = False,
    allow: AllowOpt = [],  # noqa: B006
    force: Annotated[bool, typer.Option("--force", help="overwrite existing output files")] = False,
    pickle_ok: Annotated[bool, typer.Option("--pickle", help="save a pickled GraphModule when the safe format cannot hold it")] = False,
    train_mode: Annotated[bool, typer.Option("--train-mode", help="trace in training mode (default: eval mode)")] = False,
    calib: Annotated[int, typer.Option("--calib", help="calibration batches for data-driven passes (cdg-prune)", min=1)] = 1,
    data: Annotated[Optional[str], typer.Option("--data", help="calibration data: digits, imagefolder:DIR, tensors:FILE or module:factory (see qcd-fx train --help); default: random inputs")] = None,
    onnx_out: Annotated[Optional[str], typer.Option("--onnx", help="also export the result to this .onnx file, verified against onnxruntime")] = None,
    debug: DebugOpt = False,
) -> None:
    """Trace MODEL, run the pass pipeline, verify after every pass, print the report, save the result."""
    from .. import io
    from ..capture import check_capture
    from ..inputs import parse_dtype
    from ..passes import Pipeline

    pipeline = Pipeline.parse(passes)  # spec errors before any slow work
    check_capture(capture)
    parse_dtype(dtype)
    inputs_src = [model] if model and os.path.exists(model) else []
    if weights:
        inputs_src.append(weights)
    if output:
        if not output.endswith((".pt", ".pt2")):
            raise UsageError(f"output {output!r} must end in .pt (qcd-fx GraphModule) or .pt2 (torch.export program)")
        io.check_output_path(output, inputs=inputs_src, force=force)
    if report:
        io.check_output_path(report, inputs=inputs_src + ([output] if output else []), force=force, what="report")
    if onnx_out:
        from .export import check_onnx_output

        check_onnx_output(onnx_out, inputs_src + [p for p in (output, report) if p], force)
    with io.OutputFiles() as files:
        # every output's temporary file exists before the work: an unwritable location fails now
        model_tmp = files.reserve(output, "output") if output and not dry_run else None
        report_tmp = files.reserve(report, "report") if report and not dry_run else None
        with progress() as step:
            step("loading model")
            module, name, default_shape, _ = resolve_model(model, example, weights, trust_pickle, allow)
            if not train_mode:
                module.eval()
            inputs = example_inputs(input_shape, default_shape, name, dtype, module)
            dataset = None
            if data is not None:
                from ..datasets import load_data

                step("loading calibration data")
                dataset = load_data(data)
            calibration = calibration_batches(inputs, calib, dataset)
            result = pipeline.run(module, inputs, leaf_modules=leaf, calibration=calibration, on_step=step, capture=capture)
        result.report.model = name
        result.report.print(out)
        kind = None
        if report_tmp:
            with open(report_tmp, "w") as f:
                f.write(result.report.to_json())
        if model_tmp:
            shapes = [list(t.shape) for t in inputs]
            kind = io.save(result.graph_module, model_tmp, allow_pickle=pickle_ok, input_shapes=shapes, allow=allow)
        if onnx_out:  # last: the file is renamed into place only once verified; then the others
            from .export import export_after_transform

            export_after_transform(result.graph_module, inputs, onnx_out, dry_run=dry_run, verbose=debug)
        files.commit()
    if dry_run:
        out.print("dry run: nothing written")
        return
    if report:
        out.print(f"report written to {report}", highlight=False, markup=False, soft_wrap=True)
    if output:
        note = {"safe": "", "pt2": " (torch.export program: torch.export.load(path).module() runs it)"}.get(kind, " (pickled: loading it needs --trust-pickle)")
        out.print(f"transformed model written to {output}{note}", highlight=False, markup=False, soft_wrap=True)
    elif not report and not onnx_out:
        out.print("nothing written; add -o OUT.pt to save the transformed model, --report FILE.json for the report")


@app.command("passes")
@friendly
def list_passes(debug: DebugOpt = False) -> None:
    """List the available passes and their options (the words of a --passes spec)."""
    from rich.markup import escape
    from rich.table import Table

    from ..passes import option_help, registry

    for name, cls in registry().items():
        table = Table(title=escape(f"{name} — {cls.summary}"), title_justify="left", show_edge=False)
        for col in ("option", "type", "default", "meaning"):
            table.add_column(col)
        for row in option_help(cls):
            table.add_row(*(escape(cell) for cell in row))
        out.print(table)
        out.print()
    out.print("spec example: qci{min_width=64,rank=8},csc{target=activations,hard=true}", highlight=False, markup=False)
