"""The README's measured numbers against the benchmark JSON they come from.

Every numeric table in the README names, in the text just before it, the command and the JSON
(``benchmarks/results/*.json``) it comes from; ``TABLES`` maps each table, by its header row, to
that JSON and to the values of its cells, and every number in a cell must be its JSON value
rounded to the digits the cell shows. ``CLAIMS`` does the same for figures quoted in the text:
phrases of the README with ``{}`` where the numbers stand. Editing a number in the README, or
regenerating a JSON without updating the README, fails here. ± is the sample SD (n - 1)
everywhere, computed here from the per-seed values.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from statistics import mean, median, stdev
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
TEXT = " ".join(README.split())  # phrases wrap across lines
NUMBER = r"[+-]?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?"  # 1,226  -0.3  5.05e-07
STANDALONE = rf"(?<![\w.]){NUMBER}"  # not the digits of a name (b1, vit_b_16)
OPTIONAL = ...  # in a cell's values: the numbers after it may be left out of the README


def load(name: str) -> dict:
    return json.loads((ROOT / "benchmarks" / "results" / f"{name}.json").read_text())


J = {
    name: load(name)
    for name in (
        "transform_cost",
        "load_time",
        "onnx_export",
        "onnx_export.3265fc6",
        "onnx_export.a123f27",
        "prune",
        "optimizers",
        "global_opt",
        "timm_sweep",
        "timm_attention_dims",
        "hf_sweep",
        "compiled",
        "compress",
        "distributed",
    )
}


def shown_as(token: str, value: float) -> bool:
    """Whether ``token`` is ``value`` rounded to the digits ``token`` shows (``1,226``, ``0.77``, ``5.05e-07``)."""
    token = token.replace(",", "")
    mantissa, _, exponent = token.lower().partition("e")
    half_unit = 0.5 * 10.0 ** (int(exponent or 0) - len(mantissa.partition(".")[2]))
    return abs(float(token) - value) <= half_unit * (1 + 1e-9)


def check(where: str, text: str, values: list) -> None:
    """Every number in ``text`` is the value at its position (trailing ``OPTIONAL`` values may be missing)."""
    required = values.index(OPTIONAL) if OPTIONAL in values else len(values)
    values = [v for v in values if v is not OPTIONAL]
    shown = re.findall(STANDALONE, text)
    ok = required <= len(shown) <= len(values) and all(shown_as(s, v) for s, v in zip(shown, values))
    assert ok, f"{where}: the README shows {shown} in {text!r}; the JSON gives {[float(f'{v:.4g}') for v in values]}"


# ── the tables ──────────────────────────────────────────────────────────────────────────────────


class Table(NamedTuple):
    header: str  # the start of its header row
    json: str  # benchmarks/results/<json>.json
    command: str  # cited before the table
    rows: Callable[[dict], dict[str, list[list]]]  # JSON -> {first cell: numbers of each further cell}


def sd_pair(xs: list[float]) -> list[float]:
    return [100 * mean(xs), 100 * stdev(xs)]


def capture_share(entry: dict) -> float:
    return (entry["phases"]["torch.export"] + entry["phases"]["decompose"]) / entry["export_s"]


def transform_rows(d: dict) -> dict:
    def cells(r):
        e, f = r["rank8"], r["full"]
        full = "pipeline_s" in f
        return [
            r["input"][2:], [r["nodes"]], [1e3 * e["pipeline_s"]], [1e3 * f["pipeline_s"]] if full else [], [e["gates"]],
            [100 * f["param_overhead"], 100 * f["mac_overhead"]] if full else [], [100 * e["param_overhead"], 100 * e["mac_overhead"]],
        ]  # fmt: skip

    return {r["model"]: cells(r) for r in d["rows"]}


def onnx_rows(d: dict) -> dict:
    def cells(spec):
        s = d["summary"][spec]
        shares = [capture_share(r["variants"][spec]) for r in d["rows"] if "export_s" in r["variants"][spec]]
        return [
            [s["parity_ok"], s["models"]], [s["ratio_median"], s["ratio_min"], s["ratio_max"]], [s["export_s_median"]],
            [100 * min(shares), 100 * max(shares)], [100 * s["ours_share_median"]],
        ]  # fmt: skip

    return {"untransformed": cells("plain"), "after `qci,csc`": cells("qci,csc")}


def prune_rows(d: dict) -> dict:
    def cells(r):
        q, c, t = r["qcd_l1"], r["qcd_cdg"], r["tp"]

        def eff(e):
            return [e["efficiency_b1"], e["efficiency_b8"]] if e["ok"] else []

        return [
            [r["macs"] / q["macs"], *([r["macs"] / t["macs"]] if t["ok"] else [])], [], eff(q), eff(t),
            [q["transform_wall_s"], c["transform_wall_s"]], [t["prune_s"]] if t["ok"] else [],
        ]  # fmt: skip

    return {r["model"]: cells(r) for r in d["rows"]}


def digits_prune_rows(d: dict) -> dict:
    after = {k: [x["after_finetune"] for x in v] for k, v in d["digits"]["pruned"].items()}
    return {f"{100 * ratio:.0f} % of channels": [sd_pair(after[f"{c}@{ratio}"]) for c in ("cdg", "l1", "random")] for ratio in (0.5, 0.75)}


def optimizer_rows(d: dict) -> dict:
    runs, cost = d["accuracy"]["runs"], {k: v["ratio_to_sgd_foreach"] for k, v in d["cce_step_cost"]["timing"].items()}

    def accuracy(kind, name):
        return sd_pair([r["final_accuracy"] for r in runs[f"{kind}/{name}"]["runs"]])

    def qimad_per_epoch(kind):
        return runs[f"{kind}/qimad"]["epoch_seconds_median"] / runs[f"{kind}/adam"]["epoch_seconds_median"]

    step = {
        "sgd": [cost["sgd_momentum_foreach"], cost["sgd_momentum_fused"]], "adam": [cost["adam_foreach"]], "cce_seed": [cost["cce_seed"]],
        "cce": [cost["cce_default"], cost["cce_exact"]], "qimad": [qimad_per_epoch("mlp"), qimad_per_epoch("cnn")],
    }  # fmt: skip
    labels = {"sgd": "SGD (momentum 0.9)", "adam": "Adam", "cce_seed": "CCE, seed formula", "cce": "CCE, default", "qimad": "QIMAD, 8 agents"}
    return {label: [accuracy("mlp", name), accuracy("cnn", name), step[name]] for name, label in labels.items()}


def global_rows(d: dict) -> dict:
    def solved(s, evals=True):
        return [s["successes"], s["runs"], *([s["median_evals_to_target"]] if evals and s["successes"] else []), OPTIONAL, s["median_final_f"]]

    def cells(block):
        s = {m: v["summary"] for m, v in block["methods"].items()}
        v1, v1r = s["quantum-dynamics-v1"], s["quantum-dynamics-v1+restarts"]
        return [
            solved(s["quantum-dynamics"]), solved(s["quantum-dynamics-multimodal"]), [v1["successes"], v1["runs"], v1r["successes"], v1r["runs"]],
            solved(s["ipop-cma-es"]), solved(s["cma-es"], evals=False), solved(s["random"], evals=False),
        ]  # fmt: skip

    return {key.capitalize(): cells(block) for key, block in d["functions"].items()}


def compress_rows(d: dict) -> dict:
    nets = {"digits CNN (8×8)": "digits_cnn", "ResNet-18 (32×32)": "resnet18@32"}
    kinds = {
        "half the MACs, distilled": "macs0.5_distill0.5",
        "half the MACs, not distilled": "macs0.5_distill0.0",
        "a quarter of the MACs, distilled": "macs0.25_distill0.5",
    }
    out = {}
    for label, net in nets.items():
        s = d["summary"][net]
        for kind, key in kinds.items():
            e = s[key]
            rss = [100 * s["peak_rss_reduction"]] if key == "macs0.5_distill0.5" else []
            loss = e["accuracy_loss_points"]
            out[f"{label}, {kind}"] = [[e["macs_ratio"]], [loss["mean"], loss["sd"]], [e["train_step_speedup"]], [100 * e["train_memory_reduction"]], rss]
    return out


def compress_claims(d: dict) -> list:
    s = d["summary"]
    cnn, rn = s["digits_cnn"], s["resnet18@32"]
    h_cnn, h_rn = cnn["macs0.5_distill0.5"], rn["macs0.5_distill0.5"]
    l_cnn, l_rn = cnn["latency_vs_macs_route_at_equal_latency"], rn["latency_vs_macs_route_at_equal_latency"]
    originals = [1e3 * r["latency_route"]["predicted"]["original_s"] for r in d["latency_vs_macs"] if r["network"] == "resnet18@32"]
    return [
        ("The floor of the step-time gain is the MACs ratio ({}): ResNet-18 gets {} % of it, the 8×8 digits CNN {} %",
         [h_rn["macs_ratio"], 100 * h_rn["train_step_speedup"] / h_rn["macs_ratio"], 100 * h_cnn["train_step_speedup"] / h_cnn["macs_ratio"]]),
        ("kept {} vs {} % (digits CNN) and {} vs {} % (ResNet-18)",
         [100 * l_cnn["accuracy_latency_route"]["mean"], 100 * l_cnn["accuracy_macs_route"]["mean"], 100 * l_rn["accuracy_latency_route"]["mean"], 100 * l_rn["accuracy_macs_route"]["mean"]]),
        ("measured between {} and {} ms across runs", [min(originals), max(originals)]),
        ("landed at {} of the original's latency where {} was asked (digits CNN) and at {} where {} was asked (ResNet-18)",
         [l_cnn["measured_latency_ratio_latency_route"], l_cnn["target_latency_ratio"], l_rn["measured_latency_ratio_latency_route"], l_rn["target_latency_ratio"]]),
        ("training steps {}× faster ({} % less time), training memory −{} % (−{} % peak RSS growth), accuracy within {} ± {} points",
         [h_rn["train_step_speedup"], 100 * (1 - 1 / h_rn["train_step_speedup"]), 100 * h_rn["train_memory_reduction"], 100 * rn["peak_rss_reduction"],
          h_rn["accuracy_loss_points"]["mean"], h_rn["accuracy_loss_points"]["sd"]]),
        ("on the 8×8 digits CNN too, narrowly: training memory −{} %, steps {}× faster ({} % less time)",
         [100 * h_cnn["train_memory_reduction"], h_cnn["train_step_speedup"], 100 * (1 - 1 / h_cnn["train_step_speedup"])]),
    ]  # fmt: skip


def distributed_claims(d: dict) -> list:
    r, m = d["rows"], d["meta"]
    return [
        ("load average {}–{} at start and end", [min(m["load_average_at_start"] + m["load_average_at_end"]), max(m["load_average_at_start"] + m["load_average_at_end"])]),
        ("QIMAD with 8 agents on the digits CNN runs {}× faster per epoch", [r["qimad_cnn"]["speedup"]]),
        ("each step all-gathers {} MB of agent gradients", [r["qimad_cnn"]["gradient_bytes_per_step"] / 1e6]),
        ("beside {} M MACs of evaluation per rank", [r["qimad_cnn"]["step_macs_per_rank_two_processes"] / 1e6]),
        ("calibration of ResNet-18 on 16 batches {}× faster", [r["calibration"]["speedup"]]),
        ("the digits CNN {}×, ResNet-18 at 32×32 {}×", [r["ddp_cnn"]["speedup"], r["ddp_resnet18"]["speedup"]]),
        ("all-reduces {} MB of ResNet-18 gradients (4 bytes × {} M parameters) against {} G MACs",
         [r["ddp_resnet18"]["gradient_bytes_per_step"] / 1e6, r["ddp_resnet18"]["params"] / 1e6, r["ddp_resnet18"]["step_macs_per_rank_two_processes"] / 1e9]),
    ]  # fmt: skip


TABLES = [
    Table("| model | input | nodes | pipeline (rank 8)", "transform_cost", "python benchmarks/transform_cost.py", transform_rows),
    Table("| variant | parity | onnxruntime ÷ eager", "onnx_export", "python benchmarks/onnx_export.py --quick --models resnet50", onnx_rows),
    Table("| model | MACs ÷ (qcd-fx / TP)", "prune", "python benchmarks/prune.py", prune_rows),
    Table("| removed | `cdg` | `l1` | `random` |", "prune", "python benchmarks/prune.py", digits_prune_rows),
    Table("| optimizer | MLP accuracy | CNN accuracy", "optimizers", "python benchmarks/optimizers.py", optimizer_rows),
    Table("| problem | QuantumDynamics |", "global_opt", "python benchmarks/global_opt.py", global_rows),
    Table("| compressed to | MACs ÷ |", "compress", "python benchmarks/compress.py", compress_rows),
]
UNSOURCED = ("| pass | what it inserts", "| claim (seed) |")  # no measurements / its figures are in CLAIMS


def readme_tables() -> list[tuple[str, str, list[list[str]]]]:
    """``(text before it, header row, body rows split into cells)`` of every README table; the text
    before a table starts after the previous table or heading."""
    tables, lead, lines = [], [], README.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|"):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines[i + 2 : j]]
            tables.append((" ".join(" ".join(lead).split()), lines[i], rows))
            lead, i = [], j
            continue
        lead = [] if lines[i].startswith("#") else [*lead, lines[i]]
        i += 1
    return tables


@pytest.mark.parametrize("spec", TABLES, ids=lambda t: t.header.split("|")[1].strip())
def test_table_matches_its_json(spec):
    found = [(lead, rows) for lead, header, rows in readme_tables() if header.startswith(spec.header)]
    assert len(found) == 1, f"the README has {len(found)} tables starting {spec.header!r}"
    lead, rows = found[0]
    assert f"`{spec.command}" in lead and f"benchmarks/results/{spec.json}.json" in lead, (
        f"the text before {spec.header!r} must cite `{spec.command}` and benchmarks/results/{spec.json}.json"
    )
    expected = spec.rows(J[spec.json])
    assert rows
    for key, *cells in rows:
        assert key in expected, f"{spec.json}.json has no row {key!r}"
        assert len(cells) == len(expected[key]), f"{key}: {len(cells)} cells, expected {len(expected[key])}"
        for column, (cell, values) in enumerate(zip(cells, expected[key]), start=2):
            check(f"{spec.json}: {key}, column {column}", cell, values)


def test_every_numeric_table_is_checked():
    for _, header, rows in readme_tables():
        if any(re.search(STANDALONE, cell) for row in rows for cell in row[1:]):
            assert header.startswith(tuple(t.header for t in TABLES) + UNSOURCED), f"no source registered for the table {header!r}"


def test_onnx_table_command_gives_its_models():
    from qcd_fx import zoo

    args = re.search(r"`python benchmarks/onnx_export.py ([^`]*)`", TEXT).group(1).split()
    models = list(zoo.CI_SUBSET) if "--quick" in args else []
    models += [m for m in args[args.index("--models") + 1 :] if not m.startswith("-") and m not in models] if "--models" in args else []
    assert [r["model"] for r in J["onnx_export"]["rows"]] == models


def test_prune_bold_marks_the_faster_end_to_end():
    rows = {r["model"]: r for r in J["prune"]["rows"]}
    prune_header = next(t.header for t in TABLES if t.rows is prune_rows)
    (table,) = [rows_ for _, header, rows_ in readme_tables() if header.startswith(prune_header)]
    for key, *cells in table:
        q, t = rows[key]["qcd_l1"]["transform_wall_s"], rows[key]["tp"]
        assert cells[-2].startswith("**") == (t["ok"] and q <= t["prune_s"]), key
        assert cells[-1].startswith("**") == (t["ok"] and t["prune_s"] < q), key
        assert (cells[1] == "yes") == bool(rows[key].get("same_widths_as_tp")), key


def test_prune_text_names_where_torch_pruning_is_faster():
    sentence = re.search(r"Torch-Pruning is faster on [^:]*:", TEXT).group(0)
    both = [r for r in J["prune"]["rows"] if r["qcd_l1"]["ok"] and r["tp"]["ok"]]
    faster = {r["model"] for r in both if r["tp"]["prune_s"] < r["qcd_l1"]["transform_wall_s"]}
    assert set(re.findall(r"`(\w+)`", sentence)) == faster


def test_onnx_text_names_where_qcd_fx_takes_more_than_torch():
    assert "steps (serialisation and the checks) take less than capture and decomposition on every model" in " ".join(TEXT.split())
    entries = [(r["model"], e) for r in J["onnx_export"]["rows"] for e in r["variants"].values() if "export_s" in e]
    assert {m for m, e in entries if e["phases"]["ours"] / e["export_s"] > capture_share(e)} == set()


# ── figures quoted in the text ──────────────────────────────────────────────────────────────────


def transform_claims(d: dict) -> list:
    s = d["summary"]
    r50 = next(r for r in d["rows"] if r["model"] == "resnet50")
    return [
        ("verification excluded: they cost what the model costs), median of {}, one thread", [d["meta"]["repeats"]]),
        (
            "Over all {} models: the slowest pipeline takes {} s at rank 8 (ResNet-50: {} ms",
            [len(d["rows"]), s["max_pipeline_s_rank8"], 1e3 * s["resnet50_pipeline_s"]],
        ),
        ("({} s per 1000 nodes, R² {})", [s["fit"]["seconds_per_1000_nodes"], s["fit"]["r2"]]),
        (
            "Median gate overhead: +{} % parameters / +{} % MACs at full rank, +{} % / +{} % at rank 8",
            [100 * s[f"median_{k}_overhead_{r}"] for r in ("full", "rank8") for k in ("param", "mac")],
        ),
        ("Full-rank gates on the {} largest models", [len(s["full_rank_skipped"])]),
        ("(ResNet-50 +{} % parameters at full rank)", [100 * r50["full"]["param_overhead"]]),
    ]


def load_claims(d: dict) -> list:
    r50, vit = ({r["model"]: r for r in d["models"]}[m] for m in ("resnet50", "vit_b_16"))
    return [
        (
            (
                "ResNet-50 after `qci,csc` ({} MiB, {} nodes) loads in {} ms against {} ms for `torch.load(weights_only=True)` alone, "
                "ViT-B/16 ({} MiB) in {} vs {} ms"
            ),
            [
                r50["file_bytes"] / 2**20,
                r50["nodes"],
                1e3 * r50["qcd_load_s"],
                1e3 * r50["torch_load_s"],
                vit["file_bytes"] / 2**20,
                1e3 * vit["qcd_load_s"],
                1e3 * vit["torch_load_s"],
            ],
        ),
        ("medians of {} interleaved runs", [d["repeats"]]),
        ("the {}–{} ms above `torch.load`", sorted(1e3 * r["rules_and_build_s"] for r in d["models"])),
    ]


def onnx_claims(d: dict, before: dict, other_machine: dict) -> list:
    shares = [capture_share(e) for r in d["rows"] for e in r["variants"].values() if "export_s" in e]
    entries = {(r["model"], k): e for r in d["rows"] for k, e in r["variants"].items() if "export_s" in e}
    ours = {key: e["phases"]["ours"] / e["export_s"] for key, e in entries.items()}

    def vit_of(data):
        e = next(r for r in data["rows"] if r["model"] == "vit_b_16")["variants"]["qci,csc"]
        return e, sum(v for k, v in e["phases"].items() if k != "ours")

    (vit, torch_s), (old, old_torch_s), (was, _) = vit_of(d), vit_of(other_machine), vit_of(before)
    detail = vit["ours_detail"]
    floor = (detail["reference"] + detail["onnxruntime"] + detail["session"]) / 2 + detail["serialize"]
    old_checks = 3 * (old["eager_ms"] + old["ort_ms"]) / 2e3  # three images through each runtime, on two cores
    return [
        ("one thread each, interleaved, median of {}):", [d["meta"]["repeats"]]),
        ("machine of the previous run (median {} after `qci,csc`", [other_machine["summary"]["qci,csc"]["ratio_median"]]),
        ("onnxruntime gains less over eager (median {}, ViT-B/16 {})", [d["summary"]["qci,csc"]["ratio_median"], vit["ort_ms"] / vit["eager_ms"]]),
        ("capture and decomposition alone take {}–{} % of it", [100 * min(shares), 100 * max(shares)]),
        (
            "qcd-fx's share is under 20 % on {} of the {} exports, at most {} % and {} % on ViT-B/16",
            [sum(v < 0.2 for v in ours.values()), len(ours), 100 * ours[("vit_b_16", "plain")], 100 * ours[("vit_b_16", "qci,csc")]],
        ),
        ("qcd-fx's steps take {} s beside torch's {} s: the reference forwards {} s and onnxruntime's runs {} s",
         [vit["phases"]["ours"], torch_s, detail["reference"], detail["onnxruntime"]]),
        ("the session {} s, serialising {} s — against a floor of about {} s", [detail["session"], detail["serialize"], floor]),
        ("the same benchmark on this machine gave {} s, {} %", [was["phases"]["ours"], 100 * was["phases"]["ours"] / was["export_s"]]),
        ("torch's own phases took {} s on the previous run's machine against {} s here", [old_torch_s, torch_s]),
        ("a forward took {} s (PyTorch) and {} s (onnxruntime) per image there", [old["eager_ms"] / 1e3, old["ort_ms"] / 1e3]),
        ("(3×{} + 3×{})/2 = {} s before the session and serialising, {} % of the export already",
         [old["eager_ms"] / 1e3, old["ort_ms"] / 1e3, old_checks, 100 * old_checks / (old_checks + old_torch_s)]),
    ]  # fmt: skip


def prune_claims(d: dict) -> list:
    s, rows = d["summary"], {r["model"]: r for r in d["rows"]}
    both = [r for r in d["rows"] if r["qcd_l1"]["ok"] and r["tp"]["ok"]]
    tp_faster = [r for r in both if r["tp"]["prune_s"] < r["qcd_l1"]["transform_wall_s"]]
    wall = [f([r[key]["transform_wall_s"] for r in d["rows"]]) for key in ("qcd_l1", "qcd_cdg") for f in (min, max)]
    return [
        ("original/qcd-fx/Torch-Pruning interleaved, median of {};", [d["meta"]["repeats"]]),
        ("qcd-fx prunes all {};", [s["qcd_pruned"]]),
        ("keep exactly the same widths on the {} models both prune", [s["same_widths_as_tp"]]),
        (
            "median {} (qcd-fx) vs {} (Torch-Pruning) at batch 1, {} vs {} at batch 8; qcd-fx is at or above on {} of {} at batch 1",
            [*(s[f"{lib}_median_efficiency_b{b}_on_both"] for b in (1, 8) for lib in ("qcd", "tp")), s["efficiency_not_below_tp_b1"], s["both_pruned"]],
        ),
        ("and never more than {} below", [max(r["tp"]["efficiency_b1"] - r["qcd_l1"]["efficiency_b1"] for r in both)]),
        ("(MobileNetV2 / V3-small {} / {}, ResNet-50 {})", [rows[m]["qcd_l1"]["efficiency_b1"] for m in ("mobilenet_v2", "mobilenet_v3_small", "resnet50")]),
        (
            "End to end, qcd-fx prunes in {}–{} s with `l1` and {}–{} s with `cdg`, Torch-Pruning in {}–{} s",
            [*wall, *(f(r["tp"]["prune_s"] for r in both) for f in (min, max))],
        ),
        ("Torch-Pruning is faster on {} of the {} models both prune", [len(tp_faster), len(both)]),
        ("qcd-fx on the other {}, by up to {}×", [len(both) - len(tp_faster), max(r["tp"]["prune_s"] / r["qcd_l1"]["transform_wall_s"] for r in both)]),
        ("alone, without tracing and checks, takes at most {} s with `l1`", [s["qcd_max_prune_s_l1"]]),
        ("(VGG-11: it must read {} MB of weights", [4e-6 * rows["vgg11_bn"]["params"]]),
        ("and {} s with `cdg` (ViT-B/16", [s["qcd_max_prune_s_cdg"]]),
        ("The digits CNN ({} ± {} % test accuracy unpruned, {} seeds)", [*sd_pair(d["digits"]["full"]), len(d["digits"]["full"])]),
    ]


def optimizer_claims(d: dict) -> list:
    acc, keval, steps = d["accuracy"]["runs"], d["qimad_keval"]["runs"], d["qimad_step_cost"]

    def per_step(kind, name):
        return steps[f"digits_{kind}"]["timing"][name]["ratio_to_adam"]

    def per_epoch(kind):
        return acc[f"{kind}/qimad"]["epoch_seconds_median"] / acc[f"{kind}/adam"]["epoch_seconds_median"]

    def epochs_more(kind):  # % more epochs to 95 % than the better of SGD and Adam
        e = {n: mean(acc[f"{kind}/{n}"]["epochs_to_95"]) for n in ("cce", "sgd", "adam")}
        return 100 * (e["cce"] / min(e["sgd"], e["adam"]) - 1)

    final = {k: 100 * v["final_mean"] for k, v in acc.items()}
    k2 = {k: keval[f"{k}/k2"] for k in ("mlp", "cnn")}
    return [
        ("after {} epochs, QCI-transformed models, {} seeds)", [d["accuracy"]["epochs"], len(d["accuracy"]["seeds"])]),
        ("step cost ÷ SGD(foreach), {} M-param MLP", [d["cce_step_cost"]["parameters"] / 1e6]),
        ("reproduces it: {}–{} % on digits", sorted(final[f"{k}/cce_seed"] for k in ("mlp", "cnn"))),
        ("its time per epoch in these runs (not interleaved) is {}× / {}× Adam's on the MLP / CNN", [per_epoch("mlp"), per_epoch("cnn")]),
        (
            "one step with all 8 agents evaluated is {}× / {}× an Adam step on the plain digits MLP / CNN (the seed's loop: {}× / {}×)",
            [per_step(k, name) for name in ("qimad_k8", "seed_loop_k8") for k in ("mlp", "cnn")],
        ),
        ("it runs at {}× / {}× the `k_eval`-Adam-steps floor", [steps[f"digits_{k}"]["ratio_to_k_eval_floor"]["qimad_k8"] for k in ("mlp", "cnn")]),
        ("`k_eval=2` ({} seeds, epochs of Adam", [len(d["qimad_keval"]["seeds"])]),
        (
            "CNN {} % / 98.0 % vs Adam {} % at {}× / 2.05×",
            [100 * k2["cnn"]["final_accuracy"], 100 * keval["cnn/adam"]["final_accuracy"], k2["cnn"]["time_ratio_to_adam"]],
        ),
        ("the three seeds end at {}–{} %", [100 * f(k2["cnn"]["final_accuracy_per_seed"]) for f in (min, max)]),
        (
            "MLP {} % / 96.5 % vs {} % at {}× / 2.43×",
            [100 * k2["mlp"]["final_accuracy"], 100 * keval["mlp/adam"]["final_accuracy"], k2["mlp"]["time_ratio_to_adam"]],
        ),
        (
            "that floor is {}× an Adam step and QIMAD's step is {}× the floor on the QCI MLP, {}× on the CNN",
            [
                steps["digits_qci_mlp"]["timing"]["floor_k2"]["ratio_to_adam"],
                steps["digits_qci_mlp"]["k2_over_swarm_floor"],
                steps["digits_cnn"]["k2_over_swarm_floor"],
            ],
        ),
        (
            "meets the target on the MLP ({} %, Adam's accuracy, at {}× / 1.97×) but loses {} points on the CNN",
            [100 * keval["mlp/k2_noreuse"]["final_accuracy"], keval["mlp/k2_noreuse"]["time_ratio_to_adam"], keval["cnn/k2_noreuse"]["points_below_adam"]],
        ),
        ("2-64-32-1 MLP it is {}× faster per step", [steps["small_mlp"]["seed_loop_over_qimad_batched"]]),
        ("the `k_eval=8` runs of the reruns give {}–97.5 % / {}–99.0 %", [100 * keval[f"{k}/k8"]["final_accuracy"] for k in ("mlp", "cnn")]),
        # the seeds' claims table
        (
            "costs what an SGD step costs ({}–{}× SGD on the digits models)",
            sorted(d["accuracy"]["train_step_cost"][k]["cce"]["ratio_to_sgd"] for k in ("mlp", "cnn")),
        ),
        ("the seed's own CCE step does not train at all ({}–{} % on digits)", sorted(final[f"{k}/cce_seed"] for k in ("mlp", "cnn"))),
        ("CCE needs {}–{} % *more* epochs to 95 %", sorted(epochs_more(k) for k in ("mlp", "cnn"))),
        ("CNN test error {} % vs {} %", [100 - final["cnn/cce"], 100 - max(final["cnn/sgd"], final["cnn/adam"])]),
        ("8 agents: {}× / {}× an Adam step on the digits MLP / CNN)", [per_step(k, "seed_loop_k8") for k in ("mlp", "cnn")]),
        (
            (
                "Adam's accuracy or better ({} % CNN) at {}× / {}× Adam's time per epoch with 8 agents ({}× / {}× per step), "
                "{}× with `k_eval=2` on the CNN ({} points below Adam)"
            ),
            [
                final["cnn/qimad"],
                per_epoch("mlp"),
                per_epoch("cnn"),
                *(per_step(k, "qimad_k8") for k in ("mlp", "cnn")),
                k2["cnn"]["time_ratio_to_adam"],
                k2["cnn"]["points_below_adam"],
            ],
        ),
    ]


def global_claims(d: dict) -> list:
    fn = {k: {m: v["summary"] for m, v in b["methods"].items()} for k, b in d["functions"].items()}
    qd, mm, v1, v1r, ipop = "quantum-dynamics", "quantum-dynamics-multimodal", "quantum-dynamics-v1", "quantum-dynamics-v1+restarts", "ipop-cma-es"

    def solved(key, method):
        return [fn[key][method]["successes"], fn[key][method]["runs"]]

    def evals(key, a=qd, b=ipop):  # ratio of median evaluations to the target
        return fn[key][a]["median_evals_to_target"] / fn[key][b]["median_evals_to_target"]

    everywhere = [k for k in fn if fn[k][qd]["success_rate"] == fn[k][ipop]["success_rate"] == 1]
    smooth = [k for k in fn if k.startswith(("sphere", "rosenbrock")) and fn[k][mm]["successes"]]
    mm_failures = [r["f"] for r in d["functions"]["ackley-30"]["methods"][mm]["runs"] if r["evaluations_to_target"] is None]
    digits = {k: sd_pair(v["test_accuracies"]) for k, v in d["digits"]["final"].items()}
    return [
        ("{} seeds, equal budget of {}·D evaluations", [d["meta"]["seeds"], d["meta"]["evals_per_dim"]]),
        (
            "is met by the defaults on Ackley (10-D and 30-D: {}/{} each, where the first defaults solved {}/{} and {}/{})",
            [*solved("ackley-10", qd), *solved("ackley-10", v1), *solved("ackley-30", v1)],
        ),
        (
            "on Rastrigin (10-D: {}/{} against {}/{}; 30-D: {}/{} against {}/{})",
            [x for k in ("rastrigin-10", "rastrigin-30") for m in (mm, ipop) for x in solved(k, m)],
        ),
        (
            "the defaults solve Rastrigin-10 {}/{}, `MULTIMODAL` Ackley-30 {}/{} — its failures stop at f ≈ {} ",
            [*solved("rastrigin-10", qd), *solved("ackley-30", mm), median(mm_failures)],
        ),
        ("`MULTIMODAL` is {}–{}× slower on the smooth functions", [f(evals(k, mm, qd) for k in smooth) for f in (min, max)]),
        (
            (
                "The defaults need {}–{}× the evaluations of IPOP-CMA-ES (median to the target) where both solve every run (Sphere, Rosenbrock-10, Ackley), "
                "{}× on Rastrigin-10 (their {} successes against its {}) and {}× on Rosenbrock-30 ({} success against {})"
            ),
            [*(f(evals(k) for k in everywhere) for f in (min, max))]
            + [x for k in ("rastrigin-10", "rosenbrock-30") for x in (evals(k), fn[k][qd]["successes"], fn[k][ipop]["successes"])],
        ),
        ("and fails Rosenbrock-30 ({}/{})", solved("rosenbrock-30", qd)),
        (
            "On digits (MLP, SGD momentum, {} epochs, learning rates chosen on a validation split, {} seeds)",
            [d["digits"]["epochs"], d["digits"]["final"]["qdt"]["seeds"]],
        ),
        (
            "QDT schedule {} ± {} %, cosine annealing {} ± {} %, constant {} ± {} %, QuantumLangevin {} ± {} %",
            [x for k in ("qdt", "cosine", "sgd-constant", "quantum-langevin") for x in digits[k]],
        ),
        # the seeds' claims table
        ("on Rastrigin-10 it solves {}/{}", solved("rastrigin-10", "qimad")),
        (
            "solves Ackley-10 in {}/{} runs, Ackley-30 in {}/{} and Rastrigin-10 in {}–{}/{}",
            [*solved("ackley-10", v1), *solved("ackley-30", v1), fn["rastrigin-10"][v1]["successes"], *solved("rastrigin-10", v1r)],
        ),
        *(
            (f"{label}: {{}}/{{}}, {{}}/{{}}, {{}}/{{}}", [x for k in ("ackley-10", "ackley-30", "rastrigin-10") for x in solved(k, method)])
            for label, method in (("the Boltzmann mean and restarts", qd), ("(`MULTIMODAL`)", mm), ("IPOP-CMA-ES", ipop))
        ),
        ("where the mean-field defaults need {}×, {}× and {}× its evaluations", [evals(k) for k in ("ackley-10", "ackley-30", "rastrigin-10")]),
        ("indistinguishable from cosine annealing on digits ({} ± {} vs {} ± {} %)", [*digits["qdt"], *digits["cosine"]]),
    ]


def timm_claims(d: dict) -> list:
    s = d["summary"]
    both = [r for r in d["rows"] if r["qcd"].get("prune", {}).get("ok") and r["tp"].get("ok")]
    return [
        ("the smallest model of each of timm's {} architecture families", [s["families"]]),
        ("All {} build and are captured, {} of them by `torch.export`", [s["built"], s["traced_by_export"]]),
        ("`qci` at identity is exact on {}; {} prune to a valid model", [s["qci_exact"], s["pruned_valid"]]),
        ("{} of them by at least {}x in MACs, and {} of the pruned models export", [s["floor"], d["meta"]["floor"], s["onnx_ok"]]),
        ("Torch-Pruning's pruned model runs for {}.", [s["tp_runs"]]),
        (
            "Median MACs reduction on the {} families both prune: {}x (qcd-fx) and {}x (Torch-Pruning); over every valid qcd-fx result {}x",
            [s["both_pruned"], s["median_macs_ratio_qcd_on_both"], s["median_macs_ratio_tp_on_both"], s["median_macs_ratio_qcd"]],
        ),
        (
            "takes a median {} s (Torch-Pruning's dependency graph and step: {} s) and is at or below Torch-Pruning's time on {} of the {}",
            [s["median_prune_pass_s_qcd"], s["median_prune_s_tp"], sum(r["qcd"]["prune"]["pass_s"] <= r["tp"]["prune_s"] for r in both), len(both)],
        ),
        (
            "`transform` takes a median {} s, longer than Torch-Pruning's graph and step on {} of the {}",
            [s["median_transform_wall_s_qcd"], s["transform_slower_than_tp"], len(both)],
        ),
        (
            "qcd-fx removes as much as Torch-Pruning on all four: {}x, {}x, {}x and {}x (Torch-Pruning: {}x, {}x, {}x and {}x)",
            [r[k]["macs_ratio"] if k == "tp" else r[k]["prune"]["macs_ratio"] for k in ("qcd", "tp") for r in J["timm_attention_dims"]["rows"]],
        ),
        ("`deepseek_vit`, 412 M parameters, prunes {}x", [next(r["qcd"]["prune"]["macs_ratio"] for r in d["rows"] if r["family"] == "deepseek_vit")]),
    ]


def test_timm_text_names_every_family_where_qcd_fx_falls_short():
    """The README's lists of timm families that are not pruned, pruned below the floor, below
    Torch-Pruning or slower than it are exactly the JSON's."""
    d = J["timm_sweep"]
    s, rows, floor = d["summary"], d["rows"], d["meta"]["floor"]

    def bullet(start: str) -> str:
        return re.search(rf"- {re.escape(start)}(.*?)(?= - [A-Z]|$)", TEXT).group(1)

    def explained(start: str) -> set[str]:  # `family` (why)
        return set(re.findall(r"`(\w+)` \(", bullet(start)))

    def listed(start: str) -> set[str]:  # `a`, `b` — why
        return set(re.findall(r"`(\w+)`", bullet(start).split("—")[0]))

    pruned = [r for r in rows if r["qcd"].get("prune", {}).get("ok")]
    assert explained("Not pruned:") == {r["family"] for r in rows if not r["qcd"].get("prune", {}).get("ok")}
    assert explained("Pruned by less than") == {r["family"] for r in pruned if r["qcd"]["prune"]["macs_ratio"] < floor}
    assert listed("More than 5 % fewer MACs removed than Torch-Pruning:") == set(s["qcd_below_tp_by_5pct"])
    assert listed("A slower pass than Torch-Pruning's:") == set(s["pass_slower_than_tp"])


def hf_claims(d: dict) -> list:
    s, rows = d["summary"], {r["family"]: r for r in d["rows"]}
    fails = {step: len(fams) for step, fams in s["failing_by_step"].items()}
    moe = ["mixtral", "qwen2_moe", "gpt_oss", "granitemoe", "olmoe"]
    kinds, both = dict(s["tp_failing_by_kind"]), s["on_both"]
    return [
        ("every model type in transformers' `CONFIG_MAPPING_NAMES` ({} types", [s["families"]]),
        ("{} of them build from a small config and run on one input", [s["built"]]),
        ("`torch.export` captures {} of these ({} exactly)", [s["captured"], s["capture_exact"]]),
        ("identity `qci` is exact on {}", [s["qci_exact"]]),
        (
            "gives a valid model on {}, {} of them with at least {}x fewer MACs and {} with at least {}x fewer linear-layer MACs",
            [s["pruned_valid"], s["floor"], d["meta"]["floor"], s["linear_floor"], d["meta"]["floor"]],
        ),
        ("{} export to ONNX with onnxruntime parity", [s["onnx_ok"]]),
        ("Median reduction: {}x in MACs, {}x in linear-layer MACs", [s["median_macs_ratio_qcd"], s["median_linear_macs_ratio_qcd"]]),
        (
            "The failing steps: capture {}, `qci` {}, pruning {}, ONNX {}",
            [fails.get("capture", 0), fails.get("qci", 0), fails.get("prune", 0), fails.get("onnx", 0)],
        ),
        ("Mixtral {}, Qwen2-MoE {}, gpt-oss {}, GraniteMoE {}, OLMoE {}", [rows[m]["qcd"]["prune"]["linear_macs_ratio"] for m in moe]),
        ("({} of them audio or video models;", [sum(s["inputs_built"].get(k, 0) for k in ("input_values", "input_features", "pixel_values_videos"))]),
        ("({} of them with `qci{rank=16}`", [s["qci_low_rank"]]),
        (
            "each model capped at {} s): its pruned model runs with every output's shape kept on {} of the {} types ({} of them with at least 1.8x fewer MACs)",
            [d["meta"]["tp_time_cap_s"], s["tp_runs"], s["built"], s["tp_floor"]],
        ),
        (
            "does not finish within the cap ({}), its pruned model fails to run ({}), an output changes width ({}), or its pruning raises ({}:",
            [kinds.pop("stopped at the time cap"), kinds.pop("pruned model fails to run"), kinds.pop("an output changed shape"), sum(kinds.values())],
        ),
        (
            "On the {} types both prune, the median MACs reduction is {}x (qcd-fx) vs {}x (Torch-Pruning); qcd-fx removes more than 5 % fewer MACs on {} of them",
            [s["both_pruned"], s["median_macs_ratio_qcd_on_both"], s["median_macs_ratio_tp_on_both"], len(s["qcd_below_tp_by_5pct"])],
        ),
        ("Torch-Pruning on {} (on GPT-2", [len(s["tp_below_qcd_by_5pct"])]),
        (
            "longer than Torch-Pruning's on {} of the {} (the pass itself is {} s of it)",
            [s["both_pruned"] - both["transform_at_or_below_tp"], s["both_pruned"], both["median_prune_pass_s_qcd"]],
        ),
        (
            "Time on those {}: qcd-fx's pass takes a median {} s, Torch-Pruning's dependency graph and step {} s (the pass is at or below it on {} of the {});",
            [s["both_pruned"], both["median_prune_pass_s_qcd"], both["median_prune_s_tp"], both["pass_at_or_below_tp"], s["both_pruned"]],
        ),
        *[(f"`{kind}` {{}}", [n]) for kind, n in kinds.items()],  # what was left after the pops above
        (
            "a qcd-fx transform takes a median {} s, longer than Torch-Pruning's on {} of the {}",
            [both["median_transform_wall_s_qcd"], s["both_pruned"] - both["transform_at_or_below_tp"], s["both_pruned"]],
        ),
    ]


def compiled_claims(d: dict) -> list:
    s, b1, b8 = d["summary"], d["summary"]["batch1"], d["summary"]["batch8"]
    return [
        ("`cdg-prune{ratio=0.5,criterion=l1}`, MACs ÷ {} median", [s["median_macs_ratio"]]),
        (
            "the pruned model is {}× (batch 1) / {}× (batch 8) faster than the original in eager mode and {}× / {}× when both are compiled",
            [b1["median_pruned_speedup_eager"], b8["median_pruned_speedup_eager"], b1["median_pruned_speedup_compiled"], b8["median_pruned_speedup_compiled"]],
        ),
        ("compiling the pruned model adds {}× / {}×", [b1["median_compile_speedup_pruned"], b8["median_compile_speedup_pruned"]]),
        ("so pruned + compiled runs {}× / {}× faster", [b1["median_pruned_compiled_vs_original_eager"], b8["median_pruned_compiled_vs_original_eager"]]),
        ("Compiled outputs match eager within {}.", [max(b1["max_compiled_vs_eager_abs"], b8["max_compiled_vs_eager_abs"])]),
    ]


CLAIMS = [
    *compiled_claims(J["compiled"]),
    *compress_claims(J["compress"]),
    *distributed_claims(J["distributed"]),
    *transform_claims(J["transform_cost"]),
    *load_claims(J["load_time"]),
    *onnx_claims(J["onnx_export"], J["onnx_export.a123f27"], J["onnx_export.3265fc6"]),
    *prune_claims(J["prune"]),
    *optimizer_claims(J["optimizers"]),
    *global_claims(J["global_opt"]),
    *timm_claims(J["timm_sweep"]),
    *hf_claims(J["hf_sweep"]),
]


@pytest.mark.parametrize("phrase, values", CLAIMS, ids=lambda x: x[:48] if isinstance(x, str) else "")
def test_text_figure_matches_its_json(phrase, values):
    parts = " ".join(phrase.split()).split("{}")
    pattern = "".join(re.escape(part) + (f"({NUMBER})" if i < len(parts) - 1 else "") for i, part in enumerate(parts))
    found = re.findall(pattern, TEXT)
    assert found, f"the README no longer says {phrase!r}"
    for numbers in found:
        numbers = [numbers] if isinstance(numbers, str) else list(numbers)
        check(phrase, " ".join(numbers), values)
