"""QIMAD on small networks against the seed's per-agent loop (tracker issue 11).

Run from the repository root::

    python benchmarks/qimad_small.py                  # the whole grid, 9 rounds (~7 min on 2 shared cores)
    python benchmarks/qimad_small.py --rounds 15      # more rounds
    python benchmarks/qimad_small.py --only tanh/256/64x32,relu/full/64x32 --no-profile
    python benchmarks/qimad_small.py --smoke --out /tmp/qimad_small.json   # one config, a few steps (seconds)

Writes ``benchmarks/results/qimad_small.json`` (raw times of every round; ``--out PATH`` writes
elsewhere) and prints the ratio table, then a ``torch.profiler`` breakdown of a step of QIMAD
and of the seed loop for three of the configurations (stored under the configuration's
``profile``; ``--no-profile`` skips it).

Grid: activation {ReLU, Tanh} × batch {32, 256, full} × hidden widths {(64, 32), (256, 128)} of a
2-h1-h2-1 MLP regressing ``y = sin(pi x1) cos(pi x2)`` on 1,024 points of ``[-1, 1]^2`` (MSE), 8
agents, every agent evaluated every step. Batches 32 and 256 come from a shuffling ``DataLoader``
over the 1,024 samples; ``full`` is one fixed batch of all 1,024 samples (a one-element list as
the loader: no collation). QUIMAD's own configuration, the one the README's 2.94× was measured
on, is ReLU, (64, 32), one fixed batch of 256: the per-step cell ``relu/256/64x32`` does the same
work (per-step timing uses batches drawn in advance).

Contenders, each timed once per round (rotating order; one intra-op thread):

* ``qimad_step`` / ``seed_step`` — a block of steps, qcd-fx ``QIMAD.step(model=, batch=, loss_fn=)``
  and the seed's loop (``SeedQIMAD`` from ``benchmarks/optimizers.py``: per agent, load the
  weights, run the closure's forward/backward, RMSProp per tensor) on the same batches.
* ``qimad_fit`` / ``seed_fit`` — :func:`qcd_fx.train.fit` (``progress=False``) over the loader:
  QIMAD through its population path, the seed loop through ``fit``'s closure path.
* ``qimad_loop_step`` — QIMAD with ``evaluation="loop"`` (one forward/backward per agent instead
  of one ``vmap`` call; not the default, and not bit-identical to it: float rounding differs).
* breakdown (not part of the ratios): ``qimad_eval`` — the :class:`BatchedEvaluator` call alone
  (vmap forward/backward of the 8 agents and the gradient gather), so ``qimad_step - qimad_eval``
  is everything else in a step; ``fwdbwd_x8`` — 8 plain forward/backward passes of the model
  (the seed's compute floor); ``loader`` — iterating the loader as ``fit`` does.

Every block is timed twice: process CPU time (``time.process_time``) and wall time. The ratios
reported first are CPU-time ratios: the benchmark runs one thread, and on a shared, oversubscribed
machine wall time also counts the time spent waiting for a core (wall-time ratios are reported
too, and spread several times wider). A ratio is taken within each round (seed ÷ QIMAD, same
number of steps) and the median, min and max over rounds are reported.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):  # run from a checkout without installing; the seed loop lives next door
    if p not in sys.path:
        sys.path.insert(0, p)

from optimizers import SeedQIMAD  # noqa: E402  (the seed's QIMAD, re-typed literally)

from qcd_fx.io import atomic_write  # noqa: E402
from qcd_fx.optim import QIMAD  # noqa: E402
from qcd_fx.optim.population import BatchedEvaluator, ViewCache  # noqa: E402
from qcd_fx.train import fit  # noqa: E402

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}
BATCHES = ("32", "256", "full")
WIDTHS = ((64, 32), (256, 128))
N_SAMPLES = 1024
N_AGENTS = 8
LR = 0.05  # the seed's eta (both optimizers; the cost does not depend on it)
TOTAL_STEPS = 10_000  # cooling length, the same for both (fit would set it otherwise)


class SeedForFit(SeedQIMAD):
    """The seed loop, marked for :func:`qcd_fx.train.fit`'s closure path."""

    requires_closure = True


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(N_SAMPLES, 2, generator=g) * 2 - 1
    y = (torch.sin(math.pi * x[:, :1]) * torch.cos(math.pi * x[:, 1:])).contiguous()
    return x, y


def make_model(act: str, hidden: tuple[int, int], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    a = ACTIVATIONS[act]
    return nn.Sequential(nn.Linear(2, hidden[0]), a(), nn.Linear(*hidden), a(), nn.Linear(hidden[1], 1))


def make_loader(x: torch.Tensor, y: torch.Tensor, batch: str):
    if batch == "full":
        return [(x, y)]
    return DataLoader(TensorDataset(x, y), batch_size=int(batch), shuffle=True, generator=torch.Generator().manual_seed(0))


def config_name(act: str, batch: str, hidden: tuple[int, int]) -> str:
    return f"{act}/{batch}/{hidden[0]}x{hidden[1]}"


def build(act: str, batch: str, hidden: tuple[int, int], steps: int, min_fit_steps: int) -> tuple[dict[str, Callable[[], None]], dict]:
    """The contenders of one configuration (closures that run one timed block) and its sizes."""
    x, y = make_data()
    loader = make_loader(x, y, batch)
    steps_per_epoch = len(loader)
    epochs = max(1, math.ceil(min_fit_steps / steps_per_epoch))
    batches = [(bx, by) for bx, by in make_loader(x, y, batch)]  # drawn in advance: pure step cost
    block = [batches[i % len(batches)] for i in range(steps)]
    loss_fn = F.mse_loss

    mq = make_model(act, hidden)
    q = QIMAD(mq.parameters(), num_agents=N_AGENTS, lr=LR, seed=0, total_steps=TOTAL_STEPS)

    def qimad_step():
        for b in block:
            q.step(model=mq, batch=b, loss_fn=loss_fn)

    ms = make_model(act, hidden)
    s = SeedQIMAD(ms.parameters(), num_agents=N_AGENTS, eta=LR, seed=0, total_steps=TOTAL_STEPS)

    def seed_step():
        for bx, by in block:

            def closure(bx=bx, by=by):
                s.zero_grad()
                loss = loss_fn(ms(bx), by)
                loss.backward()
                return loss

            s.step(closure)

    ml = make_model(act, hidden)
    ql = QIMAD(ml.parameters(), num_agents=N_AGENTS, lr=LR, seed=0, total_steps=TOTAL_STEPS, evaluation="loop")

    def qimad_loop_step():
        for b in block:
            ql.step(model=ml, batch=b, loss_fn=loss_fn)

    mqf = make_model(act, hidden)
    qf = QIMAD(mqf.parameters(), num_agents=N_AGENTS, lr=LR, seed=0, total_steps=TOTAL_STEPS)
    msf = make_model(act, hidden)
    sf = SeedForFit(msf.parameters(), num_agents=N_AGENTS, eta=LR, seed=0, total_steps=TOTAL_STEPS)

    def qimad_fit():
        fit(mqf, loader, qf, epochs, loss_fn=loss_fn, progress=False)

    def seed_fit():
        fit(msf, loader, sf, epochs, loss_fn=loss_fn, progress=False)

    # breakdown: the evaluation alone, the seed's compute floor, the loader
    me = make_model(act, hidden)
    ev_params = list(me.parameters())
    evaluator = BatchedEvaluator(me, ev_params)
    flat = torch.cat([p.detach().reshape(-1) for p in ev_params])
    positions = (flat + 0.01 * torch.randn(N_AGENTS, flat.numel(), generator=torch.Generator().manual_seed(1))).contiguous()
    views = ViewCache()

    def qimad_eval():  # as QIMAD.step calls it with every agent evaluated
        for bx, by in block:
            evaluator(positions, bx, by, loss_fn, cache=views)

    mf = make_model(act, hidden)

    def fwdbwd_x8():
        for bx, by in block:
            for _ in range(N_AGENTS):
                mf.zero_grad()
                loss_fn(mf(bx), by).backward()

    def loader_only():
        for _ in range(epochs):
            for _b in loader:
                pass

    contenders = {
        "qimad_step": qimad_step, "seed_step": seed_step, "qimad_fit": qimad_fit, "seed_fit": seed_fit,
        "qimad_loop_step": qimad_loop_step, "qimad_eval": qimad_eval, "fwdbwd_x8": fwdbwd_x8, "loader": loader_only,
    }  # fmt: skip
    sizes = {
        "steps_per_block": steps, "fit_epochs_per_block": epochs, "steps_per_epoch": steps_per_epoch,
        "fit_steps_per_block": epochs * steps_per_epoch, "batch_size": N_SAMPLES if batch == "full" else int(batch),
        "params": flat.numel(),
    }  # fmt: skip
    return contenders, sizes


FIT_NAMES = ("qimad_fit", "seed_fit", "loader")


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _ratios(num: list[float], den: list[float]) -> list[float]:
    return [a / b for a, b in zip(num, den)]


def run_config(act: str, batch: str, hidden: tuple[int, int], rounds: int, steps: int, min_fit_steps: int) -> dict:
    contenders, sizes = build(act, batch, hidden, steps, min_fit_steps)
    names = list(contenders)
    for f in contenders.values():  # warm-up (first vmap call, allocations)
        f()
    cpu: dict[str, list[float]] = {n: [] for n in names}
    wall: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        if r % 2:
            order.reverse()
        for name in order:
            gc.collect()
            c0, w0 = time.process_time(), time.perf_counter()
            contenders[name]()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)

    n_step, n_fit, n_ep = sizes["steps_per_block"], sizes["fit_steps_per_block"], sizes["fit_epochs_per_block"]

    def per_step_ms(times: dict[str, list[float]]) -> dict[str, float]:
        return {name: statistics.median(t) / (n_fit if name in FIT_NAMES else n_step) * 1e3 for name, t in times.items()}

    def ratios(times: dict[str, list[float]]) -> dict:
        step, fit_r, loop = (_ratios(times["seed_step"], times["qimad_step"]), _ratios(times["seed_fit"], times["qimad_fit"]),
                             _ratios(times["seed_step"], times["qimad_loop_step"]))  # fmt: skip
        return {
            "step": {**_summary(step), "per_round": step},
            "fit": {**_summary(fit_r), "per_round": fit_r},
            "step_loop_evaluation": {**_summary(loop), "per_round": loop},
        }

    # within-round shares (ratios of CPU times measured in the same round)
    breakdown = {
        "qimad_eval_share_of_step": _summary(_ratios(cpu["qimad_eval"], cpu["qimad_step"])),
        "ceiling_seed_step_over_qimad_eval": _summary(_ratios(cpu["seed_step"], cpu["qimad_eval"])),
        "seed_compute_share_fwdbwd_x8_over_seed_step": _summary(_ratios(cpu["fwdbwd_x8"], cpu["seed_step"])),
        "ceiling_seed_step_over_fwdbwd_x8": _summary(_ratios(cpu["seed_step"], cpu["fwdbwd_x8"])),
        "loader_share_of_qimad_fit": _summary(_ratios(cpu["loader"], cpu["qimad_fit"])),
    }
    return {
        "activation": act,
        "batch": batch,
        "hidden": list(hidden),
        **sizes,
        "ratio_cpu": ratios(cpu),
        "ratio_wall": ratios(wall),
        "per_step_ms_cpu": per_step_ms(cpu),
        "per_step_ms_wall": per_step_ms(wall),
        "per_epoch_ms_cpu": {name: statistics.median(cpu[name]) / n_ep * 1e3 for name in ("qimad_fit", "seed_fit")},
        "breakdown_cpu": breakdown,
        "times_cpu_s": cpu,
        "times_wall_s": wall,
    }


def table(configs: list[dict]) -> str:
    head = (
        "| act | batch | hidden | QIMAD ms/step | seed ms/step | **step ratio** (min–max) | step, wall | QIMAD ms/epoch | seed ms/epoch "
        "| **fit ratio** (min–max) | fit, wall | step ratio, loop eval | eval share of step | seed ÷ eval | seed ÷ 8 fwd/bwd | loader share of fit |"
    )
    lines = [head, "|---|---|---|" + "---:|" * (head.count("|") - 4)]
    for c in configs:
        rc, rw, b, ms = c["ratio_cpu"], c["ratio_wall"], c["breakdown_cpu"], c["per_step_ms_cpu"]
        lines.append(
            f"| {c['activation']} | {c['batch']} | {c['hidden'][0]}-{c['hidden'][1]} | {ms['qimad_step']:.2f} | {ms['seed_step']:.2f} "
            f"| **{rc['step']['median']:.2f}×** ({rc['step']['min']:.2f}–{rc['step']['max']:.2f}) | {rw['step']['median']:.2f}× "
            f"| {c['per_epoch_ms_cpu']['qimad_fit']:.1f} | {c['per_epoch_ms_cpu']['seed_fit']:.1f} "
            f"| **{rc['fit']['median']:.2f}×** ({rc['fit']['min']:.2f}–{rc['fit']['max']:.2f}) | {rw['fit']['median']:.2f}× "
            f"| {rc['step_loop_evaluation']['median']:.2f}× | {100 * b['qimad_eval_share_of_step']['median']:.0f} % "
            f"| {b['ceiling_seed_step_over_qimad_eval']['median']:.2f}× | {b['ceiling_seed_step_over_fwdbwd_x8']['median']:.2f}× "
            f"| {100 * b['loader_share_of_qimad_fit']['median']:.0f} % |"
        )
    return "\n".join(lines)


PROFILE_CONFIGS = (("relu", "256", (64, 32)), ("tanh", "256", (64, 32)), ("relu", "full", (256, 128)))


def profile_config(act: str, batch: str, hidden: tuple[int, int], steps: int) -> dict:
    """Where a step's time goes: ``torch.profiler`` over ``steps`` steps of QIMAD and of the seed
    loop on one batch. ``python_and_dispatch_ms`` is the step's own CPU time outside every ATen
    operator (Python, vmap and autograd bookkeeping); the profiler's own cost inflates it."""
    from torch.profiler import ProfilerActivity, profile

    x, y = make_data()
    b = next(iter(make_loader(x, y, batch)))
    mq = make_model(act, hidden)
    q = QIMAD(mq.parameters(), num_agents=N_AGENTS, lr=LR, seed=0, total_steps=TOTAL_STEPS)
    ms = make_model(act, hidden)
    s = SeedQIMAD(ms.parameters(), num_agents=N_AGENTS, eta=LR, seed=0, total_steps=TOTAL_STEPS)

    def closure():
        s.zero_grad()
        loss = F.mse_loss(ms(b[0]), b[1])
        loss.backward()
        return loss

    out = {}
    for name, cls, run in (("qimad", "QIMAD", lambda: q.step(model=mq, batch=b, loss_fn=F.mse_loss)), ("seed", "SeedQIMAD", lambda: s.step(closure))):
        for _ in range(3):
            run()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                run()
        events = prof.key_averages()
        step_key = f"Optimizer.step#{cls}.step"
        total = sum(e.self_cpu_time_total for e in events)
        own = sum(e.self_cpu_time_total for e in events if e.key == step_key)
        top = sorted((e for e in events if e.key != step_key), key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
        out[name] = {
            "per_step_ms": total / steps / 1e3,
            "python_and_dispatch_ms": own / steps / 1e3,
            "top_ops": [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / steps / 1e3, "calls_per_step": e.count / steps} for e in top],
        }
    return {"activation": act, "batch": batch, "hidden": list(hidden), "steps": steps, **out}


def profile_text(profiles: list[dict]) -> str:
    lines = []
    for p in profiles:
        lines.append(f"profile {p['activation']}/{p['batch']}/{p['hidden'][0]}x{p['hidden'][1]} (torch.profiler, CPU ms per step):")
        for name in ("qimad", "seed"):
            r = p[name]
            ops = ", ".join(f"{o['op']} {o['self_ms_per_step']:.2f}" for o in r["top_ops"][:6])
            lines.append(f"  {name:5s} {r['per_step_ms']:.2f} ms = Python/dispatch {r['python_and_dispatch_ms']:.2f} + ops: {ops}, ...")
    return "\n".join(lines)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "qimad_small.json"), help="JSON output path")
    ap.add_argument("--rounds", type=int, default=9, help="timed rounds per configuration (default 9)")
    ap.add_argument("--steps", type=int, default=16, help="steps per timed per-step block (default 16)")
    ap.add_argument("--fit-steps", type=int, default=16, help="at least this many steps per timed fit call (default 16)")
    ap.add_argument("--only", default="", help="comma-separated configurations act/batch/h1xh2, e.g. tanh/256/64x32")
    ap.add_argument("--smoke", action="store_true", help="one configuration, two rounds of two steps: checks that the script runs")
    ap.add_argument("--no-profile", action="store_true", help="skip the torch.profiler breakdown of a few configurations")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.fit_steps < 1:
        ap.error("--rounds, --steps and --fit-steps must be positive")
    out = Path(args.out)
    if not out.parent.is_dir():
        ap.error(f"output directory {str(out.parent)!r} does not exist")
    torch.set_num_threads(1)
    grid = [(a, b, w) for a in ACTIVATIONS for b in BATCHES for w in WIDTHS]
    if args.smoke:
        grid, rounds, steps, fit_steps = [("tanh", "256", (64, 32))], 2, 2, 4
    else:
        rounds, steps, fit_steps = args.rounds, args.steps, args.fit_steps
        if args.only:
            wanted = {s.strip() for s in args.only.split(",") if s.strip()}
            unknown = wanted - {config_name(*c) for c in grid}
            if unknown:
                ap.error(f"unknown configuration(s) {', '.join(sorted(unknown))}; known: {', '.join(config_name(*c) for c in grid)}")
            grid = [c for c in grid if config_name(*c) in wanted]
    t_start = time.perf_counter()
    configs = []
    for act, batch, hidden in grid:
        log(f"qimad_small: {config_name(act, batch, hidden)}, {rounds} rounds")
        configs.append(run_config(act, batch, hidden, rounds, steps, fit_steps))
    profiles = []
    if not args.no_profile:
        for act, batch, hidden in grid[:1] if args.smoke else [c for c in PROFILE_CONFIGS if c in grid]:
            log(f"qimad_small: profiling {config_name(act, batch, hidden)}")
            profiles.append(profile_config(act, batch, hidden, 2 if args.smoke else 30))
            configs[grid.index((act, batch, hidden))]["profile"] = profiles[-1]
    res = {
        "meta": {
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "processor": platform.processor(), "threads": torch.get_num_threads(), "rounds": rounds,
            "agents": N_AGENTS, "samples": N_SAMPLES, "smoke": args.smoke, "git_commit": git_commit(),
            "seconds": time.perf_counter() - t_start,
            "method": "one intra-op thread; each round times one block of every contender (rotating order, "
                      "alternate rounds reversed) in process CPU time and wall time; ratios seed/QIMAD within a "
                      "round, median/min/max over rounds; per-step/per-epoch times are medians (ms)",
        },
        "configs": configs,
    }  # fmt: skip
    text = table(configs) + ("\n\n" + profile_text(profiles) if profiles else "")
    print(text)
    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(res, indent=1) + "\n"))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
