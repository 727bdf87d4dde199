"""``qcd_fx.compress`` measured: does pruning plus distillation earn the seed's training claims?

The seed promised 30-50 % faster training and 20-40 % less memory. For each network and seed:

1. the network is trained ``--pretrain`` epochs (Adam): the *original*;
2. the **baseline** is the original trained ``--finetune`` more epochs, so it has the same total
   epochs as every compressed model;
3. ``qcd_fx.compress`` prunes the original to ``target_macs`` 0.5 and 0.25 of its MACs (``cdg-prune``,
   l1) and fine-tunes ``--finetune`` epochs, with distillation from the original (``distill=0.5``,
   ``T=2``) and without (``distill=0``);
4. per compressed model: held-out accuracy against the baseline's, and ``compress``'s own side-by-side
   measurements (training-step time and training memory = activations saved for backward counted
   with saved-tensor hooks + parameters + gradients + Adam state; steps of both models interleaved,
   medians);
5. the latency route: at target 0.5 with distillation, the compressed model's measured batch-1
   latency ratio ``r`` is taken as ``target_latency=r`` for a second compression (same seed,
   epochs, distillation): which route keeps more accuracy at the same latency;
6. peak RSS in a fresh process: the original and the 0.5 model are saved, then each is loaded in a
   new Python process that resets its peak RSS (``/proc/self/clear_refs``, Linux) and runs
   ``--rss-steps`` training steps at batch 64; the growth of the peak (``VmHWM``) over the RSS
   before training (one process per model and repeat, alternated, median of ``--rss-repeats``).

Networks: the digits CNN on the 8x8 digits, and torchvision's ResNet-18 (10 classes) on the digits
upscaled to 32x32 (bilinear, 3 channels). Single-threaded. Targets (issue 15): at ``target_macs``
0.5, >= 1.3x faster training steps, >= 20 % less peak training memory, <= 1 point accuracy loss
against the baseline, on both networks.

Writes ``benchmarks/results/compress.json``.

    pip install -e ".[bench]"
    python benchmarks/compress.py            # both networks, 3 seeds (~30 min on 2 cores)
    python benchmarks/compress.py --smoke --out /tmp/c   # digits CNN, 1 seed, 1+1 epochs, 0.5 only
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import qcd_fx
from qcd_fx.compress import compress
from qcd_fx.datasets import Data, load_data
from qcd_fx.examples import digits_cnn
from qcd_fx.train import fit, make_optimizer
from qcd_fx.train.loop import evaluate

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = (0.5, 0.25)
DISTILL = (0.5, 0.0)
GOALS = {"train_step_speedup": 1.3, "train_memory_reduction": 0.20, "max_accuracy_loss_points": 1.0}

RSS_CHILD = r"""
import gc, json, sys
import torch
torch.set_num_threads(1)
import qcd_fx

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

model = qcd_fx.load(sys.argv[1]).train()
shape, steps = json.loads(sys.argv[2]), int(sys.argv[3])
g = torch.Generator().manual_seed(0)
x, y = torch.randn(shape, generator=g), torch.randint(0, 10, (shape[0],), generator=g)
opt = torch.optim.Adam(model.parameters())
gc.collect()
with open("/proc/self/clear_refs", "w") as f:  # resets the peak (VmHWM) to the current RSS
    f.write("5")
before = status("VmRSS")
for _ in range(steps):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
print(json.dumps({"before_kib": before, "after_kib": status("VmHWM")}))
"""


def digits32() -> Data:
    """The digits upscaled to 32x32, three channels (what a small ImageNet-style network takes)."""
    d = load_data("digits")

    def up(t: torch.Tensor) -> torch.Tensor:
        return F.interpolate(t, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)

    (xt, yt), (xv, yv) = d.train.tensors, d.val.tensors
    return Data("digits@32x32", TensorDataset(up(xt), yt), TensorDataset(up(xv), yv), "test", d.num_classes)


def resnet18_10() -> torch.nn.Module:
    from torchvision.models import resnet18

    return resnet18(num_classes=10)


NETWORKS = {"digits_cnn": (digits_cnn, lambda: load_data("digits")), "resnet18@32": (resnet18_10, digits32)}


def pretrain(build, data: Data, epochs: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build()
    train, val = data.loaders(64, seed=seed)
    fit(model, train, make_optimizer("adam", model.parameters(), seed=seed), epochs, val_loader=val, progress=False, val_name=data.val_name)
    return model.eval()


def accuracy(model: torch.nn.Module, data: Data) -> float:
    _, val = data.loaders(64)
    return evaluate(model.eval(), val)["accuracy"]


def peak_rss(paths: dict[str, str], shape: list[int], steps: int, repeats: int) -> dict[str, dict]:
    """Peak-RSS growth (KiB) of ``steps`` training steps in a fresh process per model, alternated."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    grow: dict[str, list[int]] = {k: [] for k in paths}
    for _ in range(repeats):
        for key, path in paths.items():
            out = subprocess.run([sys.executable, "-c", RSS_CHILD, path, json.dumps(shape), str(steps)], capture_output=True, text=True, env=env, timeout=600)
            if out.returncode:
                raise RuntimeError(f"peak-RSS child for {key} failed: {out.stderr.strip().splitlines()[-1:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            grow[key].append(r["after_kib"] - r["before_kib"])
    return {k: {"growth_kib": v, "median_growth_kib": statistics.median(v)} for k, v in grow.items()}


def mean_sd(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def summarize(rows: list[dict], baselines: list[dict], rss: dict) -> dict:
    out: dict = {}
    for net in dict.fromkeys(r["network"] for r in rows):
        base = {b["seed"]: b["accuracy"] for b in baselines if b["network"] == net}
        per: dict = {"baseline_accuracy": mean_sd(list(base.values()))}
        for target in dict.fromkeys(r["target_macs"] for r in rows if r["network"] == net):
            for distill in dict.fromkeys(r["distill"] for r in rows if r["network"] == net):
                sel = [r for r in rows if r["network"] == net and r["target_macs"] == target and r["distill"] == distill]
                if not sel:
                    continue
                loss = [100 * (base[r["seed"]] - r["accuracy"]) for r in sel]
                step = [r["before"]["train_step_ms"] / r["after"]["train_step_ms"] for r in sel]
                mem = [1 - r["after"]["train_memory_bytes"] / r["before"]["train_memory_bytes"] for r in sel]
                per[f"macs{target}_distill{distill}"] = {
                    "accuracy": mean_sd([r["accuracy"] for r in sel]),
                    "accuracy_loss_points": mean_sd(loss),
                    "macs_ratio": statistics.median(r["before"]["macs"] / r["after"]["macs"] for r in sel),
                    "params_ratio": statistics.median(r["before"]["params"] / r["after"]["params"] for r in sel),
                    "train_step_speedup": statistics.median(step),
                    "train_memory_reduction": statistics.median(mem),
                    "eager_speedup_batch8": statistics.median(r["before"]["eager_ms_batch8"] / r["after"]["eager_ms_batch8"] for r in sel),
                }
        if net in rss:
            r = rss[net]
            per["peak_rss_growth_kib"] = {k: v["median_growth_kib"] for k, v in r.items()}
            per["peak_rss_reduction"] = (
                1 - r["compressed"]["median_growth_kib"] / r["original"]["median_growth_kib"] if r["original"]["median_growth_kib"] else None
            )
        half = per.get(f"macs0.5_distill{DISTILL[0]}")
        if half:
            per["goals_at_0.5_with_distillation"] = {
                "train_step_speedup": half["train_step_speedup"] >= GOALS["train_step_speedup"],
                "train_memory_reduction": half["train_memory_reduction"] >= GOALS["train_memory_reduction"],
                "accuracy_loss": half["accuracy_loss_points"]["mean"] <= GOALS["max_accuracy_loss_points"],
            }
        out[net] = per
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--networks", default=",".join(NETWORKS), help=f"comma-separated, of {', '.join(NETWORKS)}")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--pretrain", type=int, default=6, help="epochs before compressing (default 6)")
    ap.add_argument("--finetune", type=int, default=4, help="fine-tuning epochs after pruning; the baseline trains as many more (default 4)")
    ap.add_argument("--rss-steps", type=int, default=20)
    ap.add_argument("--rss-repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="digits CNN, 1 seed, 1+1 epochs, target 0.5 with distillation only")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "compress"), help="path prefix (.json appended)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    targets, distills = TARGETS, DISTILL
    if args.smoke:
        args.networks, args.seeds, args.pretrain, args.finetune, args.rss_steps, args.rss_repeats = "digits_cnn", 1, 1, 1, 2, 1
        targets, distills = (0.5,), (0.5,)
    nets = [n.strip() for n in args.networks.split(",") if n.strip()]
    unknown = [n for n in nets if n not in NETWORKS]
    if unknown:
        ap.error(f"unknown network(s) {', '.join(unknown)}; choose from {', '.join(NETWORKS)}")
    t_start = time.perf_counter()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows, baselines, rss, latency_rows = [], [], {}, []
    for net in nets:
        build, make_data = NETWORKS[net]
        data = make_data()
        for seed in range(args.seeds):
            original = pretrain(build, data, args.pretrain, seed)
            baseline = copy.deepcopy(original).train()
            train, val = data.loaders(64, seed=seed + 1)
            fit(
                baseline, train, make_optimizer("adam", baseline.parameters(), seed=seed), args.finetune, val_loader=val, progress=False, val_name=data.val_name
            )
            b = {
                "network": net,
                "seed": seed,
                "accuracy": accuracy(baseline, data),
                "original_accuracy": accuracy(original, data),
                "epochs": args.pretrain + args.finetune,
            }
            baselines.append(b)
            print(f"{net} seed {seed}: original {100 * b['original_accuracy']:.2f} %, baseline ({b['epochs']} epochs) {100 * b['accuracy']:.2f} %", flush=True)
            for target in targets:
                for distill in distills:
                    t0 = time.perf_counter()
                    res = compress(original, data, target_macs=target, epochs=args.finetune, distill=distill, seed=seed, progress=False)
                    row = {
                        "network": net,
                        "seed": seed,
                        "target_macs": target,
                        "distill": distill,
                        "accuracy": res.after.accuracy,
                        "before": vars(res.before),
                        "after": vars(res.after),
                        "rounds": res.rounds,
                        "seconds": time.perf_counter() - t0,
                    }
                    rows.append(row)
                    a = res.after
                    print(
                        f"  target {target} distill {distill}: acc {100 * a.accuracy:.2f} % (baseline {100 * b['accuracy']:.2f}), "
                        f"MACs {res.before.macs / a.macs:.2f}x, step {res.before.train_step_ms / a.train_step_ms:.2f}x, "
                        f"train memory -{100 * (1 - a.train_memory_bytes / res.before.train_memory_bytes):.0f} %",
                        flush=True,
                    )
                    if target == 0.5 and distill == distills[0]:
                        # the same measured latency, reached by a latency target instead of a MACs target
                        same = res.after.eager_ms_batch1 / res.before.eager_ms_batch1
                        if 0 < same < 1:
                            lat = compress(original, data, target_latency=same, epochs=args.finetune, distill=distill, seed=seed, progress=False)
                            latency_rows.append(
                                {
                                    "network": net,
                                    "seed": seed,
                                    "target_latency": same,
                                    "macs_route": {"accuracy": res.after.accuracy, "eager_ms_batch1": res.after.eager_ms_batch1, "macs": res.after.macs},
                                    "latency_route": {
                                        "accuracy": lat.after.accuracy,
                                        "eager_ms_batch1": lat.after.eager_ms_batch1,
                                        "macs": lat.after.macs,
                                        "original_eager_ms_batch1": lat.before.eager_ms_batch1,
                                        "predicted": lat.rounds[-1].get("latency"),
                                    },
                                }
                            )
                            print(
                                f"  same latency ({same:.2f} of the original): target_macs route {100 * res.after.accuracy:.2f} %, "
                                f"target_latency route {100 * lat.after.accuracy:.2f} % ({lat.after.eager_ms_batch1 / lat.before.eager_ms_batch1:.2f} measured)",
                                flush=True,
                            )
                    if seed == 0 and target == 0.5 and distill == distills[0]:
                        with tempfile.TemporaryDirectory() as tmp:
                            paths = {"original": os.path.join(tmp, "original.pt"), "compressed": os.path.join(tmp, "compressed.pt")}
                            qcd_fx.save(qcd_fx.trace(copy.deepcopy(original)), paths["original"])
                            qcd_fx.save(res.graph_module, paths["compressed"])
                            shape = [64, *data.example(1).shape[1:]]
                            rss[net] = peak_rss(paths, shape, args.rss_steps, args.rss_repeats)
                        g = {k: v["median_growth_kib"] for k, v in rss[net].items()}
                        print(f"  peak RSS growth over {args.rss_steps} training steps (fresh process): {g}", flush=True)
    meta = {
        "command": "python benchmarks/compress.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "torch": torch.__version__,
        "qcd_fx": qcd_fx.__version__,
        "torchvision": importlib.metadata.version("torchvision"),
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": 1,
        "load_average_at_start": load_start,
        "seeds": args.seeds,
        "pretrain_epochs": args.pretrain,
        "finetune_epochs": args.finetune,
        "optimizer": "adam (qcd_fx defaults), batch 64",
        "prune": "cdg-prune{target_macs=..., criterion=l1}, one round",
        "distillation": "alpha=distill, T=2 (compress defaults)",
        "goals": GOALS,
        "elapsed_s": time.perf_counter() - t_start,
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    summary = summarize(rows, baselines, rss)
    for net in dict.fromkeys(r["network"] for r in latency_rows):
        sel = [r for r in latency_rows if r["network"] == net]
        summary[net]["latency_vs_macs_route_at_equal_latency"] = {
            "accuracy_macs_route": mean_sd([r["macs_route"]["accuracy"] for r in sel]),
            "accuracy_latency_route": mean_sd([r["latency_route"]["accuracy"] for r in sel]),
            "measured_latency_ratio_latency_route": statistics.median(
                r["latency_route"]["eager_ms_batch1"] / r["latency_route"]["original_eager_ms_batch1"] for r in sel
            ),
            "target_latency_ratio": statistics.median(r["target_latency"] for r in sel),
        }
    path = args.out if args.out.endswith(".json") else args.out + ".json"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "summary": summary, "baselines": baselines, "rows": rows, "peak_rss": rss, "latency_vs_macs": latency_rows}, f, indent=1)
    os.replace(tmp, path)
    print(json.dumps(summary, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
