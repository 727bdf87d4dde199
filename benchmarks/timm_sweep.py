"""Every timm architecture family through qcd-fx (trace, identity QCI, cdg-prune, ONNX), and
Torch-Pruning side by side.

**Which models.** A family is the timm module a model is defined in (``timm.list_modules()``;
``resnet``, ``vision_transformer``, ``efficientnet``, …). Per family, the one model with the
fewest parameters at ``num_classes=10``: every model of the family is built on the ``meta``
device (no memory, no weights, no download; ~0.2 s a model) and its parameters counted
exactly; ties go to the first name in timm's order. timm's ``test_*`` models (unit-test
configurations, not published architectures) are left out unless a family has nothing else.
``--models a,b`` runs those names instead (family looked up), ``--limit N`` the first N
families in alphabetical order; the selection is stored in ``meta.selection``.

**How each model is built.** ``timm.create_model(name, pretrained=False, num_classes=10)`` in
eval mode, ``torch.manual_seed(0)`` before construction (random weights, timm's own
initialisation, nothing downloaded), input batch 2 from a seeded generator. The input side is
the smallest that runs, tried in order: 64, 112, 128, 224 (those below the model's native size) and
then the pretrained cfg's ``input_size``; for a model whose cfg says ``fixed_input_size`` the
smaller sides are tried with the ``img_size=`` constructor keyword (ViT-like models with a
fixed patch grid), without it otherwise. ``build_tries`` in a row lists the sides that failed.

**Per model, qcd-fx** (one child process): 1. ``qcd_fx.trace(model, x)`` (``capture="auto"``:
torch.fx, and torch.export where fx cannot trace the model; ok, ``front_end``, and whether the
captured module's output equals eager bit for bit); 2. ``qci`` (identity at init): ``torch.equal`` of the
transformed module's output and the model's, with the max abs difference; 3.
``cdg-prune{ratio=0.5,criterion=l1}`` (the l1 criterion: weight magnitudes, no calibration
forwards): valid = the pruned module runs and every output keeps its shape and is finite; MACs
and params ratios (base / after, from the transform report: ``torch.utils.flop_counter``), the
pass time (``report.passes[0].seconds``) and the transform's wall time (each the minimum of up to
3 runs, first call included, while the runs took under 30 s in all), the first 3 notes,
frozen-channel reasons and skip reasons, the report's warnings; 4. ONNX of the pruned module:
``qcd_fx.export_onnx(gm, (x,), None)`` (dry run, parity checked in onnxruntime): ok / max abs,
or the one-line error. The child runs these in the order 1, 3, 4, 2: full-rank gates on the
largest models can pass the memory cap, which then costs the ``qci`` step only.

**Per model, Torch-Pruning** (another child process; same model, same weights, same input):
its README recipe ``tp.pruner.MagnitudePruner`` with ``tp.importance.MagnitudeImportance(p=1)``,
``pruning_ratio=0.5``, one step, ``ignored_layers`` = ``model.get_classifier()``, plus its timm
example's attention handling (``num_heads={m.qkv: m.num_heads}`` for modules that have both, and
``head_dim``, and ``attn_dim`` where timm has it, set from the pruned ``qkv`` afterwards), on a
deep copy. Recorded: its time (dependency graph + step; timed like qcd-fx's, each run on a fresh
copy, its own MACs counter outside the timed window), whether the pruned model runs on the input with the same output shape, MACs and
params ratios measured like qcd-fx's (``torch.utils.flop_counter``) and with its own
``tp.utils.count_ops_and_params`` (``macs_ratio_tp_counter``), or the one-line error.

**Isolation.** Each child is killed past ``--time-cap`` seconds (default 120, each child
separately) or ``--mem-cap`` GiB of resident memory; a child writes its row after every step, so
a step that hangs or crashes the process costs that step only (its ``error`` says so).

**Summary.** Counts (families, built, traced, QCI exact, pruned validly, >= 1.8x MACs reduction,
ONNX parity ok, Torch-Pruning runs), medians, the families where a step fails with the reason,
and the families where qcd-fx's MACs ratio is more than 5 % below Torch-Pruning's (both counted
with ``torch.utils.flop_counter``, ``qcd < 0.95 * tp``, both valid).

Writes ``benchmarks/results/timm_sweep.json`` (``--out``: a path prefix, ``.json`` appended;
an existing directory gets ``timm_sweep.json`` inside). The file is rewritten after every model
with ``meta.complete = false`` until the sweep ends; ``--resume`` keeps the rows already there
(and the stored selection) and runs the rest; ``--redo a,b`` measures those families again
(``meta.redone``: family -> commit, for every row a resumed run measured at another commit than
``meta.git_commit``, the commit of the others). ``--jobs N`` measures N models at a time (their
children single-threaded; rows are written in selection order).

    python benchmarks/timm_sweep.py                          # every family (~1-2 h on 2 busy cores)
    python benchmarks/timm_sweep.py --jobs 2                 # two models at a time (98 families: ~35 min on 2 cores)
    python benchmarks/timm_sweep.py --models crossvit_tiny_240,deit_tiny_patch16_224,vit_tiny_patch16_224,vit_tiny_r_s16_p8_224 \
        --prune-spec "cdg-prune{ratio=0.5,criterion=l1,attention=dims}" --out benchmarks/results/timm_attention_dims   # narrower heads
    python benchmarks/timm_sweep.py --resume                 # continue an interrupted sweep
    python benchmarks/timm_sweep.py --resume --redo beit,eva # ... measuring these families again
    python benchmarks/timm_sweep.py --models resnet10t,vit_tiny_patch16_224 --out /tmp/ts
    python benchmarks/timm_sweep.py --smoke --out /tmp/ts    # resnet10t + mobilenetv3_small_050, 60 s cap (tests)
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed

import torch
from prune import _rss_bytes  # the sibling script (benchmarks/ is on sys.path when a script runs)

HERE = os.path.dirname(os.path.abspath(__file__))
SPEC_QCI = "qci"
DEFAULT_SPEC_PRUNE = "cdg-prune{ratio=0.5,criterion=l1}"
SPEC_PRUNE = DEFAULT_SPEC_PRUNE  # --prune-spec
SIDES = (64, 112, 128, 224)  # input sides tried before the cfg's own (112: patch 14 and 16)
SMOKE = ("resnet10t", "mobilenetv3_small_050")
BATCH = 2
NUM_CLASSES = 10
FLOOR = 1.8  # MACs reduction counted as "pruned well" (ratio 0.5 asks for about 4x)
TP_MARGIN = 0.05  # qcd-fx below Torch-Pruning by more than this fraction is listed
MAX_NOTES = 3
TIMED_RUNS = 3  # each tool's pruning is timed this many times (first call included), the minimum kept ...
TIMING_BUDGET_S = 30.0  # ... while the runs so far took less than this in all
STOP = threading.Event()  # set on SIGTERM / Ctrl-C: running children are killed, no new ones start


def one_line(e: BaseException | str, limit: int = 240) -> str:
    from qcd_fx.errors import first_line

    text = first_line(e) if isinstance(e, BaseException) else str(e).strip().splitlines()[0] if str(e).strip() else ""
    prefix = f"{type(e).__name__}: " if isinstance(e, BaseException) else ""
    return (prefix + text)[:limit]


def versions() -> dict[str, str | None]:
    out = {}
    for pkg in ("torch", "timm", "torch-pruning", "onnx", "onnxruntime", "onnxscript"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


# --------------------------------------------------------------------------------------------
# selection (parent)


def families() -> dict[str, list[str]]:
    """Family (timm module) -> its model names, in timm's order."""
    import timm

    return {mod: timm.list_models(module=mod) for mod in sorted(timm.list_modules())}


def family_of(name: str, fams: dict[str, list[str]]) -> str | None:
    import timm

    arch = timm.models.get_arch_name(name)
    return next((f for f, names in fams.items() if arch in names), None)


def meta_params(name: str) -> int | None:
    """Parameters of ``name`` at ``num_classes=10``, built on the meta device (no memory, no weights)."""
    import timm

    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001 - a model that cannot be built on meta is ranked last
        return None


def select(fams: dict[str, list[str]]) -> dict[str, dict]:
    """Per family, the model with the fewest parameters (``test_*`` models only as a last resort)."""
    out = {}
    for fam, names in fams.items():
        pool = [n for n in names if not n.startswith("test_")] or names
        counted = [(meta_params(n), i, n) for i, n in enumerate(pool)]
        known = [c for c in counted if c[0] is not None]
        params, _, name = min(known) if known else (None, 0, pool[0])
        out[fam] = {"model": name, "params": params, "candidates": len(pool)}
        print(f"  selected {fam:28s} {name:40s} {params / 1e6 if params else float('nan'):8.2f} M of {len(pool)}", flush=True)
    return out


# --------------------------------------------------------------------------------------------
# children


def build(name: str, config: dict | None = None) -> tuple[torch.nn.Module, torch.Tensor, dict, list[str]]:
    """The model in eval mode with seeded random weights and the smallest input it runs on.

    Returns the model, the input, the build config (constructor keywords and input shape, enough
    to rebuild the same thing) and the sizes that failed, one line each."""
    import timm

    cfg = timm.get_pretrained_cfg(name)
    native = tuple(cfg.input_size[-2:]) if cfg is not None and cfg.input_size else (224, 224)
    fixed = bool(getattr(cfg, "fixed_input_size", False)) if cfg is not None else False
    if config is not None:
        candidates = [(config["kwargs"], tuple(config["input"][-2:]))]
    else:
        candidates = [({"img_size": s} if fixed else {}, (s, s)) for s in SIDES if s < min(native)]
        candidates.append(({}, native))
    tries: list[str] = []
    for kwargs, hw in candidates:
        torch.manual_seed(0)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs).eval()
            x = torch.randn(BATCH, 3, *hw, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                out = model(x)
            if not isinstance(out, torch.Tensor) or out.shape[0] != BATCH:
                raise RuntimeError(f"unexpected output {type(out).__name__} {getattr(out, 'shape', '')}")
            return model, x, {"kwargs": kwargs, "input": list(x.shape)}, tries
        except Exception as e:  # noqa: BLE001 - the next size is tried
            tries.append(f"{hw[0]}x{hw[1]}{' img_size' if kwargs else ''}: {one_line(e, 160)}")
    raise RuntimeError(f"no input size runs ({tries[-1] if tries else 'no candidates'})")


def leaves(out) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def max_abs_diff(a, b) -> float | None:
    la, lb = leaves(a), leaves(b)
    if len(la) != len(lb) or any(x.shape != y.shape for x, y in zip(la, lb)):
        return None
    return max((float((x.float() - y.float()).abs().max()) if x.numel() else 0.0 for x, y in zip(la, lb)), default=0.0)


def same_shapes(a, b) -> bool:
    la, lb = leaves(a), leaves(b)
    return len(la) == len(lb) and all(x.shape == y.shape for x, y in zip(la, lb))


def macs_of(model: torch.nn.Module, x: torch.Tensor) -> tuple[int | None, str | None]:
    """MACs (``torch.utils.flop_counter``) of one forward, and a note when the plain count failed.

    torch's module tracker inside the flop counter fails on some models (CaiT: "Expected gradient
    function to be set") while parameters require gradients; the count is then repeated on a copy
    whose parameters do not."""
    from qcd_fx.analysis import count_macs

    try:
        return count_macs(model, (x,)), None
    except Exception as e:  # noqa: BLE001
        note = f"flop counter failed with gradients on ({one_line(e, 120)}); counted with requires_grad=False"
    try:
        frozen = copy.deepcopy(model)
        for p in frozen.parameters():
            p.requires_grad_(False)
        return count_macs(frozen, (x,)), note
    except Exception as e:  # noqa: BLE001
        return None, f"flop counter failed: {one_line(e, 160)}"


class Recorder:
    """The child's row, rewritten atomically after every step so the parent keeps what finished."""

    def __init__(self, path: str):
        self.path = path
        self.row: dict = {}

    def stage(self, name: str | None) -> None:
        self.row["stage"] = name
        self.save()

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.row, f)
        os.replace(tmp, self.path)


def _top(d: dict | None, n: int = MAX_NOTES) -> dict:
    return dict(sorted((d or {}).items(), key=lambda kv: -kv[1])[:n])


def timed_runs(run, setup=lambda: None):
    """``run(setup())`` until TIMED_RUNS runs or TIMING_BUDGET_S seconds in all; only ``run`` is timed.

    Returns the last run's result and every run's wall time (first call included).
    """
    walls: list[float] = []
    while True:
        state = setup()
        t1 = time.perf_counter()
        out = run(state)
        walls.append(time.perf_counter() - t1)
        if len(walls) >= TIMED_RUNS or sum(walls) >= TIMING_BUDGET_S:
            return out, walls
        del out, state


def child_qcd(name: str, rec: Recorder) -> None:
    import qcd_fx
    from qcd_fx.analysis import count_params

    row = rec.row
    rec.stage("build")
    t0 = time.perf_counter()
    model, x, config, tries = build(name)
    row.update(build=config, build_tries=tries, build_s=time.perf_counter() - t0)
    rec.stage("measure")
    with torch.no_grad():
        ref = model(x)
    macs, note = macs_of(model, x)
    row.update(params=count_params(model), macs=macs)
    if note:
        row["macs_note"] = note

    rec.stage("trace")
    t0 = time.perf_counter()
    gm = None
    try:
        gm = qcd_fx.trace(model, x)  # capture="auto": torch.fx, torch.export where fx fails
        with torch.no_grad():
            out = gm(x)
        diff = max_abs_diff(out, ref)
        info = gm.meta["capture"]
        row["trace"] = {"ok": True, "seconds": time.perf_counter() - t0, "matches_eager": diff == 0.0, "max_abs": diff, "front_end": info.front_end}
        if info.reason:
            row["trace"]["fx_failed"] = info.reason[:200]
    except Exception as e:  # noqa: BLE001 - failures are results
        row["trace"] = {"ok": False, "seconds": time.perf_counter() - t0, "error": one_line(e)}
    del gm

    rec.stage("prune")
    t0 = time.perf_counter()
    gm = None
    try:
        passes: list[float] = []

        def one(_):
            res = qcd_fx.transform(model, SPEC_PRUNE, example_inputs=x)  # --prune-spec
            passes.append(res.report.passes[0].seconds)
            return res

        result, walls = timed_runs(one)
        report, gm = result.report, result.graph_module.eval()
        p = report.passes[0]
        entry = {
            "front_end": getattr(result.graph_module.meta.get("capture"), "front_end", None),
            "transform_wall_s": min(walls),
            "pass_s": min(passes),
            "pass_s_runs": passes,
            "transform_wall_s_runs": walls,
            "macs": p.after.macs,
            "params": p.after.params,
            "macs_ratio": report.baseline.macs / p.after.macs if p.after.macs else None,
            "params_ratio": report.baseline.params / p.after.params if p.after.params else None,
            "base_macs": report.baseline.macs,
            "notes": [n[:200] for n in p.notes[:MAX_NOTES]],
            "warnings": [w[:300] for w in report.warnings()[:MAX_NOTES]],
            "channels": p.stats.get("channels"),
            "channels_removed": p.stats.get("channels_removed"),
            "groups": p.stats.get("groups"),
            "groups_pruned": p.stats.get("groups_pruned"),
            "frozen_channels": _top(p.stats.get("frozen_channels")),
            "skip_reasons": _top(p.stats.get("skip_reasons")),
            "requested_ratio": p.stats.get("requested_ratio"),
        }
        try:
            with torch.no_grad():
                out = gm(x)
            finite = all(bool(torch.isfinite(t).all()) for t in leaves(out) if t.is_floating_point())
            shapes = same_shapes(out, ref)
            entry.update(ok=shapes and finite, runs=True, same_shape=shapes, finite=finite)
            if not (shapes and finite):
                entry["error"] = "output shape changed" if not shapes else "non-finite output"
        except Exception as e:  # noqa: BLE001
            entry.update(ok=False, runs=False, error="pruned module fails: " + one_line(e))
        row["prune"] = entry
        del result
    except Exception as e:  # noqa: BLE001
        row["prune"] = {"ok": False, "transform_wall_s": time.perf_counter() - t0, "error": one_line(e)}

    rec.stage("onnx")
    if gm is None or not row["prune"].get("runs"):
        row["onnx"] = {"ok": False, "skipped": True, "error": "no pruned module"}
    else:
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rep = qcd_fx.export_onnx(gm, (x,), None)
            row["onnx"] = {"ok": rep.ok, "max_abs": rep.max_abs, "max_rel": rep.max_rel, "exporter": rep.exporter, "seconds": time.perf_counter() - t0}
            if rep.fallback_reason:
                row["onnx"]["fallback_reason"] = rep.fallback_reason[:200]
        except Exception as e:  # noqa: BLE001 - ExportError and anything else
            row["onnx"] = {"ok": False, "seconds": time.perf_counter() - t0, "error": one_line(e)}
    rec.stage("qci")  # last: full-rank gates on a large model can pass the memory cap, after the pruning is recorded
    gm = None
    t0 = time.perf_counter()
    try:
        result = qcd_fx.transform(model, SPEC_QCI, example_inputs=x)
        with torch.no_grad():
            out = result.graph_module(x)
            now = model(x)
        la, lb = leaves(out), leaves(now)
        exact = len(la) == len(lb) and all(torch.equal(a, b) for a, b in zip(la, lb))
        gates = result.report.passes[0].nodes_added if result.report.passes else 0
        row["qci"] = {"ok": True, "exact": exact, "max_abs": max_abs_diff(out, now), "nodes_added": gates, "seconds": time.perf_counter() - t0}
        del result
    except Exception as e:  # noqa: BLE001
        row["qci"] = {"ok": False, "exact": False, "seconds": time.perf_counter() - t0, "error": one_line(e)}

    rec.stage(None)


def _tp_heads(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The classifier layers Torch-Pruning is told to leave alone (``ignored_layers``)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    return [h for h in (head if isinstance(head, (tuple, list)) else [head]) if isinstance(h, torch.nn.Module) and not isinstance(h, torch.nn.Identity)]


def _tp_copy(model: torch.nn.Module) -> tuple[torch.nn.Module, dict]:
    """A deep copy for Torch-Pruning and its ``num_heads`` (timm attention: ``qkv`` -> heads)."""
    work = copy.deepcopy(model)
    num_heads = {
        m.qkv: m.num_heads for m in work.modules() if isinstance(getattr(m, "num_heads", None), int) and isinstance(getattr(m, "qkv", None), torch.nn.Linear)
    }
    return work, num_heads


def child_tp(name: str, config: dict | None, rec: Recorder) -> None:
    import torch_pruning as tp
    from torch import nn

    from qcd_fx.analysis import count_params

    row = rec.row
    rec.stage("build")
    model, x, config, _ = build(name, config)
    row.update(build=config)
    rec.stage("measure")
    with torch.no_grad():
        ref = model(x)
    (base_macs, note), base_params = macs_of(model, x), count_params(model)
    row.update(macs=base_macs, params=base_params)
    if note:
        row["macs_note"] = note
    rec.stage("prune")
    work, num_heads = _tp_copy(model)
    row["ignored"] = [type(h).__name__ for h in _tp_heads(work)]
    row["attention_modules"] = len(num_heads)
    try:
        tp_base_macs, _ = tp.utils.count_ops_and_params(work, x)
    except Exception:  # noqa: BLE001 - its counter is informative only
        tp_base_macs = None
    del work
    t0 = time.perf_counter()

    def one(copied):  # each run on a fresh copy (the copy is not timed); the last one is kept
        work, num_heads = copied
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MagnitudePruner(
                work, example_inputs=x, importance=tp.importance.MagnitudeImportance(p=1), iterative_steps=1,
                pruning_ratio=0.5, ignored_layers=_tp_heads(work), num_heads=num_heads,
            )  # fmt: skip
            pruner.step()
        return work, num_heads

    try:
        (work, num_heads), runs = timed_runs(one, lambda: _tp_copy(model))
        seconds = min(runs)
        row["prune_s_runs"] = runs
        for m in work.modules():  # its timm example: attention modules read these in forward
            if getattr(m, "qkv", None) in num_heads and isinstance(m.qkv, nn.Linear):
                m.num_heads = num_heads[m.qkv]
                if hasattr(m, "head_dim"):
                    m.head_dim = m.qkv.out_features // (3 * m.num_heads)
                if hasattr(m, "attn_dim"):  # timm >= 1.0.2x reshapes the attention output to attn_dim
                    m.attn_dim = m.qkv.out_features // 3
        row["prune_s"] = seconds
    except Exception as e:  # noqa: BLE001
        row.update(ok=False, runs=False, prune_s=time.perf_counter() - t0, error=one_line(e))
        rec.stage(None)
        return
    rec.stage("run")
    try:
        work.eval()
        with torch.no_grad():
            out = work(x)
        shapes = same_shapes(out, ref)
        (macs, note), params = macs_of(work, x), count_params(work)
        row.update(runs=True, same_shape=shapes, ok=shapes, macs_after=macs, params_after=params)
        row["macs_ratio"] = base_macs / macs if macs and base_macs else None
        if note:
            row["macs_after_note"] = note
        row["params_ratio"] = base_params / params if params else None
        if not shapes:
            row["error"] = f"output shape changed {[tuple(t.shape) for t in leaves(ref)]} -> {[tuple(t.shape) for t in leaves(out)]}"
        try:
            tp_macs, _ = tp.utils.count_ops_and_params(work, x)
            row["macs_ratio_tp_counter"] = tp_base_macs / tp_macs if tp_base_macs and tp_macs else None
        except Exception as e:  # noqa: BLE001
            row["tp_counter_error"] = one_line(e)
    except Exception as e:  # noqa: BLE001
        row.update(ok=False, runs=False, error="pruned model fails: " + one_line(e))
    rec.stage(None)


def run_child(name: str, tool: str, config: dict | None, cap_s: float, mem_gb: float) -> dict:
    """One child process (this script with ``--one``); its row, with what stopped it if it was stopped."""
    extra = ["--build", json.dumps(config)] if config is not None else []
    if tool == "qcd" and SPEC_PRUNE != DEFAULT_SPEC_PRUNE:
        extra += ["--prune-spec", SPEC_PRUNE]
    return spawn_child(__file__, name, tool, extra, cap_s, mem_gb, steps=("trace", "prune", "onnx", "qci"), stop=STOP)


def spawn_child(
    script: str, key: str, tool: str, extra: list[str], cap_s: float, mem_gb: float, *, steps: tuple[str, ...],
    env: dict[str, str] | None = None, stop: threading.Event | None = None, limit_data: bool = False,
) -> dict:  # fmt: skip
    """``script --one key --tool tool [extra]`` in a child process (shared by the sweeps): stopped
    past ``cap_s`` seconds, ``mem_gb`` GiB of resident memory or when ``stop`` is set; with
    ``limit_data`` its data segment is also limited to ``mem_gb`` (``RLIMIT_DATA``: an allocation
    beyond it fails inside the child, and qcd-fx sees the limit before allocating). Returns the
    row the child wrote; a child that did not finish gets ``stopped`` (the stage it reached, why)
    and, for a qcd-fx step in ``steps`` or a Torch-Pruning run, a failed result for that stage."""
    fd, path = tempfile.mkstemp(prefix=f"{os.path.splitext(os.path.basename(script))[0]}.{tool}.", suffix=".json")
    os.close(fd)
    os.unlink(path)
    cmd = [sys.executable, os.path.abspath(script), "--one", key, "--tool", tool, "--one-out", path, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    t0 = time.monotonic()
    stopped = None
    with tempfile.TemporaryFile(mode="w+") as err:
        limit = int(mem_gb * 2**30)
        preexec = (lambda: resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))) if limit_data else None
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, preexec_fn=preexec)
        try:
            while child.poll() is None:
                if stop is not None and stop.is_set():
                    stopped = "stopped: the sweep was interrupted"
                elif _rss_bytes(child.pid) > mem_gb * 2**30:
                    stopped = f"stopped: used more than {mem_gb:g} GiB of memory"
                elif time.monotonic() - t0 > cap_s:
                    stopped = f"stopped: did not finish within {cap_s:g} s"
                if stopped:
                    break
                time.sleep(0.1)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        err.seek(0)
        lines = [ln for ln in err.read().splitlines() if ln.strip()]
    row: dict = {}
    if os.path.exists(path):
        with open(path) as f:
            row = json.load(f)
        os.unlink(path)
    if os.path.exists(path + ".tmp"):
        os.unlink(path + ".tmp")
    row["child_s"] = time.monotonic() - t0
    stage = row.pop("stage", "start")
    if stopped or child.returncode != 0 or stage is not None:
        if not stopped:
            stopped = f"child exited with code {child.returncode}" + (f": {lines[-1].strip()[:200]}" if lines else "")
        row["stopped"] = {"stage": stage, "reason": stopped}
        if tool == "qcd" and stage in steps:
            row[stage] = {"ok": False, "error": stopped}
        elif tool == "tp":
            row.update(ok=False, error=row.get("error") or f"{stage}: {stopped}")
        if stage in ("start", "build", "measure"):
            row["error"] = f"{stage}: {stopped}"
    return row


def one_main(args) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    rec = Recorder(args.one_out)
    rec.stage("start")
    try:
        if args.tool == "qcd":
            child_qcd(args.one, rec)
        else:
            child_tp(args.one, json.loads(args.build) if args.build else None, rec)
    except Exception as e:  # noqa: BLE001 - a build failure: the row says so
        rec.row["error"] = f"{rec.row.get('stage')}: {one_line(e)}"
        rec.stage(None)


# --------------------------------------------------------------------------------------------
# parent


def run_all(jobs: int, tasks: dict, done) -> None:
    """``tasks`` {key: zero-argument callable} on ``jobs`` threads; ``done(key, result)`` in this
    thread as each finishes (results of None, an interrupted task, are dropped). On an exception
    or a signal the running children are stopped and no new task starts."""
    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        futures = {pool.submit(fn): key for key, fn in tasks.items()}
        for fut in as_completed(futures):
            result = fut.result()
            if result is not None:
                done(futures[fut], result)
    except BaseException:
        STOP.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()


def measure(name: str, family: str | None, cap_s: float, mem_gb: float) -> dict | None:
    """The model's row, or None when the sweep was interrupted while it ran."""
    row: dict = {"name": name, "family": family}
    q = run_child(name, "qcd", None, cap_s, mem_gb)
    if STOP.is_set():
        return None
    for key in ("build", "build_tries", "build_s", "params", "macs"):
        if key in q:
            row[key] = q.pop(key)
    row["input"] = row.get("build", {}).get("input")
    if "error" in q:
        row["error"] = q.pop("error")
    row["qcd"] = q
    if "build" not in row:  # the model does not build or run: nothing for Torch-Pruning either
        row["tp"] = {"ok": False, "error": "not run: the model did not build"}
        return row
    t = run_child(name, "tp", row["build"], cap_s, mem_gb)
    if STOP.is_set():
        return None
    t.pop("build", None)
    row["tp"] = t
    return row


def status(row: dict) -> dict[str, bool]:
    q, t = row.get("qcd", {}), row.get("tp", {})
    pr = q.get("prune", {})
    return {
        "built": "build" in row,
        "traced": bool(q.get("trace", {}).get("ok")),
        "traced_by_export": q.get("trace", {}).get("front_end") == "export",
        "qci_exact": bool(q.get("qci", {}).get("exact")),
        "pruned_valid": bool(pr.get("ok")),
        "floor": bool(pr.get("ok")) and (pr.get("macs_ratio") or 0) >= FLOOR,
        "onnx_ok": bool(q.get("onnx", {}).get("ok")),
        "tp_runs": bool(t.get("ok")),
        "tp_floor": bool(t.get("ok")) and (t.get("macs_ratio") or 0) >= FLOOR,
    }


def first_failure(row: dict) -> str | None:
    """The first qcd-fx step that fails, with its one-line reason."""
    if "build" not in row:
        return f"build: {row.get('error', '?')}"
    q = row["qcd"]
    for step in ("trace", "prune", "onnx", "qci"):  # the order the child runs them
        e = q.get(step)
        if e is None:
            return row.get("error") or f"{step}: not reached"
        if step == "qci" and e.get("ok") and not e.get("exact"):
            return f"qci: not exact (max abs {e.get('max_abs')})"
        if not e.get("ok"):
            if step == "onnx" and "error" not in e:
                return f"onnx: parity failed (max abs {e.get('max_abs')})"
            return f"{step}: {e.get('error', '?')}"
    return None


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(rows: list[dict]) -> dict:
    st = [status(r) for r in rows]
    count = {k: sum(s[k] for s in st) for k in (st[0] if st else status({}))}
    valid = [r for r, s in zip(rows, st) if s["pruned_valid"]]
    tp_ok = [r for r, s in zip(rows, st) if s["tp_runs"]]
    both = [r for r, s in zip(rows, st) if s["pruned_valid"] and s["tp_runs"] and r["qcd"]["prune"].get("macs_ratio") and r["tp"].get("macs_ratio")]
    below = {
        r["family"]: {"model": r["name"], "qcd": round(r["qcd"]["prune"]["macs_ratio"], 3), "tp": round(r["tp"]["macs_ratio"], 3)}
        for r in both
        if r["qcd"]["prune"]["macs_ratio"] < (1 - TP_MARGIN) * r["tp"]["macs_ratio"]
    }
    above = {
        r["family"]: {"model": r["name"], "qcd": round(r["qcd"]["prune"]["macs_ratio"], 3), "tp": round(r["tp"]["macs_ratio"], 3)}
        for r in both
        if r["tp"]["macs_ratio"] < (1 - TP_MARGIN) * r["qcd"]["prune"]["macs_ratio"]
    }
    failing = {r["family"]: f"{r['name']}: {f}" for r in rows if (f := first_failure(r))}
    tp_failing = {r["family"]: f"{r['name']}: {r['tp'].get('error', '?')}" for r, s in zip(rows, st) if not s["tp_runs"]}
    frozen: dict[str, int] = {}
    for r in rows:
        for why in r.get("qcd", {}).get("prune", {}).get("frozen_channels", {}) or {}:
            frozen[why] = frozen.get(why, 0) + 1
    return {
        "families": len(rows),
        **count,
        "qcd_only": sum(s["pruned_valid"] and not s["tp_runs"] for s in st),  # pruned validly by one tool only
        "tp_only": sum(s["tp_runs"] and not s["pruned_valid"] for s in st),
        "both_pruned": len(both),
        "median_macs_ratio_qcd": _median(r["qcd"]["prune"]["macs_ratio"] for r in valid),
        "median_macs_ratio_tp": _median(r["tp"]["macs_ratio"] for r in tp_ok),
        "median_macs_ratio_qcd_on_both": _median(r["qcd"]["prune"]["macs_ratio"] for r in both),
        "median_macs_ratio_tp_on_both": _median(r["tp"]["macs_ratio"] for r in both),
        "median_params_ratio_qcd": _median(r["qcd"]["prune"]["params_ratio"] for r in valid),
        "median_params_ratio_tp": _median(r["tp"]["params_ratio"] for r in tp_ok),
        "median_prune_pass_s_qcd": _median(r["qcd"]["prune"]["pass_s"] for r in valid),
        "median_transform_wall_s_qcd": _median(r["qcd"]["prune"]["transform_wall_s"] for r in valid),
        "median_prune_s_tp": _median(r["tp"].get("prune_s") for r in tp_ok),
        "median_onnx_max_abs": _median(r["qcd"]["onnx"].get("max_abs") for r, s in zip(rows, st) if s["onnx_ok"]),
        "qcd_below_tp_by_5pct": below,
        "pass_slower_than_tp": {  # the pass's own time against TP's dependency graph + step
            r["family"]: {"model": r["name"], "qcd_s": round(r["qcd"]["prune"]["pass_s"], 3), "tp_s": round(r["tp"]["prune_s"], 3)}
            for r in valid
            if r.get("tp", {}).get("ok") and r["tp"].get("prune_s") is not None and r["qcd"]["prune"]["pass_s"] > r["tp"]["prune_s"]
        },
        "transform_slower_than_tp": sum(  # end to end (trace, MACs counts, pass, checks) against TP's graph + step
            1 for r in valid if r.get("tp", {}).get("ok") and r["tp"].get("prune_s") is not None and r["qcd"]["prune"]["transform_wall_s"] > r["tp"]["prune_s"]
        ),
        "tp_below_qcd_by_5pct": above,
        "failing": failing,
        "tp_failing": tp_failing,
        "frozen_reasons_by_families": dict(sorted(frozen.items(), key=lambda kv: -kv[1])[:10]),
    }


def line(row: dict) -> str:
    q, t = row.get("qcd", {}), row.get("tp", {})
    if "build" not in row:
        return f"{row['family'] or '?':26s} {row['name']:34s} BUILD FAILED: {row.get('error', '')[:90]}"
    pr, ox = q.get("prune", {}), q.get("onnx", {})
    side = "x".join(str(s) for s in row["input"][-2:])
    trace = "ok" if q.get("trace", {}).get("ok") else "FAIL"
    qci = "exact" if q.get("qci", {}).get("exact") else ("diff" if q.get("qci", {}).get("ok") else "FAIL")
    prune = f"x{pr.get('macs_ratio') or float('nan'):.2f} {pr.get('pass_s') or 0:5.1f}s" if pr.get("ok") else "FAIL"
    onnx = f"ok {ox.get('max_abs') or 0:.0e}" if ox.get("ok") else "FAIL"
    tpc = f"x{t.get('macs_ratio') or float('nan'):.2f} {t.get('prune_s') or 0:5.1f}s" if t.get("ok") else "FAIL"
    why = first_failure(row) or ""
    twhy = "" if t.get("ok") else f" | TP: {t.get('error', '')[:60]}"
    return f"{row['family']:26s} {row['name']:34s} {side:>7s} {trace:4s} {qci:5s} {prune:14s} {onnx:9s} {tpc:14s} {why[:70]}{twhy}"


HEADER = f"{'family':26s} {'model':34s} {'input':>7s} {'trace':4s} {'qci':5s} {'qcd MACs÷, pass':14s} {'ONNX':9s} {'TP MACs÷, time':14s} first failure"


def output_path(out: str) -> str:
    if os.path.isdir(out):
        return os.path.join(out, "timm_sweep.json")
    return out if out.endswith(".json") else out + ".json"


def write(path: str, meta: dict, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data = {"meta": meta, "summary": summarize(rows), "rows": rows}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "--no-optional-locks", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True, timeout=10)
        return head.stdout.strip()
    except Exception:  # noqa: BLE001
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated timm model names (default: the smallest model of every family)")
    ap.add_argument("--limit", type=int, help="only the first N families (alphabetical)")
    ap.add_argument("--time-cap", type=float, default=120.0, help="seconds per model and tool (a child process each; default 120)")
    ap.add_argument("--mem-cap", type=float, default=8.0, help="GiB of resident memory per child (default 8)")
    ap.add_argument("--resume", action="store_true", help="keep the rows (and selection) already in the output file, run the rest")
    ap.add_argument("--redo", help="with --resume: comma-separated families measured again (their rows dropped; meta.redone maps them to the commit)")
    ap.add_argument("--jobs", type=int, default=1, help="models measured at the same time (default 1; each runs its two children one after the other)")
    ap.add_argument("--smoke", action="store_true", help=f"{' + '.join(SMOKE)} with a 60 s cap: checks that the script runs")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "timm_sweep"), help="path prefix (.json appended) or a directory")
    ap.add_argument("--prune-spec", default=DEFAULT_SPEC_PRUNE, help=f"the cdg-prune pass qcd-fx runs (default {DEFAULT_SPEC_PRUNE}; e.g. with attention=dims)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one model in a child process
    ap.add_argument("--tool", choices=("qcd", "tp"), help=argparse.SUPPRESS)
    ap.add_argument("--one-out", help=argparse.SUPPRESS)
    ap.add_argument("--build", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    global SPEC_PRUNE
    SPEC_PRUNE = args.prune_spec
    if args.one:
        one_main(args)
        return 0
    torch.set_num_threads(1)
    if args.jobs < 1:
        ap.error("--jobs must be at least 1")
    import qcd_fx

    try:
        passes = qcd_fx.Pipeline.parse(SPEC_PRUNE).passes
    except qcd_fx.errors.QcdFxError as e:
        ap.error(f"--prune-spec: {e}")
    if [p.name for p in passes] != ["cdg-prune"]:
        ap.error(f"--prune-spec must be one cdg-prune pass, got {SPEC_PRUNE!r}")
    redo = {f.strip() for f in (args.redo or "").split(",") if f.strip()}
    if redo and not args.resume:
        ap.error("--redo needs --resume (it measures families of an existing sweep again)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run_all stops the running children
    if args.smoke:
        args.models, args.time_cap = ",".join(SMOKE), min(args.time_cap, 60.0)
    path = output_path(args.out)
    t_start = time.perf_counter()
    old = None
    if args.resume and os.path.exists(path):
        with open(path) as f:
            old = json.load(f)

    import timm

    fams = families()
    if args.models:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
        unknown = [n for n in names if not timm.is_model(n)]
        if unknown:
            ap.error(f"timm has no model(s) {', '.join(unknown)}")
        selection = {family_of(n, fams) or n: {"model": n, "params": None, "candidates": None} for n in names}
        chosen = [(family_of(n, fams), n) for n in names]
    else:
        wanted = list(fams)[: args.limit] if args.limit else list(fams)
        stored = (old or {}).get("meta", {}).get("selection", {})
        todo = {f: fams[f] for f in wanted if f not in stored}
        if todo:
            print(f"selecting the smallest model of {len(todo)} families (meta-device parameter counts) ...", flush=True)
        fresh = select(todo)
        selection = {f: stored.get(f) or fresh[f] for f in wanted}
        chosen = [(f, selection[f]["model"]) for f in wanted]
    selection_s = time.perf_counter() - t_start

    meta = {
        "command": "python benchmarks/timm_sweep.py " + " ".join(sys.argv[1:] if argv is None else argv),
        **versions(),
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "threads": 1,
        "jobs": args.jobs,
        "qcd_fx": __import__("qcd_fx").__version__,
        "git_commit": git_commit(),
        "batch": BATCH,
        "num_classes": NUM_CLASSES,
        "weights": "random: timm's initialisation after torch.manual_seed(0), pretrained=False",
        "input_sides_tried": [*SIDES, "cfg input_size"],
        "qcd_specs": {"qci": SPEC_QCI, "prune": SPEC_PRUNE},
        "qcd_note": "cdg-prune with criterion=l1 (weight magnitudes; no calibration forwards), ratio 0.5"
        + ("" if SPEC_PRUNE == DEFAULT_SPEC_PRUNE else f"; this run: {SPEC_PRUNE}"),
        "tp_recipe": (
            "tp.pruner.MagnitudePruner(importance=MagnitudeImportance(p=1), pruning_ratio=0.5, iterative_steps=1, "
            "ignored_layers=model.get_classifier(), num_heads={m.qkv: m.num_heads}); head_dim and attn_dim patched after step()"
        ),
        "macs": "torch.utils.flop_counter (qcd_fx.analysis.count_macs) for both tools; macs_ratio = base / after",
        "floor": FLOOR,
        "tp_margin": TP_MARGIN,
        "time_cap_s": args.time_cap,
        "mem_cap_gb": args.mem_cap,
        "selection_rule": "per timm module, fewest parameters at num_classes=10 (meta-device build); test_* models only if nothing else",
        "selection": selection,
        "selection_s": selection_s,
        "complete": False,
    }
    done: dict[str, dict] = {}
    if old:
        old_spec = old.get("meta", {}).get("qcd_specs", {}).get("prune", DEFAULT_SPEC_PRUNE)
        if old_spec != SPEC_PRUNE:
            ap.error(f"--resume: {path} was measured with {old_spec!r}, not {SPEC_PRUNE!r}")
        unknown = redo - {r["family"] for r in old.get("rows", [])}
        if unknown:
            ap.error(f"--redo: no rows for {', '.join(sorted(unknown))} in {path}")
        done = {r["name"]: r for r in old.get("rows", []) if r["family"] not in redo}
        meta["git_commit"] = old.get("meta", {}).get("git_commit") or meta["git_commit"]  # the rows' commit; redone ones below
        meta["redone"] = dict(old.get("meta", {}).get("redone", {}))
        meta["resumed_from"] = old.get("meta", {}).get("command")
        meta["commands"] = [*old.get("meta", {}).get("commands", [old.get("meta", {}).get("command")]), meta["command"]]  # every run behind the rows
        meta["elapsed_before_resume_s"] = old.get("meta", {}).get("elapsed_s", 0.0) + old.get("meta", {}).get("elapsed_before_resume_s", 0.0)
    print(HEADER, flush=True)
    for _, name in chosen:
        if name in done:
            print(line(done[name]) + "  (kept)", flush=True)

    now = git_commit()

    def finished(name: str, row: dict) -> None:
        done[name] = row
        if old and now != meta["git_commit"]:
            meta["redone"][row["family"]] = now
        print(line(row), flush=True)
        meta["elapsed_s"] = time.perf_counter() - t_start
        write(path, meta, [done[n] for _, n in chosen if n in done])  # in selection order, whatever finished first

    run_all(args.jobs, {name: (lambda f=fam, n=name: measure(n, f, args.time_cap, args.mem_cap)) for fam, name in chosen if name not in done}, finished)
    rows = [done[n] for _, n in chosen]
    meta["elapsed_s"] = time.perf_counter() - t_start
    meta["complete"] = True
    meta["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    write(path, meta, rows)
    summary = summarize(rows)
    print()
    print(HEADER)
    for row in rows:
        print(line(row))
    print()
    print(
        f"families {summary['families']}, built {summary['built']}, traced {summary['traced']}, QCI exact {summary['qci_exact']}, "
        f"pruned validly {summary['pruned_valid']}, >= {FLOOR}x MACs {summary['floor']}, ONNX parity ok {summary['onnx_ok']}, "
        f"Torch-Pruning runs {summary['tp_runs']} (>= {FLOOR}x {summary['tp_floor']}); "
        f"median MACs ratio qcd-fx {summary['median_macs_ratio_qcd']}, TP {summary['median_macs_ratio_tp']}"
    )
    print(json.dumps(summary, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
