"""QDT — the quantum-duality-theory seed as a learning-rate schedule and a gradient-clipping hook.

Source: ``quantum-duality-theory-ml.md`` (sections 1, 2.2 and 4.2). Its constants::

    alpha = 0.45   "energy growth rate"          beta   = 0.25  "entropy-energy modulator"
    gamma = 0.35   "exploration/exploitation"    Lambda = 1.2   "cosmological constant"

:class:`QDTSchedule` (a ``torch.optim.lr_scheduler.LRScheduler``)
================================================================

The learning rate of every group is ``base_lr * m(n)`` at scheduler step ``n``, with
``t = n * time_scale`` and the multiplier the seed's adaptive rate (section 2.2)::

    m(t)  = Psi(t) / Psi_peak  *  E(t) * (1 + beta * S(t))  *  S_lambda(t)

* **Coupling** (section 1.1), with the integral in closed form::

      Psi(t) = alpha e^{-beta t} cos(gamma t) + Lambda * int_0^t e^{-beta tau} sin(gamma tau) dtau
      int_0^t e^{-beta tau} sin(gamma tau) dtau = (gamma - e^{-beta t} (beta sin(gamma t) + gamma cos(gamma t))) / (beta^2 + gamma^2)

  For the seed's constants ``Psi`` starts at ``alpha = 0.45``, dips to 0.433 at ``t = 0.31``,
  peaks at 2.465 at ``t = 9.28`` and settles at ``Lambda gamma / (beta^2 + gamma^2) = 2.27``: a warm-up
  with a small overshoot. It is divided by its maximum over ``t >= 0`` (:func:`coupling_peak`,
  also in closed form), so ``base_lr`` is the peak rate; the seed's constant ``alpha`` in front of
  ``eta`` is the value of ``Psi`` at ``t = 0`` and is otherwise absorbed into ``base_lr``.
  ``coupling=False`` drops the factor (the seed's constant-``alpha`` rate).
* **Scale transition** (section 1.2): ``S_lambda(t) = 1 / (1 + exp(-lambda (t - t_c)))`` with
  ``lambda = transition_rate``, ``t_c = transition_time``: from the "quantum" (~0) to the
  "classical" (~1) regime.
* **Energy** — the seed's ``E(x, y)`` is a sum over primes and an integral over parameter space
  that its code never defines. Here the energy is the *training loss relative to its initial
  value*: ``E = clip(L_bar / L_bar_0, min_energy, 1)``, ``L_bar`` an exponential moving average
  (``energy_ema``) of the losses passed to :meth:`QDTSchedule.step` / :meth:`QDTSchedule.observe`
  and ``L_bar_0`` its first value. The loss plays the role of the potential energy whose ground
  state training seeks; a run far from it (``E ~ 1``) takes full steps, and the rate falls with
  the loss. Capped at 1 so a rising loss never raises the rate (no runaway feedback). The loss
  must be non-negative (cross-entropy, MSE, ...).
* **Entropy** (section 2.2): ``S(t) = -sum_i P_i log2 P_i / log2 M + gamma * int_0^t |dE/dtau| dtau``
  with ``P_i = E_i / sum_j E_j`` over the last ``M = window`` energies (normalised to ``[0, 1]``:
  1 on a plateau, lower while the loss falls fast) plus the total variation of the energy;
  clipped to ``max_entropy`` so that ``(1 + beta S)`` stays bounded on noisy losses.

Without any observed loss ``E = 1, S = 0`` and the schedule is the deterministic
``Psi_hat(t) * S_lambda(t)``. Feed losses with ``sched.step(loss)`` (per batch: set
``energy_ema`` to ~0.9) or ``sched.observe(loss)``; with :func:`qcd_fx.train.fit`, which steps
schedulers once per epoch without arguments, pass ``on_epoch=lambda r: sched.observe(r.train_loss)``
(the epoch's loss then shapes the rate from the epoch after next). ``state_dict`` round-trips.
:meth:`QDTSchedule.plot` / :func:`plot_schedule` write a PNG of the components.

:class:`StabilityController` (section 4.2)
==========================================

The seed's stability criteria, read as bounds on a gradient step and enforced by scaling the
gradients in an optimizer *step pre-hook* (so it works with any optimizer that reads ``.grad`` in
``step()``; not with closure or population optimizers, which compute gradients inside it):

1. ``|dE/dt| <= Lambda ||grad L||`` — ``dE/dt`` is the first-order loss change of the coming
   step, ``sum_g lr_g ||g_g||^2`` for a gradient step per unit time; scaling the gradient by ``c``
   gives ``c^2 sum lr_g ||g_g||^2 <= Lambda c ||g||``, i.e.
   ``c = min(1, Lambda ||g|| / sum_g lr_g ||g_g||^2)``. For plain SGD this bounds the step
   length ``||delta theta|| <= Lambda``: a trust region that scales with the learning rate.
2. ``||laplace E|| <= (alpha / beta) ||grad L||`` (``curvature=True``; off by default) — the
   curvature along the last step is estimated by the secant ``||g_t - g_{t-1}|| / ||theta_t - theta_{t-1}||``
   (two extra copies of the parameters); where it exceeds ``(alpha/beta) ||g||`` the gradient is
   scaled by the ratio. Note that near a minimum ``||g|| -> 0`` at finite curvature, so this
   criterion keeps shrinking steps there (the step becomes quadratic in ``||g||``).
3. ``int |E| dOmega <= E_max`` (``energy_max``; off by default) — the gradient's energy
   ``1/2 ||g||^2`` is bounded: ``c = min(1, sqrt(2 E_max) / ||g||)`` (global-norm clipping).

The applied factor is the minimum of the active criteria. ``controller.stats`` counts the clips.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

ALPHA = 0.45
BETA = 0.25
GAMMA = 0.35
LAMBDA = 1.2


# ── the coupling equation, in closed form ───────────────────────────────────────────────────────


def coupling_integral(t: float | Tensor, beta: float = BETA, gamma: float = GAMMA) -> float | Tensor:
    """``int_0^t exp(-beta tau) sin(gamma tau) dtau`` in closed form (float or tensor ``t``)."""
    denom = beta * beta + gamma * gamma
    if denom == 0.0:
        return t * 0.0
    if isinstance(t, Tensor):
        return (gamma - torch.exp(-beta * t) * (beta * torch.sin(gamma * t) + gamma * torch.cos(gamma * t))) / denom
    return (gamma - math.exp(-beta * t) * (beta * math.sin(gamma * t) + gamma * math.cos(gamma * t))) / denom


def coupling(t: float | Tensor, alpha: float = ALPHA, beta: float = BETA, gamma: float = GAMMA, Lambda: float = LAMBDA) -> float | Tensor:
    """The seed's coupling ``Psi(t) = alpha e^{-beta t} cos(gamma t) + Lambda int_0^t e^{-beta tau} sin(gamma tau) dtau``."""
    if isinstance(t, Tensor):
        return alpha * torch.exp(-beta * t) * torch.cos(gamma * t) + Lambda * coupling_integral(t, beta, gamma)
    return alpha * math.exp(-beta * t) * math.cos(gamma * t) + Lambda * coupling_integral(t, beta, gamma)


def _critical_times(alpha: float, beta: float, gamma: float, Lambda: float) -> list[float]:
    """``t = 0``, the first two positive critical points of ``Psi`` and (beta > 0) infinity."""
    times = [0.0]
    if gamma > 0:
        # Psi = Psi_inf + e^{-beta t} (a cos(gamma t) + b sin(gamma t)); Psi' = 0 where
        # (gamma b - beta a) cos(gamma t) = (beta b + gamma a) sin(gamma t).
        denom = beta * beta + gamma * gamma
        psi_inf = Lambda * gamma / denom
        a, b = alpha - psi_inf, -Lambda * beta / denom
        theta = math.atan2(gamma * b - beta * a, beta * b + gamma * a) % math.pi
        times += [(theta + j * math.pi) / gamma for j in range(3) if (theta + j * math.pi) > 0][:2]
    if beta > 0:
        times.append(math.inf)
    return times


def _psi_at(t: float, alpha: float, beta: float, gamma: float, Lambda: float) -> float:
    if math.isinf(t):
        denom = beta * beta + gamma * gamma
        return Lambda * gamma / denom if denom else 0.0
    return coupling(t, alpha, beta, gamma, Lambda)


def coupling_peak(alpha: float = ALPHA, beta: float = BETA, gamma: float = GAMMA, Lambda: float = LAMBDA) -> float:
    """``max_{t >= 0} Psi(t)`` in closed form (for ``beta >= 0``: later extrema have a smaller envelope)."""
    return max(_psi_at(t, alpha, beta, gamma, Lambda) for t in _critical_times(alpha, beta, gamma, Lambda))


def coupling_floor(alpha: float = ALPHA, beta: float = BETA, gamma: float = GAMMA, Lambda: float = LAMBDA) -> float:
    """``inf_{t >= 0} Psi(t)`` in closed form."""
    return min(_psi_at(t, alpha, beta, gamma, Lambda) for t in _critical_times(alpha, beta, gamma, Lambda))


def scale_transition(t: float, rate: float = 1.0, t_c: float = 0.0) -> float:
    """The seed's ``S(lambda) = 1 / (1 + exp(-lambda (t - t_c)))`` (overflow-safe)."""
    z = -rate * (t - t_c)
    if z > 0:
        e = math.exp(-z)
        return e / (1.0 + e)
    return 1.0 / (1.0 + math.exp(z))


# ── the schedule ────────────────────────────────────────────────────────────────────────────────


def _check_number(name: str, value: Any, *, low: float = -math.inf, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    return float(value)


class QDTSchedule(LRScheduler):
    """Learning-rate schedule from the QDT seed (see the module docstring for the formulas).

    Args:
        optimizer: any ``torch.optim.Optimizer``; its groups' ``lr`` are the base rates.
        alpha, beta, gamma, Lambda: the seed's constants (0.45, 0.25, 0.35, 1.2). ``beta >= 0``
            and the coupling must stay positive for ``t >= 0`` (checked).
        time_scale: ``t`` per scheduler step (default 1.0; ``T / total_steps`` maps a run onto
            ``[0, T]``; the coupling peaks at ``t = 9.28`` for the seed's constants).
        transition_time, transition_rate: ``t_c`` and ``lambda`` of the scale transition (0, 1).
        coupling: multiply by the normalised coupling ``Psi(t) / Psi_peak`` (default True).
        feedback: use the energy/entropy feedback when losses are observed (default True).
        energy_ema: smoothing of the observed losses (default 0: per-epoch losses; ~0.9 per batch).
        window: ``M``, the number of recent energies in the entropy term (default 10).
        min_energy: lower clip of ``E`` (default 0.0).
        max_entropy: upper clip of ``S`` (default 4.0, so ``1 + beta S <= 2`` with the seed's beta).
        last_epoch: as for every ``LRScheduler``.

    ``sched.step()`` / ``sched.step(loss)`` after ``optimizer.step()``; :attr:`components` holds
    the factors of the last multiplier.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        alpha: float = ALPHA,
        beta: float = BETA,
        gamma: float = GAMMA,
        Lambda: float = LAMBDA,
        time_scale: float = 1.0,
        transition_time: float = 0.0,
        transition_rate: float = 1.0,
        coupling: bool = True,
        feedback: bool = True,
        energy_ema: float = 0.0,
        window: int = 10,
        min_energy: float = 0.0,
        max_entropy: float = 4.0,
        last_epoch: int = -1,
    ):
        self.alpha = _check_number("alpha", alpha)
        self.beta = _check_number("beta", beta, low=0.0)
        self.gamma = _check_number("gamma", gamma)
        self.Lambda = _check_number("Lambda", Lambda)
        self.time_scale = _check_number("time_scale", time_scale, low=0.0, low_open=True)
        self.transition_time = _check_number("transition_time", transition_time)
        self.transition_rate = _check_number("transition_rate", transition_rate, low=0.0)
        if not isinstance(coupling, bool) or not isinstance(feedback, bool):
            raise ValueError("coupling and feedback must be True or False")
        self.use_coupling = coupling
        self.use_feedback = feedback
        self.energy_ema = _check_number("energy_ema", energy_ema, low=0.0)
        if self.energy_ema >= 1.0:
            raise ValueError(f"energy_ema must be in [0, 1), got {energy_ema!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"window must be an integer >= 2, got {window!r}")
        self.window = window
        self.min_energy = _check_number("min_energy", min_energy, low=0.0)
        if self.min_energy > 1.0:
            raise ValueError(f"min_energy must be in [0, 1], got {min_energy!r}")
        self.max_entropy = _check_number("max_entropy", max_entropy, low=0.0)
        if coupling:
            floor = coupling_floor(self.alpha, self.beta, self.gamma, self.Lambda)
            if floor <= 0.0:
                raise ValueError(
                    f"the coupling Psi(t) reaches {floor:.4g} <= 0 for these constants (alpha={alpha}, beta={beta}, "
                    f"gamma={gamma}, Lambda={Lambda}): a non-positive learning rate; choose other constants or coupling=False"
                )
            self.psi_peak = coupling_peak(self.alpha, self.beta, self.gamma, self.Lambda)
        else:
            self.psi_peak = 1.0
        # feedback state (plain Python values: state_dict/load_state_dict round-trip them)
        self.smoothed_loss: float | None = None
        self.reference_loss: float | None = None
        self.energies: list[float] = []
        self.total_variation = 0.0
        self.observations = 0
        self.components: dict[str, float] = {}
        super().__init__(optimizer, last_epoch)

    # feedback ----------------------------------------------------------------------------------

    def observe(self, loss: float | Tensor) -> None:
        """Record a training loss (the energy's source). Must be finite and non-negative."""
        if isinstance(loss, Tensor):
            if loss.numel() != 1:
                raise ValueError(f"loss must be a scalar, got a tensor of shape {tuple(loss.shape)}")
            loss = float(loss.detach())
        if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss):
            raise ValueError(f"loss must be a finite number, got {loss!r}")
        if loss < 0:
            raise ValueError(f"QDTSchedule's energy is the loss relative to its start; it needs a non-negative loss, got {loss}")
        loss = float(loss)
        b = self.energy_ema
        self.smoothed_loss = loss if self.smoothed_loss is None else b * self.smoothed_loss + (1 - b) * loss
        if self.reference_loss is None:
            self.reference_loss = self.smoothed_loss
        e = self.energy()
        if self.energies:
            self.total_variation += abs(e - self.energies[-1])
        self.energies.append(e)
        del self.energies[: -self.window]
        self.observations += 1

    def energy(self) -> float:
        """``E = clip(L_bar / L_bar_0, min_energy, 1)`` (1 before any loss is observed or if ``L_bar_0 = 0``)."""
        if self.smoothed_loss is None or not self.reference_loss:
            return 1.0
        return min(1.0, max(self.min_energy, self.smoothed_loss / self.reference_loss))

    def entropy(self) -> float:
        """``S = H(P) / log2(M) + gamma * TV(E)``, clipped to ``[0, max_entropy]`` (0 before any loss)."""
        window = self.energies
        h = 0.0
        if len(window) >= 2:
            total = sum(window)
            if total > 0:
                h = -sum((e / total) * math.log2(e / total) for e in window if e > 0) / math.log2(len(window))
        return min(self.max_entropy, max(0.0, h + self.gamma * self.total_variation))

    # the multiplier ----------------------------------------------------------------------------

    def time(self, step: int | None = None) -> float:
        return (self.last_epoch if step is None else step) * self.time_scale

    def time_factor(self, step: int) -> float:
        """``Psi_hat(t) * S_lambda(t)`` at scheduler step ``step`` (the loss-free part of the multiplier)."""
        t = step * self.time_scale
        psi = coupling(t, self.alpha, self.beta, self.gamma, self.Lambda) / self.psi_peak if self.use_coupling else 1.0
        return psi * scale_transition(t, self.transition_rate, self.transition_time)

    def multiplier(self) -> float:
        t = self.time()
        psi = coupling(t, self.alpha, self.beta, self.gamma, self.Lambda) / self.psi_peak if self.use_coupling else 1.0
        trans = scale_transition(t, self.transition_rate, self.transition_time)
        e, s = (self.energy(), self.entropy()) if self.use_feedback else (1.0, 0.0)
        m = psi * e * (1.0 + self.beta * s) * trans
        self.components = {"t": t, "psi": psi, "transition": trans, "energy": e, "entropy": s, "multiplier": m}
        return m

    def get_lr(self) -> list[float | Tensor]:
        m = self.multiplier()
        return [base * m for base in self.base_lrs]

    def step(self, loss: float | Tensor | None = None, epoch: int | None = None) -> None:  # type: ignore[override]
        """Advance one step; ``loss`` (optional) is observed first, so it shapes the new rate."""
        if loss is not None:
            self.observe(loss)
        super().step(epoch)

    # plotting ----------------------------------------------------------------------------------

    def plot(self, path: str | Path, steps: int | None = None, title: str = "") -> None:
        """PNG of the schedule's factors over ``steps`` scheduler steps (default: ``max(100, last_epoch)``)."""
        n = max(100, self.last_epoch) if steps is None else steps
        plot_schedule(path, n, schedule=self, title=title)


def plot_schedule(path: str | Path, steps: int, *, schedule: QDTSchedule | None = None, title: str = "", **options: Any) -> None:
    """Write a PNG of the QDT multiplier's loss-free factors (``Psi_hat``, ``S_lambda``, their product)
    over ``steps`` scheduler steps. ``options`` are :class:`QDTSchedule` keywords (ignored when a
    ``schedule`` is given, whose own settings are drawn). Written atomically (matplotlib Agg)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if schedule is None:
        dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        schedule = QDTSchedule(dummy, **options)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_write

    s = schedule
    xs = list(range(steps + 1))
    ts = [n * s.time_scale for n in xs]
    psi = [coupling(t, s.alpha, s.beta, s.gamma, s.Lambda) / s.psi_peak if s.use_coupling else 1.0 for t in ts]
    trans = [scale_transition(t, s.transition_rate, s.transition_time) for t in ts]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, psi, label=r"$\Psi(t)/\Psi_{peak}$ (coupling)")
    ax.plot(xs, trans, label=r"$\mathcal{S}(\lambda)$ (scale transition)")
    ax.plot(xs, [p * q for p, q in zip(psi, trans)], label="multiplier without feedback", linewidth=2)
    ax.set_xlabel(f"scheduler step (t = step x {s.time_scale:g})")
    ax.set_ylabel("learning-rate multiplier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title or f"QDT schedule: alpha={s.alpha}, beta={s.beta}, gamma={s.gamma}, Lambda={s.Lambda}")
    fig.tight_layout()
    try:
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


# ── the stability controller ────────────────────────────────────────────────────────────────────


class StabilityController:
    """The seed's stability criteria as a gradient-scaling step pre-hook (see the module docstring).

    Args:
        optimizer: the optimizer whose gradients are controlled.
        Lambda: bound of criterion 1 (the seed's 1.2); ``None`` turns criterion 1 off.
        alpha, beta: criterion 2's ratio ``alpha / beta`` (seed: 0.45 / 0.25).
        curvature: enable criterion 2 (default False; keeps copies of parameters and gradients).
        energy_max: ``E_max`` of criterion 3 (default None: off).
        attach: register the pre-hook now (default True); otherwise call :meth:`clip_` yourself
            between ``backward()`` and ``optimizer.step()``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        Lambda: float | None = LAMBDA,
        alpha: float = ALPHA,
        beta: float = BETA,
        curvature: bool = False,
        energy_max: float | None = None,
        attach: bool = True,
    ):
        if not isinstance(optimizer, Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, torch.optim.LBFGS) or getattr(optimizer, "requires_closure", False) or getattr(optimizer, "population_based", False):
            raise ValueError(
                f"{type(optimizer).__name__} computes its gradients inside step(); a step pre-hook cannot clip them"
            )
        if Lambda is not None:
            _check_number("Lambda", Lambda, low=0.0, low_open=True)
        _check_number("alpha", alpha, low=0.0, low_open=True)
        _check_number("beta", beta, low=0.0, low_open=True)
        if energy_max is not None:
            _check_number("energy_max", energy_max, low=0.0, low_open=True)
        if not isinstance(curvature, bool):
            raise ValueError(f"curvature must be True or False, got {curvature!r}")
        if Lambda is None and not curvature and energy_max is None:
            raise ValueError("every criterion is off: pass Lambda, curvature=True or energy_max")
        self.optimizer = optimizer
        self.Lambda = None if Lambda is None else float(Lambda)
        self.ratio = float(alpha) / float(beta)
        self.curvature = curvature
        self.energy_max = None if energy_max is None else float(energy_max)
        self._prev_params: list[Tensor] | None = None
        self._prev_grads: list[Tensor] | None = None
        self.stats = {"steps": 0, "clipped": 0, "flow": 0, "curvature": 0, "energy": 0, "last_scale": 1.0, "min_scale": 1.0}
        self._handle = optimizer.register_step_pre_hook(self._hook) if attach else None

    def remove(self) -> None:
        """Detach the hook (idempotent)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.clip_()

    def _grads(self) -> tuple[list[list[Tensor]], list[float], list[Tensor]]:
        per_group, lrs, params = [], [], []
        for g in self.optimizer.param_groups:
            gs = [p.grad for p in g["params"] if p.grad is not None]
            params += [p for p in g["params"] if p.grad is not None]
            per_group.append(gs)
            lrs.append(float(g["lr"]))
        return per_group, lrs, params

    @staticmethod
    def _sq_norm(tensors: Sequence[Tensor]) -> float:
        if not tensors:
            return 0.0
        norms = torch._foreach_norm([t.detach() for t in tensors])
        return float(torch.stack([n.to(torch.float64) for n in norms]).square().sum())

    @torch.no_grad()
    def clip_(self) -> float:
        """Scale the gradients by the factor the criteria allow; returns the factor (1.0: untouched)."""
        per_group, lrs, params = self._grads()
        grads = [g for gs in per_group for g in gs]
        self.stats["steps"] += 1
        if not grads:
            self.stats["last_scale"] = 1.0
            return 1.0
        sq = [self._sq_norm(gs) for gs in per_group]
        gnorm = math.sqrt(sum(sq))
        scale = 1.0
        if not math.isfinite(gnorm) or gnorm == 0.0:
            self._remember(params, grads)
            self.stats["last_scale"] = 1.0
            return 1.0
        if self.Lambda is not None:
            flow = sum(lr * s for lr, s in zip(lrs, sq))  # |dE/dt| of a gradient step
            if flow > self.Lambda * gnorm:
                scale = min(scale, self.Lambda * gnorm / flow)
                self.stats["flow"] += 1
        if self.energy_max is not None and 0.5 * gnorm * gnorm > self.energy_max:
            scale = min(scale, math.sqrt(2.0 * self.energy_max) / gnorm)
            self.stats["energy"] += 1
        if self.curvature:
            if self._prev_params is not None and len(self._prev_params) == len(params):
                dtheta = math.sqrt(self._sq_norm(torch._foreach_sub(params, self._prev_params)))
                dgrad = math.sqrt(self._sq_norm(torch._foreach_sub(grads, self._prev_grads)))
                if dtheta > 0:
                    kappa = dgrad / dtheta
                    if kappa > self.ratio * gnorm:
                        scale = min(scale, self.ratio * gnorm / kappa)
                        self.stats["curvature"] += 1
            self._remember(params, grads)
        if scale < 1.0:
            torch._foreach_mul_(grads, scale)
            self.stats["clipped"] += 1
        self.stats["last_scale"] = scale
        self.stats["min_scale"] = min(self.stats["min_scale"], scale)
        return scale

    def _remember(self, params: list[Tensor], grads: list[Tensor]) -> None:
        if self.curvature:
            self._prev_params = [p.detach().clone() for p in params]
            self._prev_grads = [g.detach().clone() for g in grads]

    def state_dict(self) -> dict[str, Any]:
        return {"stats": dict(self.stats), "prev_params": self._prev_params, "prev_grads": self._prev_grads}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats = dict(state["stats"])
        self._prev_params = state["prev_params"]
        self._prev_grads = state["prev_grads"]


__all__ = [
    "ALPHA",
    "BETA",
    "GAMMA",
    "LAMBDA",
    "QDTSchedule",
    "StabilityController",
    "coupling",
    "coupling_integral",
    "coupling_peak",
    "coupling_floor",
    "scale_transition",
    "plot_schedule",
]
