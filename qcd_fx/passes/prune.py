"""``cdg-prune``: score channels by the seed's efficiency and remove them structurally.

The seed's "Cosmic Dynamic Graph" scores units by ``E = (I - S)/(I + S + eps)`` and drops the
inefficient ones, with the output's own efficiency as the threshold; its code only set
``param.grad = None``. Here units are really removed: weight tensors shrink, module attributes
(``in_channels``, ``num_features``, ``normalized_shape``, ``embed_dim``…) and graph constants
(reshape sizes) are rewritten, and the result is an ordinary, smaller GraphModule.

Criteria (``criterion=``), per *unit* (a set of channels that must go together, see
:mod:`qcd_fx.passes.dependency`):

* ``cdg`` — for every channel ``c`` of every layer output that produces channels (Conv, Linear,
  Embedding, ``x @ W``), on the calibration activations ``a`` (batch and positions pooled, the
  channel axis last): ``I_c = mean |a_c|``; ``S_c = mean s_c`` with the seed's element-wise
  entropy term ``s = -softmax(a) * log_softmax(a)`` taken across the channels at each position;
  ``E_c = (I_c - S_c)/(I_c + S_c + 1e-8)``. A unit's score is the mean ``E`` of its channels.
  Without calibration data (weight-only), ``I`` and ``S`` are taken over each channel's weight
  slices instead (``I = mean |w|``, ``S`` = the seed's entropy of the slice). Low ``E`` goes first.
* ``l1`` / ``l2`` — weight magnitude: for every tensor dimension bound to the unit (producing
  rows, consuming columns, norm affine parameters), the L1 (L2²) norm of its slice, normalised by
  that tensor's mean slice norm, summed over tensors (the usual group-magnitude anchor).
* ``random`` — uniform scores from ``seed``.

Selection: ``ratio`` (fraction of the prunable units removed in every group; default 0.5),
``target_macs`` (global uniform ratio found by bisection until MACs fall to the target:
a fraction of the current MACs when <= 1, an absolute count otherwise), or ``threshold=auto``
(the seed's rule: remove units whose ``E`` is below the efficiency of the model output).
Every group keeps at least one unit; ``round_to=N`` keeps a multiple of N units.

``scope=nodes`` (or ``both``) also removes residual branches ``x + f(x) -> x`` whose output
efficiency is below the output's efficiency (at most ``ratio`` of the branches when a ratio is
given), then dead code.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.fx import GraphModule, Node

from .. import measures
from ..analysis import count_macs, eval_no_grad
from ..errors import PreconditionError
from .base import Pass, PassOutcome, option, register
from .dependency import FROZEN, Dependencies, analyze
from .runtime import PassContext, Runner, tensor_leaves

"""``gm.meta`` key under which the pipeline hands calibration batches (tuples of inputs) to passes."""


@register
@dataclass(frozen=True)
class CDGPrune(Pass):
    """Structural channel pruning scored by the seed's efficiency (CDG) or a baseline criterion."""

    name = "cdg-prune"
    summary = "remove channels (and optionally residual branches) structurally, scored by CDG efficiency or l1/l2/random"

    ratio: float | None = option(
        "fraction of each group's prunable channels to remove (0.5 unless target_macs or threshold=auto is given)", None, shown_default="0.5"
    )
    criterion: Literal["cdg", "l1", "l2", "random"] = option("channel score: cdg (seed efficiency), l1, l2, random", "cdg")
    target_macs: float | None = option("prune until MACs fall to this (fraction of current if <= 1, else absolute)", None)
    threshold: Literal["none", "auto"] = option("auto: the seed's rule, remove units less efficient than the output", "none")
    round_to: int = option("keep a multiple of this many units per group", 1)
    scope: Literal["channels", "nodes", "both"] = option("what to remove: channels, residual branches (nodes), or both", "channels")
    seed: int = option("random seed (criterion=random)", 0)

    def __post_init__(self):
        chosen = [self.ratio is not None, self.target_macs is not None, self.threshold == "auto"]
        if sum(chosen) > 1:
            raise ValueError("give only one of ratio, target_macs and threshold=auto")
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.target_macs is not None and not (math.isfinite(self.target_macs) and self.target_macs > 0):
            raise ValueError(f"target_macs must be > 0 and finite, got {self.target_macs}")
        if self.round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {self.round_to}")
        if self.threshold == "auto" and self.criterion != "cdg":
            raise ValueError("threshold=auto compares efficiencies: it needs criterion=cdg")

    @property
    def effective_ratio(self) -> float | None:
        if self.target_macs is None and self.threshold == "none":
            return 0.5 if self.ratio is None else self.ratio
        return self.ratio

    def call(self, gm: GraphModule, context: PassContext) -> PassOutcome:
        calib = list(context.calibration)
        _ensure_shapes(gm, calib, self.name)
        notes: list[str] = []
        stats: dict[str, Any] = {"criterion": self.criterion}
        if self.scope in ("nodes", "both"):
            if not calib:
                raise PreconditionError(self.name, "scope=nodes needs calibration data (example inputs)")
            removed = _remove_branches(gm, calib, self.ratio)
            stats["branches_removed"] = removed
            if removed:
                _ensure_shapes(gm, calib, self.name, force=True)
            if self.scope == "nodes":
                return PassOutcome(gm, bool(removed), notes, stats)
        deps = analyze(gm)
        acts: dict[str, torch.Tensor] = {}
        out_eff: float | None = None
        if calib and (self.criterion == "cdg" or self.threshold == "auto"):
            acts, out_eff = _calibrate(gm, calib, set(deps.producers))
        elif self.criterion == "cdg":
            notes.append("no calibration data: cdg scored from weights only")
        scores = _scores(gm, deps, self.criterion, acts, self.seed)
        if self.target_macs is not None:
            if not calib:
                raise PreconditionError(self.name, "target_macs needs example inputs to count MACs")
            # MACs are counted on the example inputs (what the report counts), not on a calibration batch
            inputs = context.example_inputs if context.example_inputs is not None else calib[0]
            removed, missed = _search_macs(gm, deps, scores, self.target_macs, self.round_to, inputs)
            if missed:
                notes.append(missed)
        elif self.threshold == "auto":
            if out_eff is None:
                raise PreconditionError(self.name, "threshold=auto needs calibration data (the output's efficiency)")
            stats["output_efficiency"] = out_eff
            removed = _select(deps, scores, self.round_to, threshold=out_eff)
        else:
            removed = _select(deps, scores, self.round_to, ratio=self.effective_ratio)
        inputs = context.example_inputs if context.example_inputs is not None else (calib[0] if calib else None)
        widths, removed = _apply_checked(gm, deps, removed, inputs, notes)
        skipped = [g for g in deps.groups if len(g.units) == 0]
        stats.update(
            groups=len(deps.groups),
            groups_pruned=sum(1 for g in deps.groups if np.isin(g.units, removed).any()),
            groups_skipped=len(skipped),
            channels_removed=int(sum(before - after for before, after in widths.values())),
            widths={k: list(v) for k, v in widths.items()},
        )
        frozen: dict[str, int] = {}  # prunable channels left alone, per reason (first reason of their group)
        for g in deps.groups:
            if g.frozen:
                in_group = np.isin(deps.family_of, g.families)
                in_group[0] = False
                why = g.reasons[0].split(": ", 1)[-1] if g.reasons else "frozen"
                frozen[why] = frozen.get(why, 0) + int((deps.labels[in_group] == FROZEN).sum())
        stats.update(channels=int(deps.num_atoms - 1), frozen_channels=frozen)
        if self.effective_ratio is not None:
            stats["requested_ratio"] = self.effective_ratio
        reasons: dict[str, int] = {}
        for g in deps.groups:
            for r in g.reasons[:1] if len(g.units) == 0 else []:
                key = r.split(": ", 1)[-1]
                reasons[key] = reasons.get(key, 0) + 1
        for why, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
            notes.append(f"{count} group(s) left alone: {why}")
        stats["skip_reasons"] = reasons
        return PassOutcome(gm, bool(len(removed)), notes, stats)


# ---------------------------------------------------------------------------------------------


def _ensure_shapes(gm: GraphModule, calib: list, pass_name: str, force: bool = False) -> None:
    # a node that ran has "type" (nodes returning sizes or None never get "tensor_meta": without
    # this ViT and Swin paid a second full forward here)
    missing = any("tensor_meta" not in n.meta and "type" not in n.meta for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method"))
    if not missing and not force:
        return
    if not calib:
        raise PreconditionError(pass_name, "needs example inputs (shape propagation) to find channel dependencies")
    with eval_no_grad(gm):
        Runner(gm).run(*calib[0])


def _calibrate(gm: GraphModule, calib: list, nodes: set[str]) -> tuple[dict[str, torch.Tensor], float]:
    """The outputs of ``nodes`` on the calibration batches (concatenated on axis 0) and the
    seed's efficiency of the model output (softmax over the last axis, as the seed's CDG)."""
    values: dict[str, list[torch.Tensor]] = {}
    outputs = []
    for batch in calib:
        runner = Runner(gm, capture=set(nodes))
        with eval_no_grad(gm):
            out = runner.run(*batch)
        for name, v in (runner.values or {}).items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                values.setdefault(name, []).append(v.detach())
        outputs.extend(tensor_leaves(out))
    acts = {k: torch.cat(v) if len(v) > 1 and all(x.dim() > 0 for x in v) else v[0] for k, v in values.items()}
    effs = [float(measures.efficiency(o.float(), dim=-1)) for o in outputs if o.is_floating_point() and o.numel()]
    return acts, (sum(effs) / len(effs) if effs else 0.0)


def channel_efficiency(act: torch.Tensor, axis: int) -> torch.Tensor:
    """Per-channel ``E_c`` of an activation (see the module docstring)."""
    a = act.float().movedim(axis, -1)
    a = a.reshape(-1, a.shape[-1])
    info = a.abs().mean(0)
    ent = measures.entropy_terms(a, dim=-1).mean(0)
    return measures.efficiency_from(info, ent)


def _slice_norms(t: torch.Tensor, dim: int, p: int, chunk_elems: int = 1 << 20) -> torch.Tensor:
    """``sum |w|^p`` over every axis of ``t`` but ``dim`` (float32), one chunk of rows at a time.

    No transposed or ``|w|`` copy of the whole tensor: on VGG-11's 25088x4096 classifier those
    copies (and strided reductions) took 0.8-1.0 s of a 1.2 s pass; chunks of ~4 MB stay in cache.
    """
    w = t.detach()
    if w.dim() == 0:
        return w.float().abs().pow(p).reshape(1)
    others = [d for d in range(w.dim()) if d != dim]
    rows = max(1, chunk_elems // max(1, w[0].numel()))
    out = torch.zeros(w.shape[dim], dtype=torch.float32) if dim != 0 else None
    parts = []
    with torch.no_grad():
        for c in w.split(rows, dim=0):
            a = c.float().abs() if p == 1 else c.float().square()
            if not others:
                parts.append(a)
            elif dim == 0:
                parts.append(a.sum(dim=others))
            else:
                out += a.sum(dim=others)
    return torch.cat(parts) if dim == 0 else out


def _scores(gm: GraphModule, deps: Dependencies, criterion: str, acts: dict[str, torch.Tensor], seed: int) -> np.ndarray:
    """Score per unit label (index = label); higher = keep."""
    n = deps.num_atoms
    if criterion == "random":
        rng = np.random.default_rng(seed)
        atom = rng.random(n)
        return _per_unit(deps, atom, "mean")
    tensors = dict(gm.named_parameters(remove_duplicate=False))
    if criterion in ("l1", "l2"):
        total = np.zeros(n)
        for (name, dim), atoms in deps.bindings.items():
            t = tensors.get(name)
            if t is None or not t.is_floating_point():
                continue
            s = _slice_norms(t, dim, 1 if criterion == "l1" else 2).numpy().astype(np.float64)
            mean = s.mean()
            if mean > 0:
                np.add.at(total, atoms, s / mean)
        return _per_unit(deps, total, "sum")
    # cdg
    eff_sum, eff_cnt = np.zeros(n), np.zeros(n)
    for node_name, chan in deps.producers.items():
        act = acts.get(node_name)
        if act is None or act.dim() <= chan.axis or act.shape[chan.axis] != len(chan.atoms):
            continue
        e = channel_efficiency(act, chan.axis).numpy().astype(np.float64)
        np.add.at(eff_sum, chan.atoms, e)
        np.add.at(eff_cnt, chan.atoms, 1)
    w_sum, w_cnt = np.zeros(n), np.zeros(n)
    for (name, dim), atoms in deps.bindings.items():
        t = tensors.get(name)
        if t is None or not t.is_floating_point() or (eff_cnt[atoms] > 0).all():
            continue  # weight-only scores only where no activation was observed
        w = t.detach().float().movedim(dim, 0).reshape(t.shape[dim], -1)
        info = w.abs().mean(1)
        ent = measures.entropy_terms(w, dim=1).mean(1)
        e = measures.efficiency_from(info, ent).numpy().astype(np.float64)
        np.add.at(w_sum, atoms, e)
        np.add.at(w_cnt, atoms, 1)
    atom = np.where(eff_cnt > 0, eff_sum / np.maximum(eff_cnt, 1), w_sum / np.maximum(w_cnt, 1))
    has = (eff_cnt > 0) | (w_cnt > 0)
    return _per_unit(deps, np.where(has, atom, np.nan), "nanmean")


def _per_unit(deps: Dependencies, atom_scores: np.ndarray, how: str) -> np.ndarray:
    labels = deps.labels
    valid = ~np.isnan(atom_scores)
    total = np.zeros(deps.num_atoms)
    count = np.zeros(deps.num_atoms)
    np.add.at(total, labels[valid], atom_scores[valid])
    np.add.at(count, labels[valid], 1)
    if how == "sum":
        return total
    return np.where(count > 0, total / np.maximum(count, 1), 0.0)


def _keep_count(n: int, remove: int, round_to: int) -> int:
    """Units to keep: at least 1 (or round_to), a multiple of round_to, at most n."""
    keep = max(n - remove, 1)
    if round_to > 1:
        keep = min(n, max(round_to, math.ceil(keep / round_to) * round_to)) if n >= round_to else n
    return keep


def _select(deps: Dependencies, scores: np.ndarray, round_to: int, *, ratio: float | None = None, threshold: float | None = None) -> np.ndarray:
    """Labels of the lowest-scored units of every group: ``floor(ratio * n)`` of them, or those
    scoring below ``threshold`` (give exactly one), then rounded by :func:`_keep_count`."""
    removed = []
    for g in deps.groups:
        n = len(g.units)
        if n <= 1:
            continue
        s = scores[g.units]
        drop = int((s < threshold).sum()) if threshold is not None else math.floor(ratio * n + 1e-9)
        keep = _keep_count(n, drop, round_to)
        removed.append(g.units[np.argsort(s, kind="stable")][: n - keep])
    if not removed:
        return np.zeros(0, np.int64)
    return _keep_every_layer(deps, scores, np.concatenate(removed))


def _keep_every_layer(deps: Dependencies, scores: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Put back the best-scored unit of any layer (family) or cut-out section (a slice, a split
    piece) that would otherwise lose every channel: a group's ranking spans several layers (a
    concatenation feeding one squeeze-excite, say), and its lowest units can all be one layer's."""
    dropped = np.zeros(deps.num_atoms, dtype=bool)
    dropped[removed] = True
    for atoms in deps.nonempty:
        units = np.unique(deps.labels[atoms])
        if len(units) and (units != FROZEN).all() and dropped[units].all():
            best = units[np.argmax(scores[units])]
            dropped[best] = False
    return np.flatnonzero(dropped)


def _search_macs(gm: GraphModule, deps: Dependencies, scores: np.ndarray, target: float, round_to: int, inputs: tuple) -> tuple[np.ndarray, str | None]:
    """Smallest uniform ratio whose pruned copy has MACs <= target (bisection, 10 steps), and a
    note when even the largest ratio tried (0.95 of every group) stays above the target."""

    def macs_at(removed: np.ndarray) -> int:
        trial = copy.deepcopy(gm)
        apply_pruning(trial, deps, removed)
        return count_macs(trial, inputs)

    base = count_macs(gm, inputs)
    goal = target * base if target <= 1 else target
    lo, hi = 0.0, 0.95
    best = _select(deps, scores, round_to, ratio=hi)
    floor = macs_at(best)
    if floor > goal:
        return best, f"target_macs {goal:.4g} not reached: removing 95 % of every prunable group leaves {floor} MACs (of {base})"
    for _ in range(10):
        mid = (lo + hi) / 2
        removed = _select(deps, scores, round_to, ratio=mid)
        if macs_at(removed) <= goal:
            hi, best = mid, removed
        else:
            lo = mid
    return best, None


def _output_shapes(gm: GraphModule, inputs: tuple) -> list[tuple[int, ...]]:
    with eval_no_grad(gm):
        return [tuple(t.shape) for t in tensor_leaves(Runner(gm).run(*inputs))]


def _failure(gm: GraphModule, inputs: tuple, shapes: list[tuple[int, ...]]) -> tuple[str | None, str] | None:
    """(node, message) when the pruned graph fails on ``inputs`` or changes an output's shape."""
    try:
        got = _output_shapes(gm, inputs)
    except Exception as e:
        return getattr(e, "qcd_node", None), f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
    if got != shapes:
        return "output", "an output changed shape"
    return None


def _apply_checked(gm: GraphModule, deps: Dependencies, removed: np.ndarray, inputs: tuple | None, notes: list[str], attempts: int = 8) -> tuple[dict, np.ndarray]:
    """:func:`apply_pruning`, then a run on ``inputs``: if the pruned graph fails (an op whose
    sizes the analysis could not follow), the pruning is undone, the groups whose channels meet
    the failing node are left alone (a note says which node and why) and the rest is pruned
    again; if the failing node touches no pruned channel, nothing is pruned. The pass never hands
    the pipeline a graph that does not run."""
    shapes = _output_shapes(gm, inputs) if inputs is not None and len(removed) else None
    for _ in range(attempts):
        undo: list = []
        widths = apply_pruning(gm, deps, removed, undo)
        failed = _failure(gm, inputs, shapes) if shapes is not None else None
        if failed is None:
            return widths, removed
        _undo(gm, undo)
        node_name, message = failed
        nodes = {n.name: n for n in gm.graph.nodes}
        units = deps.units_at(nodes[node_name]) if node_name in nodes else np.zeros(0, np.int64)
        groups = [g for g in deps.groups if np.isin(g.units, units).any() and np.isin(g.units, removed).any()]
        where = f"at node '{node_name}' " if node_name else ""
        if not groups:
            notes.append(f"nothing pruned: the pruned graph fails {where}({message}) and the failing channels could not be located")
            return {}, removed[:0]
        drop = np.concatenate([g.units for g in groups])
        removed = removed[~np.isin(removed, drop)]
        notes.append(f"{len(groups)} group(s) left alone: pruned, the graph fails {where}({message})")
    notes.append("nothing pruned: the pruned graph kept failing")
    return {}, removed[:0]


def _undo(gm: GraphModule, undo: list) -> None:
    for restore in reversed(undo):
        restore()
    gm.recompile()


def apply_pruning(gm: GraphModule, deps: Dependencies, removed_units: np.ndarray, undo: list | None = None) -> dict[str, tuple[int, int]]:
    """Rewrite ``gm`` in place: slice tensors, update module attributes and graph constants.

    Returns ``{family: (width before, width after)}`` for every family that changed. ``undo``:
    receives one callable per change that restores what it replaced (see :func:`_undo`).
    """
    undo = [] if undo is None else undo
    keep = deps.kept_atoms(removed_units)
    per_tensor: dict[str, dict[int, torch.Tensor]] = {}
    for (name, dim), atoms in deps.bindings.items():
        mask = keep[atoms]
        if not mask.all():
            per_tensor.setdefault(name, {})[dim] = torch.from_numpy(np.nonzero(mask)[0])
    for name, dims in per_tensor.items():
        aliases = deps.aliases.get(name, [name])
        owner, attr = _owner(gm, aliases[0])
        old = getattr(owner, attr)
        new = old.detach()
        if sorted(dims) == [0, 1]:  # Linear/Conv weights: one gather reads only the kept block (~40 % faster)
            new = new[dims[0].to(new.device)[:, None], dims[1].to(new.device)]
        else:
            for dim, idx in sorted(dims.items()):
                new = new.index_select(dim, idx.to(new.device))  # a new tensor: nothing is shared with old
        if isinstance(old, nn.Parameter):
            new = nn.Parameter(new, requires_grad=old.requires_grad)
        for alias in aliases:
            mod, a = _owner(gm, alias)
            if a in mod._parameters:
                store = mod._parameters
            elif a in mod._buffers:
                store = mod._buffers
            else:
                store = mod.__dict__
            undo.append(lambda store=store, a=a, old=store[a]: store.__setitem__(a, old))
            store[a] = new
    for rw in deps.attr_rewrites:
        module = gm.get_submodule(rw.module)
        undo.append(lambda m=module, a=rw.attr, old=getattr(module, rw.attr): setattr(m, a, old))
        setattr(module, rw.attr, rw.value(int(keep[rw.atoms].sum())))
    nodes = {n.name: n for n in gm.graph.nodes}
    for rw in deps.arg_rewrites:
        node = nodes[rw.node]
        undo.append(lambda n=node, args=node.args, kwargs=node.kwargs: (setattr(n, "args", args), setattr(n, "kwargs", kwargs)))
        value = rw.value(int(keep[rw.atoms].sum()))
        if isinstance(rw.path[0], str):
            node.kwargs = {**node.kwargs, rw.path[0]: value}
        else:
            node.args = _set_path(node.args, rw.path, value)
    gm.recompile()
    fams = deps.family_of[1:]
    before = np.bincount(fams, minlength=len(deps.families))
    after = np.bincount(fams, weights=keep[1:].astype(np.float64), minlength=len(deps.families)).astype(np.int64)
    return {label: (int(b), int(a)) for label, b, a in zip(deps.families, before, after) if a != b}


def _owner(gm: GraphModule, qualname: str) -> tuple[nn.Module, str]:
    path, _, attr = qualname.rpartition(".")
    return (gm.get_submodule(path) if path else gm), attr


def _set_path(args: Any, path: tuple[int, ...], value: Any) -> Any:
    items = list(args)
    if len(path) == 1:
        items[path[0]] = value
    else:
        items[path[0]] = _set_path(items[path[0]], path[1:], value)
    return tuple(items) if isinstance(args, tuple) else items


def _remove_branches(gm: GraphModule, calib: list, cap_ratio: float | None) -> list[str]:
    """Node-level CDG: replace ``x + f(x)`` by ``x`` where ``f(x)`` is less efficient than the
    model output (at most ``cap_ratio`` of the residual adds when given)."""
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (operator.add, torch.add) and len(n.args) == 2]
    pairs = []
    for node in adds:
        a, b = node.args
        if not isinstance(a, Node) or not isinstance(b, Node):
            continue
        for skip, branch in ((a, b), (b, a)):
            if _is_ancestor(skip, branch):
                if _shape(skip) is not None and _shape(skip) == _shape(node):
                    pairs.append((node, skip, branch))
                break
    if not pairs:
        return []
    acts, out_eff = _calibrate(gm, calib, {branch.name for _, _, branch in pairs})
    candidates = []
    for node, skip, branch in pairs:
        act = acts.get(branch.name)
        if act is None:
            continue
        axis = 1 if act.dim() == 4 else act.dim() - 1  # channels of feature maps, features otherwise
        e = float(measures.efficiency(act.float(), dim=axis))
        if e < out_eff:
            candidates.append((e, node, skip))
    candidates.sort(key=lambda c: c[0])
    if cap_ratio is not None:
        candidates = candidates[: int(math.floor(cap_ratio * len(adds)))]
    removed = []
    for _, node, skip in candidates:
        node.replace_all_uses_with(skip)
        gm.graph.erase_node(node)
        removed.append(node.name)
    if removed:
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return removed


def _shape(node: Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def _is_ancestor(a: Node, b: Node, limit: int = 10_000) -> bool:
    stack, seen = [b], set()
    while stack and len(seen) < limit:
        cur = stack.pop()
        if cur is a:
            return True
        if cur in seen:
            continue
        seen.add(cur)
        stack.extend(cur.all_input_nodes)
    return False


def cdg_freeze(model: nn.Module, outputs: torch.Tensor, eps: float = measures.EPS) -> list[str]:
    """The seed's training-time CDG rule, as a hook to call between ``backward()`` and ``step()``.

    The seed's ``cosmic_dynamic_graph`` computes the output efficiency ``E_out`` (softmax over the
    last axis) and sets ``param.grad = None`` for every parameter whose own efficiency (softmax
    over dim 0) is lower, so that the optimizer skips it this step. It saves no computation (the
    full backward already ran); it is here so the rule can be compared with real pruning.
    Returns the names of the parameters it froze.
    """
    threshold = float(measures.efficiency(outputs.detach(), dim=-1, eps=eps))
    frozen = []
    for name, p in model.named_parameters():
        if p.grad is not None and float(measures.efficiency(p.detach(), dim=0, eps=eps)) < threshold:
            p.grad = None
            frozen.append(name)
    return frozen
