"""CCE: the seed's step reproduced exactly, the default mode never ascending, and the optimizer
features (momentum, groups, foreach, state_dict, schedulers, half precision, CDG freezing)."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qcd_fx import measures
from qcd_fx.examples import digits_mlp
from qcd_fx.optim import CCE
from qcd_fx.optim.cce import efficiencies, efficiency_scale, output_efficiency


pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(64, 32), (32,), (10, 64), (10,), (), (1, 7), (300, 200), (8, 4, 3, 3), (5, 5)]


def _tensors(seed: int, dtype=torch.float32, scale: float = 0.1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(s, generator=g, dtype=torch.float64).mul(scale).to(dtype) for s in SHAPES]
    ts[-1] = torch.zeros(5, 5, dtype=dtype)  # a zero tensor: E = -1
    return ts


def _seed_step(params, lr, epsilon=1e-8):
    """The seed's ``cosmic_classical_efficiency_step``, literally (one parameter group)."""
    for param in params:
        if param.grad is None:
            continue
        info = param.data.abs().mean()
        entropy = -(param.data.softmax(dim=0) * param.data.log_softmax(dim=0)).mean()
        efficiency_grad = (info - entropy) / (info + entropy + epsilon) * param.grad
        param.data.add_(efficiency_grad, alpha=-lr)


def _leaves(tensors):
    return [t.clone().requires_grad_() for t in tensors]


def _set_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)


def test_seed_mode_equals_the_literal_seed_step_bit_for_bit():
    ref, ours = _leaves(_tensors(0)), _leaves(_tensors(0))
    opt = CCE(ours, lr=0.1, momentum=0.0, mode="seed")
    for step in range(4):
        _set_grads(ref, step)
        _set_grads(ours, step)
        _seed_step(ref, 0.1)
        opt.step()
        for a, b in zip(ref, ours):
            assert torch.equal(a, b)


def test_seed_mode_with_foreach_reductions_is_close_to_the_seed():
    ref, ours = _leaves(_tensors(1)), _leaves(_tensors(1))
    opt = CCE(ours, lr=0.1, momentum=0.0, mode="seed", foreach=True)
    for step in range(3):
        _set_grads(ref, step)
        _set_grads(ours, step)
        _seed_step(ref, 0.1)
        opt.step()
    for a, b in zip(ref, ours):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _digits_batch():
    from qcd_fx.data import load_digits_split

    s = load_digits_split()
    return s.x_train, s.y_train


def test_seed_mode_ascends_on_negative_efficiency_tensors_and_default_mode_descends():
    """The seed's failure, on the digits MLP at initialisation: the output layer has E < 0, so its
    seed step points uphill; the default mode's step is a descent direction for every tensor."""
    torch.manual_seed(0)
    model = digits_mlp()
    x, y = _digits_batch()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    out_w = model[5].weight
    e_out = float(measures.efficiency(out_w.detach(), dim=0))
    assert e_out < -0.5  # 10 rows: S = ln(10)/10 dominates the small weights
    # first-order change of the loss along each tensor's step: -lr * scale * |g|^2
    for p in model.parameters():
        e = float(measures.efficiency(p.detach(), dim=0))
        assert efficiency_scale(e, "positive", 0.25) > 0  # descent, whatever E is
        if p is out_w:
            assert efficiency_scale(e, "seed", 0.25) < 0  # seed: ascent
    # and for real: a seed-mode step on the output layer alone raises the loss
    with torch.no_grad():
        before = float(F.cross_entropy(model(x), y))
    seed_opt = CCE([out_w], lr=0.5, momentum=0.0, mode="seed")
    seed_opt.step()
    with torch.no_grad():
        after_seed = float(F.cross_entropy(model(x), y))
    assert after_seed > before


def test_default_mode_never_scales_below_min_scale_and_is_monotone():
    es = torch.linspace(-1, 1, 101).tolist()
    for min_scale in (0.0, 0.25, 1.0):
        scales = [efficiency_scale(e, "positive", min_scale) for e in es]
        assert all(min_scale <= s <= 1.0 for s in scales)
        assert all(a <= b for a, b in zip(scales, scales[1:]))
    assert efficiency_scale(-1.0, "positive", 0.0) == 0.0
    assert efficiency_scale(0.3, "positive", 1.0) == 1.0  # min_scale=1: plain SGD


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 70),
    cols=st.integers(1, 9),
    scale=st.sampled_from([1e-3, 0.1, 1.0, 20.0]),
    seed=st.integers(0, 2**16),
)
def test_batched_efficiencies_equal_measures(rows, cols, scale, seed):
    g = torch.Generator().manual_seed(seed)
    ts = [
        torch.randn(rows, cols, generator=g) * scale,
        torch.randn(rows, generator=g) * scale,
        torch.randn(rows, cols, 2, generator=g) * scale,
        torch.randn(rows, cols, generator=g) * scale,  # same shape as the first: stacked together
    ]
    ours = efficiencies(ts)
    ref = torch.stack([measures.efficiency(t, dim=0) for t in ts])
    torch.testing.assert_close(ours, ref, rtol=2e-5, atol=2e-6)


def test_batched_efficiencies_large_chunked_half_and_double():
    g = torch.Generator().manual_seed(0)
    big = torch.randn(4096, 300, generator=g) * 0.02  # > 2^19 elements: column chunks
    ts = [big, big.half(), big.bfloat16(), big.double(), torch.tensor(0.7), torch.zeros(3, 4)]
    ours = efficiencies(ts)
    ref = torch.stack([measures.efficiency(t, dim=0).float() for t in ts])
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert efficiencies([big.double()]).dtype == torch.float64
    torch.testing.assert_close(efficiencies([big.double()])[0], measures.efficiency(big.double(), dim=0), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("momentum, weight_decay, nesterov", [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 1e-2, True), (0.5, 1e-3, False)])
def test_foreach_path_matches_reference_path(momentum, weight_decay, nesterov):
    big = torch.randn(200, 120)  # >= 2^14 elements: the fused per-tensor kernel
    a = _leaves(_tensors(2) + [big])
    b = _leaves(_tensors(2) + [big])
    kw = dict(lr=0.05, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, refresh_every=1)
    oa, ob = CCE(a, foreach=True, **kw), CCE(b, foreach=False, **kw)
    for step in range(4):
        _set_grads(a, step)
        _set_grads(b, step)
        oa.step()
        ob.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_reference_path_is_sgd_with_per_tensor_learning_rates():
    """With the efficiencies known, CCE is torch.optim.SGD with lr * scale(E) per tensor."""
    ps = _leaves(_tensors(3))
    twins = _leaves(_tensors(3))
    opt = CCE(ps, lr=0.1, momentum=0.9, weight_decay=1e-3, refresh_every=1000)
    _set_grads(ps, 0)
    opt.step()
    scales = [efficiency_scale(float(measures.efficiency(t.detach(), 0)), "positive", 0.25) for t in _tensors(3)]
    sgd = torch.optim.SGD([{"params": [t], "lr": 0.1 * s} for t, s in zip(twins, scales)], momentum=0.9, weight_decay=1e-3, foreach=False)
    _set_grads(twins, 0)
    sgd.step()
    for step in range(1, 4):  # refresh_every=1000: the scales of step 0 are kept
        _set_grads(ps, step)
        _set_grads(twins, step)
        opt.step()
        sgd.step()
    for x, y in zip(ps, twins):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_refresh_every_recomputes_on_schedule():
    p = torch.randn(30, 20).requires_grad_()
    opt = CCE([p], lr=0.5, momentum=0.0, refresh_every=3)
    seen = []
    for step in range(7):
        p.grad = torch.randn(30, 20)
        expected_now = float(measures.efficiency(p.detach(), dim=0))
        opt.step()
        seen.append((opt.efficiencies()[p], expected_now))
    for step, (cached, fresh) in enumerate(seen):
        if step % 3 == 0:
            assert cached == pytest.approx(fresh, rel=1e-5)
        else:
            assert cached == seen[step - step % 3][0]  # unchanged between refreshes
    assert seen[1][0] != pytest.approx(seen[1][1], rel=1e-7)  # the weights did move


def _train_steps(model, opt, batches, sched=None):
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 64, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("foreach", [True, False])
def test_state_dict_round_trip_continues_bit_for_bit(foreach):
    batches = _batches(10)

    def make():
        torch.manual_seed(0)
        m = digits_mlp(hidden=32)
        return m, CCE(m.parameters(), lr=0.1, refresh_every=4, foreach=foreach)

    m1, o1 = make()
    _train_steps(m1, o1, batches)

    m2, o2 = make()
    _train_steps(m2, o2, batches[:5])
    buf = io.BytesIO()
    torch.save({"model": m2.state_dict(), "opt": o2.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    m3, o3 = make()
    m3.load_state_dict(saved["model"])
    o3.load_state_dict(saved["opt"])
    _train_steps(m3, o3, batches[5:])
    for a, b in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(a, b)


def test_lr_scheduler_drives_the_learning_rate():
    p = torch.randn(20, 10).requires_grad_()
    opt = CCE([p], lr=1.0, momentum=0.0, refresh_every=1000)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    scale = None
    for k in range(3):
        before = p.detach().clone()
        p.grad = torch.ones(20, 10)
        opt.step()
        sched.step()
        scale = scale or efficiency_scale(opt.efficiencies()[p], "positive", 0.25)
        torch.testing.assert_close(before - p.detach(), torch.full((20, 10), 0.5**k * scale))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.125)


def test_per_group_settings():
    a, b = torch.randn(8, 4).requires_grad_(), torch.randn(8, 4).requires_grad_()
    a0, b0 = a.detach().clone(), b.detach().clone()
    opt = CCE([{"params": [a]}, {"params": [b], "lr": 0.01, "mode": "seed", "momentum": 0.0}], lr=1.0, momentum=0.0)
    a.grad, b.grad = torch.ones(8, 4), torch.ones(8, 4)
    opt.step()
    sa = efficiency_scale(float(measures.efficiency(a0, 0)), "positive", 0.25)
    eb = float(measures.efficiency(b0, 0))
    torch.testing.assert_close(a0 - a.detach(), torch.full((8, 4), sa))
    torch.testing.assert_close(b0 - b.detach(), torch.full((8, 4), 0.01 * eb))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_parameters_stay_finite(dtype):
    # weights with a wide range: the seed's fp16 softmax/log_softmax would be computed in half
    g = torch.Generator().manual_seed(0)
    ps = [(torch.randn(64, 32, generator=g) * 8).to(dtype).requires_grad_(), (torch.randn(10, generator=g) * 30).to(dtype).requires_grad_()]
    refs = [p.detach().float() for p in ps]
    opt = CCE(ps, lr=0.01)
    for step in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        opt.step()
    assert all(torch.isfinite(p).all() for p in ps)
    e = opt.efficiencies()
    for p, r in zip(ps, refs):
        assert e[p] == pytest.approx(float(measures.efficiency(r, 0)), abs=1e-2)


def test_autocast_training_has_no_nan():
    torch.manual_seed(0)
    model = digits_mlp(hidden=32)
    opt = CCE(model.parameters(), lr=0.1)
    for x, y in _batches(5):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_cdg_freezing_rule_skips_inefficient_tensors():
    lo = torch.zeros(6, 6).requires_grad_()  # E = -1
    hi = (torch.ones(1, 6) * 3).requires_grad_()  # one row: S = 0, E ~ 1
    opt = CCE([lo, hi], lr=0.1, momentum=0.9, freeze_below=0.0)
    lo.grad, hi.grad = torch.ones(6, 6), torch.ones(1, 6)
    opt.step()
    assert torch.equal(lo.detach(), torch.zeros(6, 6))
    assert "momentum_buffer" not in opt.state[lo]
    assert not torch.equal(hi.detach(), torch.ones(1, 6) * 3)
    # the seed's threshold: efficiency of the model outputs
    out = torch.tensor([[5.0, -5.0, 0.0]])
    assert output_efficiency(out) == pytest.approx(float(measures.efficiency(out, dim=-1)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": -0.1}, "lr"),
        ({"momentum": 1.5}, "momentum"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"mode": "fast"}, "mode"),
        ({"min_scale": 2.0}, "min_scale"),
        ({"refresh_every": 0}, "refresh_every"),
        ({"refresh_every": 2.5}, "refresh_every"),
        ({"nesterov": True, "momentum": 0.0}, "nesterov"),
        ({"freeze_below": "low"}, "freeze_below"),
        ({"foreach": "yes"}, "foreach"),
        ({"eps": 0.0}, "eps"),
    ],
)
def test_bad_arguments_raise_one_line_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        CCE([torch.zeros(2, requires_grad=True)], **kwargs)
    assert "\n" not in str(info.value)


def test_bad_group_arguments_are_checked_too():
    with pytest.raises(ValueError, match="mode"):
        CCE([{"params": [torch.zeros(2, requires_grad=True)], "mode": "nope"}])
