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
  that tensor's mean slice norm, averaged over tensors (so that units bound to many tensors, a
  residual stream's, and units bound to few rank on one scale).
* ``random`` — uniform scores from ``seed``.

Selection: ``ratio`` (fraction of the prunable units removed in every group; default 0.5),
``target_macs`` (global uniform ratio found by bisection until MACs fall to the target:
a fraction of the current MACs when <= 1, an absolute count otherwise), or ``threshold=auto``
(the seed's rule: remove units whose ``E`` is below the efficiency of the model output).
Every group keeps at least one unit; ``round_to=N`` keeps a multiple of N units. In a group
whose units do not all span the same layers (concatenations joined by residual streams:
Inception-ResNet, DPN), the ratio also holds per layer: the lowest-scored units go as long as
no layer loses more than ``ratio`` of its channels, so one stage is not cut in place of another.

``scope=nodes`` (or ``both``) also removes residual branches ``x + f(x) -> x`` whose output
efficiency is below the output's efficiency (at most ``ratio`` of the branches when a ratio is
given), then dead code.

Calibration streams: no activation is kept. Each calibration batch adds, per channel, the sums
``sum |a_c|`` and ``sum s_c`` (float64) and the number of positions to :class:`Moments` (the
entropy term is taken across channels at one position, so these sums are exact sufficient
statistics of ``I_c`` and ``S_c``), and the output's efficiency to a running sum; peak memory is
one forward pass instead of every activation of every batch. Under ``torch.distributed`` (a
process group with more than one rank; every rank runs the pass on the same model, each on its
shard of the calibration batches) the sums are all-reduced in one float64 vector, so every rank
scores on the union of the shards and keeps the channels one process over all the batches keeps
(shard by whole batches: the output's efficiency, the ``threshold=auto`` reference, is the mean
of per-batch values, as on one process). Rank 0's decision (the removed units) and then its
pruned parameters and buffers are broadcast, after a check that every rank built the same graph,
so the ranks cannot diverge.
"""

from __future__ import annotations

import copy
import math
import operator
import zlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.fx import GraphModule, Node

from .. import distributed, measures
from ..analysis import count_macs, eval_no_grad, node_shape
from ..errors import PreconditionError
from .base import Pass, PassOutcome, option, register
from .dependency import FROZEN, Dependencies, analyze
from .dependency.core import Chan
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
    target_latency: float | None = option(
        "prune until the predicted latency on this machine falls to this fraction of the original's measured one "
        "(per-layer latency table, measured once and cached)",
        None,
    )
    threshold: Literal["none", "auto"] = option("auto: the seed's rule, remove units less efficient than the output", "none")
    round_to: int = option("keep a multiple of this many units per group", 1)
    scope: Literal["channels", "nodes", "both"] = option("what to remove: channels, residual branches (nodes), or both", "channels")
    seed: int = option("random seed (criterion=random)", 0)
    attention: Literal["heads", "dims"] = option(
        "what attention loses: whole heads, or the same head_dim positions in every head (the head count stays)", "heads"
    )

    def __post_init__(self):
        chosen = [self.ratio is not None, self.target_macs is not None, self.threshold == "auto", self.target_latency is not None]
        if sum(chosen) > 1:
            raise ValueError("give only one of ratio, target_macs, target_latency and threshold=auto")
        if self.target_latency is not None and not (math.isfinite(self.target_latency) and 0 < self.target_latency < 1):
            raise ValueError(f"target_latency must be a fraction in (0, 1), got {self.target_latency}")
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
        if self.target_macs is None and self.target_latency is None and self.threshold == "none":
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
                _broadcast_state(gm)
                return PassOutcome(gm, bool(removed), notes, stats)
        deps = analyze(gm, attention=self.attention)
        effs: dict[str, np.ndarray] = {}
        out_eff: float | None = None
        if (calib or distributed.active()) and (self.criterion == "cdg" or self.threshold == "auto"):
            # every rank calibrates (even on an empty shard): the statistics are all-reduced
            cal = _calibrate(gm, calib, deps.producers)
            if cal.batches:
                effs, out_eff = cal.efficiencies(), cal.output_efficiency
                if distributed.active():
                    stats["calibration_batches"] = int(cal.batches)
        if out_eff is None and self.criterion == "cdg":
            notes.append("no calibration data: cdg scored from weights only")
        scores = _scores(gm, deps, self.criterion, effs, self.seed)
        if self.target_macs is not None:
            if not calib:
                raise PreconditionError(self.name, "target_macs needs example inputs to count MACs")
            # MACs are counted on the example inputs (what the report counts), not on a calibration batch
            inputs = context.example_inputs if context.example_inputs is not None else calib[0]
            removed, missed = _search_macs(gm, deps, scores, self.target_macs, self.round_to, inputs)
            if missed:
                notes.append(missed)
        elif self.target_latency is not None:
            if not calib:
                raise PreconditionError(self.name, "target_latency needs example inputs to time the model")
            inputs = context.example_inputs if context.example_inputs is not None else calib[0]
            removed, missed, latency = _search_latency(gm, deps, scores, self.target_latency, self.round_to, inputs)
            stats["latency"] = latency
            if missed:
                notes.append(missed)
        elif self.threshold == "auto":
            if out_eff is None:
                raise PreconditionError(self.name, "threshold=auto needs calibration data (the output's efficiency)")
            stats["output_efficiency"] = out_eff
            removed = _select(deps, scores, self.round_to, threshold=out_eff)
        else:
            removed = _select(deps, scores, self.round_to, ratio=self.effective_ratio)
        removed = _broadcast_labels(removed)  # rank 0 decides (the ranks' scores agree: all-reduced statistics)
        inputs = context.example_inputs if context.example_inputs is not None else (calib[0] if calib else None)
        widths, removed = _apply_checked(gm, deps, removed, inputs, notes)
        _broadcast_state(gm)  # rank 0's pruned weights everywhere (and a check that the graphs agree)
        if "latency" in stats and inputs is not None:
            from ..latency import measured_latency

            lat = stats["latency"]
            lat["measured_s"] = measured_latency(gm, inputs)
            notes.append(
                f"latency: predicted {1e3 * lat['predicted_s']:.3g} ms, measured {1e3 * lat['measured_s']:.3g} ms "
                f"(original {1e3 * lat['original_s']:.3g} ms, target {1e3 * lat['target_s']:.3g} ms)"
            )
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


class Moments:
    """Sufficient statistics of ``I`` and ``S`` along one axis, accumulated over calibration batches.

    Per channel ``c`` (``width`` of them): ``abs_sum[c] = sum |a_c|`` and ``ent_sum[c] = sum s_c``
    (float64), and ``count``, the number of terms in each sum. The seed's entropy term
    ``s = -softmax(a) * log_softmax(a)`` is taken across the channels *at one position*, so every
    term depends on one position of one sample only: ``I_c = abs_sum[c] / count`` and
    ``S_c = ent_sum[c] / count`` are exactly the means over the concatenated activations, and the
    sums of disjoint shards of the data add up to the sums over their union (the all-reduce of
    :func:`_calibrate`). Terms are computed in float32 as before; only the sums are float64.
    """

    def __init__(self, width: int):
        self.abs_sum = torch.zeros(width, dtype=torch.float64)
        self.ent_sum = torch.zeros(width, dtype=torch.float64)
        self.count = 0.0

    def add_channels(self, act: torch.Tensor, axis: int) -> None:
        """Add every position of ``act`` (channels on ``axis``): ``count`` counts positions."""
        a = act.detach().float().movedim(axis, -1)
        a = a.reshape(-1, a.shape[-1])
        self.abs_sum += a.abs().sum(0, dtype=torch.float64)
        self.ent_sum += measures.entropy_terms(a, dim=-1).sum(0, dtype=torch.float64)
        self.count += a.shape[0]

    def add_whole(self, act: torch.Tensor, dim: int) -> None:
        """Add every element of ``act`` (softmax along ``dim``) to one total (``width`` 1)."""
        a = act.detach().float()
        self.abs_sum += a.abs().sum(dtype=torch.float64)
        self.ent_sum += measures.entropy_terms(a, dim=dim).sum(dtype=torch.float64)
        self.count += a.numel()

    def efficiency(self) -> torch.Tensor:
        """``E`` per channel (float32, as :func:`channel_efficiency` computes it)."""
        n = max(self.count, 1.0)
        return measures.efficiency_from((self.abs_sum / n).float(), (self.ent_sum / n).float())


@dataclass
class Calibration:
    """What cdg-prune keeps from the calibration batches: :class:`Moments` per observed node and
    the sum and number of the per-batch efficiencies of the model's output leaves (the
    ``threshold=auto`` reference is their mean, each batch and output leaf counted once)."""

    moments: dict[str, Moments]
    out_eff_sum: float = 0.0
    out_eff_count: float = 0.0
    batches: float = 0.0

    @property
    def output_efficiency(self) -> float:
        return self.out_eff_sum / self.out_eff_count if self.out_eff_count else 0.0

    def efficiencies(self) -> dict[str, np.ndarray]:
        """Per-channel ``E`` (float64 copies of the float32 values) of every node seen at least once."""
        return {k: m.efficiency().numpy().astype(np.float64) for k, m in self.moments.items() if m.count > 0}

    def payload(self) -> torch.Tensor:
        """Every sum in one float64 vector (fixed layout: the nodes in the order given, widths from
        the graph), so that one all-reduce combines the ranks."""
        parts = [t for m in self.moments.values() for t in (m.abs_sum, m.ent_sum, torch.tensor([m.count], dtype=torch.float64))]
        parts.append(torch.tensor([self.out_eff_sum, self.out_eff_count, self.batches], dtype=torch.float64))
        return torch.cat(parts)

    def load(self, flat: torch.Tensor) -> None:
        i = 0
        for m in self.moments.values():
            w = m.abs_sum.numel()
            m.abs_sum, m.ent_sum, m.count = flat[i : i + w].clone(), flat[i + w : i + 2 * w].clone(), float(flat[i + 2 * w])
            i += 2 * w + 1
        self.out_eff_sum, self.out_eff_count, self.batches = (float(v) for v in flat[i : i + 3])

    def all_reduce(self) -> None:
        """Sum the statistics over the ranks of the running process group (a no-op without one)."""
        if not distributed.active():
            return
        layout = [(k, m.abs_sum.numel()) for k, m in self.moments.items()]
        _check_same_on_ranks(repr(layout), "the calibration statistics (channel layout)")
        flat = self.payload()
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        self.load(flat)


class _ObservingRunner(Runner):
    """A :class:`Runner` that hands the value of every node in ``observe`` to its callback as soon
    as the node has run (before a later in-place op could change it), instead of keeping it."""

    def __init__(self, gm: GraphModule, observe: dict[str, Any]):
        super().__init__(gm)
        self.observe = observe

    def run_node(self, n: Node) -> Any:
        result = super().run_node(n)
        fn = self.observe.get(n.name)
        if fn is not None and isinstance(result, torch.Tensor) and result.is_floating_point():
            fn(result)
        return result


def _calibrate(gm: GraphModule, calib: list, channels: dict[str, Chan] | None = None, whole: list[str] = ()) -> Calibration:
    """Statistics of the calibration batches, accumulated batch by batch (no activation is kept):
    per channel of each ``channels`` node (``{node: Chan}``; positions whose value has another width
    on the channel axis are skipped), one total for each ``whole`` node (softmax along axis 1 of
    4-d values, the last axis otherwise), and the seed's efficiency of the model output (softmax
    over the last axis, as the seed's CDG) per batch. Under ``torch.distributed`` (more than one
    rank) the sums are all-reduced: every rank gets the statistics of the union of the ranks'
    batches, so every rank must call this with the same graph."""
    channels = channels or {}
    order = [n.name for n in gm.graph.nodes if n.name in channels or n.name in whole]
    moments = {name: Moments(len(channels[name].atoms) if name in channels else 1) for name in order}
    observe: dict[str, Any] = {}
    for name in order:
        m = moments[name]
        if name in channels:
            axis, width = channels[name].axis, len(channels[name].atoms)

            def add(v, m=m, axis=axis, width=width):
                if v.dim() > axis and v.shape[axis] == width:
                    m.add_channels(v, axis)

        else:

            def add(v, m=m):
                m.add_whole(v, 1 if v.dim() == 4 else v.dim() - 1)

        observe[name] = add
    cal = Calibration(moments)
    for batch in calib:
        with eval_no_grad(gm):
            out = _ObservingRunner(gm, observe).run(*batch)
        for o in tensor_leaves(out):
            if o.is_floating_point() and o.numel():
                cal.out_eff_sum += float(measures.efficiency(o.float(), dim=-1))
                cal.out_eff_count += 1
        cal.batches += 1
    cal.all_reduce()
    return cal


def channel_efficiency(act: torch.Tensor, axis: int) -> torch.Tensor:
    """Per-channel ``E_c`` of an activation (see the module docstring). Calibration computes the
    same numbers from streamed sums (:class:`Moments`); this is the one-tensor reference."""
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


def _scores(gm: GraphModule, deps: Dependencies, criterion: str, effs: dict[str, np.ndarray | torch.Tensor], seed: int) -> np.ndarray:
    """Score per unit label (index = label); higher = keep. ``effs``: per-channel efficiencies of
    producer nodes (:meth:`Calibration.efficiencies`), or their activations (scored by
    :func:`channel_efficiency`)."""
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
        return _per_unit(deps, total, "mean")
    # cdg
    eff_sum, eff_cnt = np.zeros(n), np.zeros(n)
    for node_name, chan in deps.producers.items():
        e = effs.get(node_name)
        if isinstance(e, torch.Tensor):
            if e.dim() <= chan.axis or e.shape[chan.axis] != len(chan.atoms):
                continue
            e = channel_efficiency(e, chan.axis).numpy().astype(np.float64)
        if e is None or len(e) != len(chan.atoms):
            continue
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
    starts = np.searchsorted(deps.family_of[1:], np.arange(len(deps.families) + 1)) + 1
    for g in deps.groups:
        n = len(g.units)
        if n <= 1:
            continue
        s = scores[g.units]
        drop = int((s < threshold).sum()) if threshold is not None else math.floor(ratio * n + 1e-9)
        keep = _keep_count(n, drop, round_to)
        order = g.units[np.argsort(s, kind="stable")]
        if ratio is not None and round_to == 1 and len(g.families) > 1:
            picked = _within_every_layer(deps, g, order, ratio, starts)
            if picked is not None:
                removed.append(picked)
                continue
        removed.append(order[: n - keep])
    if not removed:
        return np.zeros(0, np.int64)
    return _keep_every_layer(deps, scores, np.concatenate(removed))


def _within_every_layer(deps: Dependencies, g: Any, order: np.ndarray, ratio: float, starts: np.ndarray) -> np.ndarray | None:
    """For a group whose units do not all span the same layers (a concatenation's parts joined
    by residual streams: Inception-ResNet's stages, DPN): the lowest-scored units, in ``order``,
    that leave no layer (family) with more than ``floor(ratio * width)`` channels removed, so
    that one stage is not cut in place of another. None when every unit spans every layer
    (the plain ranking does the same)."""
    atoms = np.concatenate([np.arange(starts[f], starts[f + 1]) for f in g.families])
    units, fams = deps.labels[atoms], deps.family_of[atoms]
    live = units != FROZEN
    pairs, counts = np.unique(np.stack([units[live], fams[live]]), axis=1, return_counts=True)
    if pairs.shape[1] == len(g.units) * len(g.families):
        return None
    quota = {f: math.floor(ratio * (starts[f + 1] - starts[f]) + 1e-9) for f in g.families}
    spans: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for u, f, c in zip(pairs[0].tolist(), pairs[1].tolist(), counts.tolist()):
        spans[u].append((f, c))
    budget = math.floor(ratio * len(g.units) + 1e-9)
    picked = []
    for u in order.tolist():
        if len(picked) >= budget:
            break
        if all(quota[f] >= c for f, c in spans[u]):
            for f, c in spans[u]:
                quota[f] -= c
            picked.append(u)
    return np.asarray(picked, dtype=np.int64)


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


def _bisect_ratio(deps: Dependencies, scores: np.ndarray, round_to: int, cost, goal: float) -> tuple[np.ndarray, float, float, bool]:
    """Smallest uniform ratio whose removal has ``cost(removed) <= goal`` (bisection, 10 steps):
    ``(removed, its cost, the ratio, reached)``; not reached when even 0.95 of every group stays above."""
    lo, hi = 0.0, 0.95
    best = _select(deps, scores, round_to, ratio=hi)
    best_cost = cost(best)
    if best_cost > goal:
        return best, best_cost, hi, False
    for _ in range(10):
        mid = (lo + hi) / 2
        removed = _select(deps, scores, round_to, ratio=mid)
        c = cost(removed)
        if c <= goal:
            hi, best, best_cost = mid, removed, c
        else:
            lo = mid
    return best, best_cost, hi, True


def _pruned_copy(gm: GraphModule, deps: Dependencies, removed: np.ndarray) -> GraphModule:
    trial = copy.deepcopy(gm)
    apply_pruning(trial, deps, removed)
    return trial


def _search_macs(gm: GraphModule, deps: Dependencies, scores: np.ndarray, target: float, round_to: int, inputs: tuple) -> tuple[np.ndarray, str | None]:
    """Smallest uniform ratio whose pruned copy has MACs <= target, and a note when even the
    largest ratio tried (0.95 of every group) stays above the target."""
    base = count_macs(gm, inputs)
    goal = target * base if target <= 1 else target
    best, floor, _, reached = _bisect_ratio(deps, scores, round_to, lambda removed: count_macs(_pruned_copy(gm, deps, removed), inputs), goal)
    if not reached:
        return best, f"target_macs {goal:.4g} not reached: removing 95 % of every prunable group leaves {floor} MACs (of {base})"
    return best, None


def _search_latency(
    gm: GraphModule, deps: Dependencies, scores: np.ndarray, target: float, round_to: int, inputs: tuple
) -> tuple[np.ndarray, str | None, dict[str, Any]]:
    """Smallest uniform ratio whose pruned copy's *predicted* latency is <= ``target`` x the
    original's measured latency (:class:`qcd_fx.latency.Predictor`: the per-layer table of this
    machine, cached), a note when 95 % of every group is not enough, and what was predicted."""
    from ..latency import Predictor

    predict = Predictor(gm, inputs)
    goal = target * predict.measured_s
    best, best_s, ratio, reached = _bisect_ratio(deps, scores, round_to, lambda removed: predict(_pruned_copy(gm, deps, removed)), goal)
    missed = None
    if not reached:
        missed = f"target_latency {target:g} not reached: removing 95 % of every prunable group is predicted to take {1e3 * best_s:.3g} ms of {1e3 * predict.measured_s:.3g} ms"
    predict.table.save()
    info = {
        "original_s": predict.measured_s,
        "target_s": goal,
        "predicted_s": best_s,
        "ratio": ratio,
        "layers_timed": predict.table.measured,
        "table": predict.table.path,
    }
    return best, missed, info


def _output_shapes(gm: GraphModule, inputs: tuple) -> list[tuple[int, ...]]:
    """The shapes of ``gm``'s outputs on ``inputs``, from its generated code (no interpreter: on
    small models the interpreter's per-node cost was most of the pass's time)."""
    with eval_no_grad(gm):
        return [tuple(t.shape) for t in tensor_leaves(gm(*inputs))]


def _failing_node(gm: GraphModule, inputs: tuple) -> str | None:
    """The node that raises when ``gm`` runs on ``inputs`` (None if the interpreter runs it)."""
    try:
        with eval_no_grad(gm):
            Runner(gm).run(*inputs)
    except Exception as e:
        return getattr(e, "qcd_node", None)
    return None


def _failure(gm: GraphModule, inputs: tuple, shapes: list[tuple[int, ...]]) -> tuple[str | None, str] | None:
    """(node, message) when the pruned graph fails on ``inputs`` or changes an output's shape."""
    try:
        got = _output_shapes(gm, inputs)
    except Exception as e:
        return _failing_node(gm, inputs), f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
    if got != shapes:
        return "output", "an output changed shape"
    return None


def _apply_checked(
    gm: GraphModule, deps: Dependencies, removed: np.ndarray, inputs: tuple | None, notes: list[str], attempts: int = 8
) -> tuple[dict, np.ndarray]:
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
        _undo(undo)
        node_name, message = failed
        nodes = {n.name: n for n in gm.graph.nodes}
        units = deps.units_at(nodes[node_name]) if node_name in nodes else np.zeros(0, np.int64)
        groups = [g for g in deps.groups if np.isin(g.units, units).any() and np.isin(g.units, removed).any()]
        where = f"at node '{node_name}' " if node_name else ""
        if not groups:  # the node's channels are not tracked: find a group that fails on its own
            culprit = _failing_group(gm, deps, removed, inputs, shapes)
            if culprit is None:
                notes.append(f"nothing pruned: the pruned graph fails {where}({message}) and the failing channels could not be located")
                return {}, removed[:0]
            groups = [culprit]
        drop = np.concatenate([g.units for g in groups])
        removed = removed[~np.isin(removed, drop)]
        notes.append(f"{len(groups)} group(s) left alone: pruned, the graph fails {where}({message})")
    notes.append("nothing pruned: the pruned graph kept failing")
    return {}, removed[:0]


def _failing_group(gm: GraphModule, deps: Dependencies, removed: np.ndarray, inputs: tuple, shapes: list) -> Any:
    """A group whose pruning alone makes the graph fail, found by bisecting the pruned groups
    (a trial prunes one half and runs the graph), or None when only a combination fails. Every
    set the bisection keeps is known to fail (the whole set did: the caller saw it)."""

    def fails(groups: list) -> bool:
        units = np.concatenate([g.units for g in groups])
        undo: list = []
        apply_pruning(gm, deps, removed[np.isin(removed, units)], undo)
        try:
            return _failure(gm, inputs, shapes) is not None
        finally:
            _undo(undo)

    candidates = [g for g in deps.groups if np.isin(g.units, removed).any()]
    while len(candidates) > 1:
        half = len(candidates) // 2
        if fails(candidates[:half]):
            candidates = candidates[:half]
        elif fails(candidates[half:]):
            candidates = candidates[half:]
        else:
            return None
    return candidates[0] if candidates else None


def _undo(undo: list) -> None:
    for restore in reversed(undo):
        restore()


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
    modules = dict(gm.named_modules(remove_duplicate=False)) if per_tensor else {}
    refresh: dict[int, nn.Module] = {}
    for name, dims in per_tensor.items():
        aliases = deps.aliases.get(name, [name])
        owner, attr = _owner(modules, aliases[0])
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
            mod, a = _owner(modules, alias)
            if a in mod._parameters:
                store = mod._parameters
            elif a in mod._buffers:
                store = mod._buffers
            else:
                store = mod.__dict__
            undo.append(lambda store=store, a=a, old=store[a]: store.__setitem__(a, old))
            store[a] = new
            if hasattr(mod, "_init_flat_weights"):  # nn.LSTM/GRU/RNN run on a list of their weights kept beside the parameters
                refresh[id(mod)] = mod
    for mod in refresh.values():
        mod._init_flat_weights()
        undo.insert(0, mod._init_flat_weights)  # undone last: after the weights are back
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
    if deps.arg_rewrites:  # the generated code holds the literals (weights are read by name: no recompile for them)
        gm.recompile()
        undo.insert(0, gm.recompile)  # undone last: the code of the restored graph
    fams = deps.family_of[1:]
    before = np.bincount(fams, minlength=len(deps.families))
    after = np.bincount(fams, weights=keep[1:].astype(np.float64), minlength=len(deps.families)).astype(np.int64)
    return {label: (int(b), int(a)) for label, b, a in zip(deps.families, before, after) if a != b}


def _owner(modules: dict[str, nn.Module], qualname: str) -> tuple[nn.Module, str]:
    path, _, attr = qualname.rpartition(".")
    return modules[path], attr


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
                if node_shape(skip) is not None and node_shape(skip) == node_shape(node):
                    pairs.append((node, skip, branch))
                break
    if not pairs:
        return []
    # softmax along the channels of feature maps (axis 1 of 4-d values), the features otherwise
    cal = _calibrate(gm, calib, whole=[branch.name for _, _, branch in pairs])
    out_eff = cal.output_efficiency
    candidates = []
    for node, skip, branch in pairs:
        m = cal.moments[branch.name]
        if not m.count:
            continue
        e = float(m.efficiency()[0])
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


def _check_same_on_ranks(signature: str, what: str) -> None:
    """Raise on every rank unless ``signature`` is the same on every rank (one small all-reduce)."""
    h = zlib.crc32(signature.encode())
    t = torch.tensor([h, -h], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if int(t[0]) != -int(t[1]):
        raise RuntimeError(
            f"cdg-prune under torch.distributed: {what} differs between the ranks (rank {distributed.rank()}); every rank must run the pass on the same model"
        )


def _broadcast_labels(removed: np.ndarray) -> np.ndarray:
    """Rank 0's removed unit labels on every rank (unchanged off a process group)."""
    if not distributed.active():
        return removed
    n = torch.tensor([len(removed)], dtype=torch.int64)
    dist.broadcast(n, src=0)
    labels = torch.as_tensor(np.asarray(removed, dtype=np.int64)) if distributed.rank() == 0 else torch.zeros(int(n), dtype=torch.int64)
    dist.broadcast(labels, src=0)
    return labels.numpy()


def _broadcast_state(gm: GraphModule) -> None:
    """Make every rank's pruned model rank 0's: check that the graphs and tensor shapes agree,
    then broadcast every parameter and buffer from rank 0 (as DDP does when it wraps a model).
    The structure is already identical (same decision, deterministic rewrite); the broadcast also
    covers ranks whose weights differed before the pass (an unseeded initialisation)."""
    if not distributed.active():
        return
    state = gm.state_dict(keep_vars=True)
    _check_same_on_ranks(gm.code + repr([(k, tuple(v.shape), str(v.dtype)) for k, v in state.items()]), "the pruned graph")
    seen: set[int] = set()
    with torch.no_grad():
        for v in state.values():
            if id(v) in seen or not isinstance(v, torch.Tensor):
                continue
            seen.add(id(v))
            dist.broadcast(v.data, src=0)


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
