"""The options of ``qcd-fx transform`` that tests/test_cli.py leaves out (``--calib``, ``--data``,
``--train-mode``, ``--allow``, ``--pickle``), ``qcd-fx passes`` against the pass registry, and
the ``Pipeline.run`` keywords the CLI does not expose (``tolerance``, ``copy_model``), plus
``cdg-prune{target_macs=...}`` as an absolute MAC count.

Usage errors that click itself raises (``--calib 0``, a value given to a flag) are one line only
through the console-script entry point :func:`qcd_fx.cli.main`, so those go through :func:`cli`
(``main()`` in-process, as ``python -m qcd_fx.cli`` runs it) instead of ``CliRunner``.
"""

import dataclasses
import json
import math
import operator
import pickle
import sys
from types import SimpleNamespace
from typing import Literal

import pytest
import torch
from helpers import one_line_error, run

import qcd_fx
import qcd_fx.cli
from qcd_fx.analysis import count_macs
from qcd_fx.errors import PostconditionError, UnsafeLoadError, UsageError
from qcd_fx.examples import digits_cnn
from qcd_fx.passes import Pass, PassOutcome, Pipeline, option_help, registry
from qcd_fx.passes import base as passes_base
from qcd_fx.passes.base import option

pytestmark = pytest.mark.usefixtures("one_thread")  # small models on two shared cores

PKG = "opts_pkg"  # unique to this file: test modules share sys.modules (test_cli has user_models)

PKG_SOURCE = '''
import torch
from torch import nn


class Scale(nn.Module):
    """A layer from a package the safe format does not trust by default."""

    def __init__(self, factor=2.0):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def scaled():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), Scale(), nn.ReLU(), nn.Linear(16, 3))


class TrainBranch(nn.Module):
    """Adds 100 only while training: a Python branch on self.training that tracing bakes in."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.fc(x)
        if self.training:
            y = y + 100.0
        return y
'''


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A directory holding package ``opts_pkg`` (importable, as an installed package would be)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / PKG).mkdir()
    (tmp_path / PKG / "__init__.py").write_text(PKG_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m == PKG or m.startswith(PKG + ".")]:
        del sys.modules[name]


def cli(monkeypatch, capsys, *args):
    """``qcd-fx ARGS`` through the console-script entry point, in-process (click's own usage
    errors become one line there); a result shaped like CliRunner's for :func:`one_line_error`."""
    monkeypatch.setattr(sys, "argv", ["qcd-fx", *args])
    code = qcd_fx.cli.main()
    captured = capsys.readouterr()
    return SimpleNamespace(exit_code=code, stdout=captured.out, stderr=captured.err)


def ok(*args):
    result = run(*args)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result


def report_of(path):
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# A pass that records what the pipeline hands it (registered for one test at a time)


@dataclasses.dataclass(frozen=True)
class CalibrationSpy(Pass):
    """Changes nothing; puts the calibration batches it was given into its report stats."""

    name = "opts-spy"
    summary = "test pass: report the calibration batches"

    mode: Literal["count", "all"] = option("what to record (test option of a Literal type)", "count")
    tags: tuple[str, ...] = option("free words (test option of a tuple type)", ())

    def call(self, gm, context):
        batches = context.calibration
        stats = {
            "calibration_batches": len(batches),
            "shapes": [[list(t.shape) for t in b] for b in batches],
            "sums": [float(b[0].double().sum()) for b in batches],
            "first_is_example": bool(batches) and batches[0][0] is context.example_inputs[0],
        }
        return PassOutcome(gm, False, stats=stats)


@pytest.fixture
def spy(monkeypatch):
    """``opts-spy`` in the pass registry for this test only (the registry is process-wide)."""
    monkeypatch.setitem(passes_base._REGISTRY, CalibrationSpy.name, CalibrationSpy)
    return CalibrationSpy


# ---------------------------------------------------------------------------------------------
# qcd-fx passes


def _squash(text):
    return "".join(text.split())  # Rich wraps cells at 80 columns; compare without whitespace


def _pass_tables(stdout):
    """{pass name: (title, [[option, type, default, meaning], ...])} parsed from the Rich tables."""
    tables = {}
    for block in stdout.split("\n\n"):
        lines = [line for line in block.splitlines() if line.strip()]
        header = next((i for i, line in enumerate(lines) if "┃" in line), None)
        if header is None:
            continue
        title = " ".join(line.strip() for line in lines[:header])
        assert [c.strip() for c in lines[header].split("┃")] == ["option", "type", "default", "meaning"], lines[header]
        assert set(lines[header + 1].strip()) <= set("━╇"), lines[header + 1]
        rows = []
        for line in lines[header + 2 :]:
            cells = [c.strip() for c in line.split("│")]
            assert len(cells) == 4, line
            if cells[0]:
                rows.append(cells)
            else:  # a wrapped continuation of the row above
                rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells)]
        name = title.split(" — ", 1)[0]
        assert name not in tables, f"pass {name} listed twice"
        tables[name] = (title, rows)
    return tables


def test_passes_lists_every_registered_pass_with_all_its_options(spy):
    names = list(registry())
    assert {"qci", "csc", "cdg-prune", spy.name} <= set(names)  # a plugin pass is listed like the built-ins
    result = ok("passes")
    tables = _pass_tables(result.stdout)
    assert list(tables) == names  # every registered pass, once, in the registry's order, nothing else
    for name, cls in registry().items():
        title, rows = tables[name]
        assert _squash(title) == _squash(f"{name} — {cls.summary}")
        expected = option_help(cls)
        assert [r[0] for r in rows] == [f.name for f in dataclasses.fields(cls)], name
        assert len(rows) == len(expected)
        for row, want in zip(rows, expected):
            assert [_squash(c) for c in row] == [_squash(c) for c in want], (name, row, want)
    # the options render as a spec takes them: Literal choices, tuple lists, aliases
    assert tables[spy.name][1][0][1:3] == ["count|all", "count"]
    assert tables[spy.name][1][1][1:3] == ["[str,...]", "[]"]
    assert [r[2] for r in tables["qci"][1] if r[0] == "rank"] == ["full"]
    assert result.stdout.rstrip().splitlines()[-1].startswith("spec example: ")


def test_passes_takes_no_arguments(monkeypatch, capsys):
    one_line_error(cli(monkeypatch, capsys, "passes", "qci"), 2, "unexpected extra argument", "(qci)", "see 'qcd-fx passes --help'")


# ---------------------------------------------------------------------------------------------
# --calib and --data


def test_calib_sets_how_many_batches_data_driven_passes_get(workdir, spy):
    for n in (1, 3):
        ok("transform", "--example", "-p", "opts-spy", "--calib", str(n), "--report", f"r{n}.json")
        stats = report_of(f"r{n}.json")["passes"][0]["stats"]
        assert stats["calibration_batches"] == n
        assert stats["shapes"] == [[[1, 1, 8, 8]]] * n  # random batches shaped like the example input
        assert stats["first_is_example"]  # the first batch is the example input itself
        assert len(set(stats["sums"])) == n  # the others are fresh random batches
    # the default is one batch: the example input
    ok("transform", "--example", "-p", "opts-spy", "--report", "default.json")
    assert report_of("default.json")["passes"][0]["stats"]["calibration_batches"] == 1


def test_calib_changes_what_cdg_prune_keeps(workdir):
    for n, out in ((1, "one.pt"), (3, "three.pt"), (3, "again.pt")):
        ok("transform", "--example", "-p", "cdg-prune{ratio=0.5}", "--calib", str(n), "-o", out)
    one, three, again = (qcd_fx.load(p).state_dict() for p in ("one.pt", "three.pt", "again.pt"))
    assert {k: v.shape for k, v in one.items()} == {k: v.shape for k, v in three.items()}  # ratio: the same widths
    assert not all(torch.equal(one[k], three[k]) for k in one)  # scored on other data: other channels kept
    assert all(torch.equal(three[k], again[k]) for k in three)  # the random batches are seeded


def test_data_digits_calibrates_on_digits_images(workdir, spy):
    from qcd_fx.data import load_digits_split

    x_train = load_digits_split().x_train
    ok("transform", "--example", "-p", "opts-spy", "--data", "digits", "--calib", "2", "--report", "r.json")
    stats = report_of("r.json")["passes"][0]["stats"]
    assert stats["calibration_batches"] == 2
    assert stats["shapes"] == [[[32, 1, 8, 8]]] * 2  # batches of 32 images, not the example's batch of 1
    assert not stats["first_is_example"]
    assert stats["sums"] == pytest.approx([float(x_train[:32].double().sum()), float(x_train[32:64].double().sum())])
    # a model that takes 64 features gets the images flattened
    ok("transform", "qcd_fx.examples:digits_mlp", "-s", "1,64", "-p", "opts-spy", "--data", "digits", "--report", "mlp.json")
    assert report_of("mlp.json")["passes"][0]["stats"]["shapes"] == [[[32, 64]]]
    # and cdg-prune scores channels on them: other channels than on random inputs
    ok("transform", "--example", "-p", "cdg-prune{ratio=0.5}", "-o", "random.pt")
    ok("transform", "--example", "-p", "cdg-prune{ratio=0.5}", "--data", "digits", "-o", "digits.pt")
    rnd, dig = qcd_fx.load("random.pt").state_dict(), qcd_fx.load("digits.pt").state_dict()
    assert not all(torch.equal(rnd[k], dig[k]) for k in rnd)


def test_bad_calib_and_data_values(workdir, monkeypatch, capsys):
    # click's wording of range and type errors varies between typer/click versions
    for bad in ("0", "-2", "many", "1.5"):
        one_line_error(cli(monkeypatch, capsys, "transform", "--example", "--calib", bad), 2, "Invalid value for '--calib'", "see 'qcd-fx transform --help'")
    one_line_error(cli(monkeypatch, capsys, "transform", "--example", "--calib"), 2, "'--calib' requires an argument")
    one_line_error(cli(monkeypatch, capsys, "transform", "--example", "--data", "mnist"), 2, "--data 'mnist' is not a data spec; use digits, imagefolder:DIR, tensors:FILE, module:factory")
    one_line_error(cli(monkeypatch, capsys, "transform", "--example", "--data", ""), 2, "--data '' is not a data spec")
    one_line_error(
        cli(monkeypatch, capsys, "transform", f"{PKG}:TrainBranch", "-s", "2,4", "--data", "digits"),
        2,
        "--data 'digits' gives inputs of shape 1x8x8, but the model takes 2x4",
    )
    one_line_error(cli(monkeypatch, capsys, "transform", "--example", "--data"), 2, "'--data' requires an argument")


# ---------------------------------------------------------------------------------------------
# --train-mode


def _adds(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (operator.add, torch.add)]


def test_train_mode_traces_the_training_branch(workdir):
    model = f"{PKG}:TrainBranch"
    ok("transform", model, "-s", "2,4", "-p", "csc", "-o", "eval.pt", "--report", "eval.json")
    ok("transform", model, "-s", "2,4", "-p", "csc", "-o", "train.pt", "--report", "train.json", "--train-mode")
    evaluated, trained = qcd_fx.load("eval.pt"), qcd_fx.load("train.pt")
    assert _adds(evaluated) == []  # default: traced in eval mode, the branch is not taken
    (add,) = _adds(trained)
    assert 100.0 in add.args
    # the report sees the extra node, and the saved model computes the training path
    assert report_of("train.json")["baseline"]["nodes"] == report_of("eval.json")["baseline"]["nodes"] + 1
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert float(trained.eval()(x).mean()) > 30 > abs(float(evaluated.eval()(x).mean()))


def test_train_mode_is_a_flag(workdir, monkeypatch, capsys):
    one_line_error(cli(monkeypatch, capsys, "transform", "--example", "--train-mode=yes"), 2, "'--train-mode' does not take a value")


# ---------------------------------------------------------------------------------------------
# --allow and --pickle


def _scaled_transform(*extra):
    """Transform opts_pkg:scaled keeping its opts_pkg.Scale layer opaque (so the file holds it)."""
    return run("transform", f"{PKG}:scaled", "-s", "2,4", "-p", "csc", "--leaf", "Scale", *extra)


def test_allow_trusts_an_extra_package_on_save_and_load(workdir):
    refused = "module class 'opts_pkg.Scale' is outside the allowed packages"
    # saving a module from an untrusted package is refused after the work, and nothing is written
    one_line_error(_scaled_transform("-o", "m.pt"), 2, "cannot save the GraphModule in the safe format", refused, "--pickle")
    assert not (workdir / "m.pt").exists()
    result = _scaled_transform("-o", "m.pt", "--allow", PKG)
    assert result.exit_code == 0, result.stderr
    assert "pickled" not in result.stdout
    # the file is in the safe format: plain data that weights_only=True reads
    assert isinstance(torch.load(workdir / "m.pt", weights_only=True), dict)
    # without --allow the file is refused in one line; with it, it loads and runs
    one_line_error(run("transform", "m.pt", "-p", "csc", "--dry-run"), 1, "model file 'm.pt' is refused", refused, "--allow PKG")
    ok("transform", "m.pt", "-p", "csc", "--dry-run", "--allow", PKG)  # input shape remembered: no -s
    with pytest.raises(UnsafeLoadError, match=r"is refused: module class 'opts_pkg\.Scale' is outside"):
        qcd_fx.load("m.pt")
    gm = qcd_fx.load("m.pt", allow=[PKG])
    (scale,) = [m for m in gm.modules() if type(m).__name__ == "Scale"]
    assert type(scale).__module__ == PKG and scale.factor == 2.0


def test_bad_allow_values(workdir, monkeypatch, capsys):
    assert _scaled_transform("-o", "m.pt", "--allow", PKG).exit_code == 0
    for bad in ("not a pkg", "os.path;rm", "a..b", "1pkg"):
        one_line_error(run("transform", "m.pt", "--dry-run", "--allow", bad), 2, f"--allow {bad!r} is not a package name")
    one_line_error(cli(monkeypatch, capsys, "transform", "m.pt", "--allow"), 2, "'--allow' requires an argument")
    with pytest.raises(UsageError, match=r"--allow 'a b' is not a package name"):
        qcd_fx.load("m.pt", allow=["a b"])


def test_pickle_writes_a_pickled_file_only_when_the_safe_format_cannot_hold_it(workdir):
    result = _scaled_transform("-o", "p.pt", "--pickle")
    assert result.exit_code == 0, result.stderr
    assert "transformed model written to p.pt (pickled: loading it needs --trust-pickle)" in result.stdout
    with pytest.raises(pickle.UnpicklingError):
        torch.load(workdir / "p.pt", weights_only=True)  # a real pickle, not the safe format
    assert isinstance(torch.load(workdir / "p.pt", weights_only=False), torch.fx.GraphModule)
    one_line_error(run("transform", "p.pt", "-s", "2,4", "-p", "csc", "--dry-run"), 1, "executes code from the file", "--trust-pickle")
    with pytest.raises(UnsafeLoadError, match="holds a pickled object"):
        qcd_fx.load("p.pt")
    ok("transform", "p.pt", "-s", "2,4", "-p", "csc", "--dry-run", "--trust-pickle")
    gm = qcd_fx.load("p.pt", trust_pickle=True)
    assert any(type(m).__name__ == "Scale" for m in gm.modules())
    # a graph the safe format holds is saved safe even with --pickle
    result = ok("transform", "--example", "-p", "csc", "-o", "safe.pt", "--pickle")
    assert "pickled" not in result.stdout
    assert isinstance(qcd_fx.load("safe.pt"), torch.fx.GraphModule)


def test_pickled_file_remembers_its_input_shape(workdir):
    assert _scaled_transform("-o", "p.pt", "--pickle").exit_code == 0
    assert qcd_fx.load("p.pt", trust_pickle=True).meta.get("qcd_fx_input_shapes") == [(2, 4)]
    ok("transform", "p.pt", "-p", "csc", "--dry-run", "--trust-pickle")


def test_pickle_is_a_flag(workdir, monkeypatch, capsys):
    one_line_error(cli(monkeypatch, capsys, "transform", "--example", "--pickle=1", "-o", "x.pt"), 2, "'--pickle' does not take a value")
    assert not (workdir / "x.pt").exists()


# ---------------------------------------------------------------------------------------------
# Pipeline.run(tolerance=...)


@dataclasses.dataclass(frozen=True)
class Nudge(Pass):
    """Adds ``eps`` to one node's value and claims to preserve the function."""

    name = "opts-nudge"
    node: str = "features_3"
    eps: float = 1e-3

    @property
    def preserves_function(self):
        return True

    def call(self, gm):
        node = next(n for n in gm.graph.nodes if n.name == self.node)
        with gm.graph.inserting_after(node):
            nudged = gm.graph.call_function(torch.add, (node, self.eps))
        node.replace_all_uses_with(nudged, delete_user_cb=lambda u: u is not nudged)
        return PassOutcome(gm, True)


def test_tolerance_bounds_the_drift_of_function_preserving_passes(digits_cnn):
    x = torch.randn(2, 1, 8, 8)
    loose = Pipeline([Nudge()]).run(digits_cnn, x, tolerance=1.0)
    drift = loose.report.passes[0].drift_abs
    assert 0 < drift < 1.0
    # the boundary is inclusive: exactly the drift passes, the next float below it fails
    assert Pipeline([Nudge()]).run(digits_cnn, x, tolerance=drift).report.passes[0].drift_abs == drift
    for tight in (math.nextafter(drift, 0.0), 1e-9, 0.0):
        with pytest.raises(
            PostconditionError,
            match=rf"^pass 'opts-nudge' at node 'add': declared function-preserving but outputs drifted by .* \(tolerance {tight!r}\); it changes the value of 'features_4'$",
        ):
            Pipeline([Nudge()]).run(digits_cnn, x, tolerance=tight)
    # the default is exact, and a real function-preserving pass meets it
    with pytest.raises(PostconditionError, match=r"\(tolerance 0\.0\)"):
        Pipeline([Nudge()]).run(digits_cnn, x)
    assert Pipeline.parse("qci{init=identity}").run(digits_cnn, x).report.passes[0].drift_abs == 0.0
    # tolerance is no licence for passes that do not claim to preserve the function: not checked
    assert Pipeline.parse("csc").run(digits_cnn, x, tolerance=0.0).report.passes[0].drift_abs > 0


@pytest.mark.parametrize("node", ["features_4", "classifier"], ids=["before-inplace-relu", "before-output"])
def test_drift_is_located_at_the_node_the_pass_added(digits_cnn, node):
    with pytest.raises(PostconditionError, match=r"^pass 'opts-nudge' at node 'add': declared function-preserving"):
        Pipeline([Nudge(node=node)]).run(digits_cnn, torch.randn(2, 1, 8, 8))


@pytest.mark.parametrize("bad", [float("nan"), -1.0], ids=["nan", "negative"])
def test_bad_tolerance_is_rejected(digits_cnn, bad):
    with pytest.raises(UsageError, match="tolerance must be a finite number >= 0"):
        Pipeline([Nudge()]).run(digits_cnn, torch.randn(2, 1, 8, 8), tolerance=bad)


# ---------------------------------------------------------------------------------------------
# Pipeline.run(copy_model=...)


def test_copy_model_true_leaves_the_callers_model_alone(digits_cnn):
    x = torch.randn(2, 1, 8, 8)
    before = {k: v.clone() for k, v in digits_cnn.state_dict().items()}
    result = qcd_fx.transform(digits_cnn, "cdg-prune{ratio=0.5}", (x,))
    gm = result.graph_module
    assert gm.get_submodule("features.0") is not digits_cnn.features[0]
    assert gm.get_submodule("features.0").out_channels == 16 and digits_cnn.features[0].out_channels == 32
    assert all(torch.equal(before[k], v) for k, v in digits_cnn.state_dict().items())
    # a GraphModule is copied too: a new object, the caller's graph untouched
    traced = qcd_fx.trace(digits_cnn)
    code = traced.code
    again = qcd_fx.transform(traced, "qci,csc", (x,))
    assert again.graph_module is not traced and traced.code == code


def test_copy_model_false_transforms_the_callers_model_in_place(digits_cnn):
    x = torch.randn(2, 1, 8, 8)
    conv = digits_cnn.features[0]
    result = qcd_fx.transform(digits_cnn, "cdg-prune{ratio=0.5}", (x,), copy_model=False)
    gm = result.graph_module
    # the GraphModule is built over the caller's own layers, which the pass shrank
    assert gm.get_submodule("features.0") is conv is digits_cnn.features[0]
    assert conv.out_channels == 16 and conv.weight.shape[0] == 16
    assert digits_cnn.features[1].num_features == 16
    # a GraphModule given with copy_model=False is the result itself, rewritten in place
    traced = qcd_fx.trace(digits_cnn)
    again = qcd_fx.transform(traced, "qci,csc", (x,), copy_model=False)
    assert again.graph_module is traced
    assert any(n.target == "output_csc" for n in traced.graph.nodes) and hasattr(traced, "output_csc")


# ---------------------------------------------------------------------------------------------
# cdg-prune{target_macs=...}: a fraction or an absolute count


def test_target_macs_absolute_count_and_fraction(workdir):
    ok("transform", "--example", "-p", "cdg-prune{target_macs=0.5}", "--report", "fraction.json", "-o", "fraction.pt")
    fraction = report_of("fraction.json")
    base = fraction["baseline"]["macs"]
    assert base > 1_000_000  # the digits CNN at batch 1: well above any fraction <= 1
    half = base // 2
    ok("transform", "--example", "-p", f"cdg-prune{{target_macs={half}}}", "--report", "half.json", "-o", "half.pt")
    absolute = report_of("half.json")
    # an absolute count of half the MACs prunes exactly as the fraction 0.5 does
    assert absolute["final"]["macs"] == fraction["final"]["macs"] <= half
    assert absolute["passes"][0]["stats"]["widths"] == fraction["passes"][0]["stats"]["widths"]
    a, b = qcd_fx.load("half.pt").state_dict(), qcd_fx.load("fraction.pt").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # other counts: at or below the target, and within the bisection's granularity of it (10
    # halvings of the uniform ratio leave the result a few percent under the target here)
    x = torch.randn(1, 1, 8, 8)
    for target in (base // 10, 3 * base // 4):
        gm = qcd_fx.transform(digits_cnn(), f"cdg-prune{{target_macs={target}}}", (x,)).graph_module
        macs = count_macs(gm, (x,))
        assert 0.9 * target <= macs <= target, (target, macs)


def test_unreachable_target_macs_is_not_silently_missed():
    x = torch.randn(1, 1, 8, 8)
    try:
        result = qcd_fx.transform(digits_cnn(), "cdg-prune{target_macs=1000}", (x,))
    except qcd_fx.errors.PassError as e:
        assert "target_macs" in str(e)
        return
    row = result.report.passes[0]
    assert result.report.final.macs <= 1000 or any("target_macs" in note for note in row.notes)


def test_absolute_target_macs_means_the_reports_macs_with_digits_calibration(workdir):
    ok("transform", "--example", "-p", "cdg-prune{target_macs=0.5}", "--report", "fraction.json")
    half = report_of("fraction.json")["baseline"]["macs"] // 2
    ok("transform", "--example", "--data", "digits", "-p", f"cdg-prune{{target_macs={half}}}", "--report", "digits.json")
    final = report_of("digits.json")["final"]["macs"]
    assert 0.9 * half <= final <= half, (half, final)


def test_bad_target_macs_values(workdir):
    one_line_error(run("transform", "--example", "-p", "cdg-prune{target_macs=0}"), 2, "target_macs must be > 0 and finite, got 0.0")
    one_line_error(run("transform", "--example", "-p", "cdg-prune{target_macs=-5}"), 2, "target_macs must be > 0")
    one_line_error(run("transform", "--example", "-p", "cdg-prune{target_macs=lots}"), 2, "option 'target_macs' must be a number, not 'lots'")
    one_line_error(run("transform", "--example", "-p", "cdg-prune{target_macs=100000,ratio=0.5}"), 2, "give only one of ratio, target_macs, target_latency and threshold=auto")


def test_nan_target_macs_is_rejected(workdir):
    one_line_error(run("transform", "--example", "-p", "cdg-prune{target_macs=nan}"), 2, "target_macs must be > 0")
