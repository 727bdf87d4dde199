"""QIMAD — Quantum-Inspired Multi-Agent Descent (the seed's ``QIMADTorch``), vectorised and fixed.

A swarm of ``N`` weight copies ("agents") of the model. Every step, ``k_eval`` of them (all by
default; otherwise round robin) are evaluated on the current batch, and each agent ``i`` that has
a gradient moves by (the seed's dynamics)::

    v_i   <- rho * v_i + (1 - rho) * g_i**2                       (RMSProp, rho = 0.99)
    step  = -lr * g_i / (sqrt(v_i / (1 - rho**t_i)) + eps)         (bias correction: option, default on)
          + pull * r_i * (theta_best - theta_i)                    (global-best pull, r_i ~ U(0, 1), pull = 0.2)
          + gamma * sum_j w_ij (theta_j - theta_i)                 (communication over the topology's neighbours)
          + tunnelling jump                                        (see below)

with ``w_ij`` the fidelities ``|<psi_i|psi_j>|**k`` of per-agent Bloch states
``psi = (cos(alpha/2), exp(i beta) sin(alpha/2))``, normalised over ``i``'s neighbours
(topologies ``complete``, ``ring``, ``grid``, ``random``: Erdős–Rényi p = 0.5, every agent with
at least one neighbour). The Bloch angles random-walk every step (``alpha_lr``, ``beta_lr``;
``alpha`` clipped to ``[0, pi]``, ``beta`` modulo ``2 pi``). An evaluated agent that has not
improved for more than ``patience`` evaluations tunnels with probability ``sin(alpha_i / 2)**2``:
uniform noise in ``±(0.8 * mean|theta_i,p| + 0.1) * T`` is added to every parameter tensor ``p``.
The temperature ``T`` falls from 1 to ``min_temp`` over ``total_steps`` (``cosine``, ``linear``,
``exponential``: ``max(min_temp, exp(-5 t))``; never increasing) and also scales the angle random
walk. An agent without neighbours (``N = 1``) is plain RMSProp. After the step the model holds the
best agent's weights (the ones that were evaluated, so the returned loss is theirs).

``k_eval < N``: the seed's docstring says agents not evaluated "reuse cached gradients", but its
code froze them (they only served as reference points), so each agent trained on ``k_eval/N`` of the
batches. ``reuse_gradients=True`` (default) does what the docstring says — every agent moves each
step, with the gradient of its last evaluation; ``False`` is the seed's code.

What differs from the seed (each a defect found by running it; seeds README, items 12-19):

* **Vectorised evaluation** — ``step(model=, batch=(inputs, target), loss_fn=)`` evaluates the
  agents with :class:`~qcd_fx.optim.population.BatchedEvaluator`: one ``torch.func.vmap``-ed
  forward (over views of the stacked agent weights) and one backward for all agents, or,
  for convolutional models on CPU (vmap's grouped convolutions are slower) and for one or two
  agents per step, a loop that runs the model once per agent with its parameters pointed at the
  agent's row; vmap failures fall back to the loop with a warning.
  ``step(closure)`` works as in the seed (one closure call per evaluated agent); both give the
  same trajectory (tested to 1e-5). Every agent sees the same batch.
* **One seeded generator** (``torch.Generator`` on the parameters' device) for everything random:
  angles, random topology, tunnelling, initial perturbation. ``state_dict`` holds it with the whole
  swarm, so a resumed run continues bit for bit (12).
* **Agents start apart**: agents 1..N-1 get Gaussian noise of ``init_noise`` × each tensor's RMS
  (agent 0 keeps the model's weights). Identical agents fed the same batch would stay identical (13).
* **Synchronous update** — every agent moves from the pre-step positions (14).
* **RMSProp bias correction** (default on): without it the first steps move each weight by
  ~``10 lr`` — with the seed's ``eta = 0.05`` that is 0.5 per weight (15).
* **Robust best** — the model holds the agent with the lowest exponential moving average
  (``loss_ema``) of its losses, re-chosen every step; agents are compared on the same batches. The
  seed kept the all-time lowest single-batch loss, so the model stayed at its initial weights until
  an agent beat the first batch's loss, and with mini-batches it was a lottery over batches (16, 17).
* **Memory** — the swarm is one ``(N, D)`` matrix plus the RMSProp state, ``2N + 1`` copies of the
  parameters counting the model's own (``3N + 1`` with ``k_eval < N`` and ``reuse_gradients``, for
  the gradient cache), and one ``(N, D)`` work matrix for the step; the seed kept ``3N + 1``
  always plus its per-step temporaries, its gradient cache being read only in the step that
  wrote it (18).
* **One fused pass** — with bias correction and one learning rate (the defaults) the RMSProp
  step is torch's fused Adam kernel at ``beta1 = 0``, which is exactly this RMSProp: one pass over
  each agent's weights, gradient and ``v`` instead of seven tensor operations over the swarm.
  Where the kernel refuses a call (dtype, device) the step warns once and uses the seven
  operations from then on (same result).
* **Cooling** — :func:`qcd_fx.train.fit` sets ``total_steps`` when it is not given; without it a
  warning says that cooling is off (19).
* Stagnation is counted in the agent's own evaluations (the seed also counted the steps in which
  a not-evaluated agent could not improve), on its loss average; a tunnelled agent starts a new
  personal best (otherwise, worse than its old best by construction, it would jump again every
  ``patience + 1`` evaluations).
* An agent whose loss or gradient is NaN/inf is reset to the best agent (RMSProp state cleared)
  and counted in :attr:`QIMAD.nonfinite_resets`, instead of poisoning the swarm.

Across ranks (``torch.distributed`` with more than one rank, e.g. ``qcd-fx train -O qimad --nproc 2``
or :func:`qcd_fx.train.fit` under ``torchrun``): the agents evaluated in a step are split into
contiguous blocks, one per rank (all agents: rank ``r`` evaluates its own block of ``N / world``),
and every rank sees the same, whole batch. The expensive part — the forward and backward passes —
runs only for a rank's own agents; the results are then all-gathered: one float64 row per
evaluated agent (its loss and, on the model path, its buffers, e.g. BatchNorm statistics) and
one row of its gradient (``D`` values in the parameters' dtype), i.e. ``k_eval × (D × 4 + 8)``
bytes per step for float32 parameters without buffers (blocks are padded to the largest). Every
rank then makes the rest of the step itself, on the whole swarm: the random numbers (one
generator, seeded with rank 0's seed, the same draws in the same order everywhere), the Bloch
angles and fidelities, the best agent, stagnation, tunnelling and the RMSProp-and-communication
move of all ``N`` agents (``O(N D)`` work, small beside the evaluations). Exchanging the gradients
before the move rather than the positions after it costs the same bytes and keeps the whole
swarm — positions, RMSProp state, gradient cache, Bloch states, generator — identical on every
rank: the global best is the same agent everywhere without a broadcast, and ``state_dict`` is a
local call whose result on any rank (rank 0 writes it) is the whole swarm, equal to the
one-process one. With ``evaluation="loop"`` (what ``auto`` picks for convolutional models on CPU)
or ``"vmap"``, ``N`` agents on 1 or on several processes follow the same trajectory bit for bit
(``tests/test_distributed_qimad.py``; measured for vmap too on the digits MLP). With ``auto`` on
a model without convolutions, one process may evaluate ``N`` copies with vmap where each rank
evaluates its ``<= 2`` with the loop: the same maths in another float order (on the digits MLP,
4 agents, one epoch: losses within 5e-7, positions within 6e-8). At the first step every rank takes
rank 0's seed (so ``seed=None`` works) and rank 0's weights; every rank must load the same
``state_dict``. Dropout draws from each process's own global RNG, so models with dropout do not
follow the one-process trajectory.

Per-group settings: only ``lr`` (so ``torch.optim.lr_scheduler`` works); every other option is a
property of the swarm and must be equal in all groups. All optimized parameters must share one
dtype and device. Model randomness (dropout) comes from the global RNG, as in any module.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed
from ..errors import first_line
from .population import (
    EVAL_MODES,
    Evaluation,
    Population,
    PopulationOptimizer,
    check_choice,
    check_flag,
    check_integer,
    check_number,
    closure_evaluate,
    resolve_seed,
)

TOPOLOGIES = ("complete", "ring", "grid", "random")
COOLINGS = ("cosine", "linear", "exponential", None)

_SWARM_KEYS = (
    "num_agents",
    "gamma",
    "k",
    "alpha_lr",
    "beta_lr",
    "topology",
    "k_eval",
    "cooling",
    "total_steps",
    "min_temp",
    "rms_decay",
    "eps",
    "bias_correction",
    "init_noise",
    "loss_ema",
    "patience",
    "pull",
    "evaluation",
    "reuse_gradients",
)

_STATE_VERSION = 1

DEFAULT_LR = 2e-3
"""Default RMSProp learning rate, chosen on a digits validation split (``benchmarks/optimizers.py``;
``benchmarks/results/optimizers.json`` under ``defaults``): 1e-3, 2e-3 and 3e-3 differ by a few
validation images; 1e-3 was slower on the CNN early on and 3e-3 less stable on the MLP. Bias
correction (default on) makes no measurable difference at this lr, but keeps the first steps
bounded at the seed README's larger ``eta``."""


def build_neighbors(n: int, topology: str, generator: torch.Generator | None = None) -> list[list[int]]:
    """Neighbour lists of the seed's topologies (no self-loops; ``random`` uses ``generator``)."""
    if topology == "complete":
        return [[j for j in range(n) if j != i] for i in range(n)]
    if topology == "ring":
        return [sorted({(i - 1) % n, (i + 1) % n} - {i}) for i in range(n)]
    if topology == "grid":
        side = math.ceil(math.sqrt(n))
        out = []
        for i in range(n):
            r, c = divmod(i, side)
            row = []
            for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                j = (r + dr) * side + (c + dc)
                if 0 <= r + dr < side and 0 <= c + dc < side and j < n and j != i:
                    row.append(j)
            out.append(row)
        return out
    if topology == "random":
        nb: list[list[int]] = [[] for _ in range(n)]
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        device = generator.device if generator is not None else None
        draws = torch.rand(len(pairs), generator=generator, device=device).cpu().tolist() if pairs else []
        for (i, j), u in zip(pairs, draws):
            if u < 0.5:
                nb[i].append(j)
                nb[j].append(i)
        for i in range(n):
            if not nb[i]:
                j = (i + 1) % n
                if j != i:
                    nb[i].append(j)
                    nb[j].append(i)
        return [sorted(set(row)) for row in nb]
    raise ValueError(f"topology must be one of {', '.join(TOPOLOGIES)}, got {topology!r}")


def fidelity_matrix(alphas: Tensor, betas: Tensor, k: float) -> Tensor:
    """``F_ij = |<psi_i|psi_j>|**k`` for Bloch states ``(cos(a/2), exp(i b) sin(a/2))`` (the seed's formula)."""
    ca, sa = torch.cos(alphas / 2), torch.sin(alphas / 2)
    d = betas.unsqueeze(0) - betas.unsqueeze(1)  # d[i, j] = b_j - b_i
    s = sa.unsqueeze(1) * sa.unsqueeze(0)
    re = ca.unsqueeze(1) * ca.unsqueeze(0) + torch.cos(d) * s
    im = torch.sin(d) * s
    return (re**2 + im**2) ** (k / 2)


def fidelity_lists(alphas: list[float], betas: list[float], k: float) -> list[list[float]]:
    """:func:`fidelity_matrix` on Python floats (the seed's scalar formula; cheaper for small swarms)."""
    n = len(alphas)
    ca = [math.cos(a / 2) for a in alphas]
    sa = [math.sin(a / 2) for a in alphas]
    out = [[1.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            d = betas[j] - betas[i]
            s = sa[i] * sa[j]
            re = ca[i] * ca[j] + math.cos(d) * s
            im = math.sin(d) * s
            f = re * re + im * im
            out[i][j] = out[j][i] = f if k == 2 else f ** (k / 2)
    return out


def temperature(step: int, total_steps: int | None, cooling: str | None, min_temp: float) -> float:
    """The seed's cooling schedule: 1 at step 0, ``min_temp`` at ``total_steps`` (non-increasing)."""
    if total_steps is None or total_steps <= 0 or cooling is None:
        return 1.0
    t = min(step / total_steps, 1.0)
    if cooling == "cosine":
        return min_temp + (1.0 - min_temp) * 0.5 * (1.0 + math.cos(math.pi * t))
    if cooling == "linear":
        return min_temp + (1.0 - min_temp) * (1.0 - t)
    if cooling == "exponential":
        return max(min_temp, math.exp(-5.0 * t))
    raise ValueError(f"cooling must be one of cosine, linear, exponential or None, got {cooling!r}")


class QIMAD(PopulationOptimizer):
    """Quantum-inspired multi-agent descent (population optimizer). See the module docstring.

    Args:
        params: parameters (or groups; only ``lr`` may differ between groups).
        num_agents: swarm size ``N`` (default 8).
        lr: RMSProp learning rate (the seed's ``eta``; default 2e-3; ``eta=`` is accepted too).
        gamma: communication strength (default 0.05). k: fidelity exponent (default 2).
        alpha_lr, beta_lr: Bloch-angle random-walk speeds (default 0.03).
        topology: ``complete`` (default), ``ring``, ``grid`` or ``random``.
        k_eval: agents evaluated per step, round robin (default: all).
        seed: seed of the optimizer's generator (default: drawn from the OS, then stored).
        cooling: ``cosine`` (default), ``linear``, ``exponential`` or None. total_steps: length of
            the cooling (default: set by :func:`qcd_fx.train.fit`). min_temp: final temperature.
        rms_decay: RMSProp ``rho`` (0.99). eps: RMSProp epsilon (1e-8).
        bias_correction: divide ``v`` by ``1 - rho**t`` (default True).
        init_noise: relative perturbation of agents 1..N-1 at the start (default 0.01).
        loss_ema: averaging of each agent's losses for choosing the best (default 0.9; 0: raw).
        patience: evaluations without improvement before an agent may tunnel (default 3).
        pull: strength of the global-best pull (the seed's 0.2).
        evaluation: ``auto`` (vmap, loop fallback with a warning), ``vmap`` or ``loop`` — for
            ``step(model=..., batch=..., loss_fn=...)``.

    ``step(closure)`` returns, and ``step(model=, batch=, loss_fn=)`` returns, the last measured
    loss of the agent now loaded into the model (a float).
    """

    state_key = "qimad"
    state_version = _STATE_VERSION
    distributed_ready = True  # across torch.distributed ranks: agents split, whole batches (see the module docstring)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        num_agents: int = 8,
        lr: float | None = None,
        gamma: float = 0.05,
        k: float = 2,
        alpha_lr: float = 0.03,
        beta_lr: float = 0.03,
        topology: str = "complete",
        k_eval: int | None = None,
        seed: int | None = None,
        cooling: str | None = "cosine",
        total_steps: int | None = None,
        min_temp: float = 0.05,
        *,
        eta: float | None = None,
        rms_decay: float = 0.99,
        eps: float = 1e-8,
        bias_correction: bool = True,
        init_noise: float = 0.01,
        loss_ema: float = 0.9,
        patience: int = 3,
        pull: float = 0.2,
        evaluation: str = "auto",
        reuse_gradients: bool = True,
    ):
        if lr is not None and eta is not None:
            raise ValueError("pass lr or its alias eta, not both")
        lr = DEFAULT_LR if lr is None and eta is None else (lr if lr is not None else eta)
        check_integer("num_agents", num_agents, 1)
        if k_eval is not None:
            check_integer("k_eval", k_eval, 1)
            if k_eval > num_agents:
                raise ValueError(f"k_eval must be <= num_agents ({num_agents}), got {k_eval}")
        defaults = dict(
            lr=lr, num_agents=num_agents, gamma=gamma, k=k, alpha_lr=alpha_lr, beta_lr=beta_lr, topology=topology,
            k_eval=num_agents if k_eval is None else k_eval, cooling=cooling, total_steps=total_steps, min_temp=min_temp,
            rms_decay=rms_decay, eps=eps, bias_correction=bias_correction, init_noise=init_noise, loss_ema=loss_ema,
            patience=patience, pull=pull, evaluation=evaluation, reuse_gradients=reuse_gradients,
        )  # fmt: skip
        self._validate(defaults)
        super().__init__(params, defaults)
        for g in self.param_groups:
            self._validate(g)
            for key in _SWARM_KEYS:
                if g[key] != self.param_groups[0][key]:
                    raise ValueError(f"{key} is a swarm-wide setting: it must be the same in every parameter group")
        self.seed = resolve_seed(seed)
        self._initialized = False
        self._track = False
        self._log: dict[str, list] = self._empty_log()
        self._warned_cooling = False
        self._fused = hasattr(torch, "_fused_adam_")  # False after the kernel refused a call
        self._spare: Tensor | None = None  # the fused step's second (N, D) buffer
        self._steps: Tensor | None = None  # the fused step's per-agent step counts (when all agents move)
        self.nonfinite_resets = 0
        self.tunnels = 0

    # ── validation ──────────────────────────────────────────────────────────────────────────────

    @staticmethod
    def _validate(g: dict[str, Any]) -> None:
        lr = float(g["lr"]) if isinstance(g["lr"], Tensor) else g["lr"]
        check_number("lr", lr, 0.0, low_open=True)
        check_number("gamma", g["gamma"], 0.0)
        check_number("k", g["k"], 0.0)
        check_number("alpha_lr", g["alpha_lr"], 0.0)
        check_number("beta_lr", g["beta_lr"], 0.0)
        check_choice("topology", g["topology"], TOPOLOGIES)
        check_choice("cooling", g["cooling"], COOLINGS)
        if g["total_steps"] is not None:
            check_integer("total_steps", g["total_steps"], 1)
        check_number("min_temp", g["min_temp"], 0.0, 1.0)
        check_number("rms_decay", g["rms_decay"], 0.0, 1.0, high_open=True)
        check_number("eps", g["eps"], 0.0, low_open=True)
        check_flag("bias_correction", g["bias_correction"])
        check_number("init_noise", g["init_noise"], 0.0)
        check_number("loss_ema", g["loss_ema"], 0.0, 1.0, high_open=True)
        check_integer("patience", g["patience"], 0)
        check_number("pull", g["pull"], 0.0)
        check_flag("reuse_gradients", g["reuse_gradients"])
        check_choice("evaluation", g["evaluation"], EVAL_MODES)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_initialized", False):
            raise ValueError("QIMAD cannot take new parameter groups after its first step (the swarm is built then)")
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        self._validate(g)
        for key in _SWARM_KEYS:
            if g[key] != self.param_groups[0][key]:
                raise ValueError(f"{key} is a swarm-wide setting: it must be the same in every parameter group")

    # ── public helpers ──────────────────────────────────────────────────────────────────────────

    def set_total_steps(self, total_steps: int, only_if_unset: bool = False) -> None:
        """Set the length of the cooling schedule (``fit`` calls this with epochs × batches)."""
        check_integer("total_steps", total_steps, 1)
        if only_if_unset and self.param_groups[0]["total_steps"] is not None:
            return
        for g in self.param_groups:
            g["total_steps"] = total_steps

    def get_agent_losses(self) -> list[float]:
        """Each agent's last measured loss (``inf`` before its first evaluation)."""
        return list(self._cached_losses) if self._initialized else []

    def agent_positions(self) -> Tensor:
        """The ``(N, D)`` matrix of agent weights: the live tensor until the next step (which may
        swap in a new matrix), so read it, or clone it to keep it."""
        self._require_init()
        return self._pop.positions

    @property
    def best_agent(self) -> int | None:
        return self._best if self._initialized else None

    def enable_tracking(self) -> None:
        """Log per-step diagnostics (losses, diversity, tunnels, angles, temperature, best agent)."""
        self._track = True

    def reset_log(self) -> None:
        self._log = self._empty_log()

    def get_log(self) -> dict[str, list]:
        return {k: list(v) for k, v in self._log.items()}

    @staticmethod
    def _empty_log() -> dict[str, list]:
        return {
            "losses": [],
            "diversity": [],
            "tunnels": [],
            "alphas": [],
            "betas": [],
            "temperature": [],
            "best": [],
            "resets": [],
        }

    def _require_init(self) -> None:
        if not self._initialized:
            raise RuntimeError("the swarm does not exist before the first step")

    # ── state ───────────────────────────────────────────────────────────────────────────────────
    # Per-agent scalars live in Python lists (N is small; a tensor op per scalar costs ~5 us each).

    _SCALARS = (
        "cached_losses",
        "ema",
        "agent_best",
        "stagnation",
        "rms_steps",
        "has_grad",
        "alphas",
        "betas",
        "neighbors",
    )

    def _init_state(self) -> None:
        g0 = self.param_groups[0]
        n = g0["num_agents"]
        self._pop = Population(self._params(), n)
        dev = self._pop.layout.device
        if distributed.active():  # every rank: rank 0's seed and weights, so the ranks stay in lockstep
            self.seed = distributed.broadcast_int(self.seed)
            lay = self._pop.layout
            lay.copy_into(self._pop.params, distributed.broadcast_(lay.flatten(self._pop.params)))
        self._gen = self._generator(self.seed, dev)
        self._pop.init_from_params(g0["init_noise"], self._gen)
        self._rms = torch.zeros_like(self._pop.positions)
        angles = torch.rand(2, n, generator=self._gen, device=dev, dtype=torch.float64).cpu()
        self._alphas = (angles[0] * math.pi).tolist()
        self._betas = (angles[1] * 2 * math.pi).tolist()
        self._neighbors = build_neighbors(n, g0["topology"], self._gen)
        self._cached_losses = [math.inf] * n
        self._ema = [math.nan] * n
        self._agent_best = [math.inf] * n
        self._stagnation = [0] * n
        self._rms_steps = [0] * n
        self._has_grad = [False] * n
        self._step_count = 0
        self._best = 0
        self._buffers_stacked = False
        self._grad_cache = self._new_grad_cache()
        self._initialized = True

    def _new_grad_cache(self) -> Tensor | None:
        g0 = self.param_groups[0]
        if g0["reuse_gradients"] and g0["k_eval"] < g0["num_agents"]:
            return torch.zeros_like(self._pop.positions)
        return None

    def _own_state(self) -> dict[str, Any]:
        swarm: dict[str, Any] = {"seed": self.seed, "initialized": self._initialized,
                                 "nonfinite_resets": self.nonfinite_resets, "tunnels": self.tunnels}  # fmt: skip
        if self._initialized:
            swarm.update({name: list(getattr(self, "_" + name)) for name in self._SCALARS})
            swarm["neighbors"] = [list(row) for row in self._neighbors]
            swarm.update(
                positions=self._pop.positions, rms=self._rms, grad_cache=self._grad_cache, step_count=self._step_count,
                best=self._best, generator=self._gen.get_state(), buffers=dict(self._pop.buffers),
                buffers_stacked=self._buffers_stacked,
            )  # fmt: skip
        return swarm

    def _load_own_state(self, swarm: dict[str, Any]) -> None:
        self.seed = swarm["seed"]
        self.nonfinite_resets = swarm["nonfinite_resets"]
        self.tunnels = swarm["tunnels"]
        self._initialized = False
        if not swarm["initialized"]:
            return
        g0 = self.param_groups[0]
        pop = Population(self._params(), g0["num_agents"])
        lay = pop.layout
        if tuple(swarm["positions"].shape) != (pop.num_agents, lay.dim):
            raise ValueError(f"state dict holds a swarm of shape {tuple(swarm['positions'].shape)}, this optimizer needs ({pop.num_agents}, {lay.dim})")
        pop.positions = swarm["positions"].to(device=lay.device, dtype=lay.dtype).clone()
        pop.buffers = {k: v.to(lay.device).clone() for k, v in swarm["buffers"].items()}
        self._pop = pop
        self._rms = swarm["rms"].to(device=lay.device, dtype=lay.dtype).clone()
        self._grad_cache = self._new_grad_cache()
        if (swarm["grad_cache"] is None) != (self._grad_cache is None):
            raise ValueError("state dict and optimizer disagree on k_eval / reuse_gradients (the gradient cache)")
        if self._grad_cache is not None:
            self._grad_cache = swarm["grad_cache"].to(device=lay.device, dtype=lay.dtype).clone()
        for name in self._SCALARS:
            setattr(self, "_" + name, list(swarm[name]))
        self._neighbors = [list(row) for row in swarm["neighbors"]]
        self._step_count = swarm["step_count"]
        self._best = swarm["best"]
        self._gen = torch.Generator(device=lay.device)
        self._gen.set_state(swarm["generator"].clone())
        self._spare = None
        self._steps = None
        self._buffers_stacked = swarm["buffers_stacked"]
        self._initialized = True

    # ── the step ────────────────────────────────────────────────────────────────────────────────

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Any] | None = None,
        *,
        model: nn.Module | None = None,
        batch: tuple[Any, Any] | None = None,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
    ) -> float:
        """One swarm step: ``step(closure)`` (the seed's way) or ``step(model=, batch=(inputs, target), loss_fn=)``.

        ``loss_fn(model(*inputs), target)`` must return a scalar; ``inputs`` may be a tensor or a
        tuple of positional inputs. Returns the last measured loss of the agent loaded into the model.
        """
        self._step_mode(closure, model, batch, loss_fn)
        if not self._initialized:
            self._init_state()
        g0 = self.param_groups[0]
        pop, lay = self._pop, self._pop.layout
        n, k_eval = g0["num_agents"], g0["k_eval"]
        self._step_count += 1
        if g0["total_steps"] is None and g0["cooling"] is not None and not self._warned_cooling:
            self._warned_cooling = True
            warnings.warn(
                "QIMAD: cooling is off because total_steps is unknown; pass total_steps= (qcd_fx.train.fit sets it)",
                RuntimeWarning,
                stacklevel=2,
            )
        temp = temperature(self._step_count, g0["total_steps"], g0["cooling"], g0["min_temp"])

        # Phase 1: evaluate k_eval agents (round robin), all on this batch.
        base = (self._step_count - 1) * k_eval % n
        to_eval = sorted({(base + j) % n for j in range(k_eval)})
        # A run of consecutive agents (all of them, or a round-robin window that does not wrap) is
        # evaluated through views: no gathered copies of positions and buffers, and the gradients
        # are written straight into the gradient cache.
        lo = to_eval[0]
        rows = slice(lo, lo + len(to_eval)) if to_eval == list(range(lo, lo + len(to_eval))) else None
        idx = None if rows is not None else torch.tensor(to_eval, device=lay.device)
        # every agent: the matrices themselves, whose views the evaluator keeps in pop.cache
        whole = rows is not None and len(to_eval) == n
        shared = distributed.active()
        pos_eval = None if shared else pop.positions if whole else pop.positions[rows] if rows is not None else pop.positions.index_select(0, idx)
        in_cache = False
        snapshot = None
        if shared:  # this rank's share of the agents; the results all-gathered
            if closure is not None:
                snapshot = lay.flatten(pop.params)
            ev = self._evaluate_shared(to_eval, closure, model, batch, loss_fn)
        elif closure is not None:
            snapshot = lay.flatten(pop.params)
            ev = closure_evaluate(lay, pop.params, pos_eval, closure)
        else:
            if not self._buffers_stacked:
                pop.stack_buffers(model)
                self._buffers_stacked = True
            evaluator = self._get_evaluator(model, pop.params, g0["evaluation"])
            if rows is not None:
                bufs = {name: s[rows] for name, s in pop.buffers.items()}  # updated in place
            else:
                bufs = {name: s.index_select(0, idx) for name, s in pop.buffers.items()}
            in_cache = self._grad_cache is not None and rows is not None
            out = (self._grad_cache if whole else self._grad_cache[rows]) if in_cache else None
            ev = evaluator(pos_eval, batch[0], batch[1], loss_fn, buffers=bufs or None, out=out, cache=pop.cache if whole else None)
            if rows is None:
                for name, s in pop.buffers.items():
                    s.index_copy_(0, idx, bufs[name])
        losses = ev.losses.tolist()
        # A NaN/inf anywhere in a row makes its sum non-finite (one pass, no temporary); a row whose
        # sum merely overflowed is re-checked element-wise.
        finite = []
        for r, (loss, row_sum) in enumerate(zip(losses, ev.grads.sum(1).tolist())):
            ok = math.isfinite(row_sum)
            if math.isfinite(loss) and not ok:
                ok = bool(torch.isfinite(ev.grads[r]).all())
            finite.append(math.isfinite(loss) and ok)
        good = [i for i, ok in zip(to_eval, finite) if ok]
        bad = [i for i, ok in zip(to_eval, finite) if not ok]
        good_rows = [r for r, ok in enumerate(finite) if ok]

        # Phase 2: losses, loss averages, best agent, stagnation.
        beta = g0["loss_ema"]
        for r, i in enumerate(to_eval):
            if not finite[r]:
                continue
            loss = losses[r]
            self._cached_losses[i] = loss
            self._ema[i] = loss if math.isnan(self._ema[i]) else beta * self._ema[i] + (1 - beta) * loss
        for i in bad:
            self._reset_agent(i)
        candidates = [i for i in range(n) if not math.isnan(self._ema[i])]
        if not candidates:  # every agent is non-finite: back to the model's weights
            if snapshot is not None:
                lay.copy_into(pop.params, snapshot)
            pop.positions.copy_(lay.flatten(pop.params).expand_as(pop.positions))
            if model is not None and self._buffers_stacked:
                pop.stack_buffers(model)
            self._rms.zero_()
            for i in range(n):
                self._reset_agent(i)
            self.nonfinite_resets += len(bad)
            return math.nan
        self._best = best = min(candidates, key=lambda i: (self._ema[i], i))
        pop.load_agent(best, model if self._buffers_stacked and closure is None else None)
        for i in good:
            if self._ema[i] < self._agent_best[i] - 1e-8:
                self._agent_best[i] = self._ema[i]
                self._stagnation[i] = 0
            else:
                self._stagnation[i] += 1
        if bad:
            bad_dev = torch.tensor(bad, device=lay.device)
            pop.copy_agent(bad_dev, best)
            self._rms.index_fill_(0, bad_dev, 0)
            self.nonfinite_resets += len(bad)

        # Phase 3: random numbers (always the same count: resumable), angles, fidelity weights.
        normals = torch.randn(2, n, generator=self._gen, device=lay.device, dtype=torch.float64).tolist()
        uniforms = torch.rand(2, n, generator=self._gen, device=lay.device, dtype=torch.float64).tolist()
        alphas_old, betas_old = self._alphas, self._betas
        fid = fidelity_lists(alphas_old, betas_old, g0["k"])
        a_step, b_step = g0["alpha_lr"] * temp, g0["beta_lr"] * temp
        self._alphas = [min(math.pi, max(0.0, a + a_step * z)) for a, z in zip(alphas_old, normals[0])]
        self._betas = [(b + b_step * z) % (2 * math.pi) for b, z in zip(betas_old, normals[1])]

        # Phase 4: move agents — all from the pre-step positions. With k_eval < N and
        # reuse_gradients, agents not evaluated this step move too, with the gradient of their last
        # evaluation (the seed's docstring; its code froze them instead).
        fresh_grads = ev.grads if len(good_rows) == ev.grads.shape[0] else ev.grads.index_select(0, torch.tensor(good_rows, device=lay.device))
        if self._grad_cache is not None:
            if good and not in_cache:  # (a non-finite row left in the cache belongs to a reset agent)
                self._grad_cache.index_copy_(0, torch.tensor(good, device=lay.device), fresh_grads)
            for i in good:
                self._has_grad[i] = True
            movers = [i for i in range(n) if self._has_grad[i] and not math.isnan(self._ema[i])]
        else:
            movers = good
        n_tunnels = 0
        if movers:
            all_move = len(movers) == n
            m_dev = None if all_move else torch.tensor(movers, device=lay.device)
            rho, eps = g0["rms_decay"], g0["eps"]
            for i in movers:
                self._rms_steps[i] += 1
            lr = self._lr_vector(lay)
            # pull * r_i * (theta_best - theta_i) + gamma * sum_j w_ij (theta_j - theta_i), as one
            # (m, N) @ (N, D) product over the pre-step positions.
            mix = [[0.0] * n for _ in movers]
            any_nb = False
            gamma, pull_strength = g0["gamma"], g0["pull"]
            for r, i in enumerate(movers):
                nb = self._neighbors[i]
                if not nb:
                    continue
                any_nb = True
                fid_i, row = fid[i], mix[r]
                fsum = sum([fid_i[j] for j in nb])
                wsum = fsum + 1e-8
                for j in nb:
                    row[j] += gamma * fid_i[j] / wsum
                pull = pull_strength * uniforms[1][i]
                row[best] += pull
                row[i] -= pull + gamma * fsum / wsum
            mix_t = torch.tensor(mix, device=lay.device, dtype=lay.dtype) if any_nb else None
            # Tunnelling: evaluated, stagnating agents with neighbours jump with probability sin^2(alpha/2).
            jumps: list[tuple[int, Tensor]] = []
            for r, i in enumerate(movers):
                if not (i in good and self._neighbors[i] and self._stagnation[i] > g0["patience"]):
                    continue
                if not uniforms[0][i] < math.sin(alphas_old[i] / 2) ** 2:
                    continue
                scale = lay.segment_mean(pop.positions[i].abs()).mul_(0.8).add_(0.1).mul_(temp)  # per tensor
                noise = torch.rand(lay.dim, generator=self._gen, device=lay.device, dtype=lay.dtype).mul_(2).sub_(1)
                jumps.append((r, noise.mul_(scale[lay.segment_ids()])))
                self._stagnation[i] = 0
                self._agent_best[i] = math.inf
                self._ema[i] = math.nan  # a new position: its old losses say nothing about it
                n_tunnels += 1
            fast = self._fused and g0["bias_correction"] and isinstance(lr, float) and lay.device.type in ("cpu", "cuda")
            if not (fast and self._move_fused(movers, all_move, m_dev, mix_t, fresh_grads, lr, rho, eps, jumps)):
                self._move_reference(movers, all_move, m_dev, mix_t, fresh_grads, lr, rho, eps, jumps)
        self.tunnels += n_tunnels

        if self._track:
            self._log["losses"].append(list(self._cached_losses))
            self._log["diversity"].append(float(pop.positions.var(0).mean()) if n > 1 else 0.0)
            self._log["tunnels"].append(n_tunnels)
            self._log["alphas"].append(list(self._alphas))
            self._log["betas"].append(list(self._betas))
            self._log["temperature"].append(temp)
            self._log["best"].append(best)
            self._log["resets"].append(len(bad))
        return float(self._cached_losses[best])

    def _evaluate_shared(self, to_eval: list[int], closure, model, batch, loss_fn) -> Evaluation:
        """Across ranks: evaluate this rank's contiguous share of ``to_eval`` and all-gather the
        losses, gradients and (model path) the evaluated agents' buffers, so that every rank holds
        the whole evaluation and makes the rest of the step itself (see :mod:`qcd_fx.optim.qimad`)."""
        pop, lay, g0 = self._pop, self._pop.layout, self.param_groups[0]
        counts = distributed.split_counts(len(to_eval))
        start = sum(counts[: distributed.rank()])
        mine = to_eval[start : start + counts[distributed.rank()]]
        idx = torch.tensor(mine, device=lay.device, dtype=torch.long)
        bufs: dict[str, Tensor] = {}
        if closure is None:
            if not self._buffers_stacked:
                pop.stack_buffers(model)
                for stack in pop.buffers.values():  # every rank starts from rank 0's statistics
                    distributed.broadcast_(stack)
                self._buffers_stacked = True
            bufs = {name: s.index_select(0, idx) for name, s in pop.buffers.items()}
        if not mine:
            losses = torch.empty(0, dtype=torch.float64, device=lay.device)
            grads = torch.empty(0, lay.dim, dtype=lay.dtype, device=lay.device)
            mode = "closure" if closure is not None else "loop"
        else:
            pos = pop.positions.index_select(0, idx)
            if closure is not None:
                ev = closure_evaluate(lay, pop.params, pos, closure)
            else:
                evaluator = self._get_evaluator(model, pop.params, g0["evaluation"])
                ev = evaluator(pos, batch[0], batch[1], loss_fn, buffers=bufs or None)
            losses, grads, mode = ev.losses.to(device=lay.device, dtype=torch.float64), ev.grads, ev.mode
        # one float64 row per agent: its loss and its buffers (float32 statistics and int64 counts
        # are exact in float64), and one row of the parameters' dtype: its gradient
        names = list(bufs)
        widths = [pop.buffers[name][0].numel() for name in names]
        pack = torch.cat([losses.unsqueeze(1), *(bufs[name].reshape(len(mine), w).to(torch.float64) for name, w in zip(names, widths))], 1)
        pack = distributed.all_gather_rows(pack, counts)
        grads = distributed.all_gather_rows(grads.contiguous(), counts)
        if names:
            all_idx = torch.tensor(to_eval, device=lay.device, dtype=torch.long)
            col = 1
            for name, width in zip(names, widths):
                stack = pop.buffers[name]
                stack.index_copy_(0, all_idx, pack[:, col : col + width].reshape(len(to_eval), *stack.shape[1:]).to(stack.dtype))
                col += width
        return Evaluation(pack[:, 0].clone(), grads, mode)

    def _move_reference(self, movers, all_move, m_dev, mix_t, fresh_grads, lr, rho, eps, jumps) -> None:
        """The RMSProp step in separate tensor operations (any lr layout, bias correction on or off)."""
        pop, g0 = self._pop, self.param_groups[0]
        lay = pop.layout
        if self._grad_cache is None:
            grads = fresh_grads
        else:
            grads = self._grad_cache if all_move else self._grad_cache.index_select(0, m_dev)
        v = self._rms if all_move else self._rms.index_select(0, m_dev)
        v.mul_(rho).addcmul_(grads, grads, value=1 - rho)
        # -lr g / (sqrt(v / bc) + eps)  ==  g / (sqrt(v) * (-1 / (lr sqrt(bc))) - eps / lr),
        # bc = 1 - rho**t per agent (1 without bias correction): three passes over (m, D).
        if g0["bias_correction"]:
            sqrt_bc = [math.sqrt(1.0 - rho ** self._rms_steps[i]) for i in movers]
        else:
            sqrt_bc = [1.0] * len(movers)
        denom = v.sqrt()
        if isinstance(lr, float):
            inv = torch.tensor([-1.0 / (lr * c) for c in sqrt_bc], device=lay.device, dtype=lay.dtype).unsqueeze(1)
            torch.addcmul(torch.full_like(inv, -eps / lr), denom, inv, out=denom)
        else:
            inv = torch.tensor([-1.0 / c for c in sqrt_bc], device=lay.device, dtype=lay.dtype).unsqueeze(1)
            denom.mul_(inv).sub_(eps).mul_(lr.reciprocal().unsqueeze(0))
        delta = torch.div(grads, denom, out=denom)
        if mix_t is not None:
            delta.addmm_(mix_t, pop.positions)
        for r, noise in jumps:
            delta[r].add_(noise)
        if all_move:
            pop.positions.add_(delta)
        else:
            theta = pop.positions.index_select(0, m_dev)
            pop.positions.index_copy_(0, m_dev, theta.add_(delta))
            self._rms.index_copy_(0, m_dev, v)

    def _move_fused(self, movers, all_move, m_dev, mix_t, fresh_grads, lr, rho, eps, jumps) -> bool:
        """The same step with torch's fused Adam kernel at ``beta1 = 0`` — which is RMSProp with
        bias correction, ``p -= lr g / (sqrt(v / (1 - rho**t)) + eps)`` — in one pass over each
        agent's p, g, v: the new positions ``theta + mix @ theta`` are formed first (one matmul
        over the pre-step positions), then stepped in place. Returns False, having changed nothing,
        where the kernel is unavailable for this dtype or device."""
        pop = self._pop
        pos = pop.positions
        if all_move:
            if self._spare is None or self._spare.shape != pos.shape:
                self._spare = torch.empty_like(pos)
            new = self._spare
            if mix_t is not None:  # (I + mix) @ theta: one read of the swarm instead of two
                step_matrix = mix_t.clone()  # (mix_t stays as it is for the reference path)
                step_matrix.diagonal().add_(1.0)
                torch.mm(step_matrix, pos, out=new)
            else:
                new.copy_(pos)
        else:
            new = pos.index_select(0, m_dev)
            if mix_t is not None:
                new.addmm_(mix_t, pos)
        steps_now = [float(self._rms_steps[i]) for i in movers]
        if all_move:  # rows of the long-lived matrices: cached (pop.cache), not re-made every step
            rows = pop.cache.rows
            new_rows, v_rows = rows(new), rows(self._rms)
            g_rows = list(fresh_grads.unbind(0)) if self._grad_cache is None else rows(self._grad_cache)
            if self._steps is None or self._steps.dtype != torch.get_default_dtype() or self._steps.device != pos.device:
                self._steps = torch.zeros(len(movers), device=pos.device)
            self._steps.copy_(torch.tensor(steps_now))
            steps = rows(self._steps)
        else:
            new_rows, v_rows = list(new.unbind(0)), [self._rms[i] for i in movers]
            g_rows = list(fresh_grads.unbind(0)) if self._grad_cache is None else [self._grad_cache[i] for i in movers]
            steps = list(torch.tensor(steps_now, device=pos.device).unbind(0))
        try:
            # exp_avg aliases the gradient: with beta1 = 0 the kernel writes exp_avg = g, the value it holds.
            torch._fused_adam_(
                new_rows, g_rows, g_rows, v_rows, [], steps, lr=lr, beta1=0.0,
                beta2=rho, weight_decay=0.0, eps=eps, amsgrad=False, maximize=False,
            )  # fmt: skip
        except (RuntimeError, NotImplementedError, TypeError) as e:
            self._fused = False
            warnings.warn(
                f"QIMAD: torch's fused Adam kernel refused the step ({type(e).__name__}: {first_line(e)}); "
                "using the unfused RMSProp step from now on (same result, slower)",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
        for r, noise in jumps:
            new[r].add_(noise)
        if all_move:
            self._spare, pop.positions = pos, new
        else:
            pos.index_copy_(0, m_dev, new)
        return True

    def _reset_agent(self, i: int) -> None:
        """Forget agent ``i``'s history (its position and RMSProp state are reset by the caller)."""
        self._cached_losses[i] = math.inf
        self._ema[i] = math.nan
        self._agent_best[i] = math.inf
        self._stagnation[i] = 0
        self._rms_steps[i] = 0
        self._has_grad[i] = False


__all__ = [
    "QIMAD",
    "TOPOLOGIES",
    "COOLINGS",
    "build_neighbors",
    "fidelity_matrix",
    "temperature",
]
