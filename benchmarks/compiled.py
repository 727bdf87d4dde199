"""Pruned models under ``torch.compile``: eager vs compiled latency, original vs pruned.

For each model (transformers models from mid-sized configs, random weights, captured with
``torch.export``; a torchvision ResNet-18 captured with fx): ``cdg-prune{ratio=0.5,criterion=l1}``,
then four variants timed interleaved (a, b, c, d, a, b, ...), single-threaded, medians of
``--repeats``: original eager, original compiled, pruned eager, pruned compiled
(``torch.compile(backend="inductor", dynamic=False)``, compiled once before timing; compile time
recorded). The physics floor of the pruned model's speed-up is its MACs ratio (the arithmetic that
is left); the table shows how much of it eager and compiled execution realise. Compiled outputs
are checked against eager (max abs difference).

Writes ``benchmarks/results/compiled.json``.

    pip install -e ".[bench]"
    python benchmarks/compiled.py                 # 5 models, batch 1 and 8 (~15 min on 2 cores)
    python benchmarks/compiled.py --smoke --out /tmp/c   # one tiny BERT, batch 1, 2 repeats, aot_eager
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
import warnings

import torch

import qcd_fx
from qcd_fx.analysis import count_macs, count_params

HERE = os.path.dirname(os.path.abspath(__file__))
SPEC = "cdg-prune{ratio=0.5,criterion=l1}"
TOKENS = 128


def _hf(name: str, hidden: int, layers: int, heads: int, inter: int):
    import transformers as T

    common = dict(vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter)
    if name == "bert":
        return T.BertForSequenceClassification(T.BertConfig(max_position_embeddings=TOKENS, **common)), "ids"
    if name == "gpt2":
        cfg = T.GPT2Config(vocab_size=1000, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=inter, n_positions=TOKENS, use_cache=False)
        return T.GPT2LMHeadModel(cfg), "ids"
    if name == "llama":  # grouped-query attention: heads // 2 key/value heads
        return T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=heads // 2, max_position_embeddings=TOKENS, use_cache=False, **common)), "ids"
    if name == "vit":
        cfg = T.ViTConfig(image_size=64, patch_size=8, num_labels=10, **{k: v for k, v in common.items() if k != "vocab_size"})
        return T.ViTForImageClassification(cfg), "image64"
    raise ValueError(name)


def build(name: str, smoke: bool) -> tuple[torch.nn.Module, str, str]:
    """(model in eval mode, input kind, capture front end)."""
    torch.manual_seed(0)
    if name == "resnet18":
        from torchvision.models import resnet18

        return resnet18(num_classes=10).eval(), "image112", "fx"
    size = (32, 1, 4, 64) if smoke else (256, 4, 8, 1024)
    model, kind = _hf(name, *size)
    return model.eval(), kind, "export"


def make_input(kind: str, batch: int, tokens: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if kind == "ids":
        return torch.randint(0, 1000, (batch, tokens), generator=g)
    side = int(kind.removeprefix("image"))
    return torch.randn(batch, 3, side, side, generator=g)


def main_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return out["logits"]
    return out[0]


def measure(name: str, batches: list[int], repeats: int, smoke: bool, backend: str) -> dict:
    model, kind, front = build(name, smoke)
    tokens = 16 if smoke else TOKENS
    x_cap = make_input(kind, 2, tokens)
    row: dict = {"model": name, "capture": front, "input": kind if kind != "ids" else f"token ids, {tokens} tokens", "params": count_params(model)}
    t0 = time.perf_counter()
    base = qcd_fx.trace(model, (x_cap,), capture=front)
    result = qcd_fx.transform(copy.deepcopy(base), SPEC, example_inputs=(x_cap,), capture=front)
    row["prune_s"] = time.perf_counter() - t0
    pruned = result.graph_module.eval()
    row.update(
        macs=count_macs(base, (make_input(kind, 1, tokens),)),
        macs_pruned=count_macs(pruned, (make_input(kind, 1, tokens),)),
        params_pruned=count_params(pruned),
    )
    row["macs_ratio"] = row["macs"] / row["macs_pruned"]
    variants = {"original": base, "pruned": pruned}
    compiled = {}
    row["compile_s"] = {}
    for key, gm in variants.items():
        c = torch.compile(gm, backend=backend, dynamic=False)
        t0 = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                c(make_input(kind, b, tokens))
        row["compile_s"][key] = time.perf_counter() - t0
        compiled[key] = c
    row["batches"] = {}
    for b in batches:
        x = make_input(kind, b, tokens)
        fns = {}
        diffs = {}
        with torch.no_grad():
            for key in variants:
                e, c = main_tensor(variants[key](x)), main_tensor(compiled[key](x))
                diffs[key] = float((e - c).abs().max())
                fns[f"{key}_eager"] = lambda m=variants[key]: m(x)
                fns[f"{key}_compiled"] = lambda m=compiled[key]: m(x)
            times: dict[str, list[float]] = {k: [] for k in fns}
            for fn in fns.values():  # warm-up
                fn()
            for _ in range(repeats):
                for k, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t0)
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        row["batches"][str(b)] = {
            "ms": ms,
            "compiled_vs_eager_max_abs": diffs,
            "pruned_speedup_eager": ms["original_eager"] / ms["pruned_eager"],
            "pruned_speedup_compiled": ms["original_compiled"] / ms["pruned_compiled"],
            "compile_speedup_original": ms["original_eager"] / ms["original_compiled"],
            "compile_speedup_pruned": ms["pruned_eager"] / ms["pruned_compiled"],
            "pruned_compiled_vs_original_eager": ms["original_eager"] / ms["pruned_compiled"],
        }
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="bert,gpt2,llama,vit,resnet18")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    ap.add_argument("--smoke", action="store_true", help="one tiny BERT, batch 1, 2 repeats, backend aot_eager (no C++ build)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "compiled"), help="path prefix (.json appended)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    if args.smoke:
        args.models, args.batches, args.repeats, args.backend = "bert", "1", 2, "aot_eager"
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    known = {"bert", "gpt2", "llama", "vit", "resnet18"}
    if set(names) - known:
        ap.error(f"unknown model(s) {', '.join(sorted(set(names) - known))}; choose from {', '.join(sorted(known))}")
    batches = [int(b) for b in args.batches.split(",")]
    t_start = time.perf_counter()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows = []
    for name in names:
        row = measure(name, batches, args.repeats, args.smoke, args.backend)
        rows.append(row)
        for b, r in row["batches"].items():
            ms = r["ms"]
            print(
                f"{name:9s} batch {b}: MACs ratio {row['macs_ratio']:.2f}  eager {ms['original_eager']:.2f} -> {ms['pruned_eager']:.2f} ms "
                f"({r['pruned_speedup_eager']:.2f}x)  compiled {ms['original_compiled']:.2f} -> {ms['pruned_compiled']:.2f} ms "
                f"({r['pruned_speedup_compiled']:.2f}x)  pruned+compiled vs original eager {r['pruned_compiled_vs_original_eager']:.2f}x",
                flush=True,
            )
    summary = {}
    for b in map(str, batches):
        rs = [r["batches"][b] for r in rows]
        summary[f"batch{b}"] = {
            "median_pruned_speedup_eager": statistics.median(r["pruned_speedup_eager"] for r in rs),
            "median_pruned_speedup_compiled": statistics.median(r["pruned_speedup_compiled"] for r in rs),
            "median_compile_speedup_pruned": statistics.median(r["compile_speedup_pruned"] for r in rs),
            "median_pruned_compiled_vs_original_eager": statistics.median(r["pruned_compiled_vs_original_eager"] for r in rs),
            "max_compiled_vs_eager_abs": max(max(r["compiled_vs_eager_max_abs"].values()) for r in rs),
        }
    summary["median_macs_ratio"] = statistics.median(r["macs_ratio"] for r in rows)
    meta = {
        "command": "python benchmarks/compiled.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "torch": torch.__version__,
        "transformers": importlib.metadata.version("transformers"),
        "qcd_fx": qcd_fx.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": 1,
        "repeats": args.repeats,
        "spec": SPEC,
        "compile": f'torch.compile(backend="{args.backend}", dynamic=False)',
        "config": "transformers: hidden 256, 4 layers, 8 heads (Llama 4 kv heads), intermediate 1024, vocab 1000; ViT 64x64 patch 8; ResNet-18 112x112"
        if not args.smoke
        else "smoke: BERT hidden 32, 1 layer, 4 heads, 16 tokens",
        "load_average_at_start": load_start,
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "elapsed_s": time.perf_counter() - t_start,
    }
    path = args.out if args.out.endswith(".json") else args.out + ".json"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"meta": meta, "summary": summary, "rows": rows}, f, indent=1)
    os.replace(path + ".tmp", path)
    print(json.dumps(summary, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
