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


def start_workers(script, world: int, *args: str) -> list:
    """``script`` in ``world`` processes on loopback (``env://`` rendezvous on a free port, gloo, one
    thread each), stdout/stderr piped; with ``world == 1`` no process-group variables at all, so
    the worker runs as a plain single process."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    procs = []
    for r in range(world):
        env = {**base, "OMP_NUM_THREADS": "1"}
        if world > 1:
            env.update(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(script), *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def wait_workers(procs: list, timeout: float = 600) -> None:
    """Wait for every worker; on a failure or the timeout, kill the rest and fail with the stderr."""
    import subprocess

    try:
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, err[-3000:]
    except subprocess.TimeoutExpired:
        raise AssertionError(f"a worker did not finish within {timeout:g} s") from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
