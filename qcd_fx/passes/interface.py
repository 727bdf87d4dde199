"""``qci``: insert an interface gate (QCI) after every wide Linear / Conv call site."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.lazy import LazyModuleMixin

from ..analysis import node_shape
from ..errors import PreconditionError
from ..nn import InterfaceGate
from .base import Pass, PassOutcome, option, register
from .graph_utils import insert_module_after
from .runtime import PassContext

_FUNCTIONAL_LINEAR = {F.linear, torch._C._nn.linear}
_FUNCTIONAL_CONV = {
    F.conv1d: 1, F.conv2d: 2, F.conv3d: 3,
    torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3,
    F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3,
}  # fmt: skip
_aten = torch.ops.aten
_ATEN_SITES = {  # the overload packets torch.export records -> spatial dims (0: linear)
    _aten.linear: 0, _aten.addmm: 0,
    _aten.conv1d: 1, _aten.conv2d: 2, _aten.conv3d: 3,
    _aten.conv_transpose1d: 1, _aten.conv_transpose2d: 2, _aten.conv_transpose3d: 3,
}  # fmt: skip


def functional_site(target) -> int | None:
    """Spatial dims of a functional or ATen Linear/Conv call (0 for linear), else None."""
    if target in _FUNCTIONAL_LINEAR:
        return 0
    if target in _FUNCTIONAL_CONV:
        return _FUNCTIONAL_CONV[target]
    return _ATEN_SITES.get(getattr(target, "overloadpacket", None))


def _site_name(node: Node) -> str:
    """``encoder.layer.0.query_qci`` when the call reads a ``….weight`` attribute, else ``qci_<node>``."""
    weight = node.args[2] if getattr(node.target, "overloadpacket", None) is _aten.addmm else (node.args[1] if len(node.args) > 1 else None)
    if isinstance(weight, Node) and weight.op == "get_attr" and str(weight.target).endswith(".weight"):
        return f"{str(weight.target)[: -len('.weight')]}_qci"
    return f"qci_{node.name}"


def gate_site(m: nn.Module) -> tuple[int, int, int] | None:
    """``(width, channel_dim, spatial_dims)`` of a Linear/Conv module's output, else None."""
    if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params():
        return None
    if isinstance(m, nn.Linear):
        return m.out_features, -1, 0
    if isinstance(m, _ConvNd):
        return m.out_channels, 1, len(m.kernel_size)
    return None


@register
@dataclass(frozen=True)
class QCI(Pass):
    """Insert an interface gate (QCI) after every Linear/Conv whose output width > ``min_width``.

    One gate per call site (a module called twice gets two gates). Functional ``F.linear`` /
    ``F.conv*d`` calls and their ATen spellings in ``torch.export`` graphs (``aten.linear``,
    ``aten.addmm``, ``aten.conv*d``) are gated when their output width is known from shape propagation;
    otherwise they are skipped and listed in the report, as are leaf modules that hide
    Linear/Conv layers inside them (e.g. ``nn.MultiheadAttention``). Original weights are never
    touched. With ``init=identity`` the model's outputs stay bit-for-bit equal.
    """

    name = "qci"
    summary = "insert interface gates (QCI) after wide Linear/Conv layers"

    min_width: int = option("gate layers whose output width is greater than this (the seed's rule: 10)", default=10)
    max_width: int | None = option("leave layers wider than this ungated (e.g. a vocabulary-wide LM head); default: no limit", default=None)
    init: Literal["identity", "seed"] = option("identity: gate starts as the exact identity; seed: the seed's random projector", default="identity")
    rank: int | None = option("projector I + U V^T of this rank (2·r·d parameters); full: d×d as in the seed", default=None, aliases={"full": None})
    beta: float = option("initial gate temperature beta (seed: 1.0)", default=1.0)
    seed: int = option("random seed of the gates' initialisation", default=0)

    def __post_init__(self):
        if self.min_width < 0:
            raise ValueError(f"min_width must be >= 0, got {self.min_width}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be >= 1 or full, got {self.rank}")
        if self.max_width is not None and self.max_width <= self.min_width:
            raise ValueError(f"max_width must be > min_width ({self.min_width}), got {self.max_width}")

    @property
    def preserves_function(self) -> bool:
        return self.init == "identity"

    def call(self, gm: GraphModule, context: PassContext) -> PassOutcome:
        gen = torch.Generator().manual_seed(self.seed)
        notes: list[str] = []
        hidden: dict[str, list[tuple[str, list[str]]]] = {}
        gates = narrow = wide = 0
        sites = []
        for node in list(gm.graph.nodes):
            site = self._site(gm, node, notes, hidden)
            if site is None:
                continue
            if site[0] <= self.min_width:
                narrow += 1
                continue
            if self.max_width is not None and site[0] > self.max_width:
                wide += 1
                continue
            sites.append((node, site))
        self._check_memory(sites)
        for node, (width, channel_dim, spatial, ref) in sites:
            gate = InterfaceGate(width, channel_dim, spatial, self.init, self.rank, self.beta, generator=gen, device=ref.device, dtype=ref.dtype)
            base = f"{node.target}_qci" if node.op == "call_module" else _site_name(node)
            insert_module_after(gm, node, gate, base)
            gates += 1
        for cls, found in hidden.items():
            path, inner = found[0]
            count = f"{len(found)} leaf modules" if len(found) > 1 else "leaf module"
            notes.append(
                f"not gated: {count} {cls} (e.g. '{path}') hold wide projections ({', '.join(inner[:3])}{'…' if len(inner) > 3 else ''}) "
                "that are not call sites of the graph"
            )
        if wide:
            notes.append(f"{wide} site(s) wider than max_width={self.max_width} left ungated")
        stats = {"gates": gates, "narrow_sites_skipped": narrow}
        if self.max_width is not None:
            stats["wide_sites_skipped"] = wide
        return PassOutcome(gm, gates > 0, notes, stats)

    def _gate_bytes(self, width: int, ref: torch.Tensor) -> int:
        r = self.rank if self.rank is not None and self.rank < width else None
        projector = width * width if r is None else 2 * r * width
        return (projector + 2 * width + 2) * ref.element_size()

    def _check_memory(self, sites: list) -> None:
        """Refuse, before allocating, gates that cannot fit: a full ``d×d`` projector after a
        200,000-wide LM head would need 160 GB."""
        if not sites:
            return
        need = [(self._gate_bytes(site[0], site[3]), node, site[0]) for node, site in sites]
        total = sum(b for b, _, _ in need)
        limit = _available_bytes() // 2
        if total <= limit:
            return
        widest, node, width = max(need, key=lambda t: t[0])
        where = str(node.target) if node.op == "call_module" else _site_name(node).removesuffix("_qci")
        kind = "full-rank " if self.rank is None else ""
        raise PreconditionError(
            self.name,
            f"{len(sites)} {kind}gates need {total / 1e9:.1f} GB (the largest, after '{where}' with {width:,} features, "
            f"{widest / 1e9:.1f} GB), more than half of the {2 * limit / 1e9:.1f} GB of memory available; "
            f"use qci{{rank=16}} (projector I + U V^T) or qci{{max_width=N}} to leave the widest layers ungated",
        )

    def _site(self, gm: GraphModule, node: Node, notes: list[str], hidden: dict):
        """(width, channel_dim, spatial_dims, reference tensor) for a gateable node, else None."""
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            site = gate_site(m)
            if site is None:
                if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params():
                    notes.append(f"skipped '{node.name}': lazy module {type(m).__name__} is not initialised")
                else:
                    inner = self._hidden_projections(m)
                    if inner:
                        hidden.setdefault(type(m).__name__, []).append((str(node.target), inner))
                return None
            width, channel_dim, spatial = site
            shape = node_shape(node)
            if channel_dim == 1 and shape is not None and len(shape) == spatial + 1:
                notes.append(f"skipped '{node.name}': unbatched convolution input (no batch axis)")
                return None
            return width, channel_dim, spatial, m.weight
        if node.op == "call_function" and (spatial := functional_site(node.target)) is not None:
            channel_dim = 1 if spatial else -1
            shape = node_shape(node)
            if shape is None:
                notes.append(
                    f"skipped functional call '{node.name}' ({getattr(node.target, '__name__', node.target)}): output width unknown without example inputs"
                )
                return None
            if spatial and len(shape) == spatial + 1:
                notes.append(f"skipped functional call '{node.name}': unbatched convolution input")
                return None
            device = next((t.device for t in gm.parameters()), torch.device("cpu"))
            ref = torch.empty(0, dtype=node.meta["tensor_meta"].dtype, device=device)
            return shape[channel_dim], channel_dim, spatial, ref
        return None

    def _hidden_projections(self, m: nn.Module) -> list[str]:
        """Names of wide Linear/Conv layers inside a leaf module (invisible to the graph)."""
        hidden = [name for name, sub in m.named_modules() if sub is not m and (s := gate_site(sub)) and s[0] > self.min_width]
        if isinstance(m, nn.MultiheadAttention):
            hidden = ["in_proj", *hidden]
        return hidden


def _available_bytes() -> int:
    """Memory this process can still take: the least of the machine's (``MemAvailable`` on
    Linux, else the physical memory), its cgroup's (a container's ``memory.max`` less what the
    cgroup uses) and its own limits (``RLIMIT_DATA`` / ``RLIMIT_AS`` less what it holds)."""
    return min(b for b in (_meminfo_available(), _cgroup_headroom(), _rlimit_headroom()) if b is not None)


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def _cgroup_headroom() -> int | None:
    """``memory.max - memory.current`` of this process's cgroup (v2), None without a limit."""
    try:
        with open("/proc/self/cgroup") as f:
            path = next((line.strip().split(":", 2)[2] for line in f if line.startswith("0::")), None)
        if path is None:
            return None
        with open("/proc/self/mountinfo") as f:  # where cgroup v2 is mounted (hybrid systems: not /sys/fs/cgroup itself)
            root = next((line.split()[4] for line in f if line.partition(" - ")[2].split()[:1] == ["cgroup2"]), None)
        if root is None:
            return None
        base = os.path.join(root, path.lstrip("/"))
        with open(os.path.join(base, "memory.max")) as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open(os.path.join(base, "memory.current")) as f:
            return max(0, int(limit) - int(f.read().strip()))
    except (OSError, ValueError):
        return None


def _rlimit_headroom() -> int | None:
    """The process's data / address-space limit less what it holds (``VmData`` / ``VmSize``)."""
    try:
        import resource

        with open("/proc/self/status") as f:
            status = {k: v for k, _, v in (line.partition(":") for line in f)}
    except (ImportError, OSError):
        return None
    room = []
    for limit_name, field in (("RLIMIT_DATA", "VmData"), ("RLIMIT_AS", "VmSize")):
        soft = resource.getrlimit(getattr(resource, limit_name))[0]
        if soft != resource.RLIM_INFINITY and field in status:
            room.append(max(0, soft - int(status[field].split()[0]) * 1024))
    return min(room) if room else None
