"""CCE — efficiency-scaled gradient descent (the cosmic seed's "Cosmic Classical Efficiency" step).

The seed (``cosmic_classical_efficiency_step``) scales every parameter tensor's gradient by the
tensor's efficiency ``E = (I - S) / (I + S + eps)`` (:mod:`qcd_fx.measures`, softmax along
dim 0) and takes a plain gradient step::

    p <- p - lr * E(p) * grad(p)

``E`` lies in ``(-1, 1)`` and is *negative* for tensors whose softmax entropy term exceeds their
mean magnitude: the output layer of a classifier (10 rows: ``S = ln(10)/10 = 0.23``), every
zero-initialised tensor (BatchNorm biases, the identity-initialised interface-gate projectors:
``E = -1``), most 3x3 convolutions of the digits CNN. Those tensors take gradient *ascent*
steps, and the model never trains: measured in ``benchmarks/optimizers.py`` (digits, QCI
MLP/CNN) the seed step stays near chance (see ``benchmarks/results/optimizers.md``).
``mode="seed"`` reproduces that step exactly (same arithmetic as the seed, bit for bit on float32)
so the failure can be shown; it is not meant for training.

The default ``mode="positive"`` keeps the seed's idea — rank tensors by efficiency and step harder
where it is high — and never steps uphill: the scale is an increasing, strictly positive map of
``E``::

    scale = min_scale + (1 - min_scale) * (1 + E) / 2         in [min_scale, 1)

``(1 + E) / 2`` alone (``min_scale=0``) maps ``(-1, 1)`` onto ``(0, 1)``, but ``E = -1`` for a
zero tensor, so every zero-initialised tensor (interface-gate projectors, BatchNorm biases) would
get a scale of ~1e-7 and never move. The floor ``min_scale`` keeps them trainable; the scales stay
ordered exactly as the efficiencies. The defaults were chosen on a validation split (digits, QCI
MLP and CNN; ``benchmarks/optimizers.py``, results in ``benchmarks/results/optimizers.json``
under ``defaults``): ``min_scale`` in ``{0, 0.25, 0.5, 1}`` made no measurable difference (the
efficiency scaling neither helps nor hurts), ``momentum=0.9`` trained clearly better than none,
and refreshing the efficiencies less often (``refresh_every``) cost no accuracy.

Cost. Each efficiency needs one ``exp`` per parameter element (the softmax). The foreach path
computes all ``I`` and ``S`` with batched reductions (small tensors of equal shape are stacked;
large tensors are processed in cache-sized column chunks with ``H = log Z + max - sum(z x) / Z``:
one ``exp`` per element instead of the seed's ``softmax`` + ``log_softmax``) and updates each large
tensor with one fused SGD kernel. ``refresh_every=K`` (default 32) recomputes the efficiencies every
``K`` steps; between refreshes a step costs what fused SGD-momentum costs, the floor of any
momentum method (5 memory passes per element against plain SGD's 3). The cost per step of every
mode against ``SGD(foreach=True)`` and Adam is measured by ``benchmarks/optimizers.py``
(``benchmarks/results/optimizers.json``, ``cce_step_cost``; table in the README).

Other options: momentum (heavy-ball, optional Nesterov), coupled weight decay, per-group
settings, ``torch.optim.lr_scheduler`` (it reads ``group["lr"]`` every step), ``state_dict``
round trips, half-precision parameters (efficiencies are computed in float32, so fp16/bf16
softmax underflow never produces NaN), and the seed's training-time CDG freezing rule
(``freeze_below``: a tensor whose efficiency is below the threshold is not updated that step;
note that, as in the seed, this saves no forward/backward work — only the update is skipped).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import measures
from ..distributed import is_sharded

Mode = Literal["positive", "seed"]
MODES = ("positive", "seed")

DEFAULT_REFRESH_EVERY = 32
"""Efficiency refresh interval of the default mode (see the benchmark's ``cce_refresh`` section)."""

_CHUNK_ELEMENTS = 1 << 19
"""Elements per column chunk of a large tensor in :func:`efficiencies` (2 MiB of float32: L2-sized)."""

_STACK_LIMIT = 1 << 16
"""Tensors with at most this many elements and equal shapes are stacked into one reduction."""

_FUSED_MIN_ELEMENTS = 1 << 14
"""Tensors at least this large are updated with one ``torch._fused_sgd_`` call each (5 memory
passes with momentum, against 8 for the foreach ops); smaller ones share a few foreach calls."""

_FUSED_DEVICES = ("cpu", "cuda") if hasattr(torch, "_fused_sgd_") else ()
"""Tensors with at most this many elements and equal shapes are stacked into one reduction."""


# ── efficiency of many tensors at once ─────────────────────────────────────────────────────────


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _entropy_abs_sums(x: Tensor) -> tuple[Tensor, Tensor]:
    """For ``x`` of shape ``(g, d, n)``: per ``g``, the sum over the ``n`` columns of the Shannon
    entropy of ``softmax(column)`` and the sum of ``|x|``.

    Uses ``H = log Z + m - sum(z * x) / Z`` with ``m = max``, ``z = exp(x - m)``, ``Z = sum z``:
    one ``exp`` per element, and no cancellation (``m >= softmax-weighted mean of x``, ``log Z >= 0``).
    """
    m = x.amax(1, keepdim=True)
    z = torch.exp(x - m)
    big_z = z.sum(1)
    weighted = z.mul_(x).sum(1)
    h = big_z.log() + m.squeeze(1) - weighted / big_z
    return h.sum(1), x.abs().sum((1, 2))


def efficiencies(tensors: Sequence[Tensor], eps: float = measures.EPS) -> Tensor:
    """The seed's efficiency ``E`` (softmax along dim 0, as the CCE step uses) of every tensor.

    Equals ``torch.stack([measures.efficiency(t, dim=0) for t in tensors])`` up to float rounding
    (checked in ``tests/test_optim_cce.py``), without the per-tensor ``softmax``/``log_softmax``:
    see :func:`_entropy_abs_sums`. Returns a float32 tensor (float64 if every input is float64) on
    the device of the first tensor. Empty tensors get ``E = 0``.
    """
    if not tensors:
        return torch.zeros(0)
    device = tensors[0].device
    out_dtype = torch.float64 if all(t.dtype == torch.float64 for t in tensors) else torch.float32
    h_sums: list[Tensor | None] = [None] * len(tensors)
    abs_sums: list[Tensor | None] = [None] * len(tensors)
    stacks: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        t = t.detach()
        if t.numel() == 0:
            continue
        d = t.shape[0] if t.dim() else 1
        n = t.numel() // d
        if t.numel() <= _STACK_LIMIT:
            stacks.setdefault((d, n, t.dtype, t.device), []).append(i)
            continue
        x = t.reshape(d, n)
        cdt = _compute_dtype(t)
        step = max(1, _CHUNK_ELEMENTS // d)
        h_total = torch.zeros((), dtype=cdt, device=t.device)
        a_total = torch.zeros((), dtype=cdt, device=t.device)
        for j in range(0, n, step):
            chunk = x[:, j : j + step].to(cdt).unsqueeze(0)
            h, a = _entropy_abs_sums(chunk)
            h_total += h[0]
            a_total += a[0]
        h_sums[i], abs_sums[i] = h_total, a_total
    for (d, n, dtype, _), idx in stacks.items():
        cdt = torch.float64 if dtype == torch.float64 else torch.float32
        x = torch.stack([tensors[i].detach().reshape(d, n) for i in idx]).to(cdt)
        if d == 1:  # softmax over one element is 1: the entropy term is exactly 0 (as measures.py)
            h, a = torch.zeros(len(idx), dtype=cdt, device=x.device), x.abs().sum((1, 2))
        else:
            h, a = _entropy_abs_sums(x)
        for k, i in enumerate(idx):
            h_sums[i], abs_sums[i] = h[k], a[k]
    result = torch.zeros(len(tensors), dtype=out_dtype, device=device)
    present = [i for i, h in enumerate(h_sums) if h is not None]
    if present:
        numel = torch.tensor([tensors[i].numel() for i in present], dtype=out_dtype, device=device)
        info = torch.stack([abs_sums[i].to(device=device, dtype=out_dtype) for i in present]) / numel
        ent = torch.stack([h_sums[i].to(device=device, dtype=out_dtype) for i in present]) / numel
        result[present] = measures.efficiency_from(info, ent, eps)
    return result


def efficiency_scale(e: float, mode: str, min_scale: float) -> float:
    """The step scale of a tensor with efficiency ``e``: ``e`` (seed) or ``min_scale + (1-min_scale)(1+e)/2``."""
    if mode == "seed":
        return e
    return min_scale + (1.0 - min_scale) * 0.5 * (1.0 + e)


def output_efficiency(outputs: Tensor) -> float:
    """The seed CDG's threshold: efficiency of the model outputs (softmax along the last dim).

    ``opt.param_groups[0]["freeze_below"] = output_efficiency(out.detach())`` reproduces the seed's
    ``cosmic_dynamic_graph`` freezing rule (freeze tensors less efficient than the outputs).
    """
    return float(measures.efficiency(outputs.detach(), dim=-1))


# ── the optimizer ──────────────────────────────────────────────────────────────────────────────


def _check_number(name: str, value: Any, low: float, high: float = math.inf, low_inclusive: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    ok_low = value >= low if low_inclusive else value > low
    if not (ok_low and value <= high):
        lo = "[" if low_inclusive else "("
        raise ValueError(f"{name} must be in {lo}{low}, {high}], got {value!r}")


class CCE(Optimizer):
    """Efficiency-scaled SGD (the seed's CCE step), safe by default.

    Each step, for every parameter ``p`` with a gradient, with ``E = E(p)`` from
    :mod:`qcd_fx.measures` (refreshed every ``refresh_every`` steps)::

        d   = grad + weight_decay * p
        buf = momentum * buf + (1 - dampening) * d         (if momentum > 0; first step: buf = d)
        d   = d + momentum * buf if nesterov else buf       (if momentum > 0)
        p  -= lr * scale(E) * d

    with ``scale(E) = E`` for ``mode="seed"`` and ``min_scale + (1 - min_scale) * (1 + E) / 2``
    for ``mode="positive"`` (default). With ``mode="seed"``, no momentum and no weight decay this is
    the seed's ``cosmic_classical_efficiency_step`` operation for operation.

    Args:
        params: parameters or parameter groups; every option below may be set per group.
        lr: learning rate (default 0.1).
        momentum: heavy-ball momentum (default 0.9; 0 for the seed's plain step).
        dampening, nesterov, weight_decay: as in :class:`torch.optim.SGD` (default 0 / False / 0).
        mode: ``"positive"`` (default) or ``"seed"``.
        min_scale: floor of the positive mapping, in ``[0, 1]`` (default 0.25; 1 gives plain SGD).
        refresh_every: recompute efficiencies every this many steps (default 32 in ``"positive"``
            mode, 1 in ``"seed"`` mode). 1 is the exact mode.
        freeze_below: the seed's CDG freezing rule: a tensor whose efficiency is below this value is
            not updated (its momentum is not advanced). ``None`` (default) disables it.
        foreach: batched efficiency reductions and multi-tensor momentum (default: True, except in
            ``"seed"`` mode, which uses the seed's per-tensor arithmetic).
        eps: the ``eps`` of ``E`` (default 1e-8, the seed's).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.1,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        mode: Mode = "positive",
        min_scale: float = 0.25,
        refresh_every: int | None = None,
        freeze_below: float | None = None,
        foreach: bool | None = None,
        eps: float = measures.EPS,
    ):
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            mode=mode, min_scale=min_scale, refresh_every=refresh_every, freeze_below=freeze_below,
            foreach=foreach, eps=eps,
        )  # fmt: skip
        self._validate(defaults)
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._validate(group)
            if any(is_sharded(p) for p in group["params"]):
                raise ValueError(
                    "CCE needs each parameter's whole gradient for its per-tensor statistics; these parameters are sharded "
                    "(FSDP / fully_shard): train with DistributedDataParallel (fit does, qcd-fx train --nproc N) or use adam/sgd under FSDP"
                )

    @staticmethod
    def _validate(group: dict[str, Any]) -> None:
        if group["mode"] not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {group['mode']!r}")
        lr = group["lr"]
        if isinstance(lr, Tensor):
            if lr.numel() != 1:
                raise ValueError(f"lr must be a number or a one-element tensor, got shape {tuple(lr.shape)}")
            lr = float(lr)
        _check_number("lr", lr, 0.0)
        _check_number("momentum", group["momentum"], 0.0, 1.0)
        _check_number("dampening", group["dampening"], 0.0, 1.0)
        _check_number("weight_decay", group["weight_decay"], 0.0)
        _check_number("min_scale", group["min_scale"], 0.0, 1.0)
        _check_number("eps", group["eps"], 0.0, low_inclusive=False)
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("nesterov=True needs momentum > 0 and dampening = 0")
        k = group["refresh_every"]
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"refresh_every must be a positive integer or None, got {k!r}")
        fb = group["freeze_below"]
        if fb is not None:
            _check_number("freeze_below", fb, -math.inf)
        if group["foreach"] not in (None, True, False):
            raise ValueError(f"foreach must be True, False or None, got {group['foreach']!r}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._validate(self.param_groups[-1])

    @staticmethod
    def _resolved(group: dict[str, Any]) -> tuple[int, bool]:
        seed = group["mode"] == "seed"
        k = group["refresh_every"] if group["refresh_every"] is not None else (1 if seed else DEFAULT_REFRESH_EVERY)
        foreach = group["foreach"] if group["foreach"] is not None else not seed
        return k, foreach

    def efficiencies(self) -> dict[Tensor, float]:
        """The cached efficiency of every parameter that has taken a step (diagnostics)."""
        return {p: st["efficiency"] for p, st in self.state.items() if "efficiency" in st}

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One update; ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        refresh_every, foreach = self._resolved(group)
        seed_mode = group["mode"] == "seed"
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            if p.grad.is_sparse:
                raise ValueError("CCE does not support sparse gradients")
        states = [self.state[p] for p in params]
        stale = [i for i, st in enumerate(states) if st.get("step", 0) % refresh_every == 0 or "efficiency" not in st]
        seed_e: dict[int, Tensor] = {}
        if stale:
            if foreach:
                values = efficiencies([params[i] for i in stale], group["eps"]).tolist()
            else:
                tensors = [measures.efficiency(params[i].detach(), dim=0, eps=group["eps"]) for i in stale]
                if seed_mode:  # keep the 0-d tensors: the seed multiplies the gradient by a tensor E
                    seed_e = dict(zip(stale, tensors))
                values = [float(e) for e in tensors]
            for i, e in zip(stale, values):
                states[i]["efficiency"] = e
        for st in states:
            st["step"] = st.get("step", 0) + 1

        lr = float(group["lr"])
        wd, momentum, dampening = group["weight_decay"], group["momentum"], group["dampening"]
        fb = group["freeze_below"]
        keep = [i for i, st in enumerate(states) if fb is None or not st["efficiency"] < fb]
        if len(keep) != len(params):
            params = [params[i] for i in keep]
            states = [states[i] for i in keep]
            seed_e = {k: seed_e[i] for k, i in enumerate(keep) if i in seed_e}
        if not params:
            return
        scales = [efficiency_scale(st["efficiency"], group["mode"], group["min_scale"]) for st in states]
        if seed_mode or not foreach:
            self._update_reference(group, params, states, scales, seed_e if seed_mode else None)
            return
        fused = [i for i, p in enumerate(params) if p.numel() >= _FUSED_MIN_ELEMENTS and p.device.type in _FUSED_DEVICES]
        small = sorted(set(range(len(params))) - set(fused))
        for i in fused:  # one fused kernel per large tensor: SGD's own memory traffic
            p, st = params[i], states[i]
            buf = st.get("momentum_buffer")
            first = momentum != 0 and buf is None
            if first:
                buf = st["momentum_buffer"] = torch.empty_like(p)
            torch._fused_sgd_(
                [p], [p.grad], [buf] if momentum != 0 else [], weight_decay=wd, momentum=momentum,
                lr=lr * scales[i], dampening=dampening, nesterov=group["nesterov"], maximize=False, is_first_step=first,
            )  # fmt: skip
        if small:
            ps = [params[i] for i in small]
            sts = [states[i] for i in small]
            d = [p.grad for p in ps]
            if wd != 0:
                d = torch._foreach_add(d, ps, alpha=wd)
            if momentum != 0:
                d = self._momentum_foreach(group, sts, d)
            torch._foreach_add_(ps, torch._foreach_mul(d, [-lr * scales[i] for i in small]))

    @staticmethod
    def _momentum_foreach(group: dict[str, Any], states: list[dict], d: list[Tensor]) -> list[Tensor]:
        momentum, dampening = group["momentum"], group["dampening"]
        bufs = [st.get("momentum_buffer") for st in states]
        old = [i for i, b in enumerate(bufs) if b is not None]
        for i, b in enumerate(bufs):
            if b is None:
                bufs[i] = states[i]["momentum_buffer"] = d[i].detach().clone()
        if old:
            ob = [bufs[i] for i in old]
            torch._foreach_mul_(ob, momentum)
            torch._foreach_add_(ob, [d[i] for i in old], alpha=1 - dampening)
        if group["nesterov"]:
            return torch._foreach_add(d, bufs, alpha=momentum)
        return bufs

    @staticmethod
    def _update_reference(group, params, states, scales, seed_e) -> None:
        """Per-tensor arithmetic: the seed's operation order (``seed_e`` given) or plain ops."""
        lr = float(group["lr"])
        wd, momentum, dampening = group["weight_decay"], group["momentum"], group["dampening"]
        for i, (p, st) in enumerate(zip(params, states)):
            d = p.grad
            if wd != 0:
                d = d.add(p, alpha=wd)
            if momentum != 0:
                buf = st.get("momentum_buffer")
                if buf is None:
                    buf = st["momentum_buffer"] = d.detach().clone()
                else:
                    buf.mul_(momentum).add_(d, alpha=1 - dampening)
                d = d.add(buf, alpha=momentum) if group["nesterov"] else buf
            if seed_e is not None:
                e = seed_e.get(i)
                if e is None:
                    e_dtype = p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32
                    e = torch.tensor(st["efficiency"], dtype=e_dtype, device=p.device)
                # the seed: efficiency_grad = E * grad; param.data.add_(efficiency_grad, alpha=-lr)
                p.add_(e * d, alpha=-lr)
            else:
                p.add_(d, alpha=-lr * scales[i])


__all__ = ["CCE", "MODES", "DEFAULT_REFRESH_EVERY", "efficiencies", "efficiency_scale", "output_efficiency"]
