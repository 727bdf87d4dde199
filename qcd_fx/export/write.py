"""Writing the file atomically: in a thread while the checks run, or with external weights."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator

from ..errors import ExportError

_PROTO_LIMIT = 1_800_000_000  # protobuf's hard limit is 2 GiB for the whole model; weights above this go to a .data file


def _directory(path) -> str | None:
    return os.path.dirname(os.path.abspath(os.fspath(path))) if path is not None else None


def _initializer_bytes(program) -> int:
    total = 0
    for value in program.model.graph.initializers.values():
        const = value.const_value
        if const is not None:
            total += getattr(const, "nbytes", 0) or 0
    return total


class _Writer:
    """Write ``data`` to ``path`` in a background thread; :meth:`join` waits and re-raises."""

    def __init__(self, path: str, data: bytes, timings: dict[str, float]):
        self.error: BaseException | None = None
        self.timings = timings
        self.thread = threading.Thread(target=self._run, args=(path, data), name="qcd_fx-onnx-write", daemon=True)
        self.thread.start()

    def _run(self, path: str, data: bytes) -> None:
        t0 = time.perf_counter()
        try:
            with open(path, "wb") as f:
                f.write(data)
        except BaseException as e:  # re-raised in join()
            self.error = e
        self.seconds = time.perf_counter() - t0

    def join(self) -> None:
        t0 = time.perf_counter()
        self.thread.join()
        self.timings["write"] = getattr(self, "seconds", 0.0)
        self.timings["write_wait"] = time.perf_counter() - t0
        if self.error is not None:
            raise ExportError(f"writing the ONNX file failed: {self.error}") from self.error


@contextlib.contextmanager
def _atomic_with_data(path) -> Iterator[str]:
    """Like :func:`qcd_fx.io.atomic_path` for a model with external weights: yields a path in a
    temporary directory beside ``path`` whose weights file is named ``basename(path) + ".data"``
    (the name the .onnx refers to); on success moves the weights, then the .onnx, into place."""
    path = os.fspath(path)
    tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(os.path.abspath(path)))
    tmp = os.path.join(tmp_dir, os.path.basename(path))
    try:
        yield tmp
        os.replace(tmp + ".data", path + ".data")
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


@contextlib.contextmanager
def _scratch_with_data() -> Iterator[str]:
    """A throw-away location for a model with external weights (dry runs)."""
    with tempfile.TemporaryDirectory(prefix="qcd_fx_onnx.") as tmp_dir:
        yield os.path.join(tmp_dir, "model.onnx")
