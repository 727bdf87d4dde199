"""Structural pruning, side by side with Torch-Pruning, and CDG vs magnitude vs random on digits.

Part 1 (``--zoo``): for each model at its native input size, prune at ratio 0.5 with qcd-fx
(``cdg-prune``, criterion ``l1`` and the default ``cdg``) and with Torch-Pruning following its
own torchvision recipe (``benchmarks/prunability/torchvision_pruning.py`` in its repository:
``MagnitudeImportance(p=1)``, final 1000-way Linear and attention out-projections ignored,
``round_to=num_heads`` for ViT, ``model.hidden_dim`` patched afterwards). Then, single-threaded:
MACs (``torch.utils.flop_counter``), params, and latency at batch 1 and 8 — original, qcd-fx and
Torch-Pruning interleaved round by round, median of ``--repeats`` — and the realised-speedup
efficiency = latency speedup / MACs ratio. A Torch-Pruning result whose output width changed
(e.g. SqueezeNet's Conv2d classifier pruned to 500 classes) counts as a failure. Torch-Pruning
runs in a forked child capped at ``TP_MEMORY_GB`` of address space and ``TP_TIMEOUT_S`` seconds
(on swin_t its shape inference otherwise recurses until it has taken all the memory and the
kernel kills the benchmark).

Prune times are end to end: ``qcd_fx.transform`` with its tracing, shape propagation and per-pass
checks (``transform_wall_s``; ``prune_s`` is the pass alone) and Torch-Pruning's dependency graph
plus ``step()`` (``tp.prune_s``).

Part 2 (``--digits``): the digits CNN trained (Adam, cosine, 12 epochs), pruned at 0.5 and 0.75
with ``cdg``, ``l1`` and ``random``, fine-tuned equally (10 epochs), 3 seeds: test accuracy
(mean ± sample SD over seeds in the ``.md``).

Writes ``benchmarks/results/prune.json`` and ``prune.md``.

    pip install -e ".[bench]"
    python benchmarks/prune.py                 # both parts (~30 min on 2 cores)
    python benchmarks/prune.py --quick         # 4 models, batch 1, 10 repeats; digits 1 seed
    python benchmarks/prune.py --smoke --out /tmp/pr   # resnet18, 1 repeat; digits 1 seed, 1+1 epochs, ratio 0.5
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings

import torch
from torch import nn

import qcd_fx
from qcd_fx import zoo
from qcd_fx.analysis import count_macs, count_params

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = (
    "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "vgg11_bn", "densenet121", "efficientnet_b0",
    "regnet_x_400mf", "shufflenet_v2_x1_0", "squeezenet1_1", "googlenet", "convnext_tiny", "vit_b_16", "swin_t",
)  # fmt: skip
TP_MEMORY_GB = 8  # Torch-Pruning's address-space cap per model (the machine has 24 GiB)
TP_TIMEOUT_S = 120  # and its time limit (its slowest success here, DenseNet-121 / VGG-11, takes ~5 s)
QUICK = ("resnet18", "mobilenet_v2", "shufflenet_v2_x1_0", "squeezenet1_1")


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    import torchvision.models as tvm

    kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = tvm.get_model(name, weights=None, **kwargs).eval()
    zoo.randomize_zero_weights(model)
    size = zoo.input_size(name)
    return model, torch.randn(1, 3, size, size)


def prune_qcd(model: nn.Module, x: torch.Tensor, criterion: str) -> tuple[nn.Module, float, float]:
    t0 = time.perf_counter()
    result = qcd_fx.transform(model, f"cdg-prune{{ratio=0.5,criterion={criterion}}}", example_inputs=x)
    wall = time.perf_counter() - t0
    return result.graph_module.eval(), result.report.passes[0].seconds, wall


def prune_tp(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, float]:
    import torch_pruning as tp
    from torchvision.models.vision_transformer import VisionTransformer

    model = copy.deepcopy(model)
    ignored = [m for m in model.modules() if (isinstance(m, nn.Linear) and m.out_features == 1000) or isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear)]
    round_to = model.encoder.layers[0].num_heads if isinstance(model, VisionTransformer) else None
    t0 = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(
        model, example_inputs=x, importance=tp.importance.MagnitudeImportance(p=1), iterative_steps=1,
        pruning_ratio=0.5, round_to=round_to, ignored_layers=ignored,
    )  # fmt: skip
    pruner.step()
    if isinstance(model, VisionTransformer):
        model.hidden_dim = model.conv_proj.out_channels
    return model.eval(), time.perf_counter() - t0


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def prune_tp_isolated(name: str, mem_gb: float | None = None, timeout_s: float | None = None) -> tuple[nn.Module, float]:
    """:func:`prune_tp` on ``build(name)`` in a child process (``--tp-child``), killed when its
    resident memory passes ``mem_gb`` or it runs longer than ``timeout_s``.

    Torch-Pruning's shape inference on swin_t at 224x224 recurses until it has taken all 24 GiB
    and the kernel kills the whole benchmark; in a child it is one failed row instead. The child
    builds the same model (same seed, same weights) and hands the pruned module back through a
    temporary file (a pickled module: this benchmark's own object).
    """
    import subprocess
    import tempfile

    mem_gb = TP_MEMORY_GB if mem_gb is None else mem_gb
    timeout_s = TP_TIMEOUT_S if timeout_s is None else timeout_s
    fd, path = tempfile.mkstemp(suffix=".pt")
    os.close(fd)
    try:
        child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--tp-child", name, path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while child.poll() is None:
            reason = None
            if _rss_bytes(child.pid) > mem_gb * 2**30:
                reason = f"used more than {mem_gb:g} GiB of memory"
            elif time.monotonic() > deadline:
                reason = f"did not finish within {timeout_s:g} s"
            if reason:
                child.kill()
                child.wait()
                raise MemoryError(f"Torch-Pruning {reason} (stopped)")
            time.sleep(0.05)
        with open(path, "rb") as f:
            head = f.read(6)
        if head == b"ERROR ":
            with open(path) as f:
                raise RuntimeError(f.read()[6:])
        if child.returncode != 0:
            raise RuntimeError(f"Torch-Pruning child exited with code {child.returncode}")
        data = torch.load(path, weights_only=False)
        return data["model"].eval(), data["seconds"]
    finally:
        os.unlink(path)


def _tp_child(name: str, path: str) -> None:
    torch.set_num_threads(1)
    try:
        model, x = build(name)
        pruned, seconds = prune_tp(model, x)
        torch.save({"model": pruned, "seconds": seconds}, path)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        with open(path, "w") as f:
            f.write("ERROR " + f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        raise SystemExit(1) from None


def latencies(variants: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median latency per variant; variants run interleaved, one call each per round, in an
    order rotated every round (no variant always follows the same one)."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    keys = list(variants)
    with torch.inference_mode():
        for m in variants.values():  # warm-up
            m(x)
            m(x)
        for r in range(repeats):
            for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
                t0 = time.perf_counter()
                variants[k](x)
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def zoo_part(names, repeats: int, batches: tuple[int, ...]) -> list[dict]:
    rows = []
    for name in names:
        model, x = build(name)
        row: dict = {"model": name, "input": list(x.shape), "macs": count_macs(model, (x,)), "params": count_params(model)}
        variants = {"original": model}
        for criterion in ("l1", "cdg"):
            try:
                gm, pass_s, wall = prune_qcd(model, x, criterion)
                row[f"qcd_{criterion}"] = {"ok": True, "prune_s": pass_s, "transform_wall_s": wall, "macs": count_macs(gm, (x,)), "params": count_params(gm)}
                if criterion == "l1":
                    variants["qcd"] = gm
            except Exception as e:  # noqa: BLE001 - a failure is a result here
                row[f"qcd_{criterion}"] = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        try:
            pruned, seconds = prune_tp_isolated(name)
            with torch.no_grad():
                width = pruned(x).shape[-1]
            ok = width == 1000
            row["tp"] = {"ok": ok, "prune_s": seconds, "macs": count_macs(pruned, (x,)), "params": count_params(pruned)}
            if not ok:
                row["tp"]["error"] = f"output width changed 1000 -> {width}"
            else:
                variants["tp"] = pruned
                # same l1 scores and rounding: the two libraries should keep the same widths, in which
                # case any latency difference is timing noise or Python dispatch, not the network
                row["same_widths_as_tp"] = sorted(tuple(p.shape) for p in variants["qcd"].parameters()) == sorted(tuple(p.shape) for p in pruned.parameters()) if "qcd" in variants else None
        except Exception as e:  # noqa: BLE001 - Torch-Pruning's failures are results too
            row["tp"] = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
            traceback.print_exc(limit=1)
        for b in batches:
            xb = x.expand(b, *x.shape[1:]).contiguous()
            lat = latencies(variants, xb, repeats)
            row[f"latency_b{b}"] = lat
            for key, entry in (("qcd", "qcd_l1"), ("tp", "tp")):
                if key in lat:
                    speedup = lat["original"] / lat[key]
                    macs_ratio = row["macs"] / row[entry]["macs"]
                    row[entry][f"speedup_b{b}"] = speedup
                    row[entry][f"efficiency_b{b}"] = speedup / macs_ratio
        rows.append(row)
        q, t = row["qcd_l1"], row["tp"]
        print(
            f"{name:20s} qcd: {'ok' if q['ok'] else 'FAIL'} MACs x{row['macs'] / q.get('macs', row['macs']):.2f} "
            f"eff b1 {q.get('efficiency_b1', float('nan')):.2f} prune {q.get('prune_s', float('nan')):.2f}s (cdg {row['qcd_cdg'].get('prune_s', float('nan')):.2f}s) | "
            f"TP: {'ok' if t['ok'] else 'FAIL ' + t.get('error', '')[:60]} "
            + (f"MACs x{row['macs'] / t['macs']:.2f} eff b1 {t.get('efficiency_b1', float('nan')):.2f} prune {t['prune_s']:.2f}s" if t["ok"] else ""),
            flush=True,
        )
    return rows


def digits_part(seeds: int, ratios=(0.5, 0.75), train_epochs: int = 12, finetune_epochs: int = 10) -> dict:
    from qcd_fx.data import load_digits_split, tensor_loader
    from qcd_fx.examples import digits_cnn

    split = load_digits_split()

    def train(model, epochs, lr, seed):
        torch.manual_seed(seed)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        loader = tensor_loader(split.x_train, split.y_train, batch_size=64, shuffle=True, seed=seed)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(loader))
        for _ in range(epochs):
            model.train()
            for xb, yb in loader:
                opt.zero_grad()
                nn.functional.cross_entropy(model(xb), yb).backward()
                opt.step()
                sched.step()
        model.eval()
        with torch.no_grad():
            return float((model(split.x_test).argmax(1) == split.y_test).float().mean())

    calibration = [split.x_train[i : i + 128] for i in range(0, 512, 128)]
    results: dict = {"full": [], "pruned": {}}
    for seed in range(seeds):
        torch.manual_seed(seed)
        model = digits_cnn()
        results["full"].append(train(model, train_epochs, 3e-3, seed))
        for ratio in ratios:
            for crit in ("cdg", "l1", "random"):
                r = qcd_fx.transform(model.eval(), f"cdg-prune{{ratio={ratio},criterion={crit},seed={seed}}}", example_inputs=split.x_train[:8], calibration=calibration)
                with torch.no_grad():
                    before = float((r.graph_module.eval()(split.x_test).argmax(1) == split.y_test).float().mean())
                after = train(r.graph_module, finetune_epochs, 3e-3, seed + 100)
                results["pruned"].setdefault(f"{crit}@{ratio}", []).append({"before_finetune": before, "after_finetune": after})
        print(f"digits seed {seed}: full {results['full'][-1]:.4f} " + " ".join(f"{k} {v[-1]['after_finetune']:.4f}" for k, v in results["pruned"].items()), flush=True)
    return results


def _pair(a: dict, b: dict, key: str) -> str:
    return f"{a.get(key, float('nan')):.2f} / {b.get(key, float('nan')):.2f}"


def _percent(xs: list[float]) -> str:
    """Mean ± sample SD (n - 1) of accuracies, in percent."""
    sd = f" ± {100 * statistics.stdev(xs):.2f}" if len(xs) > 1 else ""
    return f"{100 * statistics.mean(xs):.2f}{sd} %"


def markdown(rows: list[dict], digits: dict | None) -> str:
    out = []
    if rows:
        out += [
            ("| model | qcd-fx MACs ÷ | TP MACs ÷ | same widths | qcd-fx eff. b1 / b8 | TP eff. b1 / b8 "
             "| qcd-fx end to end s (l1 / cdg) | qcd-fx pass s (l1 / cdg) | TP end to end s |"),
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            q, c, t = r["qcd_l1"], r["qcd_cdg"], r["tp"]

            def eff(e):
                return f"{e.get('efficiency_b1', float('nan')):.2f} / {e.get('efficiency_b8', float('nan')):.2f}" if e.get("ok") else "—"

            out.append(
                f"| {r['model']} | {r['macs'] / q['macs']:.2f} | "
                + (f"{r['macs'] / t['macs']:.2f}" if t.get("ok") else f"fails: {t.get('error', '')[:50]}")
                + f" | {({True: 'yes', False: 'no'}).get(r.get('same_widths_as_tp'), '—')}"
                + f" | {eff(q)} | {eff(t)} | {_pair(q, c, 'transform_wall_s')} | {_pair(q, c, 'prune_s')} | "
                + (f"{t['prune_s']:.2f}" if "prune_s" in t else "—")
                + " |"
            )
    if digits:
        out += ["", "| digits CNN, test accuracy (mean ± sample SD over seeds) | before fine-tune | after fine-tune |", "|---|---:|---:|"]
        out.append(f"| unpruned | — | {_percent(digits['full'])} |")
        for k, v in digits["pruned"].items():
            out.append(f"| {k} | {_percent([x['before_finetune'] for x in v])} | {_percent([x['after_finetune'] for x in v])} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-zoo", action="store_true")
    ap.add_argument("--no-digits", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="resnet18, one repeat, digits 1 seed and 1+1 epochs: checks that the script runs")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "prune"))
    ap.add_argument("--tp-child", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)  # internal: see prune_tp_isolated
    args = ap.parse_args()
    if args.tp_child:
        _tp_child(*args.tp_child)
        return
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # random-init activations can underflow; denormals would skew latency
    if args.smoke:
        args.models, args.repeats, args.seeds = ["resnet18"], 1, 1
    names = args.models or (QUICK if args.quick else MODELS)
    batches = (1,) if args.quick or args.smoke else (1, 8)
    rows = [] if args.no_zoo else zoo_part(names, args.repeats, batches)
    digits_args = {"ratios": (0.5,), "train_epochs": 1, "finetune_epochs": 1} if args.smoke else {}
    digits = None if args.no_digits else digits_part(1 if args.quick else args.seeds, **digits_args)
    summary = {}
    if rows:
        both = [r for r in rows if r["qcd_l1"].get("ok") and r["tp"].get("ok")]
        summary = {
            "qcd_pruned": sum(r["qcd_l1"]["ok"] for r in rows),
            "tp_pruned": sum(r["tp"]["ok"] for r in rows),
            "models": len(rows),
            "qcd_max_prune_s_l1": max(r["qcd_l1"].get("prune_s", 0) for r in rows),
            "qcd_max_prune_s_cdg": max(r["qcd_cdg"].get("prune_s", 0) for r in rows),
            "efficiency_not_below_tp_b1": sum(r["qcd_l1"]["efficiency_b1"] >= r["tp"]["efficiency_b1"] for r in both),
            "both_pruned": len(both),
            "same_widths_as_tp": sum(bool(r.get("same_widths_as_tp")) for r in both),
        }
        for b in batches:  # like with like: the models both libraries prune
            summary[f"qcd_median_efficiency_b{b}_on_both"] = statistics.median(r["qcd_l1"][f"efficiency_b{b}"] for r in both) if both else None
            summary[f"tp_median_efficiency_b{b}_on_both"] = statistics.median(r["tp"][f"efficiency_b{b}"] for r in both) if both else None
        for b in batches:
            qs = [r["qcd_l1"][f"efficiency_b{b}"] for r in rows if r["qcd_l1"].get("ok")]
            ts = [r["tp"][f"efficiency_b{b}"] for r in rows if r["tp"].get("ok")]
            summary[f"qcd_median_efficiency_b{b}"] = statistics.median(qs) if qs else None
            summary[f"tp_median_efficiency_b{b}"] = statistics.median(ts) if ts else None
    meta = {"torch": torch.__version__, "python": sys.version.split()[0], "machine": platform.machine(), "threads": 1, "repeats": args.repeats, "flush_denormal": True}
    try:
        meta["torch_pruning"] = importlib.metadata.version("torch-pruning")  # 1.6.0 has no __version__
    except importlib.metadata.PackageNotFoundError:
        pass
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "summary": summary, "rows": rows, "digits": digits}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(rows, digits))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
