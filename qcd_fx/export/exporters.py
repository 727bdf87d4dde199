"""The two exporters: ``torch.onnx.export(dynamo=True)`` and, as a fallback, the TorchScript exporter."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import typing
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


def _grouped_mm_onnx():
    """ONNX for a grouped (mixture-of-experts) matmul ``out[r] = a[r] @ b[group(r)]``, rows
    sorted by group, ``offs`` the cumulative row ends: one ``MatMul`` per group (the number of
    experts is a static weight dimension) on its ``Slice`` of rows, concatenated. For
    transformers' ``grouped_mm_fallback`` custom op and ``aten._grouped_mm``, which torch's ONNX
    library does not translate."""
    from onnxscript.function_libs.torch_lib.tensor_typing import INT64, TReal
    from onnxscript.onnx_opset import opset18 as op

    def grouped_mm(mat_a: TReal, mat_b: TReal, offs: INT64, bias=None, out_dtype=None) -> TReal:
        groups = mat_b.shape[0]
        if not isinstance(groups, int) or bias is not None or out_dtype is not None:
            raise ValueError("grouped matmul: the number of groups must be static, without bias or out_dtype")
        ends = op.Cast(offs, to=7)  # int64
        axis0 = op.Constant(value_ints=[0])
        start = op.Constant(value_ints=[0])
        parts = []
        for g in range(groups):
            end = op.Slice(ends, op.Constant(value_ints=[g]), op.Constant(value_ints=[g + 1]), axis0)
            rows = op.Slice(mat_a, start, end, axis0)
            parts.append(op.MatMul(rows, op.Gather(mat_b, op.Constant(value_int=g), axis=0)))
            start = end
        return op.Concat(*parts, axis=0) if len(parts) > 1 else parts[0]

    return _typed(grouped_mm, INT64=INT64, TReal=TReal)


def _sdpa_onnx():
    """ONNX for ``scaled_dot_product_attention`` on inputs of other ranks than torch's library
    takes, (batch, heads, length, dim): a 5-D attention (timm's Hiera, NesT, Twins: windows or
    blocks as an extra batch axis) is reshaped to 4-D around it, leading axes merged; a 3-D one
    (SAM's ViT, batch and heads merged, with its position-bias mask) gets a unit axis in front.
    4-D inputs go to torch's own translation unchanged."""
    from typing import Optional  # noqa: UP035 - torch's ONNX registry reads Optional[...], as torch's library spells it

    from onnxscript import ir
    from onnxscript.function_libs.torch_lib.ops.nn import aten_scaled_dot_product_attention
    from onnxscript.function_libs.torch_lib.tensor_typing import TFloat
    from onnxscript.onnx_opset import opset18 as op
    from onnxscript.onnx_types import TensorType

    def sdpa(
        query: TFloat,
        key: TFloat,
        value: TFloat,
        attn_mask: Optional[TensorType] = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: Optional[float] = None,
        enable_gqa: bool = False,
    ) -> TFloat:  # fmt: skip  (torch's own signature: the registry reads these annotations)
        ranks = {len(query.shape), len(key.shape), len(value.shape)}
        if ranks == {4}:
            return aten_scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        if ranks == {3}:  # (batch * heads, length, dim), SAM's ViT: a unit heads axis in front
            zero = op.Constant(value_ints=[0])

            def lift(t):
                lifted = op.Unsqueeze(t, zero)
                lifted.shape = ir.Shape([1, *list(t.shape)])
                return lifted

            mask = lift(attn_mask) if attn_mask is not None and len(attn_mask.shape) == 3 else attn_mask
            out = aten_scaled_dot_product_attention(lift(query), lift(key), lift(value), mask, dropout_p, is_causal, scale, enable_gqa)
            return op.Squeeze(out, zero)
        if len(ranks) != 1 or min(ranks) < 4 or attn_mask is not None:
            raise ValueError("scaled_dot_product_attention: 3-D inputs, or inputs of one rank above 4 without a mask")
        minus_one = op.Constant(value_ints=[-1])

        def four_d(t):
            merged = op.Reshape(t, op.Concat(minus_one, op.Shape(t, start=-3), axis=0))
            merged.shape = ir.Shape([None, *list(t.shape)[-3:]])  # torch's translation reads the rank
            return merged

        out = aten_scaled_dot_product_attention(four_d(query), four_d(key), four_d(value), None, dropout_p, is_causal, scale, enable_gqa)
        return op.Reshape(out, op.Concat(op.Shape(query, end=-1), op.Shape(value, start=-1), axis=0))

    return _typed(sdpa, TFloat=TFloat, TensorType=TensorType, Optional=Optional)


def _typed(fn, **names):
    """``fn`` with its annotations resolved (this module's are strings): torch's ONNX registry
    reads them for the function's signature."""
    fn.__annotations__ = typing.get_type_hints(fn, localns=names)
    return fn


def _translations() -> dict:
    """Custom ONNX translations for ops torch's library lacks (registered custom ops included,
    when their library is loaded) or takes in fewer shapes than PyTorch."""
    table = {torch.ops.aten.scaled_dot_product_attention.default: _sdpa_onnx()}
    fn = None
    for get in (lambda: torch.ops.transformers.grouped_mm_fallback.default, lambda: torch.ops.aten._grouped_mm.default):
        try:
            target = get()
        except (AttributeError, RuntimeError):
            continue
        fn = fn or _grouped_mm_onnx()
        table[target] = fn
    return table


def _dynamo_export(module, inputs, names_in, names_out, dynamic_batch, opset, timings=None):
    program = torch.onnx.export(
        module,
        inputs,
        dynamo=True,
        custom_translation_table=_translations() or None,
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
