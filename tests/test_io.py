import os

import pytest
import torch
from torch import nn

import qcd_fx
from qcd_fx import io, zoo
from qcd_fx.errors import ModelLoadError, UnsafeLoadError, UsageError
from qcd_fx.examples import digits_cnn


def roundtrip(gm, tmp_path, name="m.pt"):
    path = tmp_path / name
    assert io.save(gm, path) == "safe"
    return io.load(path)


@pytest.mark.parametrize("name", ["resnet18", "vit_b_16", "swin_t", "shufflenet_v2_x0_5", "googlenet", "regnet_x_400mf"])
def test_transformed_zoo_models_round_trip_exactly(name, tmp_path):
    model, shape = zoo.build(name, small=True)
    x = torch.randn(shape)
    gm = qcd_fx.transform(model, "qci{rank=4},csc{target=activations,hard=true}", example_inputs=x).graph_module
    loaded = roundtrip(gm, tmp_path)
    assert isinstance(loaded, torch.fx.GraphModule)
    assert str(loaded.graph) == str(gm.graph)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), gm.eval()(x))
    assert loaded.state_dict().keys() == gm.state_dict().keys()


@pytest.mark.zoo
@pytest.mark.parametrize("name", zoo.classification_models())
def test_every_zoo_model_round_trips(name, tmp_path):
    model, shape = zoo.build(name, small=True)
    x = torch.randn(shape)
    gm = qcd_fx.transform(model, "qci,csc", example_inputs=x).graph_module
    with torch.no_grad():
        assert torch.equal(roundtrip(gm, tmp_path).eval()(x), gm.eval()(x))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(8, 8)
        self.out = nn.Linear(8, 8)
        self.out.weight = self.emb.weight  # tied weights
        self.shared = self.emb  # the same module under two names
        self.register_buffer("scale", torch.tensor(2.0), persistent=False)

    def forward(self, x):
        return self.out(self.emb(x)) + self.shared(x) * self.scale


def test_tied_weights_shared_modules_and_buffers_survive(tmp_path):
    gm = qcd_fx.trace(Tied())
    loaded = roundtrip(gm, tmp_path)
    assert loaded.out.weight is loaded.emb.weight
    x = torch.randn(3, 8)
    assert torch.equal(loaded(x), gm(x))
    assert "scale" not in loaded.state_dict() and torch.equal(loaded.scale, torch.tensor(2.0))
    loaded.train()
    loaded(x).sum().backward()
    assert loaded.emb.weight.grad is not None


def test_training_flag_and_requires_grad_survive(tmp_path):
    gm = qcd_fx.trace(digits_cnn())
    gm.features.get_submodule("0").weight.requires_grad_(False)
    gm.eval()
    loaded = roundtrip(gm, tmp_path)
    assert loaded.training is False and loaded.features.get_submodule("0").weight.requires_grad is False


def test_pickled_module_needs_trust(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(digits_cnn(), path)
    with pytest.raises(UnsafeLoadError, match="executes code from the file.*--trust-pickle"):
        io.load(path)
    assert isinstance(io.load(path, trust_pickle=True), nn.Module)


def test_state_dicts_tensors_and_junk_are_not_models(tmp_path):
    sd = tmp_path / "sd.pt"
    torch.save(digits_cnn().state_dict(), sd)
    with pytest.raises(ModelLoadError, match=r"holds a state dict \(\d+ tensors\), not a model.*--weights"):
        io.load(sd)
    t = tmp_path / "t.pt"
    torch.save(torch.zeros(3), t)
    with pytest.raises(ModelLoadError, match=r"holds a tensor of shape \(3,\), not a model"):
        io.load(t)
    txt = tmp_path / "notes.pt"
    txt.write_text("hello")
    with pytest.raises(ModelLoadError, match="not a PyTorch file|truncated or corrupt"):
        io.load(txt)
    with pytest.raises(ModelLoadError, match="does not exist"):
        io.load(tmp_path / "missing.pt")


def test_truncated_file_is_reported(tmp_path):
    good = tmp_path / "good.pt"
    io.save(qcd_fx.trace(digits_cnn()), good)
    data = good.read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        io.load(bad)


def _tamper(path, fn):
    payload = torch.load(path, weights_only=True)
    fn(payload)
    torch.save(payload, path)


def test_files_cannot_name_code_outside_the_allow_list(tmp_path):
    path = tmp_path / "m.pt"
    io.save(qcd_fx.trace(digits_cnn()), path)

    def call_os_system(payload):
        node = next(n for n in payload["nodes"] if n["op"] == "call_function")
        node["target"] = {"$fn": "os.system"}

    _tamper(path, call_os_system)
    with pytest.raises(UnsafeLoadError, match=r"refused: node '\w+' calls 'os.system', which is not a tensor operation"):
        io.load(path)

    io.save(qcd_fx.trace(digits_cnn()), path)
    _tamper(path, lambda p: p["modules"][1].update({"class": "subprocess.Popen"}))
    with pytest.raises(UnsafeLoadError, match="module class 'subprocess.Popen' is outside the allowed packages"):
        io.load(path)

    io.save(qcd_fx.trace(digits_cnn()), path)
    _tamper(path, lambda p: next(n for n in p["nodes"] if n["op"] == "call_function").update({"target": {"$fn": "torch.save"}}))
    with pytest.raises(UnsafeLoadError, match="calls 'torch.save', which is not a tensor operation"):
        io.load(path)

    io.save(qcd_fx.trace(digits_cnn()), path)
    _tamper(path, lambda p: next(n for n in p["nodes"] if n["op"] == "call_function").update({"target": {"$fn": "eval"}}))
    with pytest.raises(UnsafeLoadError, match="calls 'eval', which is not a tensor operation"):
        io.load(path)


def _noop_hook(*args):
    return None


def test_modules_with_hooks_are_refused_unless_pickle_allowed(tmp_path):
    gm = qcd_fx.trace(digits_cnn())
    gm.features.get_submodule("0").register_forward_hook(_noop_hook)
    with pytest.raises(UsageError, match=r"module 'features.0' \(Conv2d\) has forward_hooks registered"):
        io.save(gm, tmp_path / "h.pt")
    assert not os.listdir(tmp_path)  # nothing half-written
    assert io.save(gm, tmp_path / "h.pt", allow_pickle=True) == "pickle"
    with pytest.raises(UnsafeLoadError):
        io.load(tmp_path / "h.pt")


def test_atomic_path_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("precious")
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("boom")
    assert target.read_text() == "precious"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_check_output_path(tmp_path):
    src = tmp_path / "in.pt"
    src.write_text("x")
    with pytest.raises(UsageError, match="is the input file"):
        io.check_output_path(src, inputs=[src], force=True)
    with pytest.raises(UsageError, match="does not exist; create it first"):
        io.check_output_path(tmp_path / "nodir" / "o.pt")
    with pytest.raises(UsageError, match="exists; pass --force"):
        io.check_output_path(src)
    assert io.check_output_path(tmp_path / "new.pt") == str(tmp_path / "new.pt")


def test_factory_and_weights(tmp_path, monkeypatch):
    torch.manual_seed(1)
    ref = digits_cnn()
    st = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file(ref.state_dict(), st)
    model = io.load_model("qcd_fx.examples:digits_cnn", weights=str(st))
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(model.eval()(x), ref.eval()(x))
    pt = tmp_path / "w.pt"
    torch.save({"state_dict": ref.state_dict()}, pt)
    assert torch.equal(io.load_model("qcd_fx.examples:digits_cnn", weights=str(pt)).eval()(x), ref(x))
    with pytest.raises(ModelLoadError, match=r"do not fit Sequential: \d+ missing .* keys"):
        io.load_model("qcd_fx.examples:digits_mlp", weights=str(pt))
    with pytest.raises(ModelLoadError, match="cannot import 'no_such_pkg.models' for model 'no_such_pkg.models:net': No module named 'no_such_pkg'"):
        io.load_model("no_such_pkg.models:net")
    with pytest.raises(ModelLoadError, match="has no attribute 'nope'"):
        io.load_model("qcd_fx.examples:nope")
    (tmp_path / "io_user_models.py").write_text("import torch\ndef net():\n    return torch.nn.Linear(2, 2)\ndef bad():\n    return 3\n")
    monkeypatch.chdir(tmp_path)
    assert isinstance(io.load_model("io_user_models:net"), nn.Linear)  # factories are found in the current directory
    with pytest.raises(ModelLoadError, match=r"io_user_models:bad\(\) returned int, not a torch.nn.Module"):
        io.load_model("io_user_models:bad")
