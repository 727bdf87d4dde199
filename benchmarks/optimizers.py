"""Benchmark of the bundled optimizers (CCE, QIMAD) against SGD and Adam, and against the seeds.

Run from the repository root::

    python benchmarks/optimizers.py            # full run (~15-25 min on 2 shared cores)
    python benchmarks/optimizers.py --quick    # short run (~3 min): fewer rounds, epochs and seeds
    python benchmarks/optimizers.py --smoke --out /tmp   # every section at toy size (tests)
    python benchmarks/optimizers.py --only cce_step_cost,qimad_step_cost

Writes ``benchmarks/results/optimizers.json`` (raw numbers), ``optimizers.md`` (tables),
``optimizers_curves.png`` (learning curves) and ``optimizers_keval.png`` (QIMAD accuracy vs cost).
A ``--quick`` (``--smoke``) run writes ``optimizers_quick.*`` (``optimizers_smoke.*``) instead, so it
never replaces a full run's files. Test accuracies are mean ± sample SD (n - 1) over seeds.

Method: one intra-op thread (``torch.set_num_threads(1)``). Every cost ratio is measured side by
side in one process: each round times one block of steps of every contender in turn (rotating
the order), the ratio is taken within the round, and the median over rounds is reported. The
machine is shared, so absolute times are noisy; ratios much less so, but treat differences below
~10 % as noise. Accuracies are on the digits test split (360 images; one image = 0.28 points);
hyper-parameter choices (``defaults`` section) use a validation split carved out of the training
data, never the test split.

The seed QIMAD loop is re-implemented here literally (``SeedQIMAD``, from
``qimad-torch-optimizer.py.txt``) for the cost comparison; the seed files are not imported.
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch._dynamo  # torch.optim imports it on first use; main() freezes the objects of every import
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import qcd_fx
from qcd_fx.data import load_digits_split, tensor_loader
from qcd_fx.examples import digits_cnn, digits_mlp
from qcd_fx.io import atomic_write
from qcd_fx.optim import CCE, QIMAD
from qcd_fx.optim.cce import efficiencies
from qcd_fx.train import fit

SECTIONS = ("cce_step_cost", "qimad_step_cost", "accuracy", "qimad_keval", "defaults")
KINDS = ("mlp", "cnn")
"""The digits models every section trains and times."""
SMOKE = False
"""``--smoke``: the MLP only (``KINDS``), one round per timing, one step per block, a small MLP for
the CCE step cost, two batches per training epoch — every section runs, none measures anything."""


# ── the seed's QIMAD, literally (for the cost comparison only) ─────────────────────────────────


class SeedQIMAD(torch.optim.Optimizer):
    """``QIMADTorch`` from the seed, re-typed line by line (its defects included)."""

    def __init__(self, params, num_agents=8, eta=0.05, gamma=0.05, k=2, alpha_lr=0.03, beta_lr=0.03,
                 topology="complete", k_eval=None, seed=None, cooling="cosine", total_steps=None, min_temp=0.05):  # fmt: skip
        _k = num_agents if k_eval is None else max(1, min(k_eval, num_agents))
        defaults = dict(num_agents=num_agents, eta=eta, gamma=gamma, k=k, alpha_lr=alpha_lr, beta_lr=beta_lr,  # noqa: C408 - as the seed wrote it
                        topology=topology, k_eval=_k, cooling=cooling, total_steps=total_steps, min_temp=min_temp)  # fmt: skip
        super().__init__(params, defaults)
        self._rng = torch.Generator()
        if seed is not None:
            self._rng.manual_seed(seed)
        self._initialized = False

    def _init_state(self):
        group = self.param_groups[0]
        n = group["num_agents"]
        all_params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        for g in self.param_groups:
            for p in g["params"]:
                if not p.requires_grad:
                    continue
                st = self.state[p]
                st["agents_theta"] = [p.data.clone() for _ in range(n)]
                st["agents_v"] = [torch.zeros_like(p.data) for _ in range(n)]
                st["best_theta"] = p.data.clone()
        self._step_count = 0
        self._best_obj = float("inf")
        self._agent_best_obj = [float("inf")] * n
        self._stagnation = [0] * n
        self._cached_grads = {id(p): [torch.zeros_like(p.data) for _ in range(n)] for p in all_params}
        self._cached_losses = [float("inf")] * n
        self._alphas = torch.rand(n, generator=self._rng) * math.pi
        self._betas = torch.rand(n, generator=self._rng) * 2 * math.pi
        self._neighbors = [[j for j in range(n) if j != i] for i in range(n)]  # 'complete'
        self._initialized = True

    def _temperature(self):
        group = self.param_groups[0]
        total = group["total_steps"]
        if total is None or total <= 0:
            return 1.0
        min_t = group["min_temp"]
        t = min(self._step_count / total, 1.0)
        return min_t + (1.0 - min_t) * 0.5 * (1.0 + math.cos(math.pi * t))  # 'cosine'

    @staticmethod
    def _fidelity(ai, bi, aj, bj, k):
        re = math.cos(ai / 2) * math.cos(aj / 2) + math.cos(bj - bi) * math.sin(ai / 2) * math.sin(aj / 2)
        im = math.sin(bj - bi) * math.sin(ai / 2) * math.sin(aj / 2)
        return (re**2 + im**2) ** (k / 2)

    @torch.no_grad()
    def step(self, closure):
        if not self._initialized:
            self._init_state()
        self._step_count += 1
        all_params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        group = self.param_groups[0]
        n, eta, gamma, k, k_eval = group["num_agents"], group["eta"], group["gamma"], group["k"], group["k_eval"]
        eps, rms_decay = 1e-8, 0.99
        temp = self._temperature()
        alpha_lr, beta_lr = group["alpha_lr"] * temp, group["beta_lr"] * temp
        base = (self._step_count - 1) * k_eval % n
        to_eval = {(base + j) % n for j in range(k_eval)}
        agent_losses = list(self._cached_losses)
        for i in range(n):
            if i not in to_eval:
                continue
            for p in all_params:
                p.data.copy_(self.state[p]["agents_theta"][i])
            for p in all_params:
                if p.grad is not None:
                    p.grad.zero_()
            with torch.enable_grad():
                loss = closure()
            l_i = loss.item() if torch.is_tensor(loss) else float(loss)
            agent_losses[i] = l_i
            self._cached_losses[i] = l_i
            for p in all_params:
                self._cached_grads[id(p)][i].copy_(p.grad if p.grad is not None else torch.zeros_like(p.data))
        best_loss = min(agent_losses)
        best_i = agent_losses.index(best_loss)
        if best_loss < self._best_obj:
            self._best_obj = best_loss
            for p in all_params:
                self.state[p]["best_theta"].copy_(self.state[p]["agents_theta"][best_i])
        for i in range(n):
            if agent_losses[i] < self._agent_best_obj[i] - eps:
                self._agent_best_obj[i] = agent_losses[i]
                self._stagnation[i] = 0
            else:
                self._stagnation[i] += 1
        alphas, betas = self._alphas.tolist(), self._betas.tolist()
        for i in range(n):
            ai, bi = alphas[i], betas[i]
            nb = self._neighbors[i]
            if nb:
                raw_w = [self._fidelity(ai, bi, alphas[j], betas[j], k) for j in nb]
                w_sum = sum(raw_w) + eps
                norm_w = [w / w_sum for w in raw_w]
            else:
                norm_w = []
            new_alpha = ai + alpha_lr * torch.randn(1, generator=self._rng).item()
            self._alphas[i] = max(0.0, min(math.pi, new_alpha))
            self._betas[i] = (bi + beta_lr * torch.randn(1, generator=self._rng).item()) % (2 * math.pi)
            if i not in to_eval:
                continue
            tunnel_deltas = {}
            if nb and self._stagnation[i] > 3:
                prob_jump = math.sin(ai / 2) ** 2
                if torch.rand(1, generator=self._rng).item() < prob_jump:
                    for p in all_params:
                        theta_i = self.state[p]["agents_theta"][i]
                        jump_scale = (float(theta_i.abs().mean()) * 0.8 + 0.1) * temp
                        tunnel_deltas[id(p)] = (torch.rand(theta_i.shape) * 2 - 1) * jump_scale
                    self._stagnation[i] = 0
            rand_s = torch.rand(1, generator=self._rng).item()
            for p in all_params:
                st = self.state[p]
                theta_i, v_i = st["agents_theta"][i], st["agents_v"][i]
                g = self._cached_grads[id(p)][i]
                v_i.mul_(rms_decay).addcmul_(g, g, value=1 - rms_decay)
                eta_adapt = eta / (v_i.sqrt() + eps)
                delta = -eta_adapt * g
                if nb:
                    delta.add_(st["best_theta"] - theta_i, alpha=0.2 * rand_s)
                    comm = torch.zeros_like(theta_i)
                    for w, j in zip(norm_w, nb):
                        comm.add_(st["agents_theta"][j] - theta_i, alpha=w)
                    delta.add_(comm, alpha=gamma)
                if id(p) in tunnel_deltas:
                    delta.add_(tunnel_deltas[id(p)])
                theta_i.add_(delta)
        for p in all_params:
            p.data.copy_(self.state[p]["best_theta"])
        return self._best_obj


# ── helpers ────────────────────────────────────────────────────────────────────────────────────


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def qci_model(kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = digits_mlp() if kind == "mlp" else digits_cnn()
    return qcd_fx.transform(model, "qci", example_inputs=(torch.zeros(2, 1, 8, 8),)).graph_module


def plain_model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return digits_mlp() if kind == "mlp" else digits_cnn()


def interleaved(contenders: dict[str, Callable[[], None]], rounds: int, baseline: str, warmup: int = 1, steps: dict[str, int] | None = None) -> dict:
    """Time every contender once per round (rotating the order); per-step ratios to ``baseline``
    within each round. ``steps`` gives the steps a contender's call runs (default: all equal)."""
    names = list(contenders)
    steps = steps or {}
    for _ in range(warmup):
        for f in contenders.values():
            f()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            gc.collect()
            t0 = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name in names:
        scale = steps.get(baseline, 1) / steps.get(name, 1)
        ratios = [t / b * scale for t, b in zip(times[name], times[baseline])]
        out[name] = {
            "median_s": statistics.median(times[name]),
            "ratio_to_" + baseline: statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "times_s": times[name],
        }
    return out


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of tensors an optimizer keeps (per-parameter state and QIMAD's swarm)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
        elif isinstance(t, dict):
            for v in t.values():
                add(v)
        elif isinstance(t, (list, tuple)):
            for v in t:
                add(v)

    for st in opt.state.values():
        add(st)
    if isinstance(opt, QIMAD) and opt.best_agent is not None:
        add(opt.agent_positions())
        add(opt._rms)
        add(opt._grad_cache)
        add(opt._pop.buffers)
    if isinstance(opt, SeedQIMAD) and getattr(opt, "_initialized", False):
        add(opt._cached_grads)
    return total


# ── A. CCE step cost on a 25M-parameter MLP ────────────────────────────────────────────────────


def cce_step_cost(quick: bool) -> dict:
    torch.manual_seed(0)
    d, h = (64, 256) if SMOKE else (1024, 4096)
    model = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    lr = 1e-4
    opts = {
        "sgd_foreach": torch.optim.SGD(params, lr=lr, foreach=True),
        "sgd_momentum_foreach": torch.optim.SGD(params, lr=lr, momentum=0.9, foreach=True),
        "sgd_momentum_fused": torch.optim.SGD(params, lr=lr, momentum=0.9, fused=True),
        "adam_foreach": torch.optim.Adam(params, lr=lr, foreach=True),
        "cce_seed": CCE(params, lr=lr, momentum=0.0, mode="seed"),
        "cce_default": CCE(params, lr=lr),
        "cce_default_no_momentum": CCE(params, lr=lr, momentum=0.0),
        "cce_exact": CCE(params, lr=lr, refresh_every=1),
        "cce_exact_no_momentum": CCE(params, lr=lr, momentum=0.0, refresh_every=1),
    }
    block = 32  # one full refresh period of the default CCE: its amortised cost
    rounds = 1 if SMOKE else 2 if quick else 5

    # every-step methods (no refresh schedule) run 4 steps per round; the others a whole period
    steps = {name: (4 if name in ("cce_seed", "cce_exact", "cce_exact_no_momentum", "adam_foreach") else block) for name in opts}
    steps["efficiency_refresh_only"] = 4

    def run(opt, k):
        return lambda: [opt.step() for _ in range(k)]

    contenders = {name: run(opt, steps[name]) for name, opt in opts.items()}
    contenders["efficiency_refresh_only"] = lambda: [efficiencies(params) for _ in range(4)]
    log(f"cce_step_cost: {n_params / 1e6:.1f}M parameters, {rounds} rounds")
    timing = interleaved(contenders, rounds, "sgd_foreach", steps=steps)
    for name, t in timing.items():
        t["per_step_ms"] = t["median_s"] / steps[name] * 1e3
        t["steps_per_round"] = steps[name]
        del t["times_s"]
    return {
        "parameters": n_params,
        "layers": [d, h, h, d],
        "block_steps": block,
        "rounds": rounds,
        "timing": timing,
        "state_bytes": {name: state_bytes(opt) for name, opt in opts.items()},
        "param_bytes": n_params * 4,
    }


# ── B. QIMAD step cost ─────────────────────────────────────────────────────────────────────────


@functools.cache
def digits_split(val_fraction: float = 0.0):
    """The digits split (deterministic; loaded once per process)."""
    return load_digits_split(val_fraction=val_fraction)


def _digits_batch(batch: int):
    s = digits_split()
    return s.x_train[:batch].clone(), s.y_train[:batch].clone()


def _closure_for(model, x, y, loss_fn, opt):
    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return closure


def _swarm_floor(model: nn.Module, x: Tensor, y: Tensor, k: int, n: int, block: int) -> Callable[[], None]:
    """What a QIMAD step with ``k`` of ``n`` agents evaluated and every agent moving cannot avoid:
    ``k`` forward/backward passes of the model, one mixing product over the ``(n, D)`` positions
    and one fused RMSProp pass over positions, gradients and ``v`` — no bookkeeping at all."""
    dim = sum(p.numel() for p in model.parameters())
    pos, grads, v, out = torch.randn(n, dim), torch.randn(n, dim), torch.rand(n, dim), torch.empty(n, dim)
    mix = torch.full((n, n), 0.01)
    steps = [torch.tensor(5.0) for _ in range(n)]

    def run():
        for _ in range(block):
            for _ in range(k):
                model.zero_grad()
                F.cross_entropy(model(x), y).backward()
            torch.addmm(pos, mix, pos, out=out)
            g = list(grads.unbind(0))
            torch._fused_adam_(list(out.unbind(0)), g, g, list(v.unbind(0)), [], steps, lr=1e-3, beta1=0.0, beta2=0.99,
                               weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)  # fmt: skip

    return run


def qimad_step_cost(quick: bool) -> dict:
    rounds = 1 if SMOKE else 3 if quick else 7
    block = 1 if SMOKE else 5
    out: dict = {"rounds": rounds, "block_steps": block}
    for kind in (*KINDS, "qci_mlp"):
        x, y = _digits_batch(64)
        build = (lambda: qci_model("mlp", 0)) if kind == "qci_mlp" else (lambda kind=kind: plain_model(kind))
        full = kind != "qci_mlp"  # the QCI MLP (the one the k_eval training runs use): Adam, k_eval = 2, floor
        contenders: dict[str, Callable[[], None]] = {}
        adam_model = build()
        adam = torch.optim.Adam(adam_model.parameters(), lr=1e-3, foreach=True)

        def adam_block(m=adam_model, o=adam, x=x, y=y):
            for _ in range(block):
                o.zero_grad()
                F.cross_entropy(m(x), y).backward()
                o.step()

        contenders["adam"] = adam_block
        for k_eval in (8, 4, 2, 1) if full else (2,):
            m = build()
            q = QIMAD(m.parameters(), num_agents=8, k_eval=k_eval, seed=0, total_steps=10_000)
            contenders[f"qimad_k{k_eval}"] = lambda m=m, q=q, x=x, y=y: [q.step(model=m, batch=(x, y), loss_fn=F.cross_entropy) for _ in range(block)]
        contenders["floor_k2"] = _swarm_floor(build(), x, y, k=2, n=8, block=block)
        if full:
            for mode in ("vmap", "loop"):
                m = build()
                q = QIMAD(m.parameters(), num_agents=8, seed=0, total_steps=10_000, evaluation=mode)
                contenders[f"qimad_k8_{mode}"] = lambda m=m, q=q, x=x, y=y: [q.step(model=m, batch=(x, y), loss_fn=F.cross_entropy) for _ in range(block)]
            m = build()
            q = QIMAD(m.parameters(), num_agents=8, seed=0, total_steps=10_000)
            c = _closure_for(m, x, y, F.cross_entropy, q)
            contenders["qimad_k8_closure"] = lambda q=q, c=c: [q.step(c) for _ in range(block)]
            m = build()
            s = SeedQIMAD(m.parameters(), num_agents=8, eta=1e-3, seed=0, total_steps=10_000)
            c = _closure_for(m, x, y, F.cross_entropy, s)
            contenders["seed_loop_k8"] = lambda s=s, c=c: [s.step(c) for _ in range(block)]
        log(f"qimad_step_cost: digits {kind}, batch 64, {rounds} rounds")
        timing = interleaved(contenders, rounds, "adam")
        for t in timing.values():
            t["per_step_ms"] = t["median_s"] / block * 1e3
            del t["times_s"]
        floor = {}
        for name, t in timing.items():
            if name.startswith("qimad_k") and name[len("qimad_k")].isdigit():
                k = int(name[len("qimad_k")])
                floor[name] = t["ratio_to_adam"] / k
        out[f"digits_{kind}"] = {
            "timing": timing,
            "ratio_to_k_eval_floor": floor,
            "k2_over_swarm_floor": timing["qimad_k2"]["ratio_to_adam"] / timing["floor_k2"]["ratio_to_adam"],
        }

    # QUIMAD's own small benchmark network: 2-64-32-1, batch 256, MSE
    g = torch.Generator().manual_seed(0)
    xs = torch.rand(256, 2, generator=g) * 2 - 1
    ys = (torch.sin(math.pi * xs[:, :1]) * torch.cos(math.pi * xs[:, 1:])).contiguous()

    def small(seed=0):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))

    contenders = {}
    ma = small()
    adam = torch.optim.Adam(ma.parameters(), lr=1e-3, foreach=True)

    def adam_small():
        for _ in range(block * 4):
            adam.zero_grad()
            F.mse_loss(ma(xs), ys).backward()
            adam.step()

    contenders["adam"] = adam_small
    ms = small()
    seed_opt = SeedQIMAD(ms.parameters(), num_agents=8, eta=0.05, seed=0, total_steps=10_000)
    cs = _closure_for(ms, xs, ys, F.mse_loss, seed_opt)
    contenders["seed_loop"] = lambda: [seed_opt.step(cs) for _ in range(block * 4)]
    mq = small()
    ours = QIMAD(mq.parameters(), num_agents=8, lr=0.05, seed=0, total_steps=10_000)
    contenders["qimad_batched"] = lambda: [ours.step(model=mq, batch=(xs, ys), loss_fn=F.mse_loss) for _ in range(block * 4)]
    mc = small()
    ours_c = QIMAD(mc.parameters(), num_agents=8, lr=0.05, seed=0, total_steps=10_000)
    cc = _closure_for(mc, xs, ys, F.mse_loss, ours_c)
    contenders["qimad_closure"] = lambda: [ours_c.step(cc) for _ in range(block * 4)]
    small_rounds = 4 * rounds  # a round takes ~0.3 s here: more of them steady the median
    log(f"qimad_step_cost: small MLP 2-64-32-1, batch 256, {small_rounds} rounds")
    timing = interleaved(contenders, small_rounds, "adam")
    speedup = [s / q for s, q in zip(timing["seed_loop"]["times_s"], timing["qimad_batched"]["times_s"])]
    for t in timing.values():
        t["per_step_ms"] = t["median_s"] / (block * 4) * 1e3
        del t["times_s"]
    out["small_mlp"] = {
        "rounds": small_rounds,
        "timing": timing,
        "seed_loop_over_qimad_batched": statistics.median(speedup),
        "state_bytes": {"seed_loop": state_bytes(seed_opt), "qimad": state_bytes(ours)},
        "param_bytes": sum(p.numel() for p in mq.parameters()) * 4,
    }
    return out


# ── C/D. accuracy ──────────────────────────────────────────────────────────────────────────────


def make(name: str, params, seed: int):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, foreach=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3, foreach=True)
    if name == "cce_seed":
        return CCE(params, lr=0.1, momentum=0.0, mode="seed")
    if name == "cce":
        return CCE(params, lr=0.1)
    if name.startswith("qimad"):
        k = int(name.split("_k")[1].split("_")[0]) if "_k" in name else None
        return QIMAD(params, num_agents=8, k_eval=k, seed=seed, reuse_gradients=not name.endswith("_noreuse"))
    raise ValueError(name)


class _Head:
    """The first ``n`` batches of a loader (``--smoke``)."""

    def __init__(self, loader, n: int):
        self.loader, self.n = loader, n

    def __iter__(self):
        return itertools.islice(self.loader, self.n)

    def __len__(self):
        return min(self.n, len(self.loader))


def loaders(seed: int, val_fraction: float = 0.0):
    """Digits ``(train, test, val)`` loaders as ``qcd_fx.data.digits_loaders`` builds them (batch 64,
    evaluation batch 512); with ``--smoke`` an epoch is two batches."""
    s = digits_split(val_fraction)
    train = tensor_loader(s.x_train, s.y_train, 64, shuffle=True, seed=seed)
    valid = tensor_loader(s.x_val, s.y_val, 512) if len(s.y_val) else None
    return (_Head(train, 2) if SMOKE else train), tensor_loader(s.x_test, s.y_test, 512), valid


def train_run(kind: str, name: str, seed: int, epochs: int, val: bool = False, make_opt=None) -> dict:
    model = qci_model(kind, seed)
    train, test, valid = loaders(seed, val_fraction=0.2 if val else 0.0)
    opt = make_opt(model.parameters()) if make_opt else make(name, model.parameters(), seed)
    try:
        history = fit(model, train, opt, epochs, val_loader=valid if val else test, progress=False)
    except FloatingPointError as e:
        return {"diverged": str(e)}
    acc = history.column("val_accuracy")
    return {
        "accuracy": acc,
        "train_loss": history.column("train_loss"),
        "epoch_seconds": history.column("seconds"),
        "final_accuracy": acc[-1],
        "epochs_to_95": history.epochs_to(0.95),
        "state_bytes": state_bytes(opt),
    }


def train_step_cost(rounds: int, block: int = 32) -> dict:
    """Whole training steps (zero_grad, forward, backward, step) on the QCI digits models, batch 64,
    interleaved: what 'faster training' means per step, free of the drift between training runs."""
    x, y = _digits_batch(64)
    out = {}
    for kind in KINDS:
        contenders = {}
        for name in ("sgd", "adam", "cce_seed", "cce"):
            m = qci_model(kind, 0)
            opt = make(name, m.parameters(), 0)

            def run(m=m, opt=opt):
                for _ in range(block):
                    opt.zero_grad()
                    F.cross_entropy(m(x), y).backward()
                    opt.step()

            contenders[name] = run
        log(f"accuracy: training-step cost, QCI {kind}")
        timing = interleaved(contenders, rounds, "sgd")
        out[kind] = {name: {"per_step_ms": v["median_s"] / block * 1e3, "ratio_to_sgd": v["ratio_to_sgd"]} for name, v in timing.items()}
    return out


def accuracy(quick: bool, epochs: int, seeds: list[int]) -> dict:
    names = ["sgd", "adam", "cce_seed", "cce", "qimad"]
    cost = train_step_cost(1, block=1) if SMOKE else train_step_cost(3 if quick else 7)
    out: dict = {"epochs": epochs, "seeds": seeds, "runs": {}, "train_step_cost": cost}
    for kind in KINDS:
        for name in names:
            runs = []
            for seed in seeds:
                log(f"accuracy: {kind} {name} seed {seed} ({epochs} epochs)")
                runs.append(train_run(kind, name, seed, epochs))
            finals = [r["final_accuracy"] for r in runs if "final_accuracy" in r]
            e95 = [r["epochs_to_95"] for r in runs if "final_accuracy" in r]
            reached = [e for e in e95 if e is not None]
            out["runs"][f"{kind}/{name}"] = {
                "runs": runs,
                "final_mean": statistics.mean(finals) if finals else None,
                "final_std": final_sd(runs),
                "epochs_to_95_mean": statistics.mean(reached) if len(reached) == len(e95) and reached else None,
                "epochs_to_95": e95,
                "epoch_seconds_median": statistics.median([s for r in runs for s in r.get("epoch_seconds", [])[1:]] or [math.nan]),
            }
    return out


def qimad_keval(quick: bool, epochs: int, seeds: list[int]) -> dict:
    """Adam and QIMAD at k_eval 8, 4, 2, 1 (and 2 without gradient reuse) trained in lockstep: one
    epoch of every run per round, the order rotating, so each epoch-time ratio to Adam compares
    epochs run side by side (the machine's load drifts between whole training runs)."""
    names = ["adam", "qimad_k8", "qimad_k4", "qimad_k2", "qimad_k1", "qimad_k2_noreuse"]
    out: dict = {"epochs": epochs, "seeds": seeds, "runs": {}, "timing": "lockstep: one epoch of each run per round, rotating order"}
    skip = 1 if epochs > 1 else 0  # the first epoch includes warm-up
    for kind in KINDS:
        acc: dict[str, list[list[float]]] = {n: [] for n in names}
        sec: dict[str, list[list[float]]] = {n: [] for n in names}
        for seed in seeds:
            runs = {}
            for name in names:
                model = qci_model(kind, seed)
                train, test, _ = loaders(seed)
                opt = make(name, model.parameters(), seed)
                if isinstance(opt, QIMAD):
                    opt.set_total_steps(epochs * len(train))  # the cooling of one epochs-long run
                runs[name] = {"model": model, "train": train, "test": test, "opt": opt, "acc": [], "sec": []}
            for e in range(epochs):
                log(f"qimad_keval: {kind} seed {seed} epoch {e + 1}/{epochs}")
                for name in names[e % len(names) :] + names[: e % len(names)]:
                    r = runs[name]
                    gc.collect()
                    h = fit(r["model"], r["train"], r["opt"], 1, val_loader=r["test"], progress=False)
                    r["acc"].append(h.column("val_accuracy")[0])
                    r["sec"].append(h.column("seconds")[0])
            for name in names:
                acc[name].append(runs[name]["acc"])
                sec[name].append(runs[name]["sec"])
        adam_final = [a[-1] for a in acc["adam"]]
        for name in names:
            ratios = [s / a for ss, aa in zip(sec[name], sec["adam"]) for s, a in zip(ss[skip:], aa[skip:])]
            final = [a[-1] for a in acc[name]]
            key = "adam" if name == "adam" else name[len("qimad_") :]
            out["runs"][f"{kind}/{key}"] = {
                "final_accuracy": statistics.mean(final),
                "final_accuracy_per_seed": final,
                "accuracy": acc[name],
                "epoch_seconds": statistics.median(x for ss in sec[name] for x in ss[skip:]),
                "epoch_seconds_all": sec[name],
                "time_ratio_to_adam": statistics.median(ratios),
                "points_below_adam": 100 * (statistics.mean(adam_final) - statistics.mean(final)),
            }
    return out


# ── E. the measurements behind the defaults (validation split) ─────────────────────────────────


def defaults(quick: bool, epochs: int) -> dict:
    seeds = [0] if quick else [0, 1]
    out: dict = {"epochs": epochs, "seeds": seeds, "split": "validation (20 % of the training images)"}

    def sweep(kind, label, make_opt):
        accs = []
        for seed in seeds:
            r = train_run(kind, label, seed, epochs, val=True, make_opt=make_opt)
            accs.append(r.get("final_accuracy", math.nan))
        return {"val_accuracy": accs, "mean": statistics.mean(accs)}

    mapping = {}
    for kind in KINDS:
        for ms in (0.0, 0.25, 0.5, 1.0):
            log(f"defaults: cce min_scale={ms} {kind}")
            mapping[f"{kind}/min_scale={ms}"] = sweep(kind, "cce", lambda p, ms=ms: CCE(p, lr=0.1, min_scale=ms))
        log(f"defaults: cce momentum=0 {kind}")
        mapping[f"{kind}/min_scale=0.25, momentum=0"] = sweep(kind, "cce", lambda p: CCE(p, lr=0.1, momentum=0.0))
    out["cce_mapping"] = mapping
    refresh = {}
    for k in (1, 32, 128):
        log(f"defaults: cce refresh_every={k}")
        refresh[f"mlp/refresh_every={k}"] = sweep("mlp", "cce", lambda p, k=k: CCE(p, lr=0.1, refresh_every=k))
    out["cce_refresh"] = refresh
    q = {}
    for label, kw in (("bias_correction=True", {}), ("bias_correction=False", {"bias_correction": False}), ("loss_ema=0", {"loss_ema": 0.0}), ("init_noise=0", {"init_noise": 0.0})):
        log(f"defaults: qimad {label}")
        q[f"mlp/{label}"] = sweep("mlp", "qimad", lambda p, kw=kw: QIMAD(p, num_agents=8, seed=0, **kw))
    for kind in KINDS:
        for lr in (1e-3, 2e-3, 3e-3):
            log(f"defaults: qimad lr={lr} {kind}")
            q[f"{kind}/lr={lr}"] = sweep(kind, "qimad", lambda p, lr=lr: QIMAD(p, num_agents=8, seed=0, lr=lr))
    out["qimad_options"] = q
    # The seed's eta = 0.05, full batch: what the first steps do with and without bias correction.
    s = digits_split()
    batch = (s.x_train[:64], s.y_train[:64]) if SMOKE else (s.x_train, s.y_train)
    first = {}
    for eta in (0.01, 0.05):
        for bc in (False, True):
            m = qci_model("mlp", 0)
            opt = QIMAD(m.parameters(), num_agents=8, lr=eta, bias_correction=bc, seed=0, total_steps=100, loss_ema=0.0)
            first[f"eta={eta}, bias_correction={bc}"] = [opt.step(model=m, batch=batch, loss_fn=F.cross_entropy) for _ in range(6)]
    out["qimad_full_batch_best_loss_first_steps"] = first
    return out


def final_sd(runs: list[dict]) -> float:
    """Sample SD (n - 1) of the runs' final accuracies. The report computes it from the runs, not
    from ``final_std``: results written before this function stored the population SD there."""
    finals = [r["final_accuracy"] for r in runs if "final_accuracy" in r]
    return statistics.stdev(finals) if len(finals) > 1 else 0.0


# ── report ─────────────────────────────────────────────────────────────────────────────────────


def _pct(x):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f} %"


def markdown(res: dict) -> str:
    lines = ["# Optimizer benchmark (`benchmarks/optimizers.py`)", ""]
    meta = res["meta"]
    lines += [
        (f"torch {meta['torch']}, {meta['platform']}, one thread, {'smoke' if meta.get('smoke') else 'quick' if meta['quick'] else 'full'} run, "
         f"{meta['seconds']:.0f} s. Shared 2-core machine: times are noisy; ratios are medians of per-round ratios."),
        "",
    ]
    if meta.get("runs"):
        lines += ["Sections measured in separate runs (`--merge`): " + "; ".join(
            f"{', '.join(r.get('sections') or [])} on {r.get('date') or 'an earlier date'} ({(r.get('seconds') or 0) / 60:.0f} min)" for r in meta["runs"]) + ".", ""]  # fmt: skip
    if "cce_step_cost" in res:
        a = res["cce_step_cost"]
        t = a["timing"]
        lines += [
            f"## CCE step cost, {a['parameters'] / 1e6:.1f}M-parameter MLP {'-'.join(map(str, a.get('layers', (1024, 4096, 4096, 1024))))}",
            "",
            "| optimizer | ms / step | ÷ SGD(foreach) | state (MB) |",
            "|---|---|---|---|",
        ]
        for name, v in t.items():
            mb = a["state_bytes"].get(name)
            lines.append(f"| {name} | {v['per_step_ms']:.1f} | {v['ratio_to_sgd_foreach']:.2f}× | {'' if mb is None else f'{mb / 2**20:.0f}'} |")
        lines += [
            "",
            ("Floors: SGD reads p and g and writes p (3 passes over memory); momentum adds a buffer read and"
             " write (5 passes: fused SGD-momentum is the floor of any momentum method, ~1.67×). An exact"
             " efficiency costs one `exp` per weight (the softmax), a few cache-resident passes on top:"
             " `efficiency_refresh_only` is that cost per step; the default refreshes every 32 steps."),
            "",
        ]
    if "qimad_step_cost" in res:
        b = res["qimad_step_cost"]
        lines += ["## QIMAD step cost (8 agents)", "", "| model | contender | ms / step | ÷ Adam step | ÷ k_eval floor |", "|---|---|---|---|---|"]
        for kind in ("digits_mlp", "digits_cnn", "digits_qci_mlp"):
            if kind not in b:
                continue
            for name, v in b[kind]["timing"].items():
                fl = b[kind]["ratio_to_k_eval_floor"].get(name)
                lines.append(f"| {kind} | {name} | {v['per_step_ms']:.2f} | {v['ratio_to_adam']:.2f}× | {'' if fl is None else f'{fl:.2f}'} |")
        for kind in ("digits_mlp", "digits_cnn", "digits_qci_mlp"):
            if kind in b and "k2_over_swarm_floor" in b[kind]:
                lines.append(f"| {kind} | qimad_k2 ÷ floor_k2 | | {b[kind]['k2_over_swarm_floor']:.2f}× | |")
        if "small_mlp" in b:
            sm = b["small_mlp"]
            for name, v in sm["timing"].items():
                lines.append(f"| 2-64-32-1, batch 256 | {name} | {v['per_step_ms']:.2f} | {v['ratio_to_adam']:.2f}× | |")
            lines += ["", f"Seed loop ÷ vectorised QIMAD on the small MLP: **{sm['seed_loop_over_qimad_batched']:.2f}×** (target ≥ 3×)."]
            lines += [f"Optimizer state on the small MLP: seed {sm['state_bytes']['seed_loop'] / sm['param_bytes']:.0f}× the parameters, ours {sm['state_bytes']['qimad'] / sm['param_bytes']:.0f}×."]
        lines += [
            "",
            ("The k_eval floor is k_eval × one Adam step (forward, backward, update) of the same model and batch."
             " `floor_k2` is what a k_eval = 2 step with all 8 agents moving cannot avoid: 2 forward/backward"
             " passes, one (8, 8) @ (8, D) mixing product and one fused RMSProp pass over the swarm (no bookkeeping)."),
            "",
        ]
    if "accuracy" in res:
        c = res["accuracy"]
        lines += [
            f"## Accuracy after {c['epochs']} epochs (QCI-transformed models, test split, seeds {c['seeds']})",
            "",
            "| model | optimizer | test accuracy (mean ± sample SD) | epochs to 95 % (per seed) | s / epoch |",
            "|---|---|---|---|---|",
        ]
        for key, v in c["runs"].items():
            kind, name = key.split("/")
            sd = f" ± {100 * final_sd(v['runs']):.1f}" if len(v["runs"]) > 1 else ""
            lines.append(f"| {kind} | {name} | {_pct(v['final_mean'])}{sd} | {', '.join('–' if e is None else str(e) for e in v['epochs_to_95'])} | {v['epoch_seconds_median']:.2f} |")
        lines += ["", ("Seconds per epoch come from the training runs themselves (not interleaved; load on the shared"
                       " machine drifts between runs). The interleaved cost of one training step (forward, backward, update;"
                       " QCI models, batch 64) is:"), "", "| model | optimizer | ms / step | ÷ SGD |", "|---|---|---|---|"]
        for kind, d in c.get("train_step_cost", {}).items():
            for name, v in d.items():
                lines.append(f"| {kind} | {name} | {v['per_step_ms']:.2f} | {v['ratio_to_sgd']:.2f}× |")
        lines.append("")
    if "qimad_keval" in res:
        d = res["qimad_keval"]
        lines += [f"## QIMAD accuracy vs cost, k_eval (8 agents, {d['epochs']} epochs, seeds {d.get('seeds', [0])})", "", "| model | run | test accuracy | time / epoch ÷ Adam | points below Adam |", "|---|---|---|---|---|"]
        if "timing" in d:
            lines[-2:-2] = [f"Epoch times: {d['timing']}; the ratio is the median over seeds and epochs 2.. of each epoch's time ÷ Adam's in the same round. Accuracy: mean over seeds.", ""]
        for key, v in d["runs"].items():
            kind, name = key.split("/")
            lines.append(f"| {kind} | {name} | {_pct(v['final_accuracy'])} | {v['time_ratio_to_adam']:.2f}× | {v.get('points_below_adam', 0):.1f} |")
        lines.append("")
    if "defaults" in res:
        e = res["defaults"]
        lines += [f"## Measurements behind the defaults ({e['split']}, {e['epochs']} epochs, seeds {e['seeds']})", "", "| setting | validation accuracy (mean) |", "|---|---|"]
        for group in ("cce_mapping", "cce_refresh", "qimad_options"):
            for key, v in e[group].items():
                lines.append(f"| {group}: {key} | {_pct(v['mean'])} |")
        lines += ["", "QIMAD, full batch (QCI MLP, 8 agents) — loss of the best agent over the first six steps:", ""]
        for key, v in e["qimad_full_batch_best_loss_first_steps"].items():
            lines.append(f"- {key}: " + ", ".join(f"{x:.4g}" for x in v))
        lines.append("")
    lines += verdicts(res)
    return "\n".join(lines)


def verdicts(res: dict) -> list[str]:
    """The issue's targets and the seed's claims, each with the measured value and a verdict."""
    rows = []

    def row(target, value, ok):
        rows.append(f"| {target} | {value} | {'met' if ok else 'missed'} |")

    if "cce_step_cost" in res:
        t = res["cce_step_cost"]["timing"]
        r = {k: v["ratio_to_sgd_foreach"] for k, v in t.items()}
        row("CCE default step ≤ 2× SGD(foreach), 25M MLP", f"{r['cce_default']:.2f}× (momentum 0.9; floor fused SGD-momentum {r['sgd_momentum_fused']:.2f}×; without momentum {r['cce_default_no_momentum']:.2f}×)", r["cce_default"] <= 2.0)
        row("CCE exact (every-step) ≤ Adam(foreach)'s ratio", f"{r['cce_exact']:.2f}× vs Adam {r['adam_foreach']:.2f}×", r["cce_exact"] <= r["adam_foreach"])
        rows.append(f"| (seed CCE step, for reference) | {r['cce_seed']:.1f}× SGD(foreach) | |")
    if "qimad_step_cost" in res:
        b = res["qimad_step_cost"]
        for kind in ("digits_mlp", "digits_cnn"):
            if kind in b:
                fl = b[kind]["ratio_to_k_eval_floor"]["qimad_k8"]
                row(f"QIMAD (8 agents, all evaluated) ≤ 1.15 × k_eval floor, {kind}", f"{fl:.2f} × floor", fl <= 1.15)
        if "small_mlp" in b:
            sp = b["small_mlp"]["seed_loop_over_qimad_batched"]
            row("QIMAD ≥ 3× faster per step than the seed loop, 2-64-32-1 batch 256", f"{sp:.2f}×", sp >= 3.0)
    if "qimad_keval" in res:
        d = res["qimad_keval"]["runs"]
        for kind in ("mlp", "cnn"):
            if f"{kind}/k2" in d:
                v = d[f"{kind}/k2"]
                ok = v["points_below_adam"] <= 1.0 and v["time_ratio_to_adam"] <= 2.3
                row(f"QIMAD k_eval=2 within 1 point of Adam at ≤ 2.3× Adam's time/epoch, {kind}", f"{v['points_below_adam']:+.1f} points, {v['time_ratio_to_adam']:.2f}×", ok)
    if "accuracy" in res:
        a = res["accuracy"]["runs"]
        for kind in ("mlp", "cnn"):
            cce, sgd, adam = a.get(f"{kind}/cce"), a.get(f"{kind}/sgd"), a.get(f"{kind}/adam")
            if not (cce and sgd and adam):
                continue
            tsc = res["accuracy"].get("train_step_cost", {}).get(kind)
            if tsc:
                best = min(tsc["sgd"]["per_step_ms"], tsc["adam"]["per_step_ms"])
                speed = best / tsc["cce"]["per_step_ms"] - 1
                rows.append(f"| seed claim: 30–50 % faster training ({kind}; training step, CCE vs the faster of SGD/Adam, interleaved) | {100 * speed:+.0f} % | {'holds' if speed >= 0.3 else 'does not hold'} |")
            e = [x for x in cce["epochs_to_95"] if x is not None]
            base = [x for x in sgd["epochs_to_95"] + adam["epochs_to_95"] if x is not None]
            if e and base:
                fewer = 1 - statistics.mean(e) / min(statistics.mean(sgd["epochs_to_95"]), statistics.mean(adam["epochs_to_95"])) if None not in sgd["epochs_to_95"] + adam["epochs_to_95"] else math.nan
                rows.append(f"| seed claim: 15–35 % fewer iterations ({kind}; epochs to 95 %, CCE vs the better of SGD/Adam) | {100 * fewer:+.0f} % | {'holds' if fewer >= 0.15 else 'does not hold'} |")
            err_cce = 1 - cce["final_mean"]
            err_base = 1 - max(sgd["final_mean"], adam["final_mean"])
            lower = 1 - err_cce / err_base if err_base > 0 else math.nan
            sd = 100 * max(final_sd(x["runs"]) for x in (cce, sgd, adam))
            verdict = "holds" if lower >= 0.05 and 100 * (err_base - err_cce) > 2 * sd else "not shown (within seed-to-seed spread)" if lower > 0 else "does not hold"
            rows.append(f"| seed claim: 5–15 % lower generalisation error ({kind}; test error CCE {100 * err_cce:.1f} % vs best baseline {100 * err_base:.1f} %, sd up to {sd:.1f}) | {100 * lower:+.0f} % | {verdict} |")
        st = {k: v["runs"][0].get("state_bytes") for k, v in a.items()}
        if st.get("mlp/cce") is not None and st.get("mlp/sgd") is not None:
            rows.append(f"| seed claim: 20–40 % less memory (optimizer state, QCI MLP) | CCE {st['mlp/cce'] / 2**20:.2f} MB = SGD-momentum {st['mlp/sgd'] / 2**20:.2f} MB; seed-mode CCE 0 MB = plain SGD; QIMAD {st['mlp/qimad'] / 2**20:.1f} MB | does not hold (no mechanism: CCE stores what SGD stores) |")
    if not rows:
        return []
    return ["## Targets and the seed's claims", "", "| target / claim | measured | verdict |", "|---|---|---|", *rows, ""]


def plots(res: dict, out_dir: Path, suffix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if "accuracy" in res:
        c = res["accuracy"]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, kind in zip(axes, ("mlp", "cnn")):
            for key, v in c["runs"].items():
                k, name = key.split("/")
                if k != kind:
                    continue
                curves = [r["accuracy"] for r in v["runs"] if "accuracy" in r]
                if not curves:
                    continue
                mean = [100 * statistics.mean(col) for col in zip(*curves)]
                ax.plot(range(1, len(mean) + 1), mean, label=name)
            ax.set_title(f"QCI digits {kind.upper()} (mean of {len(c['seeds'])} seeds)")
            ax.set_xlabel("epoch")
            ax.axhline(95, color="grey", lw=0.5, ls="--")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("test accuracy (%)")
        axes[0].set_ylim(0, 100)
        axes[1].legend(fontsize="small")
        fig.tight_layout()
        path = out_dir / f"optimizers{suffix}_curves.png"
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
        plt.close(fig)
        written.append(path.name)
    if "qimad_keval" in res:
        d = res["qimad_keval"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for kind, marker in (("mlp", "o"), ("cnn", "s")):
            pts = [(v["time_ratio_to_adam"], 100 * v["final_accuracy"], key.split("/")[1]) for key, v in d["runs"].items() if key.startswith(kind + "/")]
            ax.plot([p[0] for p in pts if p[2] != "adam"], [p[1] for p in pts if p[2] != "adam"], marker=marker, label=f"QIMAD {kind}")
            for x, y, name in pts:
                ax.annotate(name, (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel("time per epoch ÷ Adam's")
        ax.set_ylabel(f"test accuracy after {d['epochs']} epochs (%)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"optimizers{suffix}_keval.png"
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
        plt.close(fig)
        written.append(path.name)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run: fewer rounds, epochs and seeds")
    ap.add_argument("--smoke", action="store_true", help="every section at toy size: checks that the script runs")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of: {', '.join(SECTIONS)}")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="output directory")
    ap.add_argument("--merge", action="store_true", help="update the existing JSON: rerun only the --only sections, keep the others")
    args = ap.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    out_dir = Path(args.out)
    if not out_dir.is_dir():
        ap.error(f"output directory {out_dir} does not exist")
    torch.set_num_threads(1)
    global SMOKE, KINDS
    SMOKE = args.smoke
    if SMOKE:
        KINDS = ("mlp",)
    gc.freeze()  # the gc.collect() before every timed block then skips the imported modules' objects (~0.5 s each)
    quick = args.quick or args.smoke
    epochs = 1 if SMOKE else 3 if quick else 15
    seeds = [0] if quick else [0, 1, 2]
    t0 = time.perf_counter()
    res: dict = {"meta": {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
                          "threads": torch.get_num_threads(), "quick": quick, "smoke": SMOKE, "sections": sections}}  # fmt: skip
    if "cce_step_cost" in sections:
        res["cce_step_cost"] = cce_step_cost(quick)
    if "qimad_step_cost" in sections:
        res["qimad_step_cost"] = qimad_step_cost(quick)
    if "accuracy" in sections:
        res["accuracy"] = accuracy(quick, epochs, seeds)
    if "qimad_keval" in sections:
        res["qimad_keval"] = qimad_keval(quick, epochs, seeds)
    if "defaults" in sections:
        res["defaults"] = defaults(quick, 1 if SMOKE else 3 if quick else 8)
    res["meta"]["seconds"] = time.perf_counter() - t0
    res["meta"]["date"] = time.strftime("%Y-%m-%d")
    suffix = "_smoke" if SMOKE else "_quick" if quick else ""
    json_path = out_dir / f"optimizers{suffix}.json"
    md_path = out_dir / f"optimizers{suffix}.md"
    if args.merge and json_path.exists():
        old = json.loads(json_path.read_text())
        runs = old["meta"].get("runs") or [{k: old["meta"].get(k) for k in ("date", "seconds", "sections", "torch", "platform")}]
        runs.append({k: res["meta"].get(k) for k in ("date", "seconds", "sections", "torch", "platform")})
        old.update({k: v for k, v in res.items() if k != "meta"})
        old["meta"].update(res["meta"], runs=runs, sections=[x for x in SECTIONS if x in old])
        old["meta"]["seconds"] = sum(r.get("seconds") or 0 for r in runs)
        res = old
    res["meta"]["plots"] = plots(res, out_dir, suffix)
    text = json.dumps(res, indent=1, default=float)
    atomic_write(json_path, lambda tmp: Path(tmp).write_text(text + "\n"))
    md = markdown(res)
    atomic_write(md_path, lambda tmp: Path(tmp).write_text(md + "\n"))
    log(f"wrote {json_path}, {md_path} and {len(res['meta']['plots'])} plot(s) in {res['meta']['seconds']:.0f} s")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
