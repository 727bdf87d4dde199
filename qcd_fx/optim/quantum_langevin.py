"""QuantumLangevin — the gradient-based hybrid of the quantum-dynamics optimizers (seed: Wang &
Maimaitiabudula, *Quantum dynamics of machine learning*, arXiv 2407.19890; the gradient-free
MQHOA is :class:`~qcd_fx.optim.quantum_dynamics.QuantumDynamics`).

Gradient drift plus diffusion at scale ``sigma`` — the Euler–Maruyama step of the Langevin
equation ``dx = -grad f dt + sigma dW`` with ``dt = lr`` — with momentum, and MQHOA's
multi-scale annealing of ``sigma``::

    v_i <- momentum * v_i + g_i
    x_i <- x_i - lr * v_i + sigma * sqrt(lr) * xi_i            (xi_i ~ N(0, I))

for ``walkers`` weight copies ``x_i`` (default 1: plain annealed Langevin; several walkers are
evaluated together in one ``vmap`` call and their momenta are kept apart). Annealing
(``anneal``): ``"levels"`` halves ``sigma`` ``levels`` times at evenly spaced steps over
``total_steps`` (which :func:`qcd_fx.train.fit` sets), ``"plateau"`` halves it when the energy
level is stable (the best walker's smoothed loss has not improved by ``plateau_tol`` relative
for ``patience`` steps). Below ``sigma_min`` the diffusion stops (pure momentum descent). With
``walkers > 1`` every energy-level transition also replaces the worst walker by the mean (or the
Boltzmann mean) of the walkers, as in MQHOA. The model holds the walker with the lowest smoothed
loss. Only ``lr`` may differ between parameter groups (``torch.optim.lr_scheduler`` works).

Every random number comes from one ``torch.Generator`` seeded with ``seed``, and ``state_dict``
holds the whole state including the generator, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .population import EVAL_MODES, Population, PopulationOptimizer, check_choice, check_integer, check_number, closure_evaluate, resolve_seed
from .quantum_dynamics import WEIGHTINGS, boltzmann_weights

ANNEALS = ("levels", "plateau")


class QuantumLangevin(PopulationOptimizer):
    """Gradient drift + diffusion at scale ``sigma`` with multi-scale annealing. See the module docstring.

    Args:
        params: parameters or groups (only ``lr`` may differ between groups).
        lr: step size ``dt`` (default 0.05).
        sigma: initial diffusion scale (default 1e-3; the noise per step is ``sigma * sqrt(lr)``).
        momentum: heavy-ball momentum of the drift (default 0.9).
        walkers: number of weight copies (default 1).
        anneal: ``"levels"`` (default; needs ``total_steps``, which ``fit`` sets) or ``"plateau"``.
        levels: number of halvings of ``sigma`` over ``total_steps`` (default 4).
        total_steps: length of the run for ``anneal="levels"``.
        patience, plateau_tol: the energy-level-stable test of ``anneal="plateau"``.
        sigma_min: below it the diffusion is switched off (default ``sigma / 2**10``).
        weighting, temperature: how the worst walker is replaced (``walkers > 1``).
        loss_ema: smoothing of each walker's loss (default 0.9).
        weight_decay: decoupled weight decay (default 0).
        evaluation: ``auto``/``vmap``/``loop`` for the ``model=`` path.
        seed: seed of the generator.

    ``step(closure)`` (the closure runs forward and backward), ``step(model=, batch=, loss_fn=)``
    (all walkers in one ``vmap`` call; what :func:`qcd_fx.train.fit` does) or plain ``step()``
    after ``backward()`` (``walkers=1`` only; the energy level is then unknown, so only
    ``anneal="levels"`` works). Returns the loss of the walker now in the model (None for
    ``step()``).
    """

    state_key = "quantum_langevin"
    state_version = 1

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.05,
        sigma: float = 1e-3,
        momentum: float = 0.9,
        walkers: int = 1,
        *,
        anneal: str = "levels",
        levels: int = 4,
        total_steps: int | None = None,
        patience: int = 50,
        plateau_tol: float = 1e-3,
        sigma_min: float | None = None,
        weighting: str = "mean",
        temperature: float = 1.0,
        loss_ema: float = 0.9,
        weight_decay: float = 0.0,
        evaluation: str = "auto",
        seed: int | None = None,
    ):
        check_number("lr", lr, 0.0, low_open=True)
        check_number("sigma", sigma, 0.0)
        check_number("momentum", momentum, 0.0, 1.0, high_open=True)
        check_integer("walkers", walkers, 1)
        check_choice("anneal", anneal, ANNEALS)
        check_integer("levels", levels, 0)
        if total_steps is not None:
            check_integer("total_steps", total_steps, 1)
        check_integer("patience", patience, 1)
        check_number("plateau_tol", plateau_tol, 0.0)
        if sigma_min is not None:
            check_number("sigma_min", sigma_min, 0.0)
        check_choice("weighting", weighting, WEIGHTINGS)
        if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > 0):
            raise ValueError(f"temperature must be a positive number (inf allowed), got {temperature!r}")
        check_number("loss_ema", loss_ema, 0.0, 1.0, high_open=True)
        check_number("weight_decay", weight_decay, 0.0)
        check_choice("evaluation", evaluation, EVAL_MODES)
        self.seed = resolve_seed(seed)
        self.options = dict(
            sigma=float(sigma), momentum=float(momentum), walkers=walkers, anneal=anneal, levels=levels, total_steps=total_steps,
            patience=patience, plateau_tol=float(plateau_tol), sigma_min=float(sigma / 2**10 if sigma_min is None else sigma_min),
            weighting=weighting, temperature=float(temperature), loss_ema=float(loss_ema), weight_decay=float(weight_decay),
            evaluation=evaluation,
        )  # fmt: skip
        super().__init__(params, {"lr": lr})
        for g in self.param_groups:
            check_number("lr", float(g["lr"]), 0.0, low_open=True)
        self._initialized = False
        self.transitions = 0  # energy-level transitions (sigma halvings)

    def set_total_steps(self, total_steps: int, only_if_unset: bool = False) -> None:
        """Length of the run for ``anneal="levels"`` (``fit`` calls this with epochs x batches)."""
        check_integer("total_steps", total_steps, 1)
        if only_if_unset and self.options["total_steps"] is not None:
            return
        self.options["total_steps"] = total_steps

    @property
    def sigma(self) -> float:
        """The current diffusion scale (0 once below ``sigma_min``)."""
        s = self._sigma if self._initialized else self.options["sigma"]
        return 0.0 if s < self.options["sigma_min"] else s

    def _init_state(self) -> None:
        params = self._params()
        n = self.options["walkers"]
        self._pop = Population(params, n)
        lay = self._pop.layout
        self._gen = self._generator(self.seed, lay.device)
        self._pop.init_from_params(0.0)
        self._velocity = torch.zeros_like(self._pop.positions)
        self._ema = torch.full((n,), math.nan, dtype=torch.float64)
        self._sigma = self.options["sigma"]
        self._level = 0
        self._best_ema = math.inf
        self._since_best = 0
        self._steps = 0
        self._best = 0
        self._buffers_stacked = False
        self._initialized = True

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Any] | None = None,
        *,
        model: nn.Module | None = None,
        batch: tuple[Any, Any] | None = None,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
    ) -> float | None:
        self._step_mode(closure, model, batch, loss_fn, plain=True)
        if not self._initialized:
            self._init_state()
        o, pop = self.options, self._pop
        lay = pop.layout
        n = o["walkers"]
        if closure is None and model is None:
            if n != 1:
                raise ValueError("plain step() (after backward) supports walkers=1 only; use step(closure) or step(model=, batch=, loss_fn=)")
            if o["anneal"] == "plateau":
                raise ValueError('anneal="plateau" needs the loss: use step(closure) or step(model=, batch=, loss_fn=)')
            pop.positions[0].copy_(lay.flatten(pop.params))
            grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in pop.params]).unsqueeze(0).to(lay.dtype)
            losses = None
        elif closure is not None:
            ev = closure_evaluate(lay, pop.params, pop.positions, closure)
            losses, grads = ev.losses.to(torch.float64), ev.grads
        else:
            if not self._buffers_stacked:
                pop.stack_buffers(model)
                self._buffers_stacked = True
            ev = self._get_evaluator(model, pop.params, o["evaluation"])(pop.positions, batch[0], batch[1], loss_fn, buffers=pop.buffers or None)
            losses, grads = ev.losses.to(device="cpu", dtype=torch.float64), ev.grads
        if losses is not None and not bool(torch.isfinite(losses).all()):
            bad = [i for i, v in enumerate(losses.tolist()) if not math.isfinite(v)]
            raise FloatingPointError(f"QuantumLangevin: non-finite loss for walker(s) {bad}; lower lr or sigma")
        self._steps += 1

        # drift (momentum) + diffusion, all walkers at once
        lr = self._lr_vector(lay)
        v = self._velocity
        v.mul_(o["momentum"]).add_(grads)
        if o["weight_decay"]:
            v.add_(pop.positions, alpha=o["weight_decay"])
        if isinstance(lr, float):
            pop.positions.add_(v, alpha=-lr)
        else:
            pop.positions.addcmul_(v, lr.unsqueeze(0).expand_as(v), value=-1.0)
        noise = torch.randn(pop.positions.shape, generator=self._gen, device=lay.device, dtype=lay.dtype)
        s = self.sigma
        if s > 0:
            scale = math.sqrt(lr) * s if isinstance(lr, float) else lr.sqrt().mul(s).unsqueeze(0)
            if isinstance(scale, float):
                pop.positions.add_(noise, alpha=scale)
            else:
                pop.positions.addcmul_(noise, scale.expand_as(noise))

        # energies, best walker, annealing
        result = None
        if losses is not None:
            b = o["loss_ema"]
            fresh = torch.isnan(self._ema)
            self._ema = torch.where(fresh, losses, b * self._ema + (1 - b) * losses)
            self._best = int(torch.argmin(self._ema))
            result = float(losses[self._best])
        transition = False
        if o["anneal"] == "levels":
            total = o["total_steps"]
            if total is None:
                raise ValueError('anneal="levels" needs total_steps= (qcd_fx.train.fit sets it), or use anneal="plateau"')
            level = min(o["levels"], self._steps * (o["levels"] + 1) // total) if o["levels"] else 0
            if level > self._level:
                transition = True
                self._level = level
                self._sigma = o["sigma"] / 2**level
        else:
            best_ema = float(self._ema[self._best])
            if best_ema < self._best_ema * (1 - o["plateau_tol"]) or not math.isfinite(self._best_ema):
                self._best_ema = best_ema
                self._since_best = 0
            else:
                self._since_best += 1
                if self._since_best >= o["patience"]:
                    transition = True
                    self._sigma /= 2
                    self._since_best = 0
                    self._best_ema = best_ema
        if transition:
            self.transitions += 1
            if n > 1 and losses is not None:
                ema = self._ema
                if o["weighting"] == "boltzmann":
                    w = boltzmann_weights(ema, o["temperature"]).to(device=lay.device, dtype=lay.dtype)
                else:
                    w = torch.full((n,), 1.0 / n, device=lay.device, dtype=lay.dtype)
                mean = (w.unsqueeze(1) * pop.positions).sum(0)
                worst = int(torch.argmax(ema))
                if worst != self._best:
                    pop.positions[worst] = mean
                    self._velocity[worst] = 0
                    for stack in pop.buffers.values():
                        stack[worst] = stack[self._best].clone()
                    self._ema[worst] = math.nan
        pop.load_agent(self._best, model if self._buffers_stacked and model is not None else None)
        return result

    def _own_state(self) -> dict[str, Any]:
        run: dict[str, Any] = {"seed": self.seed, "options": dict(self.options),
                               "initialized": self._initialized, "transitions": self.transitions}  # fmt: skip
        if self._initialized:
            run.update(
                positions=self._pop.positions.clone(), velocity=self._velocity.clone(), ema=self._ema.clone(), sigma=self._sigma,
                level=self._level, best_ema=self._best_ema, since_best=self._since_best, steps=self._steps, best=self._best,
                buffers={k: v.clone() for k, v in self._pop.buffers.items()}, buffers_stacked=self._buffers_stacked,
                generator=self._gen.get_state(),
            )  # fmt: skip
        return run

    def _load_own_state(self, run: dict[str, Any]) -> None:
        self.seed, self.options, self.transitions = run["seed"], dict(run["options"]), run["transitions"]
        self._initialized = False
        if not run["initialized"]:
            return
        self._pop = Population(self._params(), self.options["walkers"])
        lay = self._pop.layout
        if tuple(run["positions"].shape) != tuple(self._pop.positions.shape):
            raise ValueError(f"state dict holds walkers of shape {tuple(run['positions'].shape)}, this optimizer needs {tuple(self._pop.positions.shape)}")
        cast = dict(device=lay.device, dtype=lay.dtype)
        self._pop.positions = run["positions"].to(**cast).clone()
        self._velocity = run["velocity"].to(**cast).clone()
        self._pop.buffers = {k: v.to(lay.device).clone() for k, v in run["buffers"].items()}
        self._ema = run["ema"].cpu().clone()
        for key in ("sigma", "level", "best_ema", "since_best", "steps", "best", "buffers_stacked"):
            setattr(self, "_" + key, run[key])
        self._gen = torch.Generator(device=lay.device)
        self._gen.set_state(run["generator"].clone())
        self._initialized = True


__all__ = ["QuantumLangevin", "ANNEALS"]
