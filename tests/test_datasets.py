"""Data specs (digits, imagefolder:DIR, tensors:FILE, module:factory), their bad inputs, the
model-fits check, distillation, and the CLI's --data / --teacher."""

import json

import numpy as np
import pytest
import torch
from helpers import one_line_error, run
from torch import nn
from torch.utils.data import DataLoader

from qcd_fx.datasets import check_fits, load_data
from qcd_fx.errors import UsageError
from qcd_fx.examples import digits_cnn, digits_mlp
from qcd_fx.train import fit, make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _blobs(n=60, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, d, generator=g) + 3 * torch.nn.functional.one_hot(y, d).float()
    return x, y


def test_tensors_pt_npz_and_pair(tmp_path):
    x, y = _blobs()
    torch.save({"x": x, "y": y}, tmp_path / "d.pt")
    np.savez(tmp_path / "d.npz", inputs=x.numpy(), labels=y.numpy())
    torch.save((x, y), tmp_path / "pair.pt")
    for name in ("d.pt", "d.npz", "pair.pt"):
        data = load_data(f"tensors:{tmp_path / name}", val_split=0.25, seed=1)
        train, val = data.train.tensors, data.val.tensors
        assert len(train[0]) == 45 and len(val[0]) == 15 and data.num_classes == 3
        assert set(torch.cat([train[1], val[1]]).tolist()) == {0, 1, 2}
    torch.save({"x": x[:40], "y": y[:40], "x_val": x[40:], "y_val": y[40:]}, tmp_path / "own_val.pt")
    data = load_data(f"tensors:{tmp_path / 'own_val.pt'}")
    assert len(data.train) == 40 and len(data.val) == 20  # its own validation part, not a split


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ({"x": torch.randn(5, 3), "y": torch.zeros(4, dtype=torch.long)}, "5 training inputs but 4 labels"),
        ({"x": torch.randn(5, 3), "y": torch.rand(5)}, "labels must be integers"),
        ({"x": torch.randn(5, 3), "y": -torch.ones(5, dtype=torch.long)}, "labels must be >= 0"),
        ({"x": torch.full((5, 3), float("nan")), "y": torch.zeros(5, dtype=torch.long)}, "5 training input(s) hold NaN"),
        ({"features_typo": torch.randn(5, 3)}, "expected keys x and y"),
        ({"x": torch.randn(1, 3), "y": torch.zeros(1, dtype=torch.long)}, "too few to hold out"),
        ("not tensors", "expected a dict with x and y"),
    ],
)
def test_bad_tensor_files_get_one_line(tmp_path, content, fragment):
    torch.save(content, tmp_path / "bad.pt")
    with pytest.raises(UsageError, match=None) as info:
        load_data(f"tensors:{tmp_path / 'bad.pt'}")
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(UsageError, match="no file"):
        load_data(f"tensors:{tmp_path / 'none.pt'}")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(UsageError, match="weights_only"):
        load_data(f"tensors:{tmp_path / 'junk.pt'}")
    with pytest.raises(UsageError, match="is not a data spec"):
        load_data("mnist")


def _image_folder(root, classes=("cat", "dog"), per_class=4, size=12):
    from PIL import Image

    g = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(g.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_imagefolder(tmp_path):
    pytest.importorskip("torchvision")
    root = _image_folder(tmp_path / "imgs")
    data = load_data(f"imagefolder:{root}", image_size=8, val_split=0.25)
    assert data.num_classes == 2 and len(data.train) == 6 and len(data.val) == 2
    x, y = next(iter(data.loaders(4)[0]))
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="one sub-directory of images per class"):
        load_data(f"imagefolder:{tmp_path / 'empty'}")
    with pytest.raises(UsageError, match="1 class folder"):
        load_data(f"imagefolder:{_image_folder(tmp_path / 'one', classes=('a',))}")
    with pytest.raises(UsageError, match="is not a directory"):
        load_data(f"imagefolder:{tmp_path / 'nowhere'}")


def test_module_factory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_data.py").write_text(
        "import torch\n"
        "from torch.utils.data import TensorDataset, DataLoader\n"
        "def dataset():\n    return TensorDataset(torch.randn(20, 4), torch.arange(20) % 2)\n"
        "def pair():\n    d = TensorDataset(torch.randn(8, 4), torch.arange(8) % 2)\n    return DataLoader(d, batch_size=4), DataLoader(d, batch_size=8)\n"
        "def broken():\n    raise OSError('disk gone')\n"
        "def wrong():\n    return 42\n"
    )
    data = load_data("my_data:dataset", val_split=0.2)
    assert len(data.train) == 16 and len(data.val) == 4
    train, val = load_data("my_data:pair").loaders(99)
    assert isinstance(train, DataLoader) and next(iter(val))[0].shape == (8, 4)
    with pytest.raises(UsageError, match="the factory failed: OSError: disk gone"):
        load_data("my_data:broken")
    with pytest.raises(UsageError, match="returned a int"):
        load_data("my_data:wrong")
    with pytest.raises(UsageError, match="cannot import 'nothing'"):
        load_data("my_data:nothing")


def test_check_fits_names_the_mismatch():
    data = load_data("digits")
    assert check_fits(digits_cnn().eval(), data)(data.example(2)).shape == (2, 1, 8, 8)
    assert check_fits(nn.Linear(64, 10), data)(data.example(2)).shape == (2, 64)  # flattened for a plain Linear
    with pytest.raises(UsageError, match=r"does not fit --data 'digits' \(inputs 1x8x8, 10 classes\)"):
        check_fits(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), data)  # 3 scores for 10 classes


def test_distillation_moves_the_student_toward_its_teacher():
    torch.manual_seed(0)
    data = load_data("digits")
    train, _ = data.loaders(128, seed=0)
    teacher = digits_cnn()
    fit(teacher, train, make_optimizer("adam", teacher.parameters(), lr=0.01), 2, progress=False)
    teacher.eval()
    x = data.val.tensors[0]

    def gap(student):
        with torch.no_grad():
            p = torch.log_softmax(student(x) / 2, -1)
            q = torch.log_softmax(teacher(x) / 2, -1)
        return float(torch.nn.functional.kl_div(p, q, log_target=True, reduction="batchmean"))

    students = []
    for alpha in (0.0, 1.0):
        torch.manual_seed(1)
        student = digits_mlp(hidden=16)
        flat = nn.Sequential(nn.Flatten(), student)
        fit(flat, train, make_optimizer("adam", student.parameters(), lr=0.01), 2, progress=False, teacher=teacher, distill=alpha, temperature=2.0)
        students.append(gap(flat.eval()))
    assert students[1] < 0.7 * students[0], students  # soft targets pull the student to the teacher
    with pytest.raises(ValueError, match="distill must be in"):
        fit(flat, train, make_optimizer("sgd", student.parameters()), 1, progress=False, teacher=teacher, distill=2.0)


def test_cli_trains_on_a_tensor_file_with_a_teacher_and_calibrates_on_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x, y = _blobs(n=120, d=64, classes=10)
    torch.save({"x": x.reshape(120, 1, 8, 8), "y": y}, tmp_path / "mine.pt")
    result = run("train", "--example", "--data", "tensors:mine.pt", "-O", "adam", "-e", "2", "--teacher", "qcd_fx.examples:digits_cnn", "-o", "run", "-q")
    assert result.exit_code == 0, result.stderr
    assert "val accuracy" in result.stdout
    history = json.loads((tmp_path / "run.history.json").read_text())
    assert history["meta"]["data"] == "tensors:mine.pt" and history["meta"]["distill"] == 0.5
    result = run("transform", "--example", "-p", "cdg-prune{ratio=0.5}", "--data", "tensors:mine.pt", "--calib", "2", "--report", "r.json")
    assert result.exit_code == 0, result.stderr
    torch.save({"x": torch.randn(10, 5), "y": torch.zeros(10, dtype=torch.long)}, tmp_path / "wrong.pt")
    one_line_error(run("train", "--example", "--data", "tensors:wrong.pt", "-e", "1"), 2, "does not fit --data 'tensors:wrong.pt' (inputs 5")
    one_line_error(run("train", "--example", "--data", "tensors:mine.pt", "--distill", "3"), 2, "--distill must be in [0, 1]")


def test_compress_example_end_to_end(tmp_path, monkeypatch):
    """``qcd-fx compress --example``: pruned to half the MACs, fine-tuned with distillation,
    exported with parity; four files, a before/after table, accuracy well above chance."""
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    result = run("compress", "--example", "-e", "1", "-o", "small", "-q")
    assert result.exit_code == 0, result.stderr
    for name in ("small.pt", "small.onnx", "small.report.json", "small.curve.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "MACs (batch 1)" in result.stdout and "training memory" in result.stdout
    report = json.loads((tmp_path / "small.report.json").read_text())
    before, after = report["before"], report["after"]
    assert after["macs"] <= 0.5 * before["macs"] * 1.05
    assert after["params"] < before["params"] and after["train_memory_bytes"] < before["train_memory_bytes"]
    assert after["accuracy"] > 0.6  # chance is 0.1
    assert all(p["ok"] for p in report["onnx"]["parity"])
    assert [r["round"] for r in report["rounds"]] == [0, 1]
    import qcd_fx

    gm = qcd_fx.load(tmp_path / "small.pt")
    assert gm(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    one_line_error(run("compress", "--example", "--target-macs", "1.5"), 2, "--target-macs 1.5 must be a fraction in (0, 1)")
    one_line_error(run("compress", "--example", "--target-latency", "2"), 2, "--target-latency 2.0 must be a fraction in (0, 1)")
    one_line_error(run("compress", "--example", "-o", "small", "-q"), 2, "exists")  # nothing overwritten


def test_compress_in_two_rounds_reaches_each_rounds_target_and_leaves_the_model_alone():
    """``compress(steps=2)``: round r prunes to ``target ** (r / steps)`` of the original MACs
    (fine-tuning between rounds); the caller's model keeps its weights and widths."""
    from qcd_fx.analysis import count_macs
    from qcd_fx.compress import compress

    torch.manual_seed(0)
    model = digits_cnn(width=8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    data = load_data("digits")
    result = compress(model, data, target_macs=0.25, steps=2, epochs=1, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    base = count_macs(model.eval(), (data.example(1),))
    assert [r["round"] for r in result.rounds] == [0, 1, 2]
    for r in result.rounds[1:]:
        assert r["target_macs"] == int(base * 0.25 ** (r["round"] / 2))
        assert r["macs"] <= r["target_macs"] * 1.05 and r["accuracy"] is not None
    assert result.rounds[1]["macs"] > result.rounds[2]["macs"]
    assert result.after.macs == result.rounds[2]["macs"] and result.before.macs == base
    with pytest.raises(UsageError, match="--steps must be >= 1"):
        compress(model, data, steps=0)
