"""Cost of loading a qcd-fx GraphModule file: ``qcd_fx.load`` vs its floor, ``torch.load``.

For each model (``--models``; default ResNet-50 and ViT-B/16 at 224x224, transformed with
``qci,csc``), the file is saved once, then two loaders run interleaved ``--repeats`` times:

* ``torch_load_s``: ``torch.load(path, weights_only=True)`` — reading and unpickling the bytes,
  the floor of any loader of this file;
* ``qcd_load_s``: ``qcd_fx.load(path)`` — the same read, plus checking every node, name and module
  against the format's rules (``qcd_fx/safe_graph.py``) and building the GraphModule.

Medians are reported with their ratio. ``rules_table_s`` is the one-time cost of building the
table of allowed functions (paid by the first load in a process). Single-threaded. Writes
``benchmarks/results/load_time.json``.

    python benchmarks/load_time.py
    python benchmarks/load_time.py --smoke --out /tmp/lt.json   # squeezenet1_1, one repeat (tests)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

import qcd_fx
from qcd_fx import io, safe_graph, zoo


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet50,vit_b_16")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--smoke", action="store_true", help="squeezenet1_1, one repeat: checks that the script runs")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "load_time.json"))
    args = ap.parse_args(argv)
    if args.smoke:
        args.models, args.repeats = "squeezenet1_1", 1
    torch.set_num_threads(1)

    safe_graph._value_functions.cache_clear()
    t0 = time.perf_counter()
    safe_graph._value_functions()
    table_s = time.perf_counter() - t0

    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in args.models.split(","):
            model, shape = zoo.build(name)
            gm = qcd_fx.transform(model, "qci,csc", example_inputs=torch.randn(shape)).graph_module
            path = os.path.join(d, f"{name}.pt")
            io.save(gm, path)
            size = os.path.getsize(path)
            nodes = len(gm.graph.nodes)
            del model, gm
            gc.collect()
            times: dict[str, list[float]] = {"torch_load_s": [], "qcd_load_s": []}
            loaders = {"torch_load_s": lambda p=path: torch.load(p, weights_only=True), "qcd_load_s": lambda p=path: io.load(p)}
            for _ in range(args.repeats):
                for key, load in loaders.items():
                    gc.collect()
                    t0 = time.perf_counter()
                    obj = load()
                    times[key].append(time.perf_counter() - t0)
                    del obj
            row = {"model": name, "file_bytes": size, "nodes": nodes, **{k: statistics.median(v) for k, v in times.items()}, "raw": times}
            row["ratio"] = row["qcd_load_s"] / row["torch_load_s"]
            row["rules_and_build_s"] = row["qcd_load_s"] - row["torch_load_s"]
            rows.append(row)
            print(
                f"{name:>12}: {size / 2**20:7.1f} MiB, {nodes} nodes  torch.load {row['torch_load_s'] * 1e3:7.1f} ms  "
                f"qcd_fx.load {row['qcd_load_s'] * 1e3:7.1f} ms  ratio {row['ratio']:.2f}  (+{row['rules_and_build_s'] * 1e3:.1f} ms)"
            )
    print(f"rules table (first load in a process): {table_s * 1e3:.1f} ms")
    result = {
        "command": "python benchmarks/load_time.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": 1,
        "repeats": args.repeats,
        "rules_table_s": table_s,
        "models": rows,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
