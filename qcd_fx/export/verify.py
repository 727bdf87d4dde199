"""Checking an exported file against PyTorch with onnxruntime."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..analysis import tensor_leaves
from ..errors import ExportError
from .report import BatchParity


def onnxruntime_session(model: bytes | str | InMemoryWeights, threads: int | None = None, spinning: bool = True, prepack: bool = True):
    """An onnxruntime CPU session for a serialized model, a path, or :class:`InMemoryWeights`
    (``threads``: intra-op threads; ``spinning=False``: idle worker threads sleep instead of
    spinning, for a session that runs beside other work; ``prepack=False``: the weights are not
    repacked for its matrix kernels when the session starts, which costs more than it saves for
    a session that runs a few times — the results are the same)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not isinstance(model, InMemoryWeights):
        return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in model.arrays.values()]  # over the arrays' memory, no copy
    opts.add_external_initializers(list(model.arrays), values)
    session = ort.InferenceSession(model.graph, sess_options=opts, providers=["CPUExecutionProvider"])
    session._qcd_fx_weights = (model, values)  # onnxruntime reads them in place: they live as long as the session
    return session


# ONNX tensor types and the numpy types that hold their bytes as they are
_NUMPY_TYPES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    4: "uint16",
    5: "int16",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
    12: "uint32",
    13: "uint64",
}


@dataclass(frozen=True)
class InMemoryWeights:
    """A serialized model for onnxruntime whose large weights are read in place from the bytes
    of the file: ``graph`` is the model with those initializers marked external, ``arrays``
    are views into the file's bytes at each one's ``raw_data``."""

    graph: bytes
    arrays: dict[str, Any]


def in_memory_weights(proto, data, names: Collection[str]) -> InMemoryWeights | None:
    """The model ``data`` (serialized: bytes-like or :class:`~qcd_fx.export.write.Pieces`;
    ``proto`` is the same model with the ``raw_data`` of the initializers in ``names`` left
    empty) for an onnxruntime session that reads those weights in place from ``data``, at the
    offsets ``data``'s own framing gives — byte for byte the file's weights, without
    onnxruntime parsing and copying them (ViT-B/16 after ``qci,csc``: 835 MB). None where a
    weight's type has no numpy equivalent (then the session loads ``data``)."""
    import math

    import numpy as np
    import onnx

    from .write import Pieces, initializer_spans

    if not isinstance(data, Pieces):
        data = Pieces([data])
    spans = initializer_spans(data, names)
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    arrays = {}
    for init in model.graph.initializer:
        if init.name not in names:
            continue
        dtype, span = _NUMPY_TYPES.get(init.data_type), spans.get(init.name)
        if dtype is None or span is None:
            return None
        dtype = np.dtype(dtype)
        count = math.prod(init.dims)
        offset, length = span
        if length != count * dtype.itemsize:
            raise ExportError(
                f"internal error serializing the ONNX model: initializer '{init.name}' holds {length} bytes, its shape {list(init.dims)} needs {count * dtype.itemsize}"
            )
        arrays[init.name] = np.frombuffer(data.view(offset, length), dtype=dtype, count=count).reshape(tuple(init.dims))
        init.ClearField("raw_data")
        init.data_location = onnx.TensorProto.EXTERNAL
        del init.external_data[:]
        entry = init.external_data.add()
        entry.key, entry.value = "location", "qcd_fx-in-memory"  # replaced by the arrays; never opened
    if len(arrays) != len(names):
        return None
    return InMemoryWeights(model.SerializeToString(), arrays)


def _feed(session, inputs: Sequence[torch.Tensor]) -> dict[str, Any]:
    return {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs)}


def compare_outputs(
    ort_outputs: Sequence[Any], torch_outputs: Sequence[torch.Tensor], names: Sequence[str], atol: float, rtol: float, batch: int | None
) -> BatchParity:
    """Max abs / rel difference of onnxruntime outputs from PyTorch's; ``ok`` per the tolerances."""
    if len(ort_outputs) != len(torch_outputs):
        raise ExportError(f"the ONNX model returns {len(ort_outputs)} outputs, PyTorch {len(torch_outputs)}")
    worst_abs, worst_rel, worst_name, ok = 0.0, 0.0, names[0] if names else "output", True
    for name, o, r in zip(names, ort_outputs, torch_outputs):
        o = torch.from_numpy(o) if not isinstance(o, torch.Tensor) else o
        if tuple(o.shape) != tuple(r.shape):
            raise ExportError(f"onnxruntime output '{name}' has shape {tuple(o.shape)}, PyTorch {tuple(r.shape)} (batch {batch})")
        if not r.is_floating_point():
            diff = 0.0 if torch.equal(o.to(r.dtype), r) else float("inf")
            scale = 1.0
        else:
            od, rd = o.double(), r.double()
            both_nan = torch.isnan(od) & torch.isnan(rd)
            same_inf = torch.isinf(od) & (od == rd)
            d = (od - rd).abs().masked_fill(both_nan | same_inf, 0.0)
            diff = float(torch.nan_to_num(d, nan=float("inf")).max()) if d.numel() else 0.0
            finite = rd[torch.isfinite(rd)]
            scale = float(finite.abs().max()) if finite.numel() else 0.0
        rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
        ok = ok and (diff <= atol or rel <= rtol)
        if diff > worst_abs:
            worst_abs, worst_name = diff, name
        worst_rel = max(worst_rel, rel)
    return BatchParity(batch, worst_abs, worst_rel, worst_name, ok)


def weights_as_inputs(proto, limit: int = 1024, names: Collection[str] = ()):
    """``proto`` (changed in place, and returned) with every initializer above ``limit`` bytes
    (and every one named in ``names``: those whose bytes the proto leaves out, see
    :func:`~qcd_fx.export.write.serialize_model`) replaced by a graph input of the same name,
    type and shape, for ``onnx.checker``.

    The full check (graph structure, types, shape inference) then reads kilobytes instead of the
    whole model: its cost no longer grows with the weights (ViT-B/16 after ``qci,csc``: 835 MB).
    Small initializers stay, so shape inference still sees constant shapes (``Reshape``); the
    large ones are checked where they are used, by onnxruntime loading the real bytes."""
    import onnx

    graph = proto.graph
    small, large = [], []
    for init in graph.initializer:
        (large if init.name in names or init.ByteSize() > limit else small).append(init)
    typed = [onnx.helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in large]
    del graph.initializer[:]
    graph.initializer.extend(small)
    graph.input.extend(typed)
    return proto


def _as_float64(module):
    """``module`` (a copy) in float64: its floating parameters and buffers, and in a graph every
    ``torch.float32`` argument (a ``torch.export`` graph spells the dtypes it traced: casts,
    factory calls, ``aten._assert_tensor_metadata``), so that the whole computation runs in
    float64 rather than failing or dropping back to float32 midway."""
    module = module.double()
    graphs = [m for m in module.modules() if isinstance(m, torch.fx.GraphModule)]
    for gm in graphs:
        changed = False
        for node in gm.graph.nodes:
            args = torch.fx.node.map_aggregate(node.args, _promote)
            kwargs = torch.fx.node.map_aggregate(node.kwargs, _promote)
            if args != node.args or kwargs != node.kwargs:
                node.args, node.kwargs, changed = args, kwargs, True
        if changed:
            gm.recompile()
    return module


def _promote(a):
    return torch.float64 if a is torch.float32 else a


FLOAT64_FACTOR = 2.0  # onnxruntime may be this many times PyTorch's own float32 error (vs float64)


class Float64Reference:
    """The module run in float64, to judge a float32 mismatch against the error PyTorch itself
    makes: random-init deep networks (efficientnetv2) have logits near 1e3 where PyTorch float32
    and onnxruntime each differ from the exact result by units. Built on first use (a copy of
    the module); :meth:`errors` is None when the module cannot run in float64."""

    def __init__(self, module):
        self.module = module
        self.copy = None
        self.failed = False

    def errors(self, inputs: Sequence[torch.Tensor], ort_outputs: Sequence[Any], torch_outputs: Sequence[torch.Tensor]) -> tuple[float, float] | None:
        """(max |PyTorch float32 - float64|, max |onnxruntime - float64|) over floating outputs."""
        import copy

        if self.failed:
            return None
        try:
            if self.copy is None:
                self.copy = _as_float64(copy.deepcopy(self.module))
            with torch.no_grad():
                exact = tensor_leaves(self.copy(*(t.double() if t.is_floating_point() else t for t in inputs)))
        except Exception:  # an op without float64 kernels, a dtype check in the model: no judgement
            self.failed = True
            return None
        if len(exact) != len(torch_outputs):
            return None
        torch_err = onnx_err = 0.0
        for o, r, x in zip(ort_outputs, torch_outputs, exact):
            if not r.is_floating_point():
                continue
            o = torch.as_tensor(o).double()
            finite = torch.isfinite(x)
            if o.shape != x.shape or not bool((finite == torch.isfinite(o)).all()):
                return None
            if finite.any():
                torch_err = max(torch_err, float((r.double() - x)[finite].abs().max()))
                onnx_err = max(onnx_err, float((o - x)[finite].abs().max()))
        return torch_err, onnx_err
