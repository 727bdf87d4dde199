"""The two exporters: ``torch.onnx.export(dynamo=True)`` and, as a fallback, the TorchScript exporter."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator

import torch

from .rewrites import faithful_rewrites
from .signature import _batch_inputs, _second_batch


def _dynamic_shapes(inputs: tuple, dynamic_batch: bool) -> tuple | None:
    if not dynamic_batch:
        return None
    batch = torch.export.Dim("batch")
    return tuple({0: batch} if dyn else None for dyn in _batch_inputs(inputs))


def _capture_inputs(inputs: tuple, dynamic_batch: bool) -> tuple:
    """The inputs ``torch.export`` traces with. A batch of 1 is special to it (sizes 0 and 1 are
    specialised, so e.g. ConvNeXt's batch axis cannot be made dynamic from a batch-1 example);
    trace with a batch of 2 instead. Parity is still checked on the caller's inputs."""
    dyn = _batch_inputs(inputs)
    if not dynamic_batch or not any(dyn) or next(t.shape[0] for t, d in zip(inputs, dyn) if d) != 1:
        return inputs
    return _second_batch(inputs, dyn, 2, seed=2)


@contextlib.contextmanager
def _captured_output() -> Iterator[list[str]]:
    """Capture what native code writes to file descriptors 1 and 2 (the TorchScript exporter
    logs its whole IR graph there on failure); yields a list that receives the captured text."""
    captured: list[str] = []
    import sys

    saved = []
    try:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        with tempfile.TemporaryFile(mode="w+b") as tmp:
            for fd in (1, 2):
                try:
                    saved.append((fd, os.dup(fd)))
                    os.dup2(tmp.fileno(), fd)
                except OSError:  # no such descriptor (embedded interpreters)
                    pass
            try:
                yield captured
            finally:
                for fd, copy in reversed(saved):
                    os.dup2(copy, fd)
                    os.close(copy)
                saved.clear()
                tmp.seek(0)
                captured.append(tmp.read().decode(errors="replace"))
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)


def _dynamo_export(module, inputs, names_in, names_out, dynamic_batch, opset, timings=None):
    program = torch.onnx.export(
        module,
        inputs,
        dynamo=True,
        input_names=names_in,
        output_names=names_out,
        dynamic_shapes=_dynamic_shapes(inputs, dynamic_batch),
        opset_version=opset,
        verbose=False,
        optimize=False,  # run below, without rules that change results or cannot match
        external_data=False,
    )
    t0 = time.perf_counter()
    with faithful_rewrites(program.model):
        program.optimize()
    if timings is not None:
        timings["optimize"] = timings.get("optimize", 0.0) + time.perf_counter() - t0
    return program


def _torchscript_export(module, inputs, names_in, names_out, dynamic_batch, opset, tmp_path, verbose=False):
    axes = None
    if dynamic_batch:
        axes = {n: {0: "batch"} for n, dyn in zip(names_in, _batch_inputs(inputs)) if dyn}
        axes.update({n: {0: "batch"} for n in names_out})
    log_was = torch._C._jit_is_onnx_log_enabled()
    try:
        with contextlib.nullcontext() if verbose else _captured_output():
            torch.onnx.export(
                module,
                inputs,
                tmp_path,
                dynamo=False,
                input_names=names_in,
                output_names=names_out,
                dynamic_axes=axes,
                opset_version=opset or 17,
                do_constant_folding=True,
            )
    finally:
        torch._C._jit_set_onnx_log_enabled(log_was)  # torch <= 2.14 leaves its IR log switched on
