"""1 vs 2 processes (one thread each) side by side: QIMAD's agents split over ranks, DDP
fine-tuning, and distributed cdg-prune calibration.

Every workload runs in fresh worker processes started by PyTorch's own launcher
(``torch.distributed.run`` on loopback, gloo, ``OMP_NUM_THREADS=1``: the command ``qcd-fx train
--nproc N`` uses), with 1 and then 2 workers, alternated ``--repeats`` times; medians. Times are
measured inside the workers, after a warm-up, so process start-up and imports are not counted.

* ``qimad_cnn``: QIMAD with 8 agents on the digits CNN; seconds per epoch (epochs after the first).
  The agents are independent between exchanges, so the floor is 2x on 2 cores less the all-gather
  of each agent's gradient (4 bytes x parameters per agent per step) and the replicated move.
* ``ddp_cnn`` / ``ddp_resnet18``: Adam through ``fit`` under DDP, global batch 64, on the digits CNN
  (8x8) and on ResNet-18 (10 classes) on the digits upscaled to 32x32; seconds per epoch. The
  all-reduce moves every gradient once per step (4 bytes x parameters); the JSON gives those
  bytes and the forward+backward MACs of a step (3x forward) beside the speed-up.
* ``calibration``: ``cdg-prune`` (criterion ``cdg``) calibration of ResNet-18 at 32x32 on 16 batches
  of 32, the batches split over the ranks; seconds of the pass.

Writes ``benchmarks/results/distributed.json``.

    pip install -e ".[bench]"
    python benchmarks/distributed.py            # all workloads, 3 repeats (~15 min on 2 cores)
    python benchmarks/distributed.py --smoke --out /tmp/d   # qimad_cnn and ddp_cnn, 1 epoch, 1 repeat
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
WORKLOADS = ("qimad_cnn", "ddp_cnn", "ddp_resnet18", "calibration")

WORKER = r"""
import json, sys, time, warnings
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset
warnings.simplefilter("ignore")
torch.set_num_threads(1)
from qcd_fx import distributed
from qcd_fx.analysis import count_macs, count_params
from qcd_fx.datasets import Data, load_data
from qcd_fx.examples import digits_cnn
from qcd_fx.train import fit, make_optimizer

workload, epochs, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
distributed.init_from_env("gloo")
torch.manual_seed(0)

def digits32():
    d = load_data("digits")
    up = lambda t: F.interpolate(t, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    (xt, yt), (xv, yv) = d.train.tensors, d.val.tensors
    return Data("digits@32", TensorDataset(up(xt), yt), TensorDataset(up(xv), yv), "test", 10)

result = {"world": distributed.world()}
if workload == "calibration":
    import qcd_fx
    from torchvision.models import resnet18
    data = digits32()
    model = resnet18(num_classes=10).eval()
    batches = data.batches(16, 32)
    mine = batches[distributed.rank()::distributed.world()]
    x = batches[0][0][:2]
    qcd_fx.transform(model, "cdg-prune{ratio=0.5}", example_inputs=(x,), calibration=mine[:1])  # warm-up
    if distributed.active():
        torch.distributed.barrier()
    t0 = time.perf_counter()
    r = qcd_fx.transform(model, "cdg-prune{ratio=0.5}", example_inputs=(x,), calibration=mine)
    result["seconds"] = time.perf_counter() - t0
    result["widths"] = r.report.passes[0].stats.get("widths")
else:
    if workload == "ddp_resnet18":
        from torchvision.models import resnet18
        model, data = resnet18(num_classes=10), digits32()
    else:
        model, data = digits_cnn(), load_data("digits")
    name = "qimad" if workload == "qimad_cnn" else "adam"
    opt = make_optimizer(name, model.parameters(), seed=0)  # QIMAD: its default 8 agents
    train, _ = data.loaders(64, seed=0)
    x = data.example(64 // distributed.world())
    result["params"] = count_params(model)
    result["step_macs_per_rank"] = 3 * count_macs(model.eval(), (x,))
    h = fit(model, train, opt, epochs, progress=False)
    result["epoch_seconds"] = [e.seconds for e in h.epochs]
    result["train_loss"] = [e.train_loss for e in h.epochs]
if distributed.is_main():
    with open(out, "w") as f:
        json.dump(result, f)
distributed.finish()
"""


def run(workload: str, nproc: int, epochs: int, tmp: str) -> dict:
    from qcd_fx.cli.train import launcher

    script = os.path.join(tmp, "worker.py")
    if not os.path.exists(script):
        with open(script, "w") as f:
            f.write(WORKER)
    out = os.path.join(tmp, f"{workload}-{nproc}.json")
    cmd, env = launcher(nproc)
    env = {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, script, workload, str(epochs), out], env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip()][-3:]
        raise RuntimeError(f"{workload} on {nproc} process(es) failed: {' | '.join(tail)}")
    with open(out) as f:
        return json.load(f)


def per_epoch(r: dict) -> float:
    secs = r["epoch_seconds"]
    return statistics.median(secs[1:] if len(secs) > 1 else secs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--epochs", type=int, default=3, help="epochs per run (the first is a warm-up; default 3)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="qimad_cnn and ddp_cnn, 1 epoch, 1 repeat")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "distributed"), help="path prefix (.json appended)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.workloads, args.epochs, args.repeats = "qimad_cnn,ddp_cnn", 1, 1
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if set(names) - set(WORKLOADS):
        ap.error(f"unknown workload(s) {', '.join(sorted(set(names) - set(WORKLOADS)))}; choose from {', '.join(WORKLOADS)}")
    t_start = time.perf_counter()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            runs: dict[int, list[dict]] = {1: [], 2: []}
            for _ in range(args.repeats):
                for nproc in (1, 2):  # alternated: the machine's drift hits both alike
                    runs[nproc].append(run(name, nproc, args.epochs, tmp))
            if name == "calibration":
                t = {n: statistics.median(r["seconds"] for r in rs) for n, rs in runs.items()}
                row = {"seconds": t, "speedup": t[1] / t[2], "same_widths": runs[1][0]["widths"] == runs[2][0]["widths"], "runs": runs}
            else:
                t = {n: statistics.median(per_epoch(r) for r in rs) for n, rs in runs.items()}
                r1 = runs[1][0]
                row = {
                    "epoch_seconds": t,
                    "speedup": t[1] / t[2],
                    "params": r1["params"],
                    "gradient_bytes_per_step": 4 * r1["params"],
                    "step_macs_one_process": r1["step_macs_per_rank"],
                    "step_macs_per_rank_two_processes": runs[2][0]["step_macs_per_rank"],
                    "train_loss_max_abs_diff": max(abs(a - b) for a, b in zip(runs[1][0]["train_loss"], runs[2][0]["train_loss"])),
                    "runs": runs,
                }
                if name == "qimad_cnn":
                    row["gradient_bytes_per_step"] = 8 * 4 * r1["params"]  # every agent's gradient row, all-gathered
            rows[name] = row
            print(f"{name:14s} 1 process {t[1]:.3f} s, 2 processes {t[2]:.3f} s: {row['speedup']:.2f}x", flush=True)
    meta = {
        "command": "python benchmarks/distributed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads_per_process": 1,
        "backend": "gloo on loopback, torch.distributed.run (c10d rendezvous)",
        "epochs": args.epochs,
        "repeats": args.repeats,
        "load_average_at_start": load_start,
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "elapsed_s": time.perf_counter() - t_start,
    }
    summary = {k: round(v["speedup"], 3) for k, v in rows.items()}
    path = args.out if args.out.endswith(".json") else args.out + ".json"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"meta": meta, "summary": summary, "rows": rows}, f, indent=1)
    os.replace(path + ".tmp", path)
    print(json.dumps(summary))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
