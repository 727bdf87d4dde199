"""The channel-dependency core: atoms, units and groups (union-find over numpy arrays), and the
walk over the graph that asks the op rules (:mod:`.rules`, chosen by :mod:`.spellings`) how the
atoms of each node relate."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.fx import GraphModule, Node

from ...analysis import node_shape

FROZEN = 0


@dataclass
class Chan:
    """Channels of a value: ``atoms[i]`` is the atom at position ``i`` of axis ``axis``."""

    axis: int
    atoms: np.ndarray


@dataclass
class ParamRef:
    """A value that is a parameter/buffer ``name``; ``axes[i]`` = the tensor dim behind value axis i."""

    name: str
    axes: tuple[int | None, ...]


@dataclass(frozen=True)
class MergedParam:
    """A parameter reshaped so that some value axes merge several of its dims (a conv weight as
    ``(1, out, in*kh*kw)`` for weight standardization): ``axes[i]`` is the tensor dim behind value
    axis ``i``, a tuple of dims for a merged axis, or None. Only the rules that accept it (a
    per-channel norm, the reshape back to the parameter's shape) see it; any other use pins the
    parameter."""

    name: str
    axes: tuple[int | tuple[int, ...] | None, ...]


Info = Chan | ParamRef | MergedParam | None | tuple


@dataclass
class AttrRewrite:
    """Set ``module.attr`` from the kept count of ``atoms`` (``value(count)``)."""

    module: str
    attr: str
    atoms: np.ndarray
    value: Callable[[int], Any]


@dataclass
class ArgRewrite:
    """Set a literal in ``node``'s args (``path`` into args; a path ``("name",)`` sets keyword
    ``name``) from the kept count of ``atoms``."""

    node: str
    path: tuple[int, ...]
    atoms: np.ndarray
    value: Callable[[int], Any]


@dataclass
class Group:
    """Families of atoms connected by shared units: one ranking, one ratio."""

    gid: int
    families: list[int]
    units: np.ndarray  # labels of the prunable units
    frozen: bool  # some channels of the group are frozen
    reasons: list[str] = field(default_factory=list)  # why channels are frozen


@dataclass
class Dependencies:
    """Result of :func:`analyze`."""

    num_atoms: int
    labels: np.ndarray  # unit label per atom (0 = frozen)
    family_of: np.ndarray  # family id per atom
    families: list[str]  # family id -> description (e.g. "conv1.weight[0]")
    bindings: dict[tuple[str, int], np.ndarray]  # (tensor name, dim) -> atoms per position
    attr_rewrites: list[AttrRewrite]
    arg_rewrites: list[ArgRewrite]
    groups: list[Group]
    producers: dict[str, Chan]  # node name -> channels it produces (for activation scoring)
    aliases: dict[str, list[str]]  # canonical tensor name -> every name of that tensor
    # atom sets that must keep at least one channel: every family (a layer's width) and the
    # sub-ranges rules cut out of one (channel slices, split sections)
    nonempty: list[np.ndarray] = field(default_factory=list)
    node_atoms: dict[str, np.ndarray] = field(default_factory=dict)  # node name -> the atoms of its channels

    def units_at(self, node: Node) -> np.ndarray:
        """Unit labels of the channels ``node`` and its inputs carry (0 excluded)."""
        parts = [self.node_atoms.get(n.name) for n in (node, *node.all_input_nodes)]
        atoms = np.concatenate([p for p in parts if p is not None]) if any(p is not None for p in parts) else np.zeros(0, np.int64)
        units = np.unique(self.labels[atoms])
        return units[units != FROZEN]

    def kept_atoms(self, removed_units: np.ndarray) -> np.ndarray:
        """Boolean keep mask per atom after removing ``removed_units`` (unit labels)."""
        keep_unit = np.ones(self.num_atoms, dtype=bool)
        keep_unit[removed_units] = False
        return keep_unit[self.labels]


class _Analyzer:
    def __init__(self, gm: GraphModule, rule_for: Callable[[GraphModule, Node], Callable]):
        self.gm = gm
        self.rule_for = rule_for  # the spelling tables (:mod:`.spellings`): node -> its kind's rule
        self.attention = "heads"  # or "dims": see analyze()
        self.next_atom = 1  # atom 0 is FROZEN
        self.family_starts: list[int] = []
        self.families: list[str] = []
        self.pairs_a: list[np.ndarray] = []
        self.pairs_b: list[np.ndarray] = []
        self.freezes: list[tuple[np.ndarray, str]] = []
        self.bindings: dict[tuple[str, int], np.ndarray] = {}
        self.pinned: dict[str, str] = {}
        self.pinned_dims: dict[tuple[str, int], str] = {}  # one dim of a tensor left whole
        self.attr_rewrites: list[AttrRewrite] = []
        self.arg_rewrites: list[ArgRewrite] = []
        self.producers: dict[str, Chan] = {}
        self.info: dict[Node, Info] = {}
        self.canon: dict[str, str] = {}
        self.aliases: dict[str, list[str]] = defaultdict(list)
        self.tensors: dict[str, torch.Tensor] = {}
        self.nonempty: list[np.ndarray] = []
        self.node_atoms: dict[str, np.ndarray] = {}
        by_id: dict[int, str] = {}
        for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
            first = by_id.setdefault(id(t), name)
            self.canon[name] = first
            self.aliases[first].append(name)
            self.tensors[first] = t

    # --- atoms -------------------------------------------------------------------------------

    def new_atoms(self, n: int, label: str) -> np.ndarray:
        start = self.next_atom
        self.family_starts.append(start)
        self.families.append(label)
        self.next_atom += n
        return np.arange(start, start + n, dtype=np.int64)

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        if a.shape != b.shape:
            raise AssertionError(f"cannot unify {a.shape} with {b.shape}")
        self.pairs_a.append(np.asarray(a, dtype=np.int64).ravel())
        self.pairs_b.append(np.asarray(b, dtype=np.int64).ravel())

    def keep_some(self, atoms: np.ndarray) -> None:
        """At least one of ``atoms`` must stay (a slice or split section that would be empty)."""
        if len(atoms):
            self.nonempty.append(np.asarray(atoms, dtype=np.int64).ravel())

    def freeze(self, atoms: np.ndarray, reason: str) -> None:
        if atoms.size:
            self.freezes.append((np.asarray(atoms, dtype=np.int64).ravel(), reason))

    def tie(self, atoms: np.ndarray, blocks: int) -> np.ndarray:
        """Unify position j of every one of ``blocks`` equal blocks; return block 0's atoms."""
        table = atoms.reshape(blocks, -1)
        for b in range(1, blocks):
            self.union(table[0], table[b])
        return table[0]

    def param_atoms(self, name: str, dim: int, label: str | None = None) -> np.ndarray:
        """The atoms of tensor ``name`` along ``dim``: existing binding or a new family."""
        name = self.canon.get(name, name)
        key = (name, dim)
        if key not in self.bindings:
            n = self.tensors[name].shape[dim]
            self.bindings[key] = self.new_atoms(n, label or f"{name}[{dim}]")
        return self.bindings[key]

    def bind(self, name: str, dim: int, atoms: np.ndarray) -> None:
        name = self.canon.get(name, name)
        t = self.tensors[name]
        if t.shape[dim] != len(atoms):
            self.freeze(atoms, f"{name} dim {dim} has {t.shape[dim]} entries for {len(atoms)} channels")
            self.pin(name, f"{name} does not line up with its channels")
            return
        key = (name, dim)
        if key in self.bindings:
            self.union(self.bindings[key], atoms)
        else:
            self.bindings[key] = atoms

    def pin(self, name: str, reason: str) -> None:
        self.pinned.setdefault(self.canon.get(name, name), reason)

    def pin_dim(self, name: str, dim: int, reason: str) -> None:
        """Dim ``dim`` of tensor ``name`` keeps its size (the rest of the tensor may be pruned)."""
        self.pinned_dims.setdefault((self.canon.get(name, name), dim), reason)

    def freeze_info(self, info: Info, reason: str) -> None:
        if isinstance(info, Chan):
            self.freeze(info.atoms, reason)
        elif isinstance(info, (ParamRef, MergedParam)):
            self.pin(info.name, reason)
        elif isinstance(info, (tuple, list)):
            for i in info:
                self.freeze_info(i, reason)

    def rewrite_attr(self, module: str, attr: str, atoms: np.ndarray, value: Callable[[int], Any] = int) -> None:
        self.attr_rewrites.append(AttrRewrite(module, attr, atoms, value))

    # --- helpers ---------------------------------------------------------------------------

    def of(self, arg: Any) -> Info:
        if isinstance(arg, Node):
            return self.info.get(arg)
        if isinstance(arg, (tuple, list)):
            return tuple(self.of(a) for a in arg)
        return None

    @staticmethod
    def shape(node_or_value: Any) -> tuple[int, ...] | None:
        return node_shape(node_or_value)

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            try:
                self.info[node] = self.visit(node)
                atoms = _atoms_of(self.info[node])
                if atoms is not None:
                    self.node_atoms[node.name] = atoms
            except _Unsupported as e:
                why = f"{node.name}: {e}"
                for arg in node.all_input_nodes:
                    self.freeze_info(self.info.get(arg), why)
                if node.op == "call_module":
                    for tname, _ in self.gm.get_submodule(node.target).named_parameters():
                        self.pin(f"{node.target}.{tname}", why)
                    for tname, _ in self.gm.get_submodule(node.target).named_buffers():
                        self.pin(f"{node.target}.{tname}", why)
                self.info[node] = None

    def visit(self, node: Node) -> Info:
        if node.op == "placeholder":
            return None
        if node.op == "get_attr":
            name = self.canon.get(node.target)
            if name is None:
                return None
            return ParamRef(name, tuple(range(self.tensors[name].dim())))
        if node.op == "output":  # every value that reaches the output, in any container (dict, nested, …)
            for value in node.all_input_nodes:
                self.freeze_info(self.info.get(value), "model output (its width never changes)")
            return None
        if node.op in ("call_module", "call_function", "call_method"):
            rule = self.rule_for(self.gm, node)
            hidden = {} if getattr(rule, "accepts_merged", False) else {a: i for a in node.all_input_nodes if isinstance(i := self.info.get(a), MergedParam)}
            if not hidden:
                return rule(self, node)
            for arg, merged in hidden.items():  # a rule that does not know merged dims sees an untracked value
                self.pin(merged.name, f"{node.name}: parameter reshaped")
                self.info[arg] = None
            try:
                return rule(self, node)
            finally:
                self.info.update(hidden)
        return None

    # --- finish ----------------------------------------------------------------------------

    def finish(self) -> Dependencies:
        for (name, dim), atoms in list(self.bindings.items()):
            if name in self.pinned:
                self.freeze(atoms, self.pinned[name])
            elif (name, dim) in self.pinned_dims:
                self.freeze(atoms, self.pinned_dims[name, dim])
        n = self.next_atom
        a = np.concatenate(self.pairs_a) if self.pairs_a else np.zeros(0, np.int64)
        b = np.concatenate(self.pairs_b) if self.pairs_b else np.zeros(0, np.int64)
        linked = _components(n, a, b)  # groups follow these links only: freezing does not link families
        if self.freezes:
            fa = np.concatenate([f for f, _ in self.freezes])
            a = np.concatenate([a, fa])
            b = np.concatenate([b, np.zeros_like(fa)])
        labels = _components(n, a, b)
        family_of = np.zeros(n, dtype=np.int64)
        starts = np.array(self.family_starts + [n], dtype=np.int64)
        for f in range(len(self.family_starts)):
            family_of[starts[f] : starts[f + 1]] = f
        family_of[0] = -1
        # groups: families connected through shared units (not through atom 0: unrelated layers with
        # frozen channels would share one ranking, and a layer could lose every channel)
        fam_labels = _components(len(self.families), family_of[1:], family_of[linked[1:]].clip(min=0))
        members: dict[int, list[int]] = defaultdict(list)
        for f, g in enumerate(fam_labels):
            members[int(g)].append(f)
        reasons: dict[int, list[str]] = defaultdict(list)
        for atoms, why in self.freezes:
            for f in np.unique(family_of[atoms]):
                if f >= 0 and why not in reasons[int(fam_labels[f])]:
                    reasons[int(fam_labels[f])].append(why)
        groups = []
        for gid, (g, fams) in enumerate(sorted(members.items())):
            atoms = np.concatenate([np.arange(starts[f], starts[f + 1]) for f in fams])
            unit_labels = np.unique(labels[atoms])
            free = unit_labels[unit_labels != FROZEN]
            groups.append(Group(gid, fams, free, bool((unit_labels == FROZEN).any()), reasons.get(g, [])))
        return Dependencies(
            num_atoms=n,
            labels=labels,
            family_of=family_of,
            families=self.families,
            bindings=self.bindings,
            attr_rewrites=self.attr_rewrites,
            arg_rewrites=self.arg_rewrites,
            groups=groups,
            producers=self.producers,
            aliases=dict(self.aliases),
            nonempty=[np.arange(starts[f], starts[f + 1]) for f in range(len(self.family_starts))] + self.nonempty,
            node_atoms=self.node_atoms,
        )


def _atoms_of(info: Info) -> np.ndarray | None:
    if isinstance(info, Chan):
        return info.atoms
    if isinstance(info, (tuple, list)):
        parts = [a for a in (_atoms_of(i) for i in info) if a is not None]
        return np.concatenate(parts) if parts else None
    return None


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of ``n`` nodes with edges ``a[i]-b[i]``: smallest member per node."""
    labels = np.arange(n, dtype=np.int64)
    if len(a) == 0:
        return labels
    while True:
        la, lb = labels[a], labels[b]
        low = np.minimum(la, lb)
        before = labels.copy()
        np.minimum.at(labels, a, low)
        np.minimum.at(labels, b, low)
        while True:  # pointer jumping
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels = jumped
        if np.array_equal(before, labels):
            return labels


class _Unsupported(Exception):
    """No rule covers this node: its inputs are frozen and its module's tensors pinned."""


def _op_name(node: Node) -> str:
    """The op's plain name whatever its spelling: ``"split"`` for a ``.split()`` call,
    ``torch.split`` and ``aten.split.Tensor`` alike."""
    target = node.target
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    return getattr(target, "__name__", "")


def _qualname(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__name__', repr(fn))}"
