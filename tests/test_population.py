"""What the three population optimizers share through :class:`PopulationOptimizer`: how ``step``
may be called, the versioned state dict, the evaluator per model."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcd_fx.optim import QIMAD, PopulationOptimizer, QuantumDynamics, QuantumLangevin

MAKERS = {
    "QIMAD": lambda ps: QIMAD(ps, num_agents=3, seed=0, total_steps=4),
    "QuantumDynamics": lambda ps: QuantumDynamics(ps, num_centres=4, seed=0),
    "QuantumLangevin": lambda ps: QuantumLangevin(ps, walkers=2, seed=0, total_steps=4),
}


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    batch = (torch.randn(16, 4), torch.randint(0, 2, (16,)))
    return model, batch


@pytest.mark.parametrize("name", MAKERS)
def test_every_population_optimizer_shares_the_base(name):
    model, batch = _problem()
    opt = MAKERS[name](model.parameters())
    assert isinstance(opt, PopulationOptimizer) and opt.population_based
    assert opt.evaluation_mode is None
    loss = opt.step(model=model, batch=batch, loss_fn=F.cross_entropy)
    assert isinstance(loss, float) and loss == loss
    assert opt.evaluation_mode in ("vmap", "loop")


@pytest.mark.parametrize("name", MAKERS)
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"model": "M"}, r"\.step\(model=\.\.\.\) also needs batch="),
        ({"model": "M", "batch": "B3", "loss_fn": F.cross_entropy}, "batch must be a pair"),
        ({"batch": "B"}, "batch= needs model="),
        ({"closure": 3}, "closure must be callable"),
        ({"closure": lambda: 0.0, "model": "M"}, "not both"),
    ],
)
def test_bad_step_calls_get_the_same_one_line_errors(name, kwargs, message):
    model, batch = _problem()
    opt = MAKERS[name](model.parameters())
    subst = {"M": model, "B": batch, "B3": (*batch, batch[1])}
    kwargs = {k: subst.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=message) as info:
        opt.step(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", MAKERS)
def test_state_dicts_are_versioned_and_refuse_each_other(name):
    model, batch = _problem()
    opt = MAKERS[name](model.parameters())
    opt.step(model=model, batch=batch, loss_fn=F.cross_entropy)
    sd = opt.state_dict()
    assert sd[opt.state_key]["version"] == opt.state_version
    for other, make in MAKERS.items():
        if other != name:
            with pytest.raises(ValueError, match=f"not a {other} state dict"):
                make(model.parameters()).load_state_dict(sd)
    future = dict(sd, **{opt.state_key: dict(sd[opt.state_key], version=99)})
    with pytest.raises(ValueError, match=f"unsupported {name} state version 99"):
        MAKERS[name](model.parameters()).load_state_dict(future)
    with pytest.raises(ValueError, match=f"not a {name} state dict"):
        MAKERS[name](model.parameters()).load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())


@pytest.mark.parametrize("name", MAKERS)
def test_a_resumed_run_continues_bit_for_bit(name):
    model, batch = _problem()
    opt = MAKERS[name](model.parameters())
    opt.step(model=model, batch=batch, loss_fn=F.cross_entropy)
    sd = {k: v for k, v in opt.state_dict().items()}
    twin, _ = _problem()
    twin.load_state_dict(model.state_dict())
    resumed = MAKERS[name](twin.parameters())
    resumed.load_state_dict(sd)
    for _ in range(2):
        a = opt.step(model=model, batch=batch, loss_fn=F.cross_entropy)
        b = resumed.step(model=twin, batch=batch, loss_fn=F.cross_entropy)
        assert a == b
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


class _Aliased(nn.Module):
    """A submodule reachable under two names (``alias`` is ``inner``)."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 2)
        self.alias = self.inner

    def forward(self, x):
        return self.alias(torch.tanh(x))


@pytest.mark.parametrize("evaluation", ["vmap", "loop"])
def test_a_module_under_two_names_is_left_usable(evaluation):
    torch.manual_seed(0)
    model = _Aliased()
    batch = (torch.randn(16, 4), torch.randint(0, 2, (16,)))
    opt = QIMAD(model.parameters(), num_agents=3, seed=0, total_steps=4, evaluation=evaluation)
    for _ in range(2):
        opt.step(model=model, batch=batch, loss_fn=F.cross_entropy)
    out = model(batch[0])  # plain tensors again, not vmap's batched ones
    assert out.shape == (16, 2)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, batch[1]).backward()  # and trainable as an ordinary module
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())


def test_a_subclass_without_its_state_methods_is_refused_when_defined():
    with pytest.raises(TypeError, match="must set state_key and define _own_state, _load_own_state"):

        class Half(PopulationOptimizer):
            state_key = "half"

    with pytest.raises(TypeError, match="must set state_key"):

        class Keyless(PopulationOptimizer):
            def _own_state(self):
                return {}

            def _load_own_state(self, own):
                pass
