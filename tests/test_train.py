"""Training QCI-transformed digits models with every bundled optimizer (real data, fixed seeds),
and the fit / evaluate / train_on_digits plumbing."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcd_fx
from qcd_fx.data import digits_loaders, load_digits_split, tensor_loader
from qcd_fx.errors import UsageError
from qcd_fx.examples import digits_cnn, digits_mlp
from qcd_fx.optim import CCE, QIMAD
from qcd_fx.train import History, evaluate, fit, make_optimizer, train_on_digits

pytestmark = pytest.mark.usefixtures("one_thread")


def _qci(kind: str) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    model = digits_mlp() if kind == "mlp" else digits_cnn()
    return qcd_fx.transform(model, "qci", example_inputs=(torch.zeros(2, 1, 8, 8),)).graph_module


def _optimizer(name, params):
    """The defaults users get (the issue's public API)."""
    if name == "cce":
        return CCE(params, lr=0.1)
    if name == "qimad":
        return QIMAD(params, num_agents=8, seed=0)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


EPOCHS = {"mlp": 10, "cnn": 10}


@pytest.mark.parametrize("kind", ["mlp", pytest.param("cnn", marks=pytest.mark.slow)])  # the CNN: ~2 min here, `-m slow`
def test_every_optimizer_trains_a_qci_digits_model_to_95_percent(kind):
    results = {}
    for name in ("cce", "qimad", "adam", "sgd"):
        model = _qci(kind)
        train, test, _ = digits_loaders(batch_size=64, seed=0)
        history = fit(model, train, _optimizer(name, model.parameters()), EPOCHS[kind], progress=False)
        results[name] = evaluate(model, test)["accuracy"]
        assert isinstance(history, History) and len(history.epochs) == EPOCHS[kind]
    assert all(acc >= 0.95 for acc in results.values()), results


def test_seed_mode_cce_does_not_train():
    """The seed's CCE step, reproduced: negative efficiencies make it ascend; it stays near chance."""
    model = _qci("mlp")
    train, test, _ = digits_loaders(batch_size=64, seed=0)
    fit(model, train, CCE(model.parameters(), lr=0.1, momentum=0.0, mode="seed"), 3, progress=False)
    assert evaluate(model, test)["accuracy"] < 0.5


def test_fit_drives_closure_optimizers():
    torch.manual_seed(0)
    s = load_digits_split()
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    loader = tensor_loader(s.x_train, s.y_train, batch_size=len(s.y_train))
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5)
    history = fit(model, loader, opt, 3, progress=False)
    losses = history.column("train_loss")
    assert losses[-1] < losses[0] < math.log(10) + 0.5
    assert history.epochs[-1].train_accuracy > 0.9


def test_fit_records_validation_and_scheduler():
    torch.manual_seed(0)
    model = digits_mlp(hidden=32)
    train, test, val = digits_loaders(batch_size=128, seed=0, val_fraction=0.2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    seen = []
    history = fit(model, train, opt, 3, val_loader=val, scheduler=sched, progress=False, on_epoch=seen.append)
    assert [e.lr for e in history.epochs] == pytest.approx([0.1, 0.05, 0.025])
    assert seen == history.epochs
    final = evaluate(model, val)
    assert history.epochs[-1].val_accuracy == final["accuracy"]
    assert history.epochs[-1].val_loss == pytest.approx(final["loss"])
    assert all(0 <= e.train_accuracy <= 1 and e.seconds > 0 for e in history.epochs)
    again = History.from_dict(json.loads(json.dumps(history.to_dict())))
    assert again.epochs == history.epochs


def test_evaluate_counts_correct_predictions():
    s = load_digits_split()
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    loader = tensor_loader(s.x_test, s.y_test, batch_size=50)
    with torch.no_grad():
        out = model(s.x_test)
    result = evaluate(model, loader)
    assert result["n"] == 360
    assert result["accuracy"] == pytest.approx(int((out.argmax(1) == s.y_test).sum()) / 360)
    assert result["loss"] == pytest.approx(float(F.cross_entropy(out, s.y_test)), rel=1e-6)
    assert model.training  # restored


def test_progress_goes_to_stderr_and_can_be_disabled(capfd):
    torch.manual_seed(0)
    model = digits_mlp(hidden=16)
    train, _, _ = digits_loaders(batch_size=256, seed=0)
    fit(model, train, torch.optim.Adam(model.parameters()), 1, progress=False)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    fit(model, train, torch.optim.Adam(model.parameters()), 1, progress=True)
    out, err = capfd.readouterr()
    assert out == "" and "epoch 1/1" in err


def test_fit_stops_on_a_nonfinite_loss():
    torch.manual_seed(0)
    model = digits_mlp(hidden=16)
    train, _, _ = digits_loaders(batch_size=64, seed=0)
    with pytest.raises(FloatingPointError, match="epoch 1"):
        fit(model, train, torch.optim.SGD(model.parameters(), lr=1e12), 1, progress=False)


def test_train_on_digits_writes_three_files_atomically_and_never_overwrites(tmp_path):
    torch.manual_seed(0)
    prefix = tmp_path / "run"
    history = train_on_digits(digits_mlp(hidden=32), "adam", 2, batch_size=128, lr=0.01, seed=0, out_prefix=prefix, progress=False)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["run.curve.png", "run.history.json", "run.pt"]  # no temporary files left
    data = json.loads((tmp_path / "run.history.json").read_text())
    assert len(data["epochs"]) == 2 and data["meta"]["optimizer"] == "adam"
    assert data["meta"]["final_test_accuracy"] == history.final_val_accuracy > 0.8
    assert (tmp_path / "run.curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = torch.load(tmp_path / "run.pt", weights_only=True)
    assert set(state) == set(digits_mlp(hidden=32).state_dict())
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(FileExistsError, match="run.pt exists"):
        train_on_digits(digits_mlp(hidden=32), "adam", 1, out_prefix=tmp_path / "run.pt", progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    train_on_digits(digits_mlp(hidden=32), "sgd", 1, out_prefix=prefix, overwrite=True, progress=False)
    assert json.loads((tmp_path / "run.history.json").read_text())["meta"]["optimizer"] == "sgd"


def test_train_on_digits_accepts_flat_input_models_and_every_optimizer_name():
    torch.manual_seed(0)
    flat = nn.Sequential(nn.Linear(64, 10))  # takes (N, 64): fed flattened images
    history = train_on_digits(flat, "qimad", 1, batch_size=256, progress=False, optimizer_options={"num_agents": 2})
    assert history.meta["optimizer"] == "qimad"
    for name in ("sgd", "adam", "cce", "cce-seed", "qimad"):
        opt = make_optimizer(name, digits_mlp(hidden=8).parameters())
        assert isinstance(opt, torch.optim.Optimizer)


def test_train_on_digits_rejects_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        train_on_digits(digits_mlp(), "lion", 1, progress=False)
    with pytest.raises(ValueError, match="epochs"):
        train_on_digits(digits_mlp(), "adam", 0, progress=False)
    with pytest.raises(UsageError, match="does not fit --data 'digits'"):
        train_on_digits(nn.Linear(3, 2), "adam", 1, progress=False)
    with pytest.raises(UsageError, match="3 class scores for 10 classes"):
        train_on_digits(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), "adam", 1, progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        train_on_digits(digits_mlp(), "adam", 1, out_prefix=tmp_path / "missing" / "run", progress=False)
    with pytest.raises(ValueError, match="lr"):
        make_optimizer("sgd", digits_mlp().parameters(), lr=-1.0)
    with pytest.raises(ValueError, match="epochs"):
        fit(digits_mlp(), [], torch.optim.SGD(digits_mlp().parameters(), lr=0.1), 0)
