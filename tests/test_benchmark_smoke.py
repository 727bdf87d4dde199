"""Every script in ``benchmarks/`` runs: each in its ``--smoke`` mode (toy sizes, one repeat, one
seed), as a subprocess writing into a temporary directory. The numbers mean nothing; what is
checked is the exit code and the JSON's top-level keys, so a script broken by a change elsewhere
fails here and not at its next full run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
GLOBAL_METHODS = ["quantum-dynamics", "quantum-dynamics-multimodal", "quantum-dynamics-v1", "quantum-dynamics-v1+restarts", "qimad", "random"]
if importlib.util.find_spec("cma"):  # the CMA-ES baselines need the bench extra
    GLOBAL_METHODS += ["cma-es", "ipop-cma-es"]

# script: (arguments after --smoke, "{out}" standing for the temporary directory; the JSON it writes; its top-level keys)
CASES = {
    "transform_cost": (["--out", "{out}/transform_cost"], "transform_cost.json", {"meta", "summary", "rows"}),
    "load_time": (["--out", "{out}/load_time.json"], "load_time.json", {"command", "torch", "python", "threads", "repeats", "rules_table_s", "models"}),
    "onnx_export": (["--out", "{out}/onnx_export"], "onnx_export.json", {"meta", "summary", "rows"}),
    "prune": (["--out", "{out}/prune"], "prune.json", {"meta", "summary", "rows", "digits"}),
    "optimizers": (["--out", "{out}"], "optimizers_smoke.json", {"meta", "cce_step_cost", "qimad_step_cost", "accuracy", "qimad_keval", "defaults"}),
    "qimad_small": (["--out", "{out}/qimad_small.json"], "qimad_small.json", {"meta", "configs"}),
    "global_opt": (["--out", "{out}/global_opt", "--methods", *GLOBAL_METHODS], "global_opt.json", {"meta", "functions", "digits"}),
    "timm_sweep": (["--out", "{out}/timm_sweep"], "timm_sweep.json", {"meta", "summary", "rows"}),
    "hf_sweep": (["--out", "{out}/hf_sweep"], "hf_sweep.json", {"meta", "summary", "rows"}),
    "compress": (["--out", "{out}/compress"], "compress.json", {"meta", "summary", "baselines", "rows", "peak_rss", "latency_vs_macs"}),
    "compiled": (["--out", "{out}/compiled"], "compiled.json", {"meta", "summary", "rows"}),
    "distributed": (["--out", "{out}/distributed"], "distributed.json", {"meta", "summary", "rows"}),
}


def test_every_script_has_a_smoke_run():
    assert {p.stem for p in BENCHMARKS.glob("*.py")} == set(CASES)


def own_results(script: str) -> dict[str, int]:
    """The files of ``benchmarks/results`` the script writes by default, with their modification times."""
    return {p.name: p.stat().st_mtime_ns for p in (BENCHMARKS / "results").glob(f"{script}*")}


@pytest.mark.parametrize("script", CASES)
def test_smoke_run(script, tmp_path):
    args, output, keys = CASES[script]
    results = own_results(script)
    command = [sys.executable, str(BENCHMARKS / f"{script}.py"), "--smoke", *(a.format(out=tmp_path) for a in args)]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, f"{' '.join(command)} exited {run.returncode}:\n{run.stderr[-3000:]}"
    assert set(json.loads((tmp_path / output).read_text())) == keys
    assert own_results(script) == results, "the smoke run wrote into benchmarks/results"
