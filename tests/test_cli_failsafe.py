"""Fail early, clearly and safely: outputs tried before any work and written all or none,
missing extras named before the work, the current directory importable everywhere, and the
smaller things a user meets (per-epoch lines, --leaf typos, Rich markup, memory, --version)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from helpers import leftovers, one_line_error, run

UNWRITABLE = "/proc/qcd_fx_cannot_write_here"  # /proc takes no new files, even for root


def test_unwritable_outputs_fail_before_the_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args, what in [
        (["transform", "--example", "-o", UNWRITABLE + ".pt"], "output"),
        (["transform", "--example", "--onnx", UNWRITABLE + ".onnx"], "ONNX output"),
        (["transform", "--example", "--report", UNWRITABLE + ".json"], "report"),
        (["train", "--example", "-e", "1", "-o", UNWRITABLE], "output"),
        (["export", "--example", UNWRITABLE + ".onnx"], "ONNX output"),
    ]:
        res = run(*args)
        one_line_error(res, 2, f"cannot write {what} '{UNWRITABLE}")
        assert ".tmp-" not in res.stderr  # the user's path, not a temporary name
        assert "epoch" not in res.stderr and "qcd-fx transform" not in res.stdout  # nothing ran
    # one good and one bad output: neither is written
    res = run("transform", "--example", "--report", "ok.json", "-o", UNWRITABLE + ".pt")
    one_line_error(res, 2, UNWRITABLE)
    assert os.listdir(tmp_path) == []


BRANCHY = """
import torch
from torch import nn


class ValueBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        return self.lin(x) if x.mean() > 0 else -self.lin(x)


def net():
    torch.manual_seed(0)
    return nn.Sequential(ValueBranch(), nn.Linear(16, 10))
"""


def test_outputs_are_written_all_or_none(tmp_path, monkeypatch):
    """The ONNX export fails after the transform: the report and the model are not written either."""
    (tmp_path / "failsafe_models.py").write_text(BRANCHY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "keep.json").write_text("mine")
    res = run(
        "transform", "failsafe_models:net", "-s", "1,16", "--leaf", "ValueBranch", "-p", "csc",
        "-o", "m.pt", "--report", "keep.json", "--force", "--onnx", "m.onnx", "--allow", "failsafe_models",
    )  # fmt: skip
    one_line_error(res, 1, "depends on a tensor's value")
    assert sorted(os.listdir(tmp_path)) == ["failsafe_models.py", "keep.json"] and leftovers(tmp_path) == []
    assert (tmp_path / "keep.json").read_text() == "mine"  # --force: replaced only if everything succeeds
    res = run(
        "transform",
        "failsafe_models:net",
        "-s",
        "1,16",
        "--leaf",
        "ValueBranch",
        "-p",
        "csc",
        "-o",
        "m.pt",
        "--report",
        "keep.json",
        "--force",
        "--allow",
        "failsafe_models",
    )
    assert res.exit_code == 0, res.stderr
    assert json.loads((tmp_path / "keep.json").read_text())["pipeline"] == "csc" and (tmp_path / "m.pt").exists()


BLOCKER = textwrap.dedent(
    """
    import sys
    BLOCKED = set(sys.argv[1].split(","))
    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, Blocker())
    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]
    sys.argv = ["qcd-fx"] + sys.argv[2:]
    from qcd_fx.cli import main
    sys.exit(main())
    """
)


def _without(tmp_path, blocked: str, *args):
    """Run the CLI in a fresh interpreter in which the modules ``blocked`` cannot be imported
    (as after the first README command, which installs no extras)."""
    script = tmp_path / "qcd_fx_without.py"
    script.write_text(BLOCKER)
    return subprocess.run([sys.executable, str(script), blocked, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "blocked, args, extra",
    [
        ("onnx,onnxruntime,onnxscript", ["export", "--example", "y.onnx"], "onnx"),
        ("onnx,onnxruntime,onnxscript", ["transform", "--example", "--onnx", "x.onnx", "-o", "x.pt"], "onnx"),
        ("onnxruntime", ["run", "y.onnx"], "onnx"),
        ("matplotlib", ["train", "--example", "-e", "1", "-o", "cnn"], "data"),
    ],
)
def test_missing_extras_are_named_before_the_work(tmp_path, blocked, args, extra):
    res = _without(tmp_path, blocked, *args)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 1 and len(lines) == 1, (res.returncode, res.stderr)
    assert lines[0].startswith("error: ") and f"pip install 'qcd-fx[{extra}]'" in lines[0] and "internal error" not in lines[0]
    assert "qcd-fx transform" not in res.stdout  # the transform did not run first
    assert sorted(os.listdir(tmp_path)) == ["qcd_fx_without.py"]


def test_train_prints_a_line_per_epoch():
    res = run("train", "--example", "-e", "2", "-O", "adam")
    assert res.exit_code == 0, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"] and all("test acc" in line for line in lines), res.stderr
    assert "2 epochs: test accuracy" in res.stdout
    res = run("train", "--example", "-e", "1", "-O", "adam", "-q")
    assert res.exit_code == 0 and "1 epoch: test accuracy" in res.stdout and "epoch 1/1" not in res.stderr


LEAFY = """
import torch
from torch import nn


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 16))

    def forward(self, x):
        return x * self.w


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), Scale(), nn.ReLU(), nn.Linear(16, 4))
"""


@pytest.mark.parametrize("how", ["allow", "pickle"])
def test_current_directory_is_importable_for_saved_files(tmp_path, monkeypatch, how):
    """`module:factory` finds mymodels.py in the current directory; so do --allow and --trust-pickle on its saved file."""
    name = f"cwd_models_{how}"
    (tmp_path / f"{name}.py").write_text(LEAFY)
    monkeypatch.chdir(tmp_path)
    keep = ["--allow", name] if how == "allow" else ["--pickle"]
    res = run("transform", f"{name}:net", "-s", "1,16", "--leaf", "Scale", "-p", "csc", "-o", "m.pt", *keep)
    assert res.exit_code == 0, res.stderr
    monkeypatch.delitem(sys.modules, name)  # a fresh process would not have it imported
    assert str(tmp_path) not in sys.path and "" not in sys.path
    load = ["--allow", name] if how == "allow" else ["--trust-pickle"]
    res = run("transform", "m.pt", "-p", "csc", *load)
    assert res.exit_code == 0, res.stderr
    assert str(tmp_path) not in sys.path  # put back as it was
    monkeypatch.delitem(sys.modules, name, raising=False)


def test_a_leaf_that_matches_nothing_names_the_closest(tmp_path, monkeypatch):
    (tmp_path / "leafy_models.py").write_text(LEAFY)
    monkeypatch.chdir(tmp_path)
    one_line_error(run("transform", "leafy_models:net", "-s", "1,16", "--leaf", "Scal"), 2, "--leaf 'Scal' matches no module", "close: Scale")
    one_line_error(run("export", "leafy_models:net", "-s", "1,16", "--leaf", "Nope", "x.onnx"), 2, "--leaf 'Nope' matches no module")
    assert run("transform", "leafy_models:net", "-s", "1,16", "--leaf", "1").exit_code == 0  # a module path
    assert run("transform", "leafy_models:net", "-s", "1,16", "--leaf", "[13]").exit_code == 0  # a glob of paths


def test_table_shows_specs_verbatim_changes_and_full_width():
    res = run("transform", "--example", "-p", "qci,csc{target=[foo*]},cdg-prune{ratio=0.5,criterion=l1}")
    assert res.exit_code == 0, res.stderr
    assert "csc{target=[foo*]}" in res.stdout  # not eaten as Rich markup
    assert "cdg-prune{ratio=0.5,criterion=l1}" in res.stdout  # not cut at 80 columns in a pipe
    assert "3 gates" in res.stdout and "features.0 32->16" in res.stdout and "groups pruned" in res.stdout


def test_inputs_too_large_for_memory():
    one_line_error(run("transform", "--example", "-s", "1,1000000,1000000,1000"), 1, "not enough memory", "1x1000000x1000000x1000", "4e+06 GB")


def test_version_passes_defaults_and_best_point():
    from qcd_fx import __version__

    res = run("--version")
    assert res.exit_code == 0 and res.stdout.strip() == f"qcd-fx {__version__}"
    res = run("passes")
    ratio = next(line for line in res.stdout.splitlines() if line.strip().startswith("ratio"))
    assert "0.5" in ratio.split("│")[2] and "none" not in ratio.split("│")[2], ratio
    res = run("optimize", "sphere", "--dim", "3", "--budget", "50")
    assert res.exit_code == 0 and "best point: [" in res.stdout and res.stdout.count(",", res.stdout.index("best point")) >= 2
