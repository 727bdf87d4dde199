import copy
import math

import pytest
import torch
from scipy.integrate import quad
from torch import nn

from qcd_fx.optim import qdt
from qcd_fx.optim.qdt import QDTSchedule, StabilityController, coupling, coupling_floor, coupling_integral, coupling_peak, scale_transition

CONSTANTS = [
    (0.45, 0.25, 0.35, 1.2),  # the seed's
    (0.3, 0.0, 0.5, 1.0),  # no damping
    (1.0, 0.7, 0.0, 2.0),  # no oscillation: the integral is 0
    (0.1, 0.05, 2.0, 0.5),
]


@pytest.mark.parametrize("alpha,beta,gamma,Lambda", CONSTANTS)
def test_coupling_matches_numerical_integration(alpha, beta, gamma, Lambda):
    for t in [0.0, 0.1, 1.0, 3.7, 9.28, 25.0, 80.0]:
        integral, _ = quad(lambda u: math.exp(-beta * u) * math.sin(gamma * u), 0.0, t, epsabs=1e-11, epsrel=1e-11, limit=1000)
        assert abs(coupling_integral(t, beta, gamma) - integral) < 1e-6
        expected = alpha * math.exp(-beta * t) * math.cos(gamma * t) + Lambda * integral
        assert abs(coupling(t, alpha, beta, gamma, Lambda) - expected) < 1e-6
    ts = torch.linspace(0, 30, 7, dtype=torch.float64)
    torch.testing.assert_close(coupling(ts, alpha, beta, gamma, Lambda), torch.tensor([coupling(float(t), alpha, beta, gamma, Lambda) for t in ts], dtype=torch.float64))


@pytest.mark.parametrize("alpha,beta,gamma,Lambda", CONSTANTS)
def test_peak_and_floor_in_closed_form_match_a_dense_grid(alpha, beta, gamma, Lambda):
    ts = torch.linspace(0, 200, 400_001, dtype=torch.float64)
    values = coupling(ts, alpha, beta, gamma, Lambda)
    assert coupling_peak(alpha, beta, gamma, Lambda) == pytest.approx(float(values.max()), abs=1e-6)
    assert coupling_floor(alpha, beta, gamma, Lambda) <= float(values.min()) + 1e-6


def test_seed_constants_profile():
    assert coupling(0.0) == pytest.approx(0.45)
    assert coupling_peak() == pytest.approx(2.465068541, abs=1e-8)
    assert coupling_floor() == pytest.approx(0.433141, abs=1e-5)
    assert coupling(1e4) == pytest.approx(1.2 * 0.35 / (0.25**2 + 0.35**2))
    assert scale_transition(0.0) == 0.5 and scale_transition(1e6) == 1.0 and scale_transition(-1e6) == 0.0


def sgd(lr=0.1):
    w = nn.Parameter(torch.zeros(3))
    return torch.optim.SGD([w], lr=lr), w


def test_schedule_without_losses_is_psi_hat_times_transition():
    opt, _ = sgd(0.2)
    sched = QDTSchedule(opt, time_scale=0.5, transition_time=2.0, transition_rate=1.5)
    lrs = []
    for _ in range(60):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for n, lr in enumerate(lrs):
        t = 0.5 * n
        expected = 0.2 * coupling(t) / coupling_peak() * scale_transition(t, 1.5, 2.0)
        assert lr == pytest.approx(expected, rel=1e-12)
    assert max(lrs) <= 0.2
    assert sched.get_last_lr() == [opt.param_groups[0]["lr"]]


def test_energy_feedback_follows_the_loss():
    opt, _ = sgd(1.0)
    sched = QDTSchedule(opt, coupling=False, transition_time=-50.0)  # S_lambda = 1: only the feedback
    opt.step()
    sched.step(2.0)
    assert sched.energy() == 1.0
    first = opt.param_groups[0]["lr"]
    opt.step()
    sched.step(1.0)
    assert sched.energy() == pytest.approx(0.5)
    # S = H(P)/log2 M + gamma * TV: window [1, 0.5], TV = 0.5
    p = [1 / 1.5, 0.5 / 1.5]
    h = -sum(q * math.log2(q) for q in p)
    assert sched.entropy() == pytest.approx(h + 0.35 * 0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * (1 + 0.25 * sched.entropy()))
    assert opt.param_groups[0]["lr"] < first
    sched.step(4.0)  # a rising loss never raises E above 1
    assert sched.energy() == 1.0
    assert sched.components["multiplier"] == pytest.approx(opt.param_groups[0]["lr"])
    # the entropy is clipped: a very noisy loss cannot make the rate explode
    for i in range(200):
        sched.step(4.0 if i % 2 else 0.4)
    assert sched.entropy() == 4.0 and opt.param_groups[0]["lr"] <= 2.0


def test_feedback_off_ignores_losses():
    opt, _ = sgd(1.0)
    sched = QDTSchedule(opt, feedback=False)
    ref = [sched.time_factor(n) for n in range(1, 6)]
    for n in range(5):
        opt.step()
        sched.step(10.0 / (n + 1))
        assert opt.param_groups[0]["lr"] == pytest.approx(ref[n])


def test_state_dict_round_trip():
    opt, _ = sgd(0.1)
    sched = QDTSchedule(opt, time_scale=0.3, energy_ema=0.5)
    losses = [2.0 / (1 + 0.1 * i) + 0.05 * math.sin(i) for i in range(40)]
    for loss in losses[:20]:
        opt.step()
        sched.step(loss)
    state = copy.deepcopy(sched.state_dict())
    expected = []
    for loss in losses[20:]:
        opt.step()
        sched.step(loss)
        expected.append(opt.param_groups[0]["lr"])
    opt2, _ = sgd(0.1)
    sched2 = QDTSchedule(opt2, time_scale=0.3, energy_ema=0.5)
    sched2.load_state_dict(state)
    got = []
    for loss in losses[20:]:
        opt2.step()
        sched2.step(loss)
        got.append(opt2.param_groups[0]["lr"])
    assert got == expected


def test_composes_with_sgd_on_a_regression_and_with_cce():
    torch.manual_seed(0)
    x = torch.randn(256, 5)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0]) + 0.1
    model = nn.Linear(5, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = QDTSchedule(opt, time_scale=0.2, energy_ema=0.9)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x).squeeze(1), y)
        loss.backward()
        opt.step()
        sched.step(loss)
        losses.append(float(loss.detach()))
    assert losses[-1] < 1e-3 * losses[0]

    from qcd_fx.optim import CCE

    model = nn.Linear(5, 1)
    cce = CCE(model.parameters(), lr=0.1)
    sched = QDTSchedule(cce, time_scale=0.2)
    seen = []
    for _ in range(5):
        cce.zero_grad()
        loss = nn.functional.mse_loss(model(x).squeeze(1), y)
        loss.backward()
        cce.step()
        sched.step(loss)
        seen.append(cce.param_groups[0]["lr"])
    assert len(set(seen)) == 5 and all(0 < lr <= 0.1 for lr in seen)


def test_works_with_fit_through_on_epoch():
    from qcd_fx.train import fit

    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = (x.sum(1) > 0).long()
    loader = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = QDTSchedule(opt, time_scale=1.0)
    history = fit(model, loader, opt, 6, scheduler=sched, progress=False, on_epoch=lambda r: sched.observe(r.train_loss))
    assert sched.observations == 6 and sched.energy() < 1.0
    assert history.epochs[-1].train_loss < history.epochs[0].train_loss


def test_plot_writes_a_png(tmp_path):
    opt, _ = sgd()
    sched = QDTSchedule(opt, time_scale=0.25)
    sched.plot(tmp_path / "qdt.png")
    qdt.plot_schedule(tmp_path / "other.png", 50, time_scale=0.5)
    for name in ("qdt.png", "other.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.png", "qdt.png"]  # no temporary files left


def test_bad_arguments():
    opt, _ = sgd()
    with pytest.raises(ValueError, match="time_scale must be > 0"):
        QDTSchedule(opt, time_scale=0.0)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        QDTSchedule(opt, beta=-0.1)
    with pytest.raises(ValueError, match="reaches .* <= 0"):
        QDTSchedule(opt, alpha=-1.0)
    with pytest.raises(ValueError, match="window must be an integer >= 2"):
        QDTSchedule(opt, window=1)
    sched = QDTSchedule(opt)
    with pytest.raises(ValueError, match="non-negative loss"):
        sched.step(-1.0)
    with pytest.raises(ValueError, match="finite number"):
        sched.observe(float("nan"))
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        qdt.plot_schedule("x.png", 0)


# ── the stability controller ────────────────────────────────────────────────────────────────────


def test_flow_criterion_bounds_the_sgd_step_length():
    w = nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([w], lr=1.0)
    ctl = StabilityController(opt, Lambda=1.2)
    w.grad = torch.tensor([30.0, 40.0, 0.0, 0.0])  # ||g|| = 50: an unclipped step of length 50
    opt.step()
    assert float(w.detach().norm()) == pytest.approx(1.2)
    assert ctl.stats["flow"] == 1 and ctl.stats["last_scale"] == pytest.approx(1.2 / 50)
    # a small gradient is left exactly as it is
    w.grad = torch.tensor([0.1, 0.0, 0.0, 0.0])
    before = w.detach().clone()
    opt.step()
    torch.testing.assert_close(w.detach(), before - torch.tensor([0.1, 0.0, 0.0, 0.0]))
    assert ctl.stats["last_scale"] == 1.0
    ctl.remove()
    w.grad = torch.tensor([300.0, 0.0, 0.0, 0.0])
    before = w.detach().clone()
    opt.step()
    assert float((w.detach() - before).norm()) == pytest.approx(300.0)


def test_flow_criterion_with_two_learning_rates_is_exact():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.5}, {"params": [b], "lr": 2.0}])
    ctl = StabilityController(opt, attach=False)
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 10.0])
    scale = ctl.clip_()
    gnorm = math.sqrt(25 + 100)
    assert scale == pytest.approx(1.2 * gnorm / (0.5 * 25 + 2.0 * 100))
    flow = 0.5 * float(a.grad.square().sum()) + 2.0 * float(b.grad.square().sum())
    assert flow == pytest.approx(1.2 * math.sqrt(float(a.grad.square().sum() + b.grad.square().sum())))


def test_energy_criterion_is_global_norm_clipping():
    w = nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adam([w], lr=1e-3)
    ctl = StabilityController(opt, Lambda=None, energy_max=2.0, attach=False)
    w.grad = torch.tensor([6.0, 8.0, 0.0])
    ctl.clip_()
    assert float(w.grad.norm()) == pytest.approx(2.0)  # 1/2 ||g||^2 = E_max


def run_quadratic(w0, steps):
    # f = 1/2 h w^2 with h = 100: the secant curvature between two steps is exactly h
    w = nn.Parameter(torch.tensor([w0], dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=1e-3)
    ctl = StabilityController(opt, Lambda=None, curvature=True)
    trace = []
    for _ in range(steps):
        opt.zero_grad()
        (50.0 * w.square().sum()).backward()
        g = float(w.grad)
        before = float(w.detach())
        opt.step()
        trace.append((g, ctl.stats["last_scale"], before, float(w.detach())))
    return trace, ctl


def test_curvature_criterion_uses_the_secant():
    # near the minimum (|w| < beta / alpha = 0.556) kappa = 100 exceeds (alpha / beta) ||g|| = 180 |w|
    trace, ctl = run_quadratic(0.1, 2)
    assert trace[0][1] == 1.0  # no secant yet
    g, scale, before, after = trace[1]
    assert scale == pytest.approx(0.45 / 0.25 * g / 100.0)
    assert after == pytest.approx(before - 1e-3 * g * scale)
    assert ctl.stats["curvature"] == 1
    # far from it the criterion holds and nothing is scaled
    trace, ctl = run_quadratic(2.0, 3)
    assert [s for _, s, _, _ in trace] == [1.0, 1.0, 1.0] and ctl.stats["curvature"] == 0


def test_controller_rejects_optimizers_that_compute_gradients_inside_step():
    from qcd_fx.optim import QIMAD

    x = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="computes its gradients inside step"):
        StabilityController(torch.optim.LBFGS([x]))
    with pytest.raises(ValueError, match="computes its gradients inside step"):
        StabilityController(QIMAD([x], seed=0))
    with pytest.raises(ValueError, match="every criterion is off"):
        StabilityController(torch.optim.SGD([x], lr=0.1), Lambda=None)
