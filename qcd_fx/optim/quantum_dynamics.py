"""The quantum-dynamics optimizers (seed: Wang & Maimaitiabudula, *Quantum dynamics of machine
learning*, Acta Physica Sinica 2025, arXiv 2407.19890).

The paper treats optimisation as the Schrödinger equation with the objective ``f`` as the
potential. A Wick rotation (``t -> -i tau``) turns it into a diffusion equation with a sink,
``d psi / d tau = D laplace(psi) - f psi``, whose solution concentrates on the ground state (the
global minimum) as ``tau`` grows; it is evolved (a) by relaxation at a fixed diffusion scale
``sigma`` and (b) by multi-scale annealing (``sigma`` shrinks in steps). Its stationary
weighting of walkers is the Boltzmann/softmax factor ``exp(-f / T)``. The authors' algorithm
family is the multi-scale quantum harmonic oscillator algorithm (MQHOA).

:class:`QuantumDynamics` — gradient-free MQHOA
==============================================

``k`` centres (walkers) ``x_1..x_k`` with energies ``f(x_i)``; a scale ``sigma``. One
:meth:`~QuantumDynamics.step` is one *pass*:

1. **Diffusion** — every centre draws ``samples_per_centre`` candidates ``b_i + sigma * xi``
   (clipped to ``bounds`` if given) around ``b_i = x_i + mean_field * (m - x_i)``, ``m`` the
   (Boltzmann) mean of the centres defined in 3: ``mean_field=1`` (default) draws every
   candidate around ``m``, ``mean_field=0`` around its own centre (the published rule).
2. **Greedy replacement** — a centre moves to its best candidate if that is lower.
3. **Energy level stable** — if at most ``stable_fraction`` (default 0.025: at most one of 40)
   of the centres improved in the pass (the published test: none), the *energy level decreases*: the worst centre is replaced by
   the mean of the centres (``weighting="mean"``) or by their Boltzmann mean with weights
   ``exp(-(f_i - f_min) / T)``, ``T = temperature * std(f)`` (``weighting="boltzmann"``; ``T -> 0``
   gives the best centre, ``T -> inf`` the plain mean). The new centre is evaluated.
4. **Scale transition** — when the centres' spread (root-mean-square over coordinates of their
   standard deviation) has fallen below ``sigma``, ``sigma <- sigma / 2``; with ``shrink < 1``
   only the lowest ``ceil(shrink * k)`` centres (at least ``min_centres``) go on to the finer scale.
5. **Stop** at ``sigma < sigma_min``, when all centres have the same energy (``f_tol``), or when
   ``max_evals`` evaluations are spent. A converged run restarts from fresh centres with
   ``restart_growth`` times as many (the IPOP rule of CMA-ES; capped at a twentieth of the
   remaining budget), until ``restarts`` or the budget are used up (default ``restarts=None``:
   while budget remains if ``max_evals`` is given, never without it); the best point ever seen is kept.

What differs from MQHOA as published (why, with the development measurements:
``docs/quantum_dynamics_notes.md``; benchmark results against CMA-ES:
``benchmarks/results/global_opt.md`` and the README):

* ``diffusion="ensemble"`` (default): the diffusion is shaped like the centres' own
  distribution — the covariance of the walkers, normalised to unit mean variance and mixed with
  the identity (``ensemble_mix``) — instead of isotropic. It is sampled in ensemble space
  (``A^T z / sqrt(k - 1)`` with ``A`` the centred ``(k, D)`` walker matrix), so no ``D x D``
  matrix is ever formed. Isotropic diffusion (the published rule) stalls in curved valleys.
* A *stable streak* replaces, one pass after another, the worst centre **not yet replaced by a
  mean in this streak** (replacing "the worst" literally can cycle). The streak ends when a
  centre improves or ``sigma`` halves.
* *Mean-field diffusion* (``mean_field=1``, ``weighting="boltzmann"``, ``temperature=2``, the
  defaults): all candidates are drawn around the Boltzmann mean of the walkers, and each
  replaces its own centre only if lower (greedy, one to one); the population contracts with the
  scale, and a warm mean averages over the basins the walkers sit in.
* *Shrinking populations* (``shrink``, off by default; :data:`MULTIMODAL`): many walkers find
  the right basin of a rugged function, few suffice to refine inside it.
* Restarts (IPOP-style) are an addition, for a fair comparison with IPOP-CMA-ES.

Evaluation: ``step(closure)`` (the closure returns ``f`` at the current parameters; it is called
once per candidate with the candidate loaded, under ``torch.enable_grad()`` like ``LBFGS``;
gradients are ignored), ``step(loss_fn=f)`` with ``f`` mapping a ``(P, D)`` matrix of flattened
positions to ``(P,)`` values — a whole population in one call (``opt.layout.views(positions)``
splits the columns into parameter-shaped ``(P, *shape)`` views) — or
``step(model=, batch=(inputs, target), loss_fn=)``, which evaluates every candidate *and every
centre* on that batch in one ``vmap`` call (:class:`~qcd_fx.optim.population.BatchedEvaluator`),
so that with mini-batches all comparisons are made on the same data (this is how
:func:`qcd_fx.train.fit` drives it). After each step the parameters hold the best point found
(model path: the best centre on the current batch) and ``step`` returns its value.

Across ranks (``torch.distributed`` with more than one rank): every evaluation of a set of rows
(centres, candidates, the mean) is split into contiguous blocks, one per rank, each rank evaluates
its own block (closure, ``loss_fn`` or the model on the whole batch, which every rank sees), and
the values are all-gathered (8 bytes per row, blocks padded to the largest). Everything else —
the random draws (rank 0's seed, the same draws in the same order on every rank), the
diffusion, replacement, scale — is made by every rank on the whole population, so the state is
identical everywhere, ``state_dict`` is local and equal to the one-process one, and the
trajectory is the one-process trajectory bit for bit where the evaluation of a block of rows
gives the same values as that of all rows (``evaluation="loop"``, closures, row-wise ``loss_fn``;
``tests/test_distributed_qimad.py``). :func:`minimize`'s ``evaluations_to_target`` counts only
the rows a rank evaluated itself.

Every random number comes from one ``torch.Generator`` seeded with ``seed`` (created on the
parameters' device), so runs are reproducible, and ``state_dict`` holds the whole state
including the generator, so a resumed run continues bit for bit. The gradient-based hybrid,
:class:`~qcd_fx.optim.quantum_langevin.QuantumLangevin`, has its own module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed
from .population import EVAL_MODES, FlatLayout, PopulationOptimizer, check_choice, check_integer, check_number, closure_evaluate, resolve_seed

WEIGHTINGS = ("mean", "boltzmann")
DIFFUSIONS = ("ensemble", "isotropic")

MULTIMODAL: dict[str, Any] = {"num_centres": 320, "shrink": 0.7, "min_centres": 40}
"""Settings of :class:`QuantumDynamics` for rugged (Rastrigin-like) functions: ``QuantumDynamics(params,
**MULTIMODAL, ...)``. Many walkers at the coarse scales, 70 % kept per halving, down to 40 (see the
module docstring for what it gains and costs)."""

_QD_VERSION = 1


# ── argument checks ─────────────────────────────────────────────────────────────────────────────


def _bounds(bounds: Any) -> tuple[float, float] | None:
    if bounds is None:
        return None
    try:
        lo, hi = bounds
    except (TypeError, ValueError):
        raise ValueError(f"bounds must be a pair (low, high), got {bounds!r}") from None
    lo = check_number("bounds[0]", lo)
    hi = check_number("bounds[1]", hi)
    if not lo < hi:
        raise ValueError(f"bounds must satisfy low < high, got ({lo}, {hi})")
    return lo, hi


def boltzmann_weights(energies: Tensor, temperature: float) -> Tensor:
    """Walker weights ``exp(-(f_i - f_min) / T)`` normalised to sum 1, with ``T = temperature * std(f)``.

    ``T`` is relative to the spread of the energies, so the weighting does not depend on the
    units of ``f``. Equal energies (or a single walker) give equal weights; ``temperature=inf``
    gives equal weights; non-finite energies get weight 0 (all non-finite: equal weights).
    """
    f = energies.to(torch.float64)
    finite = torch.isfinite(f)
    if not bool(finite.any()) or f.numel() == 1:
        return torch.full_like(f, 1.0 / f.numel())
    fin = f[finite]
    spread = float(fin.std()) if fin.numel() > 1 else 0.0
    if spread == 0.0 or math.isinf(temperature):
        w = finite.to(torch.float64)
        return w / w.sum()
    z = torch.where(finite, -(f - fin.min()) / (temperature * spread), torch.full_like(f, -math.inf))
    return torch.softmax(z, 0)


def ensemble_noise(centres: Tensor, num: int, mix: float, generator: torch.Generator) -> Tensor:
    """``num`` Gaussian draws of shape ``(num, D)`` whose covariance is ``(1 - mix) C + mix I``,
    ``C`` the covariance of the rows of ``centres`` normalised to unit mean variance.

    Sampled as ``sqrt(1 - mix) A^T z / (sqrt(k - 1) s) + sqrt(mix) xi`` with ``A`` the centred
    ``(k, D)`` matrix, ``s^2`` the mean variance, ``z ~ N(0, I_k)``, ``xi ~ N(0, I_D)``: ``O(k D)``
    work, no ``D x D`` matrix. Isotropic (``xi``) when the centres coincide or ``k < 2``. The same
    number of random numbers is drawn either way, so a resumed run stays on the same stream.
    """
    k, d = centres.shape
    xi = torch.randn(num, d, generator=generator, device=centres.device, dtype=centres.dtype)
    z = torch.randn(num, k, generator=generator, device=centres.device, dtype=centres.dtype)  # always drawn: resumable
    if k < 2 or mix >= 1.0:
        return xi
    a = centres - centres.mean(0, keepdim=True)
    mean_var = float(a.square().sum()) / ((k - 1) * d)
    if not mean_var > 0.0 or not math.isfinite(mean_var):
        return xi
    shaped = (z @ a).mul_(math.sqrt((1.0 - mix) / ((k - 1) * mean_var)))
    return shaped.add_(xi, alpha=math.sqrt(mix))


# ── gradient-free MQHOA ─────────────────────────────────────────────────────────────────────────


class QuantumDynamics(PopulationOptimizer):
    """Gradient-free multi-scale quantum harmonic oscillator algorithm (MQHOA). See the module docstring.

    Args:
        params: the tensors to optimise (all one dtype and device; float64 for tight targets).
        num_centres: ``k``, the number of walkers (default 40).
        sigma: initial diffusion scale (default: half the box width with ``bounds``, else 1.0).
        sigma_min: stop (or restart) when ``sigma`` falls below it (default ``1e-8 * sigma``).
        bounds: ``(low, high)`` box for every coordinate. With a box the centres start uniformly
            in it (the published MQHOA) and candidates are clipped to it; without one they
            start at the current parameters plus ``sigma`` noise (centre 0 exactly there).
        samples_per_centre: candidates drawn per centre per pass (default 1).
        diffusion: ``"ensemble"`` (default) or ``"isotropic"`` (the published rule).
        ensemble_mix: weight of the identity in the ensemble diffusion (default 0.1).
        weighting: ``"boltzmann"`` (default) or ``"mean"``; temperature: ``T / std(f)`` for it
            (default 2).
        stable_fraction: a pass is "energy level stable" when at most this fraction of centres
            improved (default 0.025; 0: none — the published test).
        mean_field: where candidates are drawn: ``x_i + mean_field * (m - x_i)`` with ``m`` the
            (Boltzmann) mean of the centres (default 1: around ``m``; 0: the published rule).
        f_tol: converged when ``max f - min f <= f_tol * max(1, |min f|)`` over the centres.
        max_evals: evaluation budget (default: unlimited; :attr:`done` tells when it is spent).
        restarts: restarts after convergence while budget remains (IPOP-style; default None:
            unlimited if ``max_evals`` is given, else 0).
        restart_growth: factor on ``num_centres`` at each restart (default 2).
        shrink: fraction of the centres kept (the lowest) at each halving of ``sigma``, in
            ``(0, 1]`` (default 1: all); min_centres: never fewer than this (default 40). See
            :data:`MULTIMODAL` for rugged functions.
        evaluation: ``auto``/``vmap``/``loop`` for the ``model=`` path.
        seed: seed of the optimizer's generator (default: drawn from the OS, then stored).

    ``step`` returns the best value found so far (a float); :attr:`evaluations`,
    :attr:`sigma`, :attr:`best_value`, :attr:`best_position`, :attr:`done`, :attr:`restarts_done`
    describe the run.
    """

    state_key = "quantum_dynamics"
    state_version = _QD_VERSION
    distributed_ready = True  # across torch.distributed ranks: walkers split, whole batches (see the module docstring)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        num_centres: int = 40,
        sigma: float | None = None,
        sigma_min: float | None = None,
        bounds: tuple[float, float] | None = None,
        *,
        samples_per_centre: int = 1,
        diffusion: str = "ensemble",
        ensemble_mix: float = 0.1,
        weighting: str = "boltzmann",
        temperature: float = 2.0,
        stable_fraction: float = 0.025,
        mean_field: float = 1.0,
        f_tol: float = 1e-12,
        max_evals: int | None = None,
        restarts: int | None = None,
        restart_growth: float = 2.0,
        shrink: float = 1.0,
        min_centres: int = 40,
        evaluation: str = "auto",
        seed: int | None = None,
    ):
        check_integer("num_centres", num_centres, 1)
        if sigma is not None:
            check_number("sigma", sigma, 0.0, low_open=True)
        if sigma_min is not None:
            check_number("sigma_min", sigma_min, 0.0, low_open=True)
        self.bounds = _bounds(bounds)
        check_integer("samples_per_centre", samples_per_centre, 1)
        check_choice("diffusion", diffusion, DIFFUSIONS)
        check_number("ensemble_mix", ensemble_mix, 0.0, 1.0)
        check_choice("weighting", weighting, WEIGHTINGS)
        if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > 0):
            raise ValueError(f"temperature must be a positive number (inf allowed), got {temperature!r}")
        check_number("stable_fraction", stable_fraction, 0.0, 1.0, high_open=True)
        check_number("mean_field", mean_field, 0.0, 1.0)
        check_number("f_tol", f_tol, 0.0)
        if max_evals is not None:
            check_integer("max_evals", max_evals, 1)
        if restarts is not None:
            check_integer("restarts", restarts, 0)
        check_number("restart_growth", restart_growth, 1.0)
        check_number("shrink", shrink, 0.0, 1.0, low_open=True)
        check_integer("min_centres", min_centres, 2)
        check_choice("evaluation", evaluation, EVAL_MODES)
        self.seed = resolve_seed(seed)
        if sigma is None:
            sigma = (self.bounds[1] - self.bounds[0]) / 2 if self.bounds else 1.0
        if sigma_min is None:
            sigma_min = 1e-8 * sigma
        if sigma_min >= sigma:
            raise ValueError(f"sigma_min ({sigma_min}) must be smaller than sigma ({sigma})")
        self.options = dict(
            num_centres=num_centres, sigma=float(sigma), sigma_min=float(sigma_min), samples_per_centre=samples_per_centre,
            diffusion=diffusion, ensemble_mix=float(ensemble_mix), weighting=weighting, temperature=float(temperature),
            stable_fraction=float(stable_fraction), mean_field=float(mean_field), f_tol=float(f_tol), max_evals=max_evals,
            restarts=restarts,
            restart_growth=float(restart_growth), shrink=float(shrink), min_centres=min_centres, evaluation=evaluation,
        )  # fmt: skip
        super().__init__(params, {})
        params_list = self._params()
        if not params_list:
            raise ValueError("QuantumDynamics got no parameters")
        self.layout = FlatLayout(params_list)
        self._initialized = False
        self.evaluations = 0
        self.restarts_done = 0
        self.passes = 0
        self.stable_events = 0
        self.done = False
        self.stop_reason: str | None = None

    # ── public state ────────────────────────────────────────────────────────────────────────────

    @property
    def sigma(self) -> float:
        return self._sigma if self._initialized else self.options["sigma"]

    @property
    def best_value(self) -> float:
        return self._best_f if self._initialized else math.inf

    @property
    def best_position(self) -> Tensor | None:
        """The best point found, flattened ``(D,)`` (a copy), or None before the first step."""
        return self._best_x.clone() if self._initialized else None

    @property
    def centres(self) -> Tensor | None:
        """The current ``(k, D)`` centres (a copy), or None before the first step."""
        return self._X.clone() if self._initialized else None

    @property
    def energies(self) -> Tensor | None:
        return self._F.clone() if self._initialized else None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_initialized", False):
            raise ValueError("QuantumDynamics cannot take new parameter groups after its first step")
        super().add_param_group(param_group)
        if hasattr(self, "layout"):
            self.layout = FlatLayout(self._params())

    def _params(self) -> list[Tensor]:  # gradient-free: also tensors that do not require grad
        return [p for g in self.param_groups for p in g["params"]]

    # ── evaluation ──────────────────────────────────────────────────────────────────────────────

    def _evaluate(self, positions: Tensor) -> Tensor:
        """Values at the rows of ``positions`` (float64, ``+inf`` for NaN), counted."""
        if positions.shape[0] == 0:
            return torch.empty(0, dtype=torch.float64)
        if distributed.active():  # this rank's contiguous block of the rows; the values all-gathered
            counts = distributed.split_counts(positions.shape[0])
            start, stop = distributed.my_block(positions.shape[0])
            mine = self._values(positions[start:stop]) if stop > start else torch.empty(0, dtype=torch.float64)
            dev = self.layout.device  # (the collective runs where the parameters live: gloo on CPU, NCCL on GPUs)
            values = distributed.all_gather_rows(mine.to(dev), counts).cpu()
        else:
            values = self._values(positions)
        self.evaluations += positions.shape[0]
        return torch.where(torch.isnan(values), torch.full_like(values, math.inf), values)

    def _values(self, positions: Tensor) -> Tensor:
        """``f`` at the rows of ``positions`` as evaluated here (float64, on the CPU)."""
        mode = self._mode
        if mode == "closure":
            ev = closure_evaluate(self.layout, self._params(), positions, self._closure)
            values = ev.losses
        elif mode == "loss_fn":
            with torch.no_grad():
                out = self._loss_fn(positions)
            if not isinstance(out, Tensor) or out.shape != (positions.shape[0],):
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"loss_fn must map a ({positions.shape[0]}, {self.layout.dim}) matrix to shape ({positions.shape[0]},), got {got}")
            values = out.detach()
        else:
            ev = self._get_evaluator(self._model, self._params(), self.options["evaluation"])(
                positions, self._batch[0], self._batch[1], self._loss_fn, grad=False
            )
            values = ev.losses
        return values.to(device="cpu", dtype=torch.float64)

    def _max_restarts(self) -> float:
        """``restarts``, or with ``restarts=None`` as many as the budget allows (none without ``max_evals``)."""
        r = self.options["restarts"]
        if r is None:
            return 0 if self.options["max_evals"] is None else math.inf
        return r

    def _remaining(self) -> int | None:
        m = self.options["max_evals"]
        return None if m is None else max(0, m - self.evaluations)

    def _clip(self, x: Tensor) -> Tensor:
        return x.clamp_(*self.bounds) if self.bounds else x

    # ── the run ─────────────────────────────────────────────────────────────────────────────────

    def _start(self, k: int) -> bool:
        """New centres (a fresh run). False if the budget does not allow a single evaluation."""
        lay, o = self.layout, self.options
        rem = self._remaining()
        if rem is not None and rem < 1:
            return False
        if rem is not None:
            k = min(k, rem)
        if self.bounds:
            lo, hi = self.bounds
            u = torch.rand(k, lay.dim, generator=self._gen, device=lay.device, dtype=lay.dtype)
            X = u.mul_(hi - lo).add_(lo)
        else:
            x0 = self._origin
            X = x0.expand(k, lay.dim).clone()
            noise = torch.randn(k, lay.dim, generator=self._gen, device=lay.device, dtype=lay.dtype)
            noise[0] = 0
            X.add_(noise, alpha=o["sigma"])
        self._X = X
        self._k = self._k_run = k  # the run's population size (before any shrinking)
        self._sigma = o["sigma"]
        self._replaced = torch.zeros(k, dtype=torch.bool)
        self._F = self._evaluate(X)
        self._note_best(self._X, self._F)
        return True

    def _note_best(self, X: Tensor, F: Tensor) -> None:
        i = int(torch.argmin(F))
        if float(F[i]) < self._best_f:
            self._best_f = float(F[i])
            self._best_x = X[i].clone()

    def _init_state(self) -> None:
        lay = self.layout
        if distributed.active():  # every rank: rank 0's seed and starting point (the ranks stay in lockstep)
            self.seed = distributed.broadcast_int(self.seed)
            lay.copy_into(self._params(), distributed.broadcast_(lay.flatten(self._params())))
        self._gen = self._generator(self.seed, lay.device)
        self._origin = lay.flatten(self._params()).to(lay.dtype)
        self._best_f = math.inf
        self._best_x = self._origin.clone()
        self._initialized = True
        if not self._start(self.options["num_centres"]):
            self._finish("budget")

    def _finish(self, reason: str) -> None:
        self.done = True
        self.stop_reason = reason

    def _converged(self) -> str | None:
        o = self.options
        if self._sigma < o["sigma_min"]:
            return "sigma_min"
        F = self._F
        finite = F[torch.isfinite(F)]
        if finite.numel() == F.numel() and F.numel() > 1:
            fmin = float(finite.min())
            if float(finite.max()) - fmin <= o["f_tol"] * max(1.0, abs(fmin)):
                return "f_tol"
        return None

    def _pass(self) -> None:
        o, lay = self.options, self.layout
        k, m = self._k, o["samples_per_centre"]
        X, F = self._X, self._F
        if self._mode == "model":  # a new batch: re-measure the centres on it
            F = self._F = self._evaluate(X)
        rem = self._remaining()
        n = k * m if rem is None else min(k * m, rem)
        if n == 0:
            return
        owner = torch.arange(k, device=lay.device).repeat_interleave(m)[:n]
        if o["diffusion"] == "ensemble":
            noise = ensemble_noise(X, n, o["ensemble_mix"], self._gen)
        else:
            noise = torch.randn(n, lay.dim, generator=self._gen, device=lay.device, dtype=lay.dtype)
        base = X.index_select(0, owner)
        a = o["mean_field"]
        if a > 0.0 and k > 1:
            base.mul_(1.0 - a).add_(self._centre_mean(X, F), alpha=a)
        cand = self._clip(base.add_(noise, alpha=self._sigma))
        fc = self._evaluate(cand)
        self.passes += 1
        # best candidate of every centre (centres without a candidate — budget cut — get +inf)
        full = torch.full((k * m,), math.inf, dtype=torch.float64)
        full[:n] = fc
        fbest, arg = full.view(k, m).min(1)
        improved = fbest < F
        if bool(improved.any()):
            idx = torch.nonzero(improved).flatten()
            rows = (idx * m + arg[idx]).to(lay.device)
            X.index_copy_(0, idx.to(lay.device), cand.index_select(0, rows))
            F[idx] = fbest[idx]
            self._note_best(X, F)
        stable = float(improved.to(torch.float64).mean()) <= o["stable_fraction"]
        if not stable:
            self._replaced.zero_()
            return
        # Energy level stable: the level decreases — the worst centre not yet replaced by a mean in
        # this streak is replaced by the (Boltzmann) mean of the centres.
        if self._remaining() == 0 or k < 2:
            self._maybe_halve()
            return
        self.stable_events += 1
        mean = self._centre_mean(X, F)
        fmean = self._evaluate(mean)
        order = torch.argsort(F, descending=True, stable=True)
        fresh = order[~self._replaced[order]]
        worst = int(fresh[0]) if fresh.numel() else int(order[0])
        X[worst] = mean[0]
        F[worst] = fmean[0]
        self._replaced[worst] = True
        self._note_best(X, F)
        self._maybe_halve()

    def _centre_mean(self, X: Tensor, F: Tensor) -> Tensor:
        """The (Boltzmann) mean of the centres, shape ``(1, D)``."""
        o, lay = self.options, self.layout
        if o["weighting"] == "boltzmann":
            w = boltzmann_weights(F, o["temperature"]).to(device=lay.device, dtype=lay.dtype)
            return (w.unsqueeze(1) * X).sum(0, keepdim=True)
        return X.mean(0, keepdim=True)

    def _maybe_halve(self) -> None:
        spread = math.sqrt(float(self._X.var(0, unbiased=True).mean())) if self._k > 1 else 0.0
        if spread < self._sigma:
            self._halve()

    def _halve(self) -> None:
        self._sigma /= 2
        self._replaced.zero_()
        o = self.options
        k_new = max(min(self._k, o["min_centres"]), math.ceil(self._k * o["shrink"]))
        if k_new < self._k:  # fewer walkers at the finer scale: the lowest ones stay
            keep = torch.argsort(self._F, stable=True)[:k_new]
            self._X = self._X.index_select(0, keep.to(self._X.device))
            self._F = self._F[keep]
            self._k = k_new
            self._replaced = torch.zeros(k_new, dtype=torch.bool)

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Any] | None = None,
        *,
        loss_fn: Callable[..., Tensor] | None = None,
        model: nn.Module | None = None,
        batch: tuple[Any, Any] | None = None,
    ) -> float:
        """One MQHOA pass. ``step(closure)``, ``step(loss_fn=f)`` (batched over positions) or
        ``step(model=, batch=(inputs, target), loss_fn=)``. Returns the best value so far."""
        mode = self._mode = self._step_mode(closure, model, batch, loss_fn, batched_loss_fn=True)
        self._closure, self._model, self._batch, self._loss_fn = (closure, model, batch, loss_fn)
        try:
            if not self._initialized:
                self._init_state()
            elif not self.done:
                self._pass()
                reason = self._converged()
                if reason is not None:
                    if self.restarts_done < self._max_restarts() and self._remaining() != 0:
                        self.restarts_done += 1
                        k = max(2, int(round(self._k_run * self.options["restart_growth"])))
                        rem = self._remaining()
                        if rem is not None:  # a run gets at least ~20 passes: no 10^4-centre populations near the end
                            k = max(min(k, rem // 20), min(self._k_run, rem), 1)
                        if not self._start(k):
                            self._finish("budget")
                    else:
                        self._finish(reason)
            if not self.done and self._remaining() == 0:
                self._finish("budget")
        finally:
            self._closure = self._loss_fn = self._model = self._batch = None
        if mode == "model":
            i = int(torch.argmin(self._F))
            self.layout.copy_into(self._params(), self._X[i])
            return float(self._F[i])
        self.layout.copy_into(self._params(), self._best_x)
        return self._best_f

    _mode: str = "loss_fn"
    _closure = _loss_fn = _model = _batch = None

    # ── state ───────────────────────────────────────────────────────────────────────────────────

    def _own_state(self) -> dict[str, Any]:
        run: dict[str, Any] = {
            "seed": self.seed, "options": dict(self.options), "bounds": self.bounds,
            "initialized": self._initialized, "evaluations": self.evaluations, "restarts_done": self.restarts_done,
            "passes": self.passes, "stable_events": self.stable_events, "done": self.done, "stop_reason": self.stop_reason,
        }  # fmt: skip
        if self._initialized:
            run.update(
                X=self._X.clone(), F=self._F.clone(), k=self._k, k_run=self._k_run, sigma=self._sigma, replaced=self._replaced.clone(),
                best_f=self._best_f, best_x=self._best_x.clone(), origin=self._origin.clone(), generator=self._gen.get_state(),
            )  # fmt: skip
        return run

    def _load_own_state(self, run: dict[str, Any]) -> None:
        self.seed, self.options, self.bounds = run["seed"], dict(run["options"]), run["bounds"]
        self.options.setdefault("mean_field", 0.0)  # saved before the option existed: the published rule
        self.options.setdefault("shrink", 1.0)  # (off)
        self.options.setdefault("min_centres", 40)
        for key in ("evaluations", "restarts_done", "passes", "stable_events", "done", "stop_reason"):
            setattr(self, key, run[key])
        self._initialized = False
        if not run["initialized"]:
            return
        lay = self.layout
        if tuple(run["X"].shape[1:]) != (lay.dim,):
            raise ValueError(f"state dict holds centres of dimension {run['X'].shape[1]}, this optimizer has {lay.dim}")
        cast = dict(device=lay.device, dtype=lay.dtype)
        self._X, self._best_x, self._origin = (run["X"].to(**cast).clone(), run["best_x"].to(**cast).clone(), run["origin"].to(**cast).clone())
        self._F, self._replaced = run["F"].cpu().clone(), run["replaced"].cpu().clone()
        self._k, self._sigma, self._best_f = run["k"], run["sigma"], run["best_f"]
        self._k_run = run.get("k_run", run["k"])  # saved before shrink existed: the run never shrank
        self._gen = torch.Generator(device=lay.device)
        self._gen.set_state(run["generator"].clone())
        self._initialized = True


def minimize(fn: Callable[[Tensor], Tensor], x0: Tensor, *, max_evals: int, target: float | None = None, **options: Any) -> dict[str, Any]:
    """Run :class:`QuantumDynamics` on a batched function ``fn: (P, D) -> (P,)`` from ``x0`` ``(D,)``.

    Stops at ``target`` (``best <= target``), convergence or ``max_evals``. Returns a dict with
    ``x`` (best point), ``f``, ``evaluations``, ``evaluations_to_target`` (the exact count at the
    first evaluation that reached ``target``, or None), ``stop_reason``, ``restarts``.
    """
    x = x0.detach().clone()
    if x.dim() != 1:
        raise ValueError(f"x0 must be a vector (D,), got shape {tuple(x.shape)}")
    hit: list[int] = []

    def counted(positions: Tensor) -> Tensor:
        values = fn(positions)
        if target is not None and not hit:
            below = torch.nonzero(values.detach() <= target).flatten()
            if below.numel():
                hit.append(opt.evaluations + int(below[0]) + 1)
        return values

    opt = QuantumDynamics([x], max_evals=max_evals, **options)
    while not opt.done and not hit:
        opt.step(loss_fn=counted)
    return {
        "x": opt.best_position, "f": opt.best_value, "evaluations": opt.evaluations,
        "evaluations_to_target": hit[0] if hit else None,
        "stop_reason": "target" if hit else opt.stop_reason, "restarts": opt.restarts_done,
    }  # fmt: skip


__all__ = ["QuantumDynamics", "MULTIMODAL", "minimize", "boltzmann_weights", "ensemble_noise", "WEIGHTINGS", "DIFFUSIONS"]
