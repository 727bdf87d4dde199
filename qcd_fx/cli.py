"""The ``qcd-fx`` command line: a thin Typer layer over the public API.

Every expected failure prints one line (``error: ...``) and exits non-zero; ``--debug`` shows
the traceback instead. Outputs are validated before any work and written atomically.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator
from typing import Annotated, Optional

import typer
from rich.console import Console

from .errors import QcdFxError, UsageError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="qcd-fx: trace PyTorch models with torch.fx, run passes (qci, csc, …), save and export them.",
)
out = Console()
err = Console(stderr=True)

DEFAULT_PASSES = "qci,csc"


def _fail(message: str, code: int) -> None:
    err.print("error: " + message, style="red", highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(code)


def friendly(fn: Callable) -> Callable:
    """Turn :class:`QcdFxError` (and unexpected errors) into one line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except QcdFxError as e:
            if debug:
                raise
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted; nothing was written", 130)
        except Exception as e:
            if debug:
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            _fail(f"internal error: {type(e).__name__}: {first} (rerun with --debug for the traceback)", 1)

    return wrapper


@contextlib.contextmanager
def progress(enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """A transient Rich spinner on stderr; yields ``step(description)``."""
    if not enabled or not err.is_terminal:
        yield lambda _msg: None
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task("starting", total=None)
        yield lambda msg: bar.update(task, description=msg)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` -> ``(1, 3, 224, 224)``; one-line error otherwise."""
    parts = [p.strip() for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise UsageError(f"--input-shape {text!r} is not a comma-separated list of integers (e.g. 1,3,224,224)") from None
    if not shape or any(s < 1 for s in shape):
        raise UsageError(f"--input-shape {text!r} must list positive sizes (e.g. 1,3,224,224)")
    return shape


def resolve_model(model: str | None, example: bool, weights: str | None, trust_pickle: bool, allow: list[str]):
    """(module, display name, default input shapes or None, source file or None)."""
    from .io import load_model

    if example:
        if model:
            raise UsageError("give either MODEL or --example, not both")
        from .examples import DIGITS_INPUT_SHAPE, digits_cnn

        import torch

        torch.manual_seed(0)
        return digits_cnn(), "example:digits_cnn", [DIGITS_INPUT_SHAPE], None
    if not model:
        raise UsageError("missing MODEL (torchvision:NAME, package.module:factory or FILE.pt); or use --example")
    from .io import INPUT_SHAPES_KEY

    module = load_model(model, weights=weights, trust_pickle=trust_pickle, allow=allow)
    default_shape = getattr(module, "meta", {}).get(INPUT_SHAPES_KEY)
    if model.startswith("torchvision:"):
        from .zoo import input_size

        size = input_size(model.split(":", 1)[1])
        default_shape = [(1, 3, size, size)]
    source_file = model if os.path.exists(model) else None
    return module, model, default_shape, source_file


def example_inputs(shapes: list[str], default: list[tuple[int, ...]] | None, name: str):
    import torch

    if shapes:
        parsed = [parse_shape(s) for s in shapes]
    elif default:
        parsed = [tuple(s) for s in default]
    else:
        raise UsageError(f"--input-shape is required for {name} (e.g. --input-shape 1,3,224,224)")
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(s, generator=gen) for s in parsed)


def calibration_batches(inputs: tuple, count: int, data: str | None) -> list[tuple]:
    """``count`` calibration batches shaped like ``inputs``: random (seeded) or from a data set."""
    import torch

    if data is None:
        gen = torch.Generator().manual_seed(1)
        return [inputs] + [tuple(torch.randn(t.shape, generator=gen) for t in inputs) for _ in range(count - 1)]
    if data != "digits":
        raise UsageError(f"--data {data!r} is not a known data set; known: digits")
    if len(inputs) != 1 or tuple(inputs[0].shape[1:]) not in ((1, 8, 8), (64,)):
        raise UsageError(f"--data digits gives 1x8x8 images (or 64 features), but the model takes {_shapes(inputs)}")
    from .data import load_digits_split

    x = load_digits_split().x_train.reshape((-1, *inputs[0].shape[1:]))
    size = max(inputs[0].shape[0], 32)
    return [(x[i * size : (i + 1) * size],) for i in range(min(count, len(x) // size))]


def _shapes(inputs: tuple) -> str:
    return ", ".join("x".join(map(str, t.shape)) for t in inputs)


ModelArg = Annotated[Optional[str], typer.Argument(help="torchvision:NAME, package.module:factory, or FILE.pt", show_default=False)]
InputShapeOpt = Annotated[list[str], typer.Option("--input-shape", "-s", help="example input shape, e.g. 1,3,224,224 (repeat for several inputs)")]
WeightsOpt = Annotated[Optional[str], typer.Option("--weights", help="state dict (.safetensors, or .pt read with weights_only=True) for a factory/torchvision model")]
TrustOpt = Annotated[bool, typer.Option("--trust-pickle", help="allow loading a pickled nn.Module (runs code from the file)")]
AllowOpt = Annotated[list[str], typer.Option("--allow", help="trust package PKG in saved GraphModules: its nn.Module classes (run with the file's attributes), any of its modules imported, its torch.fx.wrap leaf functions called")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="show tracebacks instead of one-line errors")]


@app.command()
@friendly
def transform(
    model: ModelArg = None,
    output: Annotated[Optional[str], typer.Option("-o", "--output", help="where to save the transformed GraphModule (.pt)")] = None,
    passes: Annotated[str, typer.Option("--passes", "-p", help="pipeline spec, e.g. 'qci{min_width=64},csc{target=activations}'")] = DEFAULT_PASSES,
    input_shape: InputShapeOpt = [],  # noqa: B006 - typer needs a literal default
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
    data: Annotated[Optional[str], typer.Option("--data", help="calibration data: 'digits' (scikit-learn's digits images); default: random inputs")] = None,
    onnx_out: Annotated[Optional[str], typer.Option("--onnx", help="also export the result to this .onnx file, verified against onnxruntime")] = None,
    debug: DebugOpt = False,
) -> None:
    """Trace MODEL, run the pass pipeline, verify after every pass, print the report, save the result."""
    from . import io
    from .passes import Pipeline

    pipeline = Pipeline.parse(passes)  # spec errors before any slow work
    inputs_src = [model] if model and os.path.exists(model) else []
    if weights:
        inputs_src.append(weights)
    if output:
        if not output.endswith(".pt"):
            raise UsageError(f"output {output!r} must end in .pt")
        io.check_output_path(output, inputs=inputs_src, force=force)
    if report:
        io.check_output_path(report, inputs=inputs_src + ([output] if output else []), force=force, what="report")
    if onnx_out:
        from .cli_onnx import check_onnx_output

        check_onnx_output(onnx_out, inputs_src + [p for p in (output, report) if p], force)
    with progress() as step:
        step("loading model")
        module, name, default_shape, _ = resolve_model(model, example, weights, trust_pickle, allow)
        if not train_mode:
            module.eval()
        inputs = example_inputs(input_shape, default_shape, name)
        calibration = calibration_batches(inputs, calib, data)
        result = pipeline.run(module, inputs, leaf_modules=leaf, calibration=calibration, on_step=step)
    result.report.model = name
    result.report.print(out)
    if onnx_out:
        from .cli_onnx import export_after_transform

        export_after_transform(result.graph_module, inputs, onnx_out, dry_run=dry_run)
    if dry_run:
        out.print("dry run: nothing written")
        return
    if report:
        with io.atomic_path(report) as tmp, open(tmp, "w") as f:
            f.write(result.report.to_json())
        out.print(f"report written to {report}")
    if output:
        shapes = [list(t.shape) for t in inputs]
        kind = io.save(result.graph_module, output, allow_pickle=pickle_ok, input_shapes=shapes, allow=allow)
        note = "" if kind == "safe" else " (pickled: loading it needs --trust-pickle)"
        out.print(f"transformed model written to {output}{note}")
    elif not report and not onnx_out:
        out.print("nothing written; add -o OUT.pt to save the transformed model, --report FILE.json for the report")


@app.command("passes")
@friendly
def list_passes(debug: DebugOpt = False) -> None:
    """List the available passes and their options (the words of a --passes spec)."""
    from rich.markup import escape
    from rich.table import Table

    from .passes import option_help, registry

    for name, cls in registry().items():
        table = Table(title=escape(f"{name} — {cls.summary}"), title_justify="left", show_edge=False)
        for col in ("option", "type", "default", "meaning"):
            table.add_column(col)
        for row in option_help(cls):
            table.add_row(*(escape(cell) for cell in row))
        out.print(table)
        out.print()
    out.print("spec example: qci{min_width=64,rank=8},csc{target=activations,hard=true}", highlight=False, markup=False)


def main() -> int:
    """Console-script entry point. Click's usage errors (unknown option, missing value, …) become
    one ``error:`` line naming the command's ``--help``, like every other qcd-fx failure."""
    # Click's exception base, whether typer vendors click or depends on it
    click_exception = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    try:
        rv = app(prog_name="qcd-fx", standalone_mode=False)
    except click_exception as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `qcd-fx` alone: the help was printed
            return 0
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        message = " ".join(e.format_message().split())
        err.print(f"error: {message}{hint}", style="red", highlight=False, markup=False, soft_wrap=True)
        return e.exit_code
    except typer.Abort:
        err.print("error: aborted", style="red", highlight=False, markup=False)
        return 1
    return rv if isinstance(rv, int) else 0


# the other commands register themselves on ``app`` when imported
from . import cli_onnx, cli_optimize, cli_train  # noqa: E402,F401

if __name__ == "__main__":  # pragma: no cover - `python -m qcd_fx.cli`: run the package's app
    from qcd_fx.cli import main as package_main

    sys.exit(package_main())
