"""Running an ONNX file: inputs for its signature, onnxruntime latency beside PyTorch eager, and parity."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..analysis import interleaved_latency, tensor_leaves
from ..errors import InputShapeError, ModelLoadError, UsageError, first_line
from ..inputs import describe_shapes
from .report import DEFAULT_ATOL, DEFAULT_RTOL, BatchParity
from .signature import output_names
from .verify import compare_outputs, onnxruntime_session

_TORCH_TYPES = {
    "tensor(float)": torch.float32,
    "tensor(double)": torch.float64,
    "tensor(float16)": torch.float16,
    "tensor(int64)": torch.int64,
    "tensor(int32)": torch.int32,
    "tensor(bool)": torch.bool,
}


@dataclass
class OnnxRun:
    """What :func:`run_onnx` measured: median seconds per call (``onnxruntime`` and, with a
    module, ``pytorch``), and onnxruntime vs PyTorch on the same inputs."""

    inputs: list[torch.Tensor]
    latency: dict[str, float]
    parity: BatchParity | None
    threads: int
    repeats: int


def open_session(path: str, threads: int | None = None):
    """An onnxruntime CPU session for the file at ``path``; one-line ModelLoadError otherwise."""
    if not os.path.exists(path):
        raise ModelLoadError(f"ONNX file {path!r} does not exist")
    if os.path.isdir(path):
        raise ModelLoadError(f"{path!r} is a directory, not an ONNX file")
    try:
        return onnxruntime_session(path, threads=threads)
    except Exception as e:
        raise ModelLoadError(f"onnxruntime cannot load {path!r}: {first_line(e)}") from None


def session_inputs(session, shapes: Sequence[Sequence[int]] | None = None, default: Sequence[Sequence[int]] | None = None, name: str = "the model") -> list[torch.Tensor]:
    """One tensor per input of ``session``: floats ~ N(0, 1) from generator seed 0 (the example
    inputs qcd-fx makes elsewhere), integers and booleans zero (valid indices and masks). Shapes
    come from ``shapes``, else ``default`` (if it has one per input), else the file's own
    (a symbolic batch axis becomes 1; other symbolic axes need ``shapes``)."""
    metas = session.get_inputs()
    if shapes:
        if len(shapes) != len(metas):
            names = ", ".join(m.name for m in metas)
            raise UsageError(f"{name} takes {len(metas)} input(s) ({names}); got {len(shapes)} --input-shape")
        parsed = [tuple(s) for s in shapes]
    elif default and len(default) == len(metas):
        parsed = [tuple(s) for s in default]
    else:
        parsed = []
        for m in metas:
            dims = list(m.shape)
            free = [str(d) for d in dims[1:] if not isinstance(d, int)]
            if free:
                raise UsageError(f"--input-shape is required: input '{m.name}' of {name} has symbolic axes {free}")
            parsed.append(tuple([1 if not isinstance(dims[0], int) else dims[0]] + dims[1:]) if dims else ())
    gen = torch.Generator().manual_seed(0)
    tensors = []
    for m, shape in zip(metas, parsed):
        expected = list(m.shape)
        if len(expected) != len(shape) or any(isinstance(e, int) and e != s for e, s in zip(expected, shape)):
            want = "x".join(str(e) for e in expected)
            raise InputShapeError(f"input '{m.name}' of {name} has shape {want}; got {'x'.join(map(str, shape))}")
        dtype = _TORCH_TYPES.get(m.type)
        if dtype is None:
            raise UsageError(f"input '{m.name}' of {name} has type {m.type}, which qcd-fx cannot generate")
        tensors.append(torch.randn(shape, generator=gen).to(dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype))
    return tensors


def run_onnx(
    path: str,
    shapes: Sequence[Sequence[int]] | None = None,
    *,
    module: nn.Module | None = None,
    module_name: str = "the model",
    default_shapes: Sequence[Sequence[int]] | None = None,
    repeats: int = 20,
    warmup: int = 3,
    threads: int = 1,
) -> OnnxRun:
    """Time the ONNX file at ``path`` in onnxruntime (median of ``repeats`` calls after ``warmup``,
    ``threads`` intra-op threads) and, given ``module``, PyTorch eager beside it (interleaved, the
    same thread count) and compare their outputs. Bad files and inputs raise one-line errors."""
    if repeats < 1 or warmup < 0 or threads < 1:
        raise UsageError("--repeats and --threads must be >= 1, --warmup >= 0")
    session = open_session(path, threads=threads)
    inputs = session_inputs(session, shapes, default_shapes, repr(path))
    feed = {m.name: t.numpy() for m, t in zip(session.get_inputs(), inputs)}
    try:
        got = session.run(None, feed)
    except Exception as e:
        raise InputShapeError(f"onnxruntime fails to run {path!r} on inputs {describe_shapes(inputs)}: {first_line(e)}") from None
    fns = {"onnxruntime": lambda: session.run(None, feed)}
    parity = None
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if module is not None:
            module.eval()
            with torch.no_grad():
                try:
                    expected = module(*inputs)
                except Exception as e:
                    raise InputShapeError(f"{module_name} fails on the inputs {describe_shapes(inputs)}: {first_line(e)}") from None
            leaves = tensor_leaves(expected)
            if len(leaves) != len(got):
                raise UsageError(f"{module_name} returns {len(leaves)} tensors but {path!r} {len(got)}; is it the model the file was exported from?")
            parity = compare_outputs(got, leaves, output_names(expected), DEFAULT_ATOL, DEFAULT_RTOL, None)

            def eager():
                with torch.no_grad():
                    module(*inputs)

            fns["pytorch"] = eager
        latency = interleaved_latency(fns, repeats=repeats, warmup=warmup)
    finally:
        torch.set_num_threads(previous_threads)
    return OnnxRun(inputs, latency, parity, threads, repeats)


__all__ = ["OnnxRun", "open_session", "run_onnx", "session_inputs"]
