"""Writing the file atomically: in a thread while the checks run, or with external weights."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Collection, Iterator, Sequence

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
    """Write ``pieces`` (bytes-like, in order) to ``path`` in a background thread; :meth:`join`
    waits and re-raises."""

    def __init__(self, path: str, pieces: Sequence, timings: dict[str, float]):
        self.error: BaseException | None = None
        self.timings = timings
        self.thread = threading.Thread(target=self._run, args=(path, pieces), name="qcd_fx-onnx-write", daemon=True)
        self.thread.start()

    def _run(self, path: str, pieces: Sequence) -> None:
        t0 = time.perf_counter()
        try:
            with open(path, "wb") as f:
                for piece in pieces:
                    f.write(piece)
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


# --- serializing once --------------------------------------------------------------------
#
# ``program.model_proto`` copies every weight into protobuf (``tobytes`` and the ``raw_data``
# field) and ``SerializeToString`` copies it again: three copies of the weights (ViT-B/16 after
# ``qci,csc``: 835 MB each) before a byte reaches the file. :func:`serialize_model` serializes
# the graph with the large weights' ``raw_data`` left empty, then splices each weight's bytes in
# at the protobuf wire level: the same bytes ``SerializeToString`` produces (field order and
# all). :func:`serialized_pieces` keeps them as pieces — the framing, and views of the weights'
# own memory (copied only where that is laid out otherwise, e.g. transposed) — which the file
# writer and onnxruntime's check session read in place: no joined copy of the weights.

_LEN = 2  # protobuf wire type of length-delimited fields
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_NAME, _TENSOR_RAW_DATA = 7, 5, 8, 9  # onnx.proto field numbers


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int, int, int]]:
    """The fields of a serialized message: (number, wire type, field start, payload start, end)."""
    pos, end = start, len(buf) if end is None else end
    while pos < end:
        field_start = pos
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _read_varint(buf, pos)
            payload = pos
        elif wire == 1:
            payload, pos = pos, pos + 8
        elif wire == _LEN:
            n, payload = _read_varint(buf, pos)
            pos = payload + n
        elif wire == 5:
            payload, pos = pos, pos + 4
        else:  # groups (wire types 3, 4) do not occur in onnx.proto
            raise ValueError(f"unexpected protobuf wire type {wire}")
        yield number, wire, field_start, payload, pos


def _len_field(number: int, length: int) -> bytes:
    return _varint(number << 3 | _LEN) + _varint(length)


class _Hollow:
    """A tensor's metadata (name, type, shape, doc string, properties) without its bytes."""

    def __init__(self, tensor):
        self.name = tensor.name
        self.doc_string = tensor.doc_string
        self.dtype = tensor.dtype
        self.shape = tensor.shape
        self.metadata_props = tensor.metadata_props
        self.meta = getattr(tensor, "meta", None)
        self.size = getattr(tensor, "size", 0)
        self.nbytes = 0

    def tobytes(self) -> bytes:
        return b""


def _raw_bytes(tensor):
    """The bytes ``tensor.tobytes()`` returns, as a buffer over the tensor's own memory (no copy)
    where that is the same: a contiguous torch tensor (``TorchTensor``) or numpy array (a plain
    ``ir.Tensor``, e.g. from constant folding) of a byte-aligned type on a little-endian
    machine; else ``tensor.tobytes()``."""
    import sys

    import numpy as np
    import onnx_ir as ir
    import torch
    from torch._subclasses.fake_tensor import is_fake
    from torch.onnx._internal.exporter._core import TorchTensor

    if sys.byteorder != "little":
        return tensor.tobytes()
    raw = getattr(tensor, "raw", None)
    if type(tensor) is TorchTensor and isinstance(raw, torch.Tensor) and not raw.is_sparse and not is_fake(raw):
        flat = raw.detach().cpu().contiguous().reshape(-1)
        if flat.numel() * flat.element_size() == tensor.nbytes:
            return memoryview(flat.view(torch.uint8).numpy())
    elif type(tensor) is ir.Tensor and isinstance(raw, np.ndarray):
        array = tensor.numpy()
        if array.dtype.itemsize == tensor.dtype.itemsize and array.nbytes == tensor.nbytes:  # not a packed 2/4/6-bit type
            if not array.flags.c_contiguous:  # e.g. a folded Transpose: torch's copy is faster than numpy's
                try:
                    array = torch.from_numpy(array).contiguous().numpy()
                except (TypeError, ValueError, RuntimeError):  # a dtype torch lacks, negative strides
                    array = np.ascontiguousarray(array)
            return memoryview(array.reshape(-1).view(np.uint8))
    return tensor.tobytes()


def _is_plain(tensor) -> bool:
    """A tensor serialized as ``raw_data`` (not external, not strings, not a proto kept verbatim)."""
    import onnx_ir as ir

    return not isinstance(tensor, (ir.ExternalTensor, ir.StringTensor, ir.TensorProtoTensor))


def serialize_model(model, limit: int = 1024) -> tuple[bytes, bytes, frozenset[str]]:
    """Serialize an ``onnx_ir`` model (``ONNXProgram.model``) once.

    Returns ``(data, hollow, large)``: ``data`` is the whole model, byte for byte what
    ``onnx_ir.serde.serialize_model(model).SerializeToString()`` gives; ``hollow`` is the same
    model whose top-level initializers above ``limit`` bytes (named in ``large``) have empty
    ``raw_data`` — kilobytes, for the structure checks. The model is left as it was.
    :func:`serialized_pieces` gives ``data`` without joining it."""
    pieces, hollow, large = serialized_pieces(model, limit)
    return pieces.join(), hollow, large


def serialized_pieces(model, limit: int = 1024) -> tuple[Pieces, bytes, frozenset[str]]:
    """:func:`serialize_model`'s ``data`` as :class:`Pieces`: the graph's framing and, for each
    large weight, a view of its own bytes (a copy only where its memory is not laid out as the
    file's, e.g. a transposed weight; those copies are made by several threads, see
    :func:`_copy_workers`)."""
    import onnx_ir as ir

    graph = model.graph
    swapped = []  # (value, tensor)
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is not None and _is_plain(tensor) and tensor.nbytes > limit:
            tensor.name = value.name  # as onnx_ir's serializer does
            swapped.append((value, tensor))
    try:
        for value, tensor in swapped:
            value.const_value = _Hollow(tensor)
        hollow = ir.serde.serialize_model(model).SerializeToString()
    finally:
        for value, tensor in swapped:
            value.const_value = tensor
    if not swapped:
        return Pieces([hollow]), hollow, frozenset()
    weights = _all_raw_bytes({value.name: tensor for value, tensor in swapped})

    pieces: list = []  # model bytes, in order
    for number, wire, field_start, payload, end in _fields(hollow):
        if number != _MODEL_GRAPH or wire != _LEN:
            pieces.append(hollow[field_start:end])
            continue
        graph_pieces: list = []
        for g_number, g_wire, g_start, g_payload, g_end in _fields(hollow, payload, end):
            tensor_pieces = None
            if g_number == _GRAPH_INITIALIZER and g_wire == _LEN:
                tensor_pieces = _splice_tensor(hollow, g_payload, g_end, weights)
            if tensor_pieces is None:
                graph_pieces.append(hollow[g_start:g_end])
            else:
                graph_pieces += [_len_field(_GRAPH_INITIALIZER, sum(map(_nbytes, tensor_pieces))), *tensor_pieces]
        pieces += [_len_field(_MODEL_GRAPH, sum(map(_nbytes, graph_pieces))), *graph_pieces]
    if weights:  # every swapped weight is spliced in exactly once
        raise ExportError(f"internal error serializing the ONNX model: initializers {sorted(weights)[:3]} not found in the graph")
    return Pieces(pieces), hollow, frozenset(v.name for v, _ in swapped)


def _nbytes(piece) -> int:
    return piece.nbytes if isinstance(piece, memoryview) else len(piece)


def _cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _copy_workers() -> int:
    """Threads for the weights' copies: the cores this process may use over PyTorch's intra-op
    threads (each copy runs on those), one to four."""
    import torch

    return max(1, min(4, _cores() // max(1, torch.get_num_threads())))


def _all_raw_bytes(tensors: dict) -> dict:
    """:func:`_raw_bytes` of each tensor (name -> buffer); the copies run in parallel (PyTorch
    releases the GIL while it copies)."""
    workers = min(_copy_workers(), len(tensors))
    if workers <= 1:
        return {name: _raw_bytes(t) for name, t in tensors.items()}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers, thread_name_prefix="qcd_fx-onnx-bytes") as pool:
        return dict(zip(tensors, pool.map(_raw_bytes, tensors.values())))


class Pieces:
    """A serialized model held as its pieces in order (bytes and views of the weights' memory),
    read as one buffer: indexing and slicing give the joined bytes' values, :meth:`view` a
    zero-copy view of a range inside one piece, :meth:`join` the bytes."""

    def __init__(self, pieces: Sequence):
        import itertools

        self.pieces = list(pieces)
        self.starts = list(itertools.accumulate(map(_nbytes, self.pieces), initial=0))

    def __len__(self) -> int:
        return self.starts[-1]

    def __iter__(self):
        return iter(self.pieces)

    def _piece(self, pos: int) -> int:
        import bisect

        return bisect.bisect_right(self.starts, pos) - 1

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, _ = key.indices(len(self))
            out = bytearray()
            while start < stop:
                i = self._piece(start)
                end = min(stop, self.starts[i + 1])
                out += memoryview(self.pieces[i]).cast("B")[start - self.starts[i] : end - self.starts[i]]
                start = end
            return bytes(out)
        if not 0 <= key < len(self):
            raise IndexError(key)
        i = self._piece(key)
        return memoryview(self.pieces[i]).cast("B")[key - self.starts[i]]

    def view(self, offset: int, length: int) -> memoryview:
        i = self._piece(offset)
        start = offset - self.starts[i]
        if i >= len(self.pieces) or start + length > self.starts[i + 1] - self.starts[i]:
            raise ExportError(f"internal error serializing the ONNX model: bytes {offset}..{offset + length} span two pieces")
        return memoryview(self.pieces[i]).cast("B")[start : start + length]

    def join(self) -> bytes:
        return self.pieces[0] if len(self.pieces) == 1 and isinstance(self.pieces[0], bytes) else b"".join(self.pieces)


def _tensor_fields(buf: bytes, start: int, end: int) -> tuple[str | None, tuple[int, int, int] | None]:
    """A serialized TensorProto's (``buf[start:end]``) name and where its ``raw_data`` field
    lies: (field start, payload start, end), or None."""
    name = raw = None
    for number, wire, field_start, payload, field_end in _fields(buf, start, end):
        if wire != _LEN:
            continue
        if number == _TENSOR_NAME:
            name = bytes(buf[payload:field_end]).decode()
        elif number == _TENSOR_RAW_DATA:
            raw = (field_start, payload, field_end)
    return name, raw


def _splice_tensor(buf: bytes, start: int, end: int, weights: dict) -> list | None:
    """The pieces of a TensorProto (``buf[start:end]``) with its empty ``raw_data`` replaced by
    the weight's bytes (``weights``: name -> buffer), or None if it is not one of ``weights``
    (removed from it when found)."""
    name, raw = _tensor_fields(buf, start, end)
    if name not in weights or raw is None:
        return None
    data = weights.pop(name)
    return [buf[start : raw[0]], _len_field(_TENSOR_RAW_DATA, _nbytes(data)), data, buf[raw[2] : end]]


def initializer_spans(data: bytes | Pieces, names: Collection[str]) -> dict[str, tuple[int, int]]:
    """Where the ``raw_data`` of each top-level initializer in ``names`` lies in the serialized
    model ``data``: name -> (offset, length), read from ``data``'s own framing (model, graph,
    tensor fields; the payloads are skipped, not read)."""
    spans: dict[str, tuple[int, int]] = {}
    for number, wire, _, payload, end in _fields(data):
        if number != _MODEL_GRAPH or wire != _LEN:
            continue
        for g_number, g_wire, _, g_payload, g_end in _fields(data, payload, end):
            if g_number == _GRAPH_INITIALIZER and g_wire == _LEN:
                name, raw = _tensor_fields(data, g_payload, g_end)
                if name in names and raw is not None:
                    spans[name] = (raw[1], raw[2] - raw[1])
    return spans
