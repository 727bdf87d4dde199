"""Cost of the qcd-fx pass pipeline over the torchvision zoo, and the overhead of QCI gates.

For every model (``--models``; default: all torchvision classification models):

* ``pass_s``: the passes ``qci,csc`` themselves (graph edits and gate construction), median of
  ``--repeats`` runs on fresh copies of the traced graph; ``pipeline_s`` adds the graph checks
  that need no forward pass (``graph.lint()`` and ``recompile()`` after each pass). Forward
  passes (shape propagation, drift, MACs) are excluded: they cost what the model costs.
  Measured at gate rank 8, where gate construction is negligible, and at full rank, where
  allocating the ``d x d`` projectors dominates for wide models.
* parameter and MAC overhead of the gates at full rank vs rank 8 (MACs from
  ``torch.utils.flop_counter`` at the small test input size; gate MACs scale with spatial
  positions as the convolutions do, so the ratio is close to the one at 224x224).

Inputs are the zoo's test sizes (``zoo.build(name, small=True)``: 64x64, ViTs 32x32 or 28x28,
Inception-v3 80x80, MaxViT 224x224; the ``input`` of each row). Single-threaded. Writes ``benchmarks/results/transform_cost.json`` and ``.md``.

    python benchmarks/transform_cost.py            # whole zoo (~10 min on 2 cores)
    python benchmarks/transform_cost.py --quick    # CI subset
    python benchmarks/transform_cost.py --smoke --out /tmp/tc   # one model, one repeat (tests)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch

import qcd_fx
from qcd_fx import zoo
from qcd_fx.analysis import count_macs, count_params
from qcd_fx.passes import Pipeline
from qcd_fx.passes.interface import gate_site

HERE = os.path.dirname(os.path.abspath(__file__))


def time_passes(gm, pipeline: Pipeline, repeats: int) -> tuple[float, float]:
    """Median seconds of (passes only, passes + lint + recompile) on fresh graph copies."""
    pass_times, total_times = [], []
    for _ in range(repeats):
        work = copy.deepcopy(gm)
        t0 = time.perf_counter()
        checks = 0.0
        for p in pipeline:
            work = p(work).graph_module
            t1 = time.perf_counter()
            work.graph.lint()
            work.recompile()
            checks += time.perf_counter() - t1
        total = time.perf_counter() - t0
        pass_times.append(total - checks)
        total_times.append(total)
        del work
    return statistics.median(pass_times), statistics.median(total_times)


def full_gate_params(gm) -> int:
    """Parameters that full-rank gates would add (d*d + 2d + 2 per wide call site)."""
    total = 0
    for node in gm.graph.nodes:
        if node.op == "call_module":
            site = gate_site(gm.get_submodule(node.target))
            if site and site[0] > 10:
                total += site[0] ** 2 + 2 * site[0] + 2
    return total


def measure(name: str, repeats: int, max_gate_params: int) -> dict:
    model, shape = zoo.build(name, small=True)
    x = torch.randn(shape)
    gm = qcd_fx.trace(model)
    row = {"model": name, "nodes": len(gm.graph.nodes), "input": list(shape), "params": count_params(gm), "macs": count_macs(gm, (x,))}
    extra = full_gate_params(gm)
    for label, spec in (("rank8", "qci{rank=8},csc"), ("full", "qci,csc")):
        if label == "full" and extra > max_gate_params:
            row[label] = {"skipped": f"full-rank gates would add {extra / 1e6:.0f}M parameters (> {max_gate_params / 1e6:.0f}M memory guard)"}
            continue
        pipeline = Pipeline.parse(spec)
        pass_s, pipeline_s = time_passes(gm, pipeline, repeats)
        result = pipeline.run(model, (x,))
        gates = result.report.passes[0].stats["gates"]
        row[label] = {
            "pass_s": pass_s,
            "pipeline_s": pipeline_s,
            "gates": gates,
            "params": result.report.final.params,
            "macs": result.report.final.macs,
            "param_overhead": result.report.final.params / row["params"] - 1,
            "mac_overhead": result.report.final.macs / row["macs"] - 1 if row["macs"] else None,
        }
        del result
        gc.collect()
    return row


def linear_fit(xs: list[float], ys: list[float]) -> dict:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    slope = sxy / sxx if sxx else 0.0
    icpt = my - slope * mx
    ss_res = sum((y - (icpt + slope * x)) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"seconds_per_1000_nodes": slope * 1000, "intercept_s": icpt, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}


def markdown(rows: list[dict], fit: dict) -> str:
    lines = [
        "| model | input | nodes | pass s (rank 8) | pass+lint+recompile s (rank 8) | pass s (full) | params +% full / r8 | MACs +% full / r8 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        f, e = r["full"], r["rank8"]
        size = "×".join(map(str, r["input"][2:]))
        if "skipped" in f:
            lines.append(f"| {r['model']} | {size} | {r['nodes']} | {e['pass_s']:.3f} | {e['pipeline_s']:.3f} | skipped | — / {e['param_overhead']:+.1%} | — / {e['mac_overhead']:+.1%} |")
            continue
        lines.append(
            f"| {r['model']} | {size} | {r['nodes']} | {e['pass_s']:.3f} | {e['pipeline_s']:.3f} | {f['pass_s']:.3f} | "
            f"{f['param_overhead']:+.1%} / {e['param_overhead']:+.1%} | {f['mac_overhead']:+.1%} / {e['mac_overhead']:+.1%} |"
        )
    lines.append("")
    lines.append(
        f"Linear fit of pass+lint+recompile time (rank 8) against node count: {fit['seconds_per_1000_nodes']:.3f} s per 1000 nodes, "
        f"intercept {fit['intercept_s'] * 1000:.1f} ms, R² = {fit['r2']:.3f}."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", help="torchvision model names (default: the whole zoo)")
    ap.add_argument("--quick", action="store_true", help="only the CI subset")
    ap.add_argument("--smoke", action="store_true", help="resnet18, one repeat: checks that the script runs")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-gate-params", type=float, default=150e6, help="skip full-rank gates above this many added parameters")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "transform_cost"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.smoke:
        args.models, args.repeats = ["resnet18"], 1
    names = args.models or (list(zoo.CI_SUBSET) if args.quick else zoo.classification_models())
    rows = []
    for name in names:
        row = measure(name, args.repeats, int(args.max_gate_params))
        rows.append(row)
        e, f = row["rank8"], row["full"]
        full = f"pass(full)={f['pass_s']:.3f}s params +{f['param_overhead']:.1%} MACs +{f['mac_overhead']:.1%}" if "pass_s" in f else f["skipped"]
        print(
            f"{name:24s} nodes={row['nodes']:5d} pass(r8)={e['pass_s']:.3f}s pipeline(r8)={e['pipeline_s']:.3f}s "
            f"params(r8) +{e['param_overhead']:.1%} MACs(r8) +{e['mac_overhead']:.1%} | {full}",
            flush=True,
        )
    fit = linear_fit([r["nodes"] for r in rows], [r["rank8"]["pipeline_s"] for r in rows])
    resnet50 = next((r for r in rows if r["model"] == "resnet50"), None)
    summary = {
        "fit": fit,
        "resnet50_pipeline_s": resnet50 and resnet50["rank8"]["pipeline_s"],
        "resnet50_pipeline_full_s": resnet50 and resnet50["full"].get("pipeline_s"),
        "max_pipeline_s_rank8": max(r["rank8"]["pipeline_s"] for r in rows),
        "median_mac_overhead_full": statistics.median(r["full"]["mac_overhead"] for r in rows if "mac_overhead" in r["full"]),
        "median_mac_overhead_rank8": statistics.median(r["rank8"]["mac_overhead"] for r in rows),
        "median_param_overhead_full": statistics.median(r["full"]["param_overhead"] for r in rows if "param_overhead" in r["full"]),
        "full_rank_skipped": [r["model"] for r in rows if "skipped" in r["full"]],
        "median_param_overhead_rank8": statistics.median(r["rank8"]["param_overhead"] for r in rows),
    }
    meta = {"torch": torch.__version__, "python": sys.version.split()[0], "machine": platform.machine(), "threads": 1, "repeats": args.repeats}
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "summary": summary, "rows": rows}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(rows, fit))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
