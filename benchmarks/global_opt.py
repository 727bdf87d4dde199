"""Global optimisation: QuantumDynamics (MQHOA) against CMA-ES, IPOP-CMA-ES, QIMAD and random search;
and, on digits, the QDT learning-rate schedule against cosine annealing.

Part 1 — test functions (``qcd_fx.optim.testfunctions``). For every function in
``--functions`` (Sphere, Rosenbrock, Rastrigin, Ackley), dimension in ``--dims`` (10, 30) and
seed (``--seeds``, 25): the optimum is moved to a random point (shift uniform in +-20 % of the
box's half-width around the textbook optimum; shift seed ``5000 + seed``) and every method gets the
same box, the same budget of ``--evals-per-dim * D`` evaluations (6000 D: 60 000 at 10-D, the
budget of the issue's Rastrigin probe) and stops at the target: ``f <= 1e-6`` (``1e-2`` for
Rosenbrock). The evaluation that first reaches the target is counted exactly.

* ``quantum-dynamics``: :class:`qcd_fx.optim.QuantumDynamics` with its defaults (40 centres,
  ensemble diffusion around the Boltzmann mean of the centres, centres uniform in the box,
  sigma0 = half the box width, restarts with twice the centres while budget remains);
* ``quantum-dynamics-multimodal``: the same with ``qcd_fx.optim.quantum_dynamics.MULTIMODAL``
  (320 centres, the lowest 70 % kept at each halving of sigma, down to 40);
* ``quantum-dynamics-v1``: its first defaults (20 centres, ensemble diffusion around each centre,
  plain mean, no restarts: ``V1_OPTIONS``);
* ``quantum-dynamics-v1+restarts``: the same with up to 20 restarts, each with twice the centres
  (the IPOP rule), while budget remains;
* ``qimad``: :class:`qcd_fx.optim.QIMAD` (8 agents; it uses *gradients*, the others do not) on the
  function through ``step(closure)``, start uniform in the box, lr = 0.01 x box width cosine-annealed
  over the budget (``qcd_fx.optim.testfunctions.optimize``);
* ``cma-es``: ``cma.CMAEvolutionStrategy`` (package ``cma``, the project's ``bench`` extra), x0
  uniform in the box, sigma0 = 0.25 x box width, box constraints, default population, its own
  stopping rules (the rest of the budget is then unused);
* ``ipop-cma-es``: the same, restarted from a new uniform x0 with the population doubled whenever
  CMA-ES stops, until the budget is spent;
* ``random``: uniform sampling in the box.

Reported per (function, dim, method): success rate, median evaluations to the target over the
successful runs, the expected running time ``ERT = (evaluations of all runs) / successes`` (BBOB's
aRT; it charges failures), the median final value, and seconds.

Part 2 — digits (``qcd_fx.data``; MLP 64-256-256-10, SGD momentum 0.9, batch 64, 20 epochs,
schedulers stepped every batch): :class:`qcd_fx.optim.QDTSchedule` (energy feedback from the batch
losses, ``energy_ema=0.9``) vs ``CosineAnnealingLR``. Both get the same epochs; each schedule's
learning rate (and QDT's horizon ``T``, the ``t`` reached at the last step) is chosen on a
validation split (20 % of the training images; mean of 2 seeds), then ``--digits-seeds`` (10) runs on the full training
set are scored on the test set. Also :class:`qcd_fx.optim.QuantumLangevin` (the quantum-dynamics
hybrid; sigma = 1e-2 halved 4 times, 1 walker) vs SGD momentum, both at the cosine run's learning
rate held constant.

Writes ``benchmarks/results/global_opt.json``, ``.md`` and ``.png``. Single-threaded.

    python benchmarks/global_opt.py            # full run (see the .md for its duration)
    python benchmarks/global_opt.py --quick    # 10-D only, 5 seeds, 20 000 evaluations; digits: 2 seeds, 5 epochs
    python benchmarks/global_opt.py --smoke --out /tmp/go   # 10-D, 1 seed, 200 evaluations; digits 1 seed, 1 epoch (tests)
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # CMA-ES's eigendecompositions were 10x slower with BLAS threads on 2 busy cores

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qcd_fx.optim import testfunctions as tf
from qcd_fx.optim.quantum_dynamics import MULTIMODAL

HERE = Path(__file__).resolve().parent
TARGETS = {"sphere": 1e-6, "rosenbrock": 1e-2, "rastrigin": 1e-6, "ackley": 1e-6}
METHODS = ("quantum-dynamics", "quantum-dynamics-multimodal", "quantum-dynamics-v1", "quantum-dynamics-v1+restarts", "qimad", "cma-es", "ipop-cma-es", "random")
V1_OPTIONS = {"num_centres": 20, "weighting": "mean", "temperature": 1.0, "stable_fraction": 0.0, "mean_field": 0.0, "restarts": 0}
"""QuantumDynamics' defaults before the mean-field diffusion (the committed results' first rows)."""


def instance(name: str, dim: int, seed: int) -> tf.TestFunction:
    base = tf.get(name, dim)
    lo, hi = base.bounds
    g = torch.Generator().manual_seed(5000 + seed)
    shift = (torch.rand(dim, generator=g, dtype=torch.float64) * 2 - 1) * 0.2 * (hi - lo) / 2
    return tf.get(name, dim, shift)


def run_cma(fn: tf.TestFunction, budget: int, target: float, seed: int, restarts: bool) -> dict:
    import cma

    lo, hi = fn.bounds
    rng = np.random.default_rng(seed)
    evals, hit, best = 0, None, math.inf
    popsize = 4 + int(3 * math.log(fn.dim))
    runs = 0
    t0 = time.perf_counter()
    while evals < budget and hit is None:
        x0 = rng.uniform(lo, hi, fn.dim)
        opts = {"bounds": [lo, hi], "seed": 1 + seed * 1000 + runs, "verbose": -9, "popsize": popsize, "maxfevals": budget - evals}
        es = cma.CMAEvolutionStrategy(x0, 0.25 * (hi - lo), opts)
        runs += 1
        while not es.stop() and evals < budget:
            X = es.ask()
            take = min(len(X), budget - evals)
            values = fn(torch.as_tensor(np.asarray(X), dtype=torch.float64)).numpy()
            below = np.flatnonzero(values[:take] <= target)
            if below.size and hit is None:
                hit = evals + int(below[0]) + 1
            best = min(best, float(values[:take].min()))
            evals += take
            if hit is not None or take < len(X):
                break
            es.tell(X, values.tolist())
        if not restarts:
            break
        popsize *= 2
    stop = "target" if hit is not None else ("budget" if evals >= budget else "converged")
    return {"f": best, "evaluations": evals, "evaluations_to_target": hit, "stop": stop, "seconds": time.perf_counter() - t0, "runs": runs}


def run_method(method: str, fn: tf.TestFunction, budget: int, target: float, seed: int) -> dict:
    if method == "cma-es":
        return run_cma(fn, budget, target, seed, restarts=False)
    if method == "ipop-cma-es":
        return run_cma(fn, budget, target, seed, restarts=True)
    if method.startswith("quantum-dynamics-v1"):
        options = dict(V1_OPTIONS, restarts=20 if method.endswith("+restarts") else 0)
        r = tf.optimize(fn, "quantum-dynamics", max_evals=budget, seed=100 + seed, target=target, options=options)
    elif method == "quantum-dynamics-multimodal":
        r = tf.optimize(fn, "quantum-dynamics", max_evals=budget, seed=100 + seed, target=target, options=dict(MULTIMODAL))
    else:
        r = tf.optimize(fn, method, max_evals=budget, seed=100 + seed, target=target)
    r.pop("x", None)
    return r


def summarize(runs: list[dict]) -> dict:
    hits = [r["evaluations_to_target"] for r in runs if r["evaluations_to_target"] is not None]
    total = sum(r["evaluations"] for r in runs)
    return {
        "runs": len(runs),
        "successes": len(hits),
        "success_rate": len(hits) / len(runs),
        "median_evals_to_target": statistics.median(hits) if hits else None,
        "ert": total / len(hits) if hits else None,
        "median_final_f": statistics.median(r["f"] for r in runs),
        "seconds": sum(r["seconds"] for r in runs),
    }


def part_functions(args, results: dict, save) -> None:
    for dim in args.dims:
        for name in args.functions:
            target = TARGETS[name]
            budget = args.evals_per_dim * dim
            key = f"{name}-{dim}"
            block = results["functions"].setdefault(key, {"function": name, "dim": dim, "target": target, "budget": budget, "methods": {}})
            for method in args.methods:
                if method == "qimad" and args.skip_qimad_dim and dim >= args.skip_qimad_dim:
                    continue
                runs = []
                for seed in range(args.seeds):
                    r = run_method(method, instance(name, dim, seed), budget, target, seed)
                    runs.append({"seed": seed, **r})
                block["methods"][method] = {"summary": summarize(runs), "runs": runs}
                s = block["methods"][method]["summary"]
                print(f"{key:>14} {method:>26}: {s['successes']:2d}/{s['runs']} solved, median evals {s['median_evals_to_target']}, "
                      f"ERT {s['ert'] and round(s['ert'])}, median f {s['median_final_f']:.3g}, {s['seconds']:.0f}s", flush=True)  # fmt: skip
                save()


# ── digits ──────────────────────────────────────────────────────────────────────────────────────


def digits_run(schedule: str, lr: float, epochs: int, seed: int, split, *, horizon: float = 20.0, use_val: bool, optimizer: str = "sgd") -> dict:
    import torch.nn.functional as F

    from qcd_fx.data import tensor_loader
    from qcd_fx.examples import digits_mlp
    from qcd_fx.optim.qdt import QDTSchedule
    from qcd_fx.optim.quantum_langevin import QuantumLangevin
    from qcd_fx.train import evaluate

    torch.manual_seed(seed)
    model = digits_mlp()
    train = tensor_loader(split.x_train, split.y_train, 64, shuffle=True, seed=seed)
    held = tensor_loader(split.x_val, split.y_val, 512) if use_val else tensor_loader(split.x_test, split.y_test, 512)
    steps = epochs * len(train)
    if optimizer == "langevin":
        opt = QuantumLangevin(model.parameters(), lr=lr, sigma=1e-2, momentum=0.9, total_steps=steps, seed=seed)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if schedule == "qdt":
        sched = QDTSchedule(opt, time_scale=horizon / steps, energy_ema=0.9)
    elif schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    else:
        sched = None
    lrs, t0 = [], time.perf_counter()
    for _ in range(epochs):
        model.train()
        for x, y in train:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            lrs.append(float(opt.param_groups[0]["lr"]))
            if isinstance(sched, QDTSchedule):
                sched.step(loss.detach())
            elif sched is not None:
                sched.step()
    seconds = time.perf_counter() - t0
    held_out = evaluate(model, held)
    train_eval = evaluate(model, tensor_loader(split.x_train, split.y_train, 512))
    return {"accuracy": held_out["accuracy"], "loss": held_out["loss"], "train_loss": train_eval["loss"], "seconds": seconds, "lrs": lrs[:: max(1, len(lrs) // 200)]}


def part_digits(args, results: dict, save) -> None:
    from qcd_fx.data import load_digits_split

    val_split = load_digits_split(val_fraction=0.2)
    test_split = load_digits_split()
    epochs = args.digits_epochs
    out = results.setdefault("digits", {"epochs": epochs, "model": "digits_mlp 64-256-256-10", "optimizer": "SGD momentum 0.9, batch 64"})
    grid_lr = [0.02, 0.05, 0.1, 0.2, 0.4]
    tuning = {}
    configs = {"cosine": [{"lr": lr} for lr in grid_lr], "qdt": [{"lr": lr, "horizon": h} for lr in grid_lr for h in (10.0, 20.0, 40.0)]}
    for schedule, grid in configs.items():
        scores = []
        for cfg in grid:
            rs = [digits_run(schedule, cfg["lr"], epochs, seed, val_split, horizon=cfg.get("horizon", 20.0), use_val=True) for seed in (0, 1)]
            acc, loss = statistics.mean(r["accuracy"] for r in rs), statistics.mean(r["loss"] for r in rs)
            scores.append({**cfg, "val_accuracy": acc, "val_loss": loss})
            print(f"digits tuning {schedule} {cfg}: val acc {acc:.4f}, val loss {loss:.4f}", flush=True)
        best = max(scores, key=lambda s: (s["val_accuracy"], -s["val_loss"]))
        tuning[schedule] = {"grid": scores, "chosen": best}
    out["tuning"] = tuning
    save()
    final = {}
    for schedule in ("cosine", "qdt"):
        chosen = tuning[schedule]["chosen"]
        runs = [digits_run(schedule, chosen["lr"], epochs, seed, test_split, horizon=chosen.get("horizon", 20.0), use_val=False) for seed in range(args.digits_seeds)]
        final[schedule] = summarize_digits(runs, chosen)
        print(f"digits {schedule}: test acc {final[schedule]['test_accuracy_mean']:.4f} +- {final[schedule]['test_accuracy_std']:.4f}", flush=True)
    # the hybrid: QuantumLangevin vs SGD momentum at the cosine run's learning rate, constant lr
    lr = tuning["cosine"]["chosen"]["lr"]
    for label, optimizer in (("sgd-constant", "sgd"), ("quantum-langevin", "langevin")):
        runs = [digits_run("none", lr, epochs, seed, test_split, use_val=False, optimizer=optimizer) for seed in range(args.digits_seeds)]
        final[label] = summarize_digits(runs, {"lr": lr})
        print(f"digits {label}: test acc {final[label]['test_accuracy_mean']:.4f} +- {final[label]['test_accuracy_std']:.4f}", flush=True)
    out["final"] = final
    save()


def summarize_digits(runs: list[dict], cfg: dict) -> dict:
    accs = [r["accuracy"] for r in runs]
    return {
        **cfg,
        "seeds": len(runs),
        "test_accuracy_mean": statistics.mean(accs),
        "test_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "test_accuracies": accs,
        "test_loss_mean": statistics.mean(r["loss"] for r in runs),
        "train_loss_mean": statistics.mean(r["train_loss"] for r in runs),
        "seconds_per_run": statistics.mean(r["seconds"] for r in runs),
        "lr_trace_seed0": runs[0]["lrs"],
    }


# ── report ──────────────────────────────────────────────────────────────────────────────────────


def fmt(v, digits=0):
    if v is None:
        return "—"
    return f"{v:,.{digits}f}" if isinstance(v, float) else f"{v:,}"


def markdown(results: dict) -> str:
    lines = [f"# Global optimisation and the QDT schedule ({results['meta']['mode']} run)", ""]
    meta = results["meta"]
    lines += [
        (f"Measured by `benchmarks/global_opt.py` on {meta['machine']}, torch {meta['torch']}, cma {meta.get('cma')}, "
         f"single-threaded; wall time {meta.get('wall_seconds', 0) / 60:.0f} min. Shifted optimum, same box and budget "
         "for every method; target f <= 1e-6 (Rosenbrock 1e-2). ERT = evaluations of all runs / successes."),
        "",
    ]
    if meta.get("merged_runs"):
        lines += ["Parts rerun into this file (`--merge`): " + "; ".join(f"`{' '.join(r.get('argv') or [])}`" for r in meta["merged_runs"]) + ".", ""]
    if results.get("functions"):
        lines += ["| problem | budget | method | solved | median evals to target | ERT | median final f |", "|---|---:|---|---:|---:|---:|---:|"]
        for key, block in results["functions"].items():
            for method, data in sorted(block["methods"].items(), key=lambda kv: METHODS.index(kv[0]) if kv[0] in METHODS else len(METHODS)):
                s = data["summary"]
                lines.append(
                    f"| {key} | {block['budget']:,} | {method} | {s['successes']}/{s['runs']} | {fmt(s['median_evals_to_target'])} | "
                    f"{fmt(s['ert'])} | {s['median_final_f']:.3g} |"
                )
        lines.append("")
    d = results.get("digits")
    if d and "final" in d:
        lines += [
            f"## Digits: learning-rate schedules at an equal budget ({d['epochs']} epochs, {d['model']}, {d['optimizer']})",
            "",
            "Learning rate (and QDT's horizon T) chosen on a validation split; test accuracy: mean ± sample SD over seeds.",
            "",
            "| schedule / optimizer | lr | QDT T | test accuracy | test loss | train loss | s per run |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for label, r in d["final"].items():
            lines.append(
                f"| {label} | {r['lr']} | {r.get('horizon', '—')} | {100 * r['test_accuracy_mean']:.2f} ± {100 * r['test_accuracy_std']:.2f} % "
                f"({r['seeds']} seeds) | {r['test_loss_mean']:.4f} | {r['train_loss_mean']:.5f} | {r['seconds_per_run']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qcd_fx.io import atomic_write

    blocks = results.get("functions", {})
    d = results.get("digits", {}).get("final")
    ncols = 2 if d else 1
    fig, axes = plt.subplots(1, ncols, figsize=(7 * ncols, 4.5))
    axes = np.atleast_1d(axes)
    if blocks:
        keys = list(blocks)
        methods = [m for m in METHODS if any(m in b["methods"] for b in blocks.values())]
        width = 0.8 / max(1, len(methods))
        for i, m in enumerate(methods):
            rates = [100 * blocks[k]["methods"][m]["summary"]["success_rate"] if m in blocks[k]["methods"] else 0 for k in keys]
            axes[0].bar(np.arange(len(keys)) + i * width, rates, width, label=m)
        axes[0].set_xticks(np.arange(len(keys)) + 0.4 - width / 2, keys, rotation=45, ha="right")
        axes[0].set_ylabel("success rate (%)")
        axes[0].legend(fontsize="x-small")
        axes[0].set_title("runs reaching the target within the budget")
    if d:
        for label in ("cosine", "qdt"):
            trace = d[label]["lr_trace_seed0"]
            axes[1].plot(np.linspace(0, 1, len(trace)), trace, label=f"{label} (test acc {100 * d[label]['test_accuracy_mean']:.2f} %)")
        axes[1].set_xlabel("fraction of training")
        axes[1].set_ylabel("learning rate")
        axes[1].legend(fontsize="small")
        axes[1].set_title("digits: learning rate, seed 0")
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="10-D only, 5 seeds, 2000 D evaluations; digits 2 seeds, 5 epochs")
    p.add_argument("--smoke", action="store_true", help="10-D only, 1 seed, 20 D evaluations; digits 1 seed, 1 epoch: checks that the script runs")
    p.add_argument("--functions", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--dims", nargs="+", type=int, default=[10, 30])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", type=int, default=25)
    p.add_argument("--evals-per-dim", type=int, default=6000)
    p.add_argument("--skip-qimad-dim", type=int, default=None, help="skip QIMAD from this dimension up (it is the slowest)")
    p.add_argument("--digits-seeds", type=int, default=10)
    p.add_argument("--digits-epochs", type=int, default=20)
    p.add_argument("--no-functions", action="store_true")
    p.add_argument("--no-digits", action="store_true")
    p.add_argument("--out", default=str(HERE / "results" / "global_opt"), help="output prefix (.json/.md/.png are added)")
    p.add_argument("--merge", action="store_true", help="update the existing JSON: rerun only the selected parts, keep the rest")
    args = p.parse_args(argv)
    if args.quick:
        args.dims, args.seeds, args.evals_per_dim, args.digits_seeds, args.digits_epochs = [10], 5, 2000, 2, 5
    if args.smoke:
        args.dims, args.seeds, args.evals_per_dim, args.digits_seeds, args.digits_epochs = [10], 1, 20, 1, 1
    torch.set_num_threads(1)
    try:
        import cma

        cma_version = cma.__version__
    except ImportError:
        if any(m.endswith("cma-es") for m in args.methods) and not args.no_functions:
            print("the CMA-ES baselines need the 'cma' package: pip install 'qcd-fx[bench]' (or drop them with --methods)", file=sys.stderr)
            return 2
        cma_version = None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {
        "meta": {
            "mode": "smoke" if args.smoke else "quick" if args.quick else "full", "torch": torch.__version__, "cma": cma_version, "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "seeds": args.seeds, "evals_per_dim": args.evals_per_dim,
            "targets": TARGETS, "argv": sys.argv[1:],
        },
        "functions": {},
    }  # fmt: skip
    if args.merge and out.with_suffix(".json").exists():
        old = json.loads(out.with_suffix(".json").read_text())
        old["meta"].setdefault("merged_runs", []).append({"argv": sys.argv[1:], "torch": torch.__version__})
        results = {**old, "functions": old.get("functions", {})}
    t0 = time.perf_counter() - (results["meta"].get("wall_seconds", 0.0) if args.merge else 0.0)

    from qcd_fx.io import atomic_write

    def save() -> None:
        results["meta"]["wall_seconds"] = time.perf_counter() - t0
        text = json.dumps(results, indent=1)
        atomic_write(out.with_suffix(".json"), lambda tmp: Path(tmp).write_text(text + "\n"))
        md = markdown(results)
        atomic_write(out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(md))

    if not args.no_functions:
        part_functions(args, results, save)
    if not args.no_digits:
        part_digits(args, results, save)
    save()
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')}, .md, .png in {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
