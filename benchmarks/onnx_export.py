"""ONNX export over the torchvision zoo: export time (and where it goes), parity, and
onnxruntime vs PyTorch eager latency, for untransformed and ``qci,csc``-transformed models.

For every model (``--models``; ``--quick``: the CI subset; default: every torchvision
classification model) and every variant (``--variants``; default ``plain`` and ``qci,csc``):

* ``export_s``: :func:`qcd_fx.export.export_onnx` with ``check=True`` — ``torch.onnx.export``
  (dynamo) plus qcd-fx's own steps — split into phases: ``registry`` (torch rebuilds the ONNX
  function registry on every call), ``torch.export`` (capture), ``decompose`` (the
  decomposition re-trace), ``translate`` (FX -> ONNX), ``optimize`` (onnxscript optimizer) and
  qcd-fx's ``ours``: the wall time outside torch's exporter (serialize, PyTorch reference
  forwards, onnxruntime runs, comparison, and the waits for the file write and for onnx.checker
  plus the onnxruntime session, which run in threads meanwhile; ``ours_detail`` has each step's
  own seconds). The torch phases are measured by wrapping torch.onnx's internal
  functions for the duration of the run (benchmark instrumentation only; absent names are
  skipped). The first export in a process also pays imports and one-off initialisation; it is
  reported separately (``warmup_s``) and excluded.
* parity: max abs / max rel difference onnxruntime vs PyTorch on the example batch and a second
  batch size (the dynamic batch axis), ``ok`` per the issue's criterion (<= 1e-4 absolute or
  <= 1e-5 relative to the output's magnitude).
* latency: median of ``--repeats`` interleaved calls (onnxruntime, eager, onnxruntime, …) after
  warm-up, batch 1, at the model's native input size (``--small``: the test size), single
  thread each (``torch.set_num_threads(1)``, ORT ``intra_op_num_threads=1``); plus MACs
  (``torch.utils.flop_counter``), so that transformed models are compared like with like.

Writes ``benchmarks/results/onnx_export.json`` and ``.md``.

    python benchmarks/onnx_export.py --quick                # CI subset (~20-40 min on 2 busy cores)
    python benchmarks/onnx_export.py --quick --models resnet50   # the README's table: CI subset + ResNet-50
    python benchmarks/onnx_export.py --models resnet50      # one model
    python benchmarks/onnx_export.py --smoke --out /tmp/ox  # squeezenet1_1 at test size, one gate, 1 repeat (tests)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
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
from qcd_fx import zoo
from qcd_fx.analysis import count_macs, count_params
from qcd_fx.export import export_onnx, interleaved_latency, onnxruntime_session

HERE = os.path.dirname(os.path.abspath(__file__))
PHASES = ("registry", "torch.export", "decompose", "translate", "optimize")


@contextlib.contextmanager
def exporter_phases(timings: dict[str, float]):
    """Accumulate the seconds spent in torch.onnx's export phases into ``timings``."""
    from torch.onnx._internal.exporter import _capture_strategies, _core, _registration

    patched = []

    def wrap(owner, name, label, classmethod_=False):
        orig = owner.__dict__.get(name) if classmethod_ else getattr(owner, name, None)
        if orig is None:
            return
        func = orig.__func__ if classmethod_ else orig

        @functools.wraps(func)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                timings[label] = timings.get(label, 0.0) + time.perf_counter() - t0

        setattr(owner, name, classmethod(timed) if classmethod_ else timed)
        patched.append((owner, name, orig))

    wrap(_registration.ONNXRegistry, "from_torchlib", "registry", classmethod_=True)
    wrap(_capture_strategies.CaptureStrategy, "__call__", "torch.export")
    wrap(_core, "_prepare_exported_program_for_export", "decompose")
    wrap(_core, "_exported_program_to_onnx_program", "translate")
    try:
        yield
    finally:
        for owner, name, orig in reversed(patched):
            setattr(owner, name, orig)


def variant_module(model, spec: str, x):
    if spec == "plain":
        return qcd_fx.trace(model)
    return qcd_fx.transform(model, spec, (x,)).graph_module


def measure(name: str, variants: list[str], small: bool, repeats: int, workdir: str) -> dict:
    model, shape = zoo.build(name, small=small)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    row: dict = {"model": name, "input": list(shape), "variants": {}}
    for spec in variants:
        gm = variant_module(model, spec, x).eval()
        entry: dict = {"params": count_params(gm), "macs": count_macs(gm, (x,))}
        path = os.path.join(workdir, f"{name}.{spec.replace(',', '_')}.onnx")
        phases: dict[str, float] = {}
        try:
            with exporter_phases(phases):
                rep = export_onnx(gm, (x,), path)
        except qcd_fx.QcdFxError as e:
            entry.update(ok=False, error=str(e))
            row["variants"][spec] = entry
            continue
        # qcd-fx's own time: the wall time of export_onnx outside the torch exporter. Its threads
        # (the file write; onnx.checker and the onnxruntime session) overlap its other steps, so
        # their own seconds in ours_detail are not added up; the waits for them count
        ours = rep.total_seconds - rep.export_seconds
        entry.update(
            ok=rep.ok,
            exporter=rep.exporter,
            nodes=rep.nodes,
            file_mb=rep.file_bytes / 1e6,
            export_s=rep.total_seconds,
            torch_onnx_export_s=rep.export_seconds,
            phases={**{k: phases.get(k, 0.0) for k in PHASES if k != "optimize"}, "optimize": rep.timings.get("optimize", 0.0), "ours": ours},
            ours_detail={k: v for k, v in rep.timings.items() if k not in ("export", "optimize")},  # write, checker, session run in threads
            max_abs=rep.max_abs,
            max_rel=rep.max_rel,
            parity_batches=[p.batch for p in rep.parity],
        )
        session = onnxruntime_session(path, threads=1)
        feed = {session.get_inputs()[0].name: x.numpy()}

        def eager(gm=gm):
            with torch.no_grad():
                gm(x)

        lat = interleaved_latency({"onnxruntime": lambda s=session, f=feed: s.run(None, f), "eager": eager}, repeats=repeats, warmup=2)
        entry.update(ort_ms=lat["onnxruntime"] * 1e3, eager_ms=lat["eager"] * 1e3, ratio=lat["onnxruntime"] / lat["eager"])
        del session
        os.unlink(path)
        row["variants"][spec] = entry
        gc.collect()
    base = row["variants"].get("plain")
    for spec, entry in row["variants"].items():
        if spec != "plain" and base and base.get("macs") and entry.get("macs"):
            entry["mac_ratio_vs_plain"] = entry["macs"] / base["macs"]
            if "eager_ms" in entry and "eager_ms" in base:
                entry["eager_vs_plain"] = entry["eager_ms"] / base["eager_ms"]
                entry["ort_vs_plain_eager"] = entry["ort_ms"] / base["eager_ms"]
    return row


def summarize(rows: list[dict], variants: list[str]) -> dict:
    out = {}
    for spec in variants:
        entries = [r["variants"][spec] for r in rows if spec in r["variants"]]
        done = [e for e in entries if "ratio" in e]
        ratios = [e["ratio"] for e in done]
        out[spec] = {
            "models": len(entries),
            "exported": sum("exporter" in e for e in entries),
            "parity_ok": sum(bool(e.get("ok")) for e in entries),
            "parity_ok_fraction": sum(bool(e.get("ok")) for e in entries) / len(entries) if entries else None,
            "failures": {r["model"]: r["variants"][spec].get("error") for r in rows if spec in r["variants"] and not r["variants"][spec].get("ok")},
            "ratio_median": statistics.median(ratios) if ratios else None,
            "ratio_min": min(ratios) if ratios else None,
            "ratio_max": max(ratios) if ratios else None,
            "export_s_median": statistics.median(e["export_s"] for e in done) if done else None,
            "phases_median_s": {k: statistics.median(e["phases"][k] for e in done) for k in (*PHASES, "ours")} if done else None,
            "ours_share_median": statistics.median(e["phases"]["ours"] / e["export_s"] for e in done) if done else None,
            "max_rel_worst": max((e["max_rel"] for e in done), default=None),
        }
        macs = [e["mac_ratio_vs_plain"] for e in done if "mac_ratio_vs_plain" in e]
        if macs:
            out[spec]["mac_ratio_vs_plain_median"] = statistics.median(macs)
            out[spec]["eager_vs_plain_median"] = statistics.median(e["eager_vs_plain"] for e in done if "eager_vs_plain" in e)
            out[spec]["ort_vs_plain_eager_median"] = statistics.median(e["ort_vs_plain_eager"] for e in done if "ort_vs_plain_eager" in e)
    return out


def capture_share(entry: dict) -> float:
    """Fraction of the export time spent in torch.export's capture and decomposition."""
    return (entry["phases"]["torch.export"] + entry["phases"]["decompose"]) / entry["export_s"]


def markdown(rows: list[dict], variants: list[str], summary: dict) -> str:
    lines = [
        "| model | variant | MACs (M) | nodes | export s | torch.export / decompose / translate / optimize / ours s | parity max abs / rel | ORT ms | eager ms | ORT/eager |",
        "|---|---|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        for spec in variants:
            e = r["variants"].get(spec)
            if e is None:
                continue
            if "ratio" not in e:
                lines.append(f"| {r['model']} | {spec} | {e['macs'] / 1e6:.0f} | | | | FAILED: {e.get('error', '')} | | | |")
                continue
            p = e["phases"]
            phase = " / ".join(f"{p[k]:.1f}" for k in ("torch.export", "decompose", "translate", "optimize", "ours"))
            mark = "" if e["ok"] else " ✗"
            lines.append(
                f"| {r['model']} | {spec} | {e['macs'] / 1e6:.0f} | {e['nodes']} | {e['export_s']:.1f} | {phase} | "
                f"{e['max_abs']:.1e} / {e['max_rel']:.1e}{mark} | {e['ort_ms']:.2f} | {e['eager_ms']:.2f} | {e['ratio']:.2f} |"
            )
    lines.append("")
    for spec in variants:
        s = summary[spec]
        if s["ratio_median"] is None:
            continue
        capture = [capture_share(r["variants"][spec]) for r in rows if "ratio" in r["variants"].get(spec, {})]
        extra = ""
        if "mac_ratio_vs_plain_median" in s:
            extra = (
                f"; MACs ×{s['mac_ratio_vs_plain_median']:.2f} of plain, eager ×{s['eager_vs_plain_median']:.2f}, "
                f"ORT ×{s['ort_vs_plain_eager_median']:.2f} of plain eager"
            )
        lines.append(
            f"- **{spec}**: parity {s['parity_ok']}/{s['models']}; ORT/eager median {s['ratio_median']:.2f} "
            f"(range {s['ratio_min']:.2f}–{s['ratio_max']:.2f}); export median {s['export_s_median']:.1f} s, "
            f"qcd-fx's own share {s['ours_share_median']:.0%}; torch.export + decompose per model "
            f"{100 * min(capture):.0f}–{100 * max(capture):.0f} %{extra}."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", help="torchvision model names (default: the whole zoo)")
    ap.add_argument("--quick", action="store_true", help="only the CI subset")
    ap.add_argument("--variants", default="plain;qci,csc", help="';'-separated: plain and/or pipeline specs (default 'plain;qci,csc')")
    ap.add_argument("--repeats", type=int, default=10, help="timed calls per runtime (median; >= 10 for the README)")
    ap.add_argument("--small", action="store_true", help="test input sizes instead of native ones")
    ap.add_argument("--smoke", action="store_true", help="squeezenet1_1 at test size, one gate, one repeat: checks that the script runs")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "onnx_export"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.smoke:  # one gate (on the classifier) exercises the transformed path at a fraction of the export time
        args.quick, args.models, args.small, args.repeats, args.variants = False, ["squeezenet1_1"], True, 1, "plain;qci{min_width=512},csc"
    names = list(zoo.CI_SUBSET) if args.quick else []
    names += [m for m in (args.models or []) if m not in names]
    if not names:
        names = zoo.classification_models()
    variants = [v.strip() for v in args.variants.split(";") if v.strip()]

    rows = []
    with tempfile.TemporaryDirectory(prefix="qcd_fx_onnx_bench.") as workdir:
        # one-off costs of the first export in a process (imports, registry, dispatch caches); not for --smoke
        t0 = time.perf_counter()
        if not args.smoke:
            warm = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
            export_onnx(qcd_fx.trace(warm), (torch.randn(1, 3, 8, 8),), os.path.join(workdir, "warm.onnx"))
        warmup_s = time.perf_counter() - t0
        for name in names:
            row = measure(name, variants, args.small, args.repeats, workdir)
            rows.append(row)
            for spec, e in row["variants"].items():
                if "ratio" in e:
                    print(
                        f"{name:22s} {spec:10s} export {e['export_s']:6.1f}s parity {e['max_abs']:.1e}/{e['max_rel']:.1e} {'ok' if e['ok'] else 'FAIL'} "
                        f"ORT {e['ort_ms']:8.2f}ms eager {e['eager_ms']:8.2f}ms ratio {e['ratio']:.2f}",
                        flush=True,
                    )
                else:
                    print(f"{name:22s} {spec:10s} FAILED: {e.get('error')}", flush=True)
    summary = summarize(rows, variants)
    import onnxruntime

    meta = {
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": 1,
        "repeats": args.repeats,
        "input": "small (test sizes)" if args.small else "native",
        "warmup_s": warmup_s,
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "summary": summary, "rows": rows}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(rows, variants, summary))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
