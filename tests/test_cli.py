import json
import os
import subprocess
import sys

import pytest
import torch

import qcd_fx
from qcd_fx.cli import app
from qcd_fx.examples import digits_cnn

from helpers import one_line_error, run, runner



@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "user_models.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "class Branchy(nn.Module):\n"
        "    def forward(self, x):\n"
        "        if x.sum() > 0:\n"
        "            return x * 2\n"
        "        return x\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(16, 32)\n"
        "        self.gate = Branchy()\n"
        "    def forward(self, x):\n"
        "        return self.gate(self.fc(x))\n"
        "def untraceable():\n"
        "    return Net()\n"
    )
    return tmp_path


def test_example_runs_and_writes_nothing(workdir):
    result = run("transform", "--example")
    assert result.exit_code == 0, result.stderr
    assert "qci" in result.stdout and "csc" in result.stdout and "nothing written" in result.stdout
    assert sorted(os.listdir(workdir)) == ["user_models.py"]


def test_transform_writes_model_and_report(workdir):
    result = run("transform", "torchvision:resnet18", "-s", "1,3,32,32", "-p", "qci{rank=8},csc", "-o", "out.pt", "--report", "r.json")
    assert result.exit_code == 0, result.stderr
    report = json.loads((workdir / "r.json").read_text())
    assert report["model"] == "torchvision:resnet18" and [p["name"] for p in report["passes"]] == ["qci", "csc"]
    gm = qcd_fx.load("out.pt")
    assert gm(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
    assert gm.meta["qcd_fx_input_shapes"] == [(1, 3, 32, 32)]
    # the saved model is itself a valid MODEL for another transform; it remembers its input shape
    again = run("transform", "out.pt", "-p", "csc{target=activations}", "--dry-run")
    assert again.exit_code == 0, again.stderr


def test_dry_run_writes_nothing(workdir):
    result = run("transform", "--example", "-o", "o.pt", "--report", "r.json", "--dry-run")
    assert result.exit_code == 0 and "dry run" in result.stdout
    assert not (workdir / "o.pt").exists() and not (workdir / "r.json").exists()


def test_existing_output_is_kept_unless_forced(workdir):
    (workdir / "o.pt").write_text("precious")
    one_line_error(run("transform", "--example", "-o", "o.pt"), 2, "exists; pass --force")
    assert (workdir / "o.pt").read_text() == "precious"
    assert run("transform", "--example", "-o", "o.pt", "--force").exit_code == 0
    assert isinstance(qcd_fx.load("o.pt"), torch.fx.GraphModule)


def test_output_paths_are_checked_before_work(workdir):
    torch.save(qcd_fx.trace(digits_cnn()), "whole.pt")
    one_line_error(run("transform", "whole.pt", "--trust-pickle", "-s", "1,1,8,8", "-o", "whole.pt", "--force"), 2, "is the input file")
    one_line_error(run("transform", "--example", "-o", "missing/dir/o.pt"), 2, "does not exist; create it first")
    one_line_error(run("transform", "--example", "-o", "o.onnx"), 2, "must end in .pt")


def test_bad_model_sources(workdir):
    one_line_error(run("transform", "nope.pt", "-s", "1,1,8,8"), 1, "'nope.pt' does not exist")
    torch.save(digits_cnn().state_dict(), "sd.pt")
    one_line_error(run("transform", "sd.pt", "-s", "1,1,8,8"), 1, "holds a state dict", "--weights")
    (workdir / "junk.pt").write_bytes(b"\x00\x01 not a model")
    one_line_error(run("transform", "junk.pt", "-s", "1,1,8,8"), 1, "junk.pt")
    qcd_fx.io.save(qcd_fx.trace(digits_cnn()), "good.pt")
    data = (workdir / "good.pt").read_bytes()
    (workdir / "cut.pt").write_bytes(data[: len(data) // 3])
    one_line_error(run("transform", "cut.pt", "-s", "1,1,8,8"), 1, "truncated or corrupt")
    one_line_error(run("transform", "torchvision:resnet81"), 1, "did you mean 'resnet18'")
    one_line_error(run("transform", "user_models:nothing", "-s", "1,16"), 1, "has no attribute 'nothing'")
    one_line_error(run("transform"), 2, "missing MODEL")
    one_line_error(run("transform", "user_models:untraceable", "--example"), 2, "either MODEL or --example")


def test_pickled_models_need_trust(workdir):
    torch.save(digits_cnn(), "whole.pt")
    one_line_error(run("transform", "whole.pt", "-s", "1,1,8,8"), 1, "executes code from the file", "--trust-pickle")
    assert run("transform", "whole.pt", "-s", "1,1,8,8", "--trust-pickle").exit_code == 0


def test_untraceable_model_suggests_leaf(workdir):
    one_line_error(
        run("transform", "user_models:untraceable", "-s", "2,16"),
        1,
        "cannot trace Net with torch.fx: Python control flow",
        "user_models.py:5",
        "--leaf gate",
        "torch.export fails too: the computation depends on tensor values",
    )
    result = run("transform", "user_models:untraceable", "-s", "2,16", "--leaf", "gate")
    assert result.exit_code == 0, result.stderr


def test_spec_and_shape_errors(workdir):
    one_line_error(run("transform", "--example", "-p", "qcx"), 2, "unknown pass 'qcx' (did you mean 'qci'?)")
    one_line_error(run("transform", "--example", "-p", "csc{alhpa=1}"), 2, "did you mean 'alpha'?")
    one_line_error(run("transform", "--example", "-s", "1,3,8,8"), 1, "do not fit DigitsCNN", "expected input")
    one_line_error(run("transform", "--example", "-s", "1,a,8"), 2, "not a comma-separated list of integers")
    one_line_error(run("transform", "--example", "-s", "1,0,8"), 2, "must list positive sizes")
    one_line_error(run("transform", "user_models:untraceable", "--leaf", "gate"), 2, "--input-shape is required")


def test_debug_shows_the_exception(workdir):
    with pytest.raises(qcd_fx.errors.PipelineSpecError):
        runner.invoke(app, ["transform", "--example", "-p", "qcx", "--debug"], catch_exceptions=False)


def test_passes_lists_every_pass_and_option():
    result = run("passes")
    assert result.exit_code == 0
    for word in ("qci", "csc", "min_width", "rank", "alpha", "target", "[glob,...]"):
        assert word in result.stdout


def test_console_script_end_to_end(tmp_path):
    """The installed entry point, in a real subprocess: success and a one-line failure."""
    ok = subprocess.run([sys.executable, "-m", "qcd_fx.cli", "transform", "--example", "-o", str(tmp_path / "e.pt")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "e.pt").exists()
    bad = subprocess.run([sys.executable, "-m", "qcd_fx.cli", "transform", str(tmp_path / "absent.pt"), "-s", "1,1,8,8"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
    # click's own usage errors are one line too, and name the command's --help
    for args, fragment in ((["train", "--bogus", "x"], "see 'qcd-fx train --help'"), (["frobnicate"], "No such command 'frobnicate'")):
        usage = subprocess.run([sys.executable, "-m", "qcd_fx.cli", *args], capture_output=True, text=True)
        assert usage.returncode == 2 and usage.stderr.count("\n") == 1 and usage.stderr.startswith("error: ") and fragment in usage.stderr, usage.stderr


def test_transform_also_exports_onnx(workdir):
    import onnxruntime as ort

    result = run("transform", "--example", "-p", "qci{rank=4},csc", "--onnx", "m.onnx")
    assert result.exit_code == 0, result.stderr
    assert "ONNX model written to m.onnx" in result.stdout and "onnxruntime vs PyTorch max abs" in result.stdout
    assert "nothing written" not in result.stdout
    session = ort.InferenceSession("m.onnx", providers=["CPUExecutionProvider"])
    assert session.run(None, {session.get_inputs()[0].name: torch.randn(3, 1, 8, 8).numpy()})[0].shape == (3, 10)
    # an existing file is kept, and the check happens before any work; a dry run writes nothing
    one_line_error(run("transform", "--example", "--onnx", "m.onnx"), 2, "'m.onnx' exists")
    one_line_error(run("transform", "--example", "--onnx", "m.txt"), 2, "must end in .onnx")
    dry = run("transform", "--example", "--onnx", "d.onnx", "--dry-run")
    assert dry.exit_code == 0 and "not written (dry run)" in dry.stdout and not (workdir / "d.onnx").exists()


def test_train_transforms_trains_and_writes_outputs(workdir):
    result = run("train", "--example", "-O", "adam", "-e", "2", "-p", "qci{rank=4}", "-o", "runs", "-q")
    assert result.exit_code == 0, result.stderr
    acc = float(result.stdout.split("test accuracy ")[1].split("%")[0])
    assert acc > 50  # two epochs of Adam on digits; chance is 10 %
    history = json.loads((workdir / "runs.history.json").read_text())
    assert len(history["epochs"]) == 2 and history["meta"]["optimizer"] == "adam"
    assert (workdir / "runs.curve.png").read_bytes()[:4] == b"\x89PNG"
    gm = qcd_fx.load("runs.pt")  # the trained GraphModule in the safe format, with its gate
    assert any(isinstance(m, qcd_fx.nn.InterfaceGate) for m in gm.modules())
    assert gm.meta["qcd_fx_input_shapes"] == [(1, 1, 8, 8)]
    # the trained file is a MODEL for every other command
    assert run("transform", "runs.pt", "-p", "csc", "--dry-run").exit_code == 0


def test_train_bad_inputs_keep_files(workdir):
    (workdir / "runs.pt").write_text("precious")
    one_line_error(run("train", "--example", "-e", "1", "-o", "runs"), 2, "runs.pt exists", "--force")
    assert (workdir / "runs.pt").read_text() == "precious"
    one_line_error(run("train", "--example", "-O", "adamw"), 2, "unknown optimizer 'adamw'", "qimad")
    one_line_error(run("train", "--example", "-e", "0"), 2, "--epochs 0")
    one_line_error(run("train", "--example", "--lr", "-1"), 2, "--lr -1")
    one_line_error(run("train", "--example", "--data", "mnist"), 2, "--data 'mnist'")
    one_line_error(run("train", "--example", "-o", "nodir/x"), 2, "does not exist")
    one_line_error(run("train", "torchvision:resnet18", "-e", "1"), 2, "does not fit --data 'digits'")
    # a diverging run says so in one line, exits 1 and writes nothing
    one_line_error(run("train", "--example", "-O", "sgd", "--lr", "1e6", "-e", "2", "-q", "-o", "div"), 1, "training diverged")
    assert not any(p.name.startswith("div") for p in workdir.iterdir())
