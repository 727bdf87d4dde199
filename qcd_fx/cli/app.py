"""The Typer app, its consoles, and what every command shares: one-line errors, progress."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator
from typing import Annotated

import typer
from rich.console import Console

from ..errors import QcdFxError, allocation_size, first_line, out_of_memory

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="qcd-fx: trace PyTorch models with torch.fx, run passes (qci, csc, …), save and export them.",
)


def _console(stderr: bool = False) -> Console:
    """Rich wraps at 80 columns when the stream is no terminal (a pipe, a log): tables would cut
    pass names. There, lines keep their natural width (unless COLUMNS says otherwise)."""
    stream = sys.stderr if stderr else sys.stdout
    is_tty = hasattr(stream, "isatty") and stream.isatty()
    width = None if is_tty or os.environ.get("COLUMNS", "").isdigit() else 100_000
    return Console(stderr=stderr, width=width)


out = _console()
err = _console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        out.print(f"qcd-fx {__version__}", highlight=False, markup=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="print the version and exit", callback=_version, is_eager=True)] = False,
) -> None:
    """qcd-fx: trace PyTorch models with torch.fx, run passes (qci, csc, …), save and export them."""


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
            if out_of_memory(e):
                _fail(f"not enough memory{allocation_size(e)}: {first_line(e)}", 1)
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
