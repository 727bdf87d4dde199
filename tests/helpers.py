"""Helpers shared by the CLI tests (``from helpers import run, one_line_error``)."""

import os

from typer.testing import CliRunner

from qcd_fx.cli import app

runner = CliRunner()


def run(*args):
    """Invoke ``qcd-fx ARGS`` in-process; exceptions the CLI does not handle propagate."""
    return runner.invoke(app, list(args), catch_exceptions=False)


def one_line_error(result, code, *fragments):
    """The command failed with exit ``code`` and exactly one ``error:`` line holding ``fragments``."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def leftovers(directory) -> list[str]:
    """Temporary files an atomic write would leave behind on failure."""
    return [f for f in os.listdir(directory) if f.startswith(".")]
