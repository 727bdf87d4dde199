"""Standard global-optimisation test functions, batched over a population.

Every function maps positions of shape ``(..., D)`` to values of shape ``(...)`` — a population
``(P, D)`` gives ``(P,)`` in one vectorised call — and knows its search box, its global minimiser
and its minimum value (0 for all of them)::

    from qcd_fx.optim.testfunctions import Rastrigin
    f = Rastrigin(10, shift=1.3)          # optimum moved from 0 to (1.3, ..., 1.3)
    f(torch.zeros(5, 10))                 # -> shape (5,)
    f.optimum, f.f_opt, f.bounds          # (10,) tensor, 0.0, (-5.12, 5.12)

``shift`` translates the function, ``f_shift(x) = f(x - shift)``, so the minimiser moves by
``shift`` while the search box stays the textbook one. Benchmarks shift the optimum so that an
optimizer that is drawn to the centre of the box (or to the mean of a symmetric initial
population) gains nothing from it. A shift that puts the optimum outside the box is refused.

=============  ==========================================================  ===================  ================
function       formula (``z = x - shift``)                                 box                  minimiser ``z*``
=============  ==========================================================  ===================  ================
Sphere         ``sum z_i^2``                                               [-5.12, 5.12]        0
Rosenbrock     ``sum_{i<D} 100 (z_{i+1} - z_i^2)^2 + (1 - z_i)^2``         [-5, 10]             1
Rastrigin      ``10 D + sum z_i^2 - 10 cos(2 pi z_i)``                     [-5.12, 5.12]        0
Ackley         ``-20 exp(-0.2 rms(z)) - exp(mean cos(2 pi z_i)) + 20 + e``  [-32.768, 32.768]    0
Griewank       ``1 + sum z_i^2 / 4000 - prod cos(z_i / sqrt(i))``           [-600, 600]          0
Schwefel 2.26  ``418.9828872724338 D - sum z_i sin(sqrt|z_i|)``            [-500, 500]          420.9687462275036
=============  ==========================================================  ===================  ================

Schwefel's minimum is the minimum *inside its box* (the function is unbounded below outside it);
``Schwefel(D)(optimum)`` is 0 only to the precision of its two constants (``|f| < 1e-9 D``).
All functions are differentiable almost everywhere, so gradient methods can be run on them too.
Computation happens in the dtype of the input; use float64 for targets like ``f < 1e-6`` on
Ackley, whose value near the optimum is ``~4 rms(z)``.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

SCHWEFEL_CONSTANT = 418.9828872724338
SCHWEFEL_ARGMIN = 420.9687462275036


class TestFunction(ABC):
    """Base class: ``f(x)`` for ``x`` of shape ``(..., dim)``; see the module docstring."""

    __test__ = False  # not a pytest test class despite the name

    name: str = ""
    default_bounds: tuple[float, float] = (-1.0, 1.0)
    argmin_value: float = 0.0  # every coordinate of the unshifted minimiser
    min_dim: int = 1

    def __init__(self, dim: int, shift: float | Sequence[float] | Tensor = 0.0):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < self.min_dim:
            raise ValueError(f"{self.name}: dim must be an integer >= {self.min_dim}, got {dim!r}")
        self.dim = dim
        s = torch.as_tensor(shift, dtype=torch.float64)
        if s.dim() == 0:
            s = s.expand(dim).clone()
        if s.shape != (dim,):
            raise ValueError(f"{self.name}: shift must be a number or a vector of length {dim}, got shape {tuple(s.shape)}")
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"{self.name}: shift must be finite")
        self.shift = s
        lo, hi = self.default_bounds
        opt = self.optimum
        if bool((opt < lo).any()) or bool((opt > hi).any()):
            raise ValueError(f"{self.name}: shift puts the optimum outside the search box [{lo}, {hi}]")

    @property
    def bounds(self) -> tuple[float, float]:
        """The search box ``(low, high)``, the same for every coordinate."""
        return self.default_bounds

    @property
    def optimum(self) -> Tensor:
        """The global minimiser, a float64 vector of length ``dim``."""
        return self.shift + self.argmin_value

    @property
    def f_opt(self) -> float:
        """The global minimum value (0 for every function here)."""
        return 0.0

    def __call__(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise ValueError(f"{self.name}: expected a tensor of shape (..., {self.dim}), got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"{self.name}: expected a tensor of shape (..., {self.dim}), got {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            x = x.to(torch.float64)
        return self._f(x - self.shift.to(device=x.device, dtype=x.dtype))

    @abstractmethod
    def _f(self, z: Tensor) -> Tensor:
        """The function of the unshifted argument ``z`` (batched over leading axes)."""

    def __repr__(self) -> str:
        s = self.shift
        shift = f"{float(s[0])!r}" if bool((s == s[0]).all()) else "[...]"
        return f"{type(self).__name__}(dim={self.dim}, shift={shift})"


class Sphere(TestFunction):
    name = "sphere"
    default_bounds = (-5.12, 5.12)

    def _f(self, z: Tensor) -> Tensor:
        return z.square().sum(-1)


class Rosenbrock(TestFunction):
    name = "rosenbrock"
    default_bounds = (-5.0, 10.0)
    argmin_value = 1.0
    min_dim = 2

    def _f(self, z: Tensor) -> Tensor:
        a, b = z[..., :-1], z[..., 1:]
        return (100.0 * (b - a.square()).square() + (1.0 - a).square()).sum(-1)


class Rastrigin(TestFunction):
    name = "rastrigin"
    default_bounds = (-5.12, 5.12)

    def _f(self, z: Tensor) -> Tensor:
        return 10.0 * self.dim + (z.square() - 10.0 * torch.cos(2 * math.pi * z)).sum(-1)


class Ackley(TestFunction):
    name = "ackley"
    default_bounds = (-32.768, 32.768)

    def _f(self, z: Tensor) -> Tensor:
        # vector_norm has a zero (not NaN) gradient at z = 0, unlike sqrt(mean(z^2)).
        rms = torch.linalg.vector_norm(z, dim=-1) / math.sqrt(self.dim)
        mean_cos = torch.cos(2 * math.pi * z).mean(-1)
        return -20.0 * torch.exp(-0.2 * rms) - torch.exp(mean_cos) + 20.0 + math.e


class Griewank(TestFunction):
    name = "griewank"
    default_bounds = (-600.0, 600.0)

    def _f(self, z: Tensor) -> Tensor:
        i = torch.arange(1, self.dim + 1, device=z.device, dtype=z.dtype)
        return 1.0 + z.square().sum(-1) / 4000.0 - torch.cos(z / i.sqrt()).prod(-1)


class Schwefel(TestFunction):
    name = "schwefel"
    default_bounds = (-500.0, 500.0)
    argmin_value = SCHWEFEL_ARGMIN

    def _f(self, z: Tensor) -> Tensor:
        return SCHWEFEL_CONSTANT * self.dim - (z * torch.sin(z.abs().sqrt())).sum(-1)


FUNCTIONS: dict[str, type[TestFunction]] = {
    cls.name: cls for cls in (Sphere, Rosenbrock, Rastrigin, Ackley, Griewank, Schwefel)
}
"""The test functions by (lower-case) name."""


def get(name: str, dim: int, shift: float | Sequence[float] | Tensor = 0.0) -> TestFunction:
    """``get("rastrigin", 10)`` -> ``Rastrigin(10)``; a clear ``ValueError`` for an unknown name."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in FUNCTIONS:
        raise ValueError(f"unknown test function {name!r}; choose one of {', '.join(FUNCTIONS)}")
    return FUNCTIONS[key](dim, shift)


OPTIMIZERS = ("quantum-dynamics", "qimad", "random")
"""Optimizers :func:`optimize` runs (the ``qcd-fx optimize`` choices)."""


def optimize(
    fn: TestFunction,
    optimizer: str = "quantum-dynamics",
    *,
    max_evals: int = 100_000,
    seed: int = 0,
    target: float | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Minimise a test function inside its box with one of :data:`OPTIMIZERS`, within ``max_evals``.

    * ``quantum-dynamics``: :class:`~qcd_fx.optim.QuantumDynamics` with the box as ``bounds``
      (``options`` go to its constructor), batched evaluation;
    * ``qimad``: :class:`~qcd_fx.optim.QIMAD` (8 agents; it uses gradients) on one float64 vector
      started uniformly in the box, through ``step(closure)`` (one closure call = one evaluation),
      with ``lr = 0.01 * box width`` annealed to 0 by ``CosineAnnealingLR`` over the budget and
      the cooling set to the budget (settings of this harness, not tuned per function);
    * ``random``: uniform samples in the box, in batches of up to 1024.

    Stops at ``target`` (``f <= target``) if given. Returns ``f`` (best value), ``x`` (best point,
    float64), ``evaluations``, ``evaluations_to_target`` (exact count at the first evaluation that
    reached ``target``, or None), ``stop`` (``target``, ``budget`` or the optimizer's own reason)
    and ``seconds``. Deterministic for a given ``seed``. Runs single-threaded (the previous
    ``torch.get_num_threads()`` is restored): the tensors are tiny, and on a busy machine
    intra-op threads made the same run 10-20x slower.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if isinstance(max_evals, bool) or not isinstance(max_evals, int) or max_evals < 1:
        raise ValueError(f"max_evals must be a positive integer, got {max_evals!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float)) or math.isnan(target)):
        raise ValueError(f"target must be a number, got {target!r}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _optimize(fn, optimizer, max_evals, seed, target, options)
    finally:
        torch.set_num_threads(threads)


def _optimize(fn: TestFunction, optimizer: str, max_evals: int, seed: int, target: float | None, options: dict[str, Any] | None) -> dict[str, Any]:
    lo, hi = fn.bounds
    t0 = time.perf_counter()
    state = {"evals": 0, "hit": None, "best": math.inf, "x": None}

    def record(points: Tensor, values: Tensor) -> None:
        values = values.detach().to(torch.float64)
        if values.numel() == 0:
            return
        i = int(torch.argmin(values))
        if float(values[i]) < state["best"]:
            state["best"], state["x"] = float(values[i]), points[i].detach().to(torch.float64).clone()
        if target is not None and state["hit"] is None:
            below = torch.nonzero(values <= target).flatten()
            if below.numel():
                state["hit"] = state["evals"] + int(below[0]) + 1
        state["evals"] += values.numel()

    gen = torch.Generator().manual_seed(seed)
    stop = "budget"
    if optimizer == "random":
        while state["evals"] < max_evals and state["hit"] is None:
            n = min(1024, max_evals - state["evals"])
            pts = torch.rand(n, fn.dim, generator=gen, dtype=torch.float64).mul_(hi - lo).add_(lo)
            record(pts, fn(pts))
    elif optimizer == "quantum-dynamics":
        from .quantum_dynamics import QuantumDynamics

        x = torch.zeros(fn.dim, dtype=torch.float64)
        opt = QuantumDynamics([x], bounds=(lo, hi), max_evals=max_evals, seed=seed, **(options or {}))

        def batched(pts: Tensor) -> Tensor:
            values = fn(pts)
            record(pts, values)
            return values

        while not opt.done and state["hit"] is None:
            opt.step(loss_fn=batched)
        if opt.done:
            stop = opt.stop_reason or "budget"
    else:
        from torch.optim.lr_scheduler import CosineAnnealingLR

        from .qimad import QIMAD

        agents = (options or {}).get("num_agents", 8)
        steps = max(1, max_evals // agents)
        x = torch.rand(fn.dim, generator=gen, dtype=torch.float64).mul_(hi - lo).add_(lo).requires_grad_(True)
        kwargs = {"num_agents": agents, "lr": 0.01 * (hi - lo), "seed": seed, "total_steps": steps, **(options or {})}
        opt = QIMAD([x], **kwargs)
        sched = CosineAnnealingLR(opt, T_max=steps)

        def closure() -> Tensor:
            value = fn(x.unsqueeze(0))
            record(x.detach().unsqueeze(0), value)
            value[0].backward()
            return value[0]

        while state["evals"] + agents <= max_evals and state["hit"] is None:
            opt.step(closure)
            sched.step()
    if state["hit"] is not None:
        stop = "target"
    return {
        "f": state["best"], "x": state["x"], "evaluations": state["evals"], "evaluations_to_target": state["hit"],
        "stop": stop, "seconds": time.perf_counter() - t0,
    }  # fmt: skip


__all__ = [
    "OPTIMIZERS",
    "optimize",
    "TestFunction",
    "Sphere",
    "Rosenbrock",
    "Rastrigin",
    "Ackley",
    "Griewank",
    "Schwefel",
    "FUNCTIONS",
    "get",
    "SCHWEFEL_CONSTANT",
    "SCHWEFEL_ARGMIN",
]
