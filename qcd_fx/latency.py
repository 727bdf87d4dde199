"""Predicted latency of a graph on this machine, from a per-layer latency table measured once and
cached (``cdg-prune{target_latency=…}``).

Every Linear/Conv call of the graph (a module, a functional call or its ATen spelling) is a
*layer*, keyed by what decides its cost: kind, input shape, weight shape, stride, padding,
dilation, groups, dtype and the number of threads. The table times each key once in isolation
(random inputs, median of repeats) and keeps it in a JSON file under the user's cache directory
(``$QCD_FX_CACHE_DIR``, else ``$XDG_CACHE_HOME/qcd_fx``, else ``~/.cache/qcd_fx``), one file per
torch version and machine; a later run, or the next trial width of the same run, reads it.

The rest of the graph (element-wise ops, norms, pooling, attention products...) is not tabled:
its time is the model's measured latency minus its layers' table time, and it is taken to scale
with the number of activation elements those ops produce — so a prediction is

    sum of table(layer at its pruned widths) + other_s x other_elements(pruned) / other_elements(original)

Widths that the hardware runs badly (odd channel counts, sizes just past a vector width) cost what
they cost here, which is the point: a MACs count cannot see them.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.passes.shape_prop import ShapeProp

from .analysis import eval_no_grad, median_latency, node_shape
from .io import atomic_path

_aten = torch.ops.aten
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def cache_dir() -> str:
    return os.environ.get("QCD_FX_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qcd_fx")


def _machine_key() -> str:
    ident = f"{platform.machine()}|{platform.processor()}|{os.cpu_count()}|{torch.__version__}"
    return hashlib.sha1(ident.encode()).hexdigest()[:12]


def _shape(node) -> tuple[int, ...] | None:
    shape = node_shape(node)
    return tuple(int(s) for s in shape) if shape is not None else None  # a table key: concrete sizes


def _ints(v, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (list, tuple)) else (int(v),) * n


def layer_key(gm: GraphModule, node: Node) -> str | None:
    """The table key of a Linear/Conv call (None for any other node, or a shape not propagated)."""
    x = node.args[0] if node.args else None
    xs = _shape(x)
    if xs is None:
        return None
    dtype = str(getattr(x.meta.get("tensor_meta"), "dtype", torch.float32)).removeprefix("torch.")
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.Linear):
            return json.dumps(["linear", xs, list(m.weight.shape), m.bias is not None, dtype])
        if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed and m.padding_mode == "zeros" and not isinstance(m.padding, str):
            return json.dumps(["conv", xs, list(m.weight.shape), m.bias is not None, list(m.stride), list(m.padding), list(m.dilation), m.groups, dtype])
        return None
    if node.op != "call_function":
        return None
    packet = getattr(node.target, "overloadpacket", None)
    w = _shape(node.args[1]) if len(node.args) > 1 else None
    if node.target is F.linear or packet is _aten.linear:
        bias = len(node.args) > 2 and node.args[2] is not None
        return json.dumps(["linear", xs, list(w), bias, dtype]) if w else None
    if packet is _aten.addmm:  # bias + x @ w (GPT-2's Conv1D): input, x, w
        xs2, w2 = _shape(node.args[1]), _shape(node.args[2])
        return json.dumps(["linear", list(xs2), [w2[1], w2[0]], True, dtype]) if xs2 and w2 else None
    dims = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, _aten.conv1d: 1, _aten.conv2d: 2, _aten.conv3d: 3}.get(
        node.target if node.op == "call_function" and packet is None else packet
    )
    if dims and w:
        args = list(node.args) + [None] * (7 - len(node.args))
        bias = args[2] is not None
        stride = _ints(args[3] if args[3] is not None else node.kwargs.get("stride", 1), dims)
        padding = args[4] if args[4] is not None else node.kwargs.get("padding", 0)
        if isinstance(padding, str):
            return None
        padding = _ints(padding, dims)
        dilation = _ints(args[5] if args[5] is not None else node.kwargs.get("dilation", 1), dims)
        groups = int(args[6] if args[6] is not None else node.kwargs.get("groups", 1))
        return json.dumps(["conv", xs, list(w), bias, list(stride), list(padding), list(dilation), groups, dtype])
    return None


def time_key(key: str, min_total_s: float = 0.02, max_repeats: int = 50) -> float:
    """Median seconds of one call of the layer ``key`` describes, on random inputs."""
    kind, xs, ws, bias, *rest = json.loads(key)
    dtype = getattr(torch, rest[-1])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(xs, generator=g).to(dtype)
    w = torch.randn(ws, generator=g).to(dtype)
    b = torch.randn(ws[0], generator=g).to(dtype) if bias else None
    if kind == "linear":

        def call():
            return F.linear(x, w, b)
    else:
        stride, padding, dilation, groups = rest[0], rest[1], rest[2], rest[3]
        fn = _CONV_FN[len(ws) - 2]

        def call():
            return fn(x, w, b, stride, padding, dilation, groups)

    with torch.no_grad():
        t0 = time.perf_counter()
        call()
        first = time.perf_counter() - t0
        repeats = max(5, min(max_repeats, int(min_total_s / max(first, 1e-7))))
        return median_latency(call, repeats=repeats, warmup=2)


class LatencyTable:
    """Per-layer latencies of this machine, read from and written back to one JSON file."""

    def __init__(self, path: str | None = None):
        self.threads = torch.get_num_threads()
        self.path = path or os.path.join(cache_dir(), f"latency-{_machine_key()}-t{self.threads}.json")
        self.entries: dict[str, float] = {}
        self.measured = 0  # keys timed by this object (the rest came from the file)
        if os.path.exists(self.path):
            try:
                with open(self.path) as f:
                    data = json.load(f)
                if isinstance(data, dict) and isinstance(data.get("entries"), dict):
                    self.entries = {k: float(v) for k, v in data["entries"].items()}
            except (OSError, ValueError, TypeError):
                self.entries = {}  # an unreadable cache is re-measured, never trusted

    def __call__(self, key: str) -> float:
        if key not in self.entries:
            self.entries[key] = time_key(key)
            self.measured += 1
        return self.entries[key]

    def save(self) -> None:
        """Write the table atomically (a failure to write only costs a re-measurement later)."""
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with atomic_path(self.path) as tmp, open(tmp, "w") as f:
                json.dump({"torch": torch.__version__, "machine": platform.machine(), "threads": self.threads, "entries": self.entries}, f)
        except OSError:
            pass


@dataclass
class Profile:
    """A graph's layers' table time and the element count of its other ops' outputs."""

    layer_s: float
    other_elements: int
    layers: int


def profile(gm: GraphModule, inputs: tuple, table: LatencyTable) -> Profile:
    """Shapes propagated on ``inputs``, then every layer looked up (timed if new)."""
    with eval_no_grad(gm):
        ShapeProp(gm).propagate(*inputs)
    layer_s, other, layers = 0.0, 0, 0
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        key = layer_key(gm, node)
        if key is not None:
            layer_s += table(key)
            layers += 1
            continue
        shape = _shape(node)
        if shape is not None:
            n = 1
            for s in shape:
                n *= s
            other += n
    return Profile(layer_s, other, layers)


class Predictor:
    """Predicted latency of pruned versions of one graph (see the module docstring)."""

    def __init__(self, gm: GraphModule, inputs: tuple, table: LatencyTable | None = None, repeats: int = 20):
        self.table = table or LatencyTable()
        self.inputs = inputs
        self.base = profile(gm, inputs, self.table)
        self.measured_s = measured_latency(gm, inputs, repeats)
        self.other_s = max(self.measured_s - self.base.layer_s, 0.0)

    def __call__(self, gm: GraphModule) -> float:
        p = profile(gm, self.inputs, self.table)
        scale = p.other_elements / self.base.other_elements if self.base.other_elements else 1.0
        return p.layer_s + self.other_s * scale


def measured_latency(gm: nn.Module, inputs: tuple, repeats: int = 20) -> float:
    with eval_no_grad(gm):
        return median_latency(lambda: gm(*inputs), repeats=repeats, warmup=3)


__all__ = ["LatencyTable", "Predictor", "Profile", "cache_dir", "layer_key", "measured_latency", "profile", "time_key"]
