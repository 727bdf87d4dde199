import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcd_fx
from qcd_fx.data import digits_loaders
from qcd_fx.examples import digits_mlp
from qcd_fx.optim.quantum_dynamics import (
    MULTIMODAL,
    QuantumDynamics,
    boltzmann_weights,
    ensemble_noise,
    minimize,
)
from qcd_fx.optim.quantum_langevin import QuantumLangevin
from qcd_fx.optim.testfunctions import Rastrigin, Rosenbrock, Sphere
from qcd_fx.train import fit

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensor ops: threads only add overhead


def shifted(cls, dim, seed, fraction=0.2):
    lo, hi = cls(dim).bounds
    g = torch.Generator().manual_seed(seed)
    shift = (torch.rand(dim, generator=g, dtype=torch.float64) * 2 - 1) * fraction * (hi - lo) / 2
    return cls(dim, shift)


def run(fn, budget, target, seed, **options):
    return minimize(fn, torch.zeros(fn.dim, dtype=torch.float64), max_evals=budget, target=target, bounds=fn.bounds, seed=seed, **options)


# ── the targets of the issue ────────────────────────────────────────────────────────────────────


def test_sphere_10d_below_1e_6_within_budget_and_deterministic():
    fn = shifted(Sphere, 10, seed=1)
    a = run(fn, 20_000, 1e-6, seed=0)
    b = run(fn, 20_000, 1e-6, seed=0)
    assert a["f"] < 1e-6 and a["stop_reason"] == "target"
    assert a["evaluations_to_target"] <= 20_000
    assert a["f"] == b["f"] and a["evaluations"] == b["evaluations"] and torch.equal(a["x"], b["x"])
    assert torch.linalg.vector_norm(a["x"] - fn.optimum) < 1e-3
    c = run(fn, 20_000, 1e-6, seed=1)
    assert c["evaluations"] != a["evaluations"] or c["f"] != a["f"]


def test_rosenbrock_10d_below_1e_2_within_budget_and_deterministic():
    fn = shifted(Rosenbrock, 10, seed=2)
    a = run(fn, 60_000, 1e-2, seed=0)
    b = run(fn, 60_000, 1e-2, seed=0)
    assert a["f"] < 1e-2 and a["evaluations_to_target"] <= 60_000
    assert a["f"] == b["f"] and a["evaluations"] == b["evaluations"]


def test_isotropic_diffusion_is_the_published_rule_and_stalls_on_rosenbrock():
    # Documents why diffusion="ensemble" is the default: the same budget, the published isotropic rule.
    fn = shifted(Rosenbrock, 10, seed=2)
    iso = run(fn, 30_000, 1e-2, seed=0, diffusion="isotropic")
    ens = run(fn, 30_000, 1e-2, seed=0)
    assert ens["f"] < 1e-2 < iso["f"]


# ── the MQHOA mechanics ─────────────────────────────────────────────────────────────────────────


def test_budget_bounds_and_halving():
    fn = shifted(Rastrigin, 4, seed=0)
    x = torch.zeros(4, dtype=torch.float64)
    opt = QuantumDynamics([x], num_centres=8, bounds=fn.bounds, max_evals=1234, seed=3)
    sigmas, runs = [], []
    while not opt.done:
        best = opt.step(loss_fn=fn)
        sigmas.append(opt.sigma)
        runs.append(opt.restarts_done)
        lo, hi = fn.bounds
        assert bool((opt.centres >= lo).all()) and bool((opt.centres <= hi).all())
        assert best == opt.best_value == float(fn(x))  # the parameters hold the best point
    assert opt.evaluations == 1234 and opt.stop_reason == "budget"
    # within a run sigma only ever halves (a restart — on by default with a budget — resets it)
    steps = [(a, b) for a, b, ra, rb in zip(sigmas, sigmas[1:], runs, runs[1:]) if ra == rb]
    assert all(b <= a for a, b in steps)
    assert {a / b for a, b in steps if a != b} == {2.0}
    assert min(sigmas) < sigmas[0] / 8
    assert opt.stable_events > 0


def test_stops_at_sigma_min_and_restarts_double_the_centres():
    fn = Sphere(3)
    x = torch.zeros(3, dtype=torch.float64)
    opt = QuantumDynamics([x], num_centres=6, bounds=fn.bounds, sigma_min=1e-3, seed=0)
    while not opt.done:
        opt.step(loss_fn=fn)
    assert opt.stop_reason == "sigma_min" and opt.sigma < 1e-3 and opt.restarts_done == 0

    y = torch.zeros(3, dtype=torch.float64)
    opt = QuantumDynamics([y], num_centres=6, bounds=fn.bounds, sigma_min=1e-3, restarts=2, seed=0)
    while not opt.done:
        opt.step(loss_fn=fn)
    assert opt.restarts_done == 2 and opt.centres.shape == (24, 3)

    # with a budget, restarts are on by default until it is spent; a restart's population is
    # capped at a twentieth of the remaining budget (never below the previous one)
    z = torch.zeros(3, dtype=torch.float64)
    opt = QuantumDynamics([z], num_centres=6, bounds=fn.bounds, sigma_min=1e-3, max_evals=3000, seed=0)
    sizes = []
    while not opt.done:
        opt.step(loss_fn=fn)
        sizes.append(opt.centres.shape[0])
    assert opt.stop_reason == "budget" and opt.restarts_done >= 2 and opt.evaluations == 3000
    assert sizes[0] == 6 and max(sizes) <= 150 and sorted(sizes) == sizes


def test_mean_field_draws_candidates_between_each_centre_and_the_boltzmann_mean():
    def run(mean_field):
        seen = []

        def f(p):
            seen.append(p.clone())
            return (p**2).sum(1)

        opt = QuantumDynamics([torch.zeros(3, dtype=torch.float64)], num_centres=6, seed=1, mean_field=mean_field, restarts=0)
        opt.step(loss_fn=f)  # evaluates the initial centres
        X, F = opt.centres.clone(), opt.energies.clone()
        opt.step(loss_fn=f)  # one pass: the candidates
        return X, F, seen[1]

    X, F, published = run(0.0)
    m = (boltzmann_weights(F, 2.0).to(X.dtype).unsqueeze(1) * X).sum(0)
    for a in (1.0, 0.5):
        Xa, _, cand = run(a)
        assert torch.equal(Xa, X)
        # the same diffusion noise, drawn around x_i + a (m - x_i) instead of x_i
        torch.testing.assert_close(cand - published, a * (m - X), rtol=0, atol=1e-12)


def test_closure_path_matches_the_batched_path():
    fn = Sphere(4, shift=0.5)
    x1 = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    x2 = torch.zeros(4, dtype=torch.float64)
    o1 = QuantumDynamics([x1], num_centres=5, bounds=fn.bounds, seed=7)
    o2 = QuantumDynamics([x2], num_centres=5, bounds=fn.bounds, seed=7)
    calls = 0

    def closure():
        nonlocal calls
        calls += 1
        loss = fn(x1)
        loss.backward()  # allowed (gradients are ignored)
        return loss

    for _ in range(40):
        b1 = o1.step(closure)
        b2 = o2.step(loss_fn=fn)
        assert b1 == pytest.approx(b2, rel=1e-12, abs=1e-15)
    assert calls == o1.evaluations == o2.evaluations
    torch.testing.assert_close(o1.centres, o2.centres, rtol=1e-12, atol=1e-12)


def test_state_dict_round_trip_continues_bit_for_bit():
    fn = shifted(Rastrigin, 5, seed=4)
    a = torch.zeros(5, dtype=torch.float64)
    opt = QuantumDynamics([a], bounds=fn.bounds, seed=11, weighting="boltzmann", restarts=1)
    for _ in range(30):
        opt.step(loss_fn=fn)
    state = copy.deepcopy(opt.state_dict())
    for _ in range(30):
        expected = opt.step(loss_fn=fn)
    b = torch.zeros(5, dtype=torch.float64)
    other = QuantumDynamics([b], bounds=fn.bounds, seed=99, weighting="boltzmann", restarts=1)
    other.load_state_dict(state)
    for _ in range(30):
        got = other.step(loss_fn=fn)
    assert got == expected and other.evaluations == opt.evaluations
    assert torch.equal(other.centres, opt.centres) and torch.equal(a, b)


def test_shrink_keeps_the_lowest_centres_at_each_halving_and_restarts_from_the_run_size():
    fn = shifted(Rastrigin, 3, seed=5)
    x = torch.zeros(3, dtype=torch.float64)
    opt = QuantumDynamics([x], num_centres=24, shrink=0.5, min_centres=5, bounds=fn.bounds, sigma_min=1e-3, restarts=1, seed=2)
    opt.step(loss_fn=fn)
    X, F = opt.centres.clone(), opt.energies.clone()
    opt._halve()  # the transition itself: the 12 lowest centres go on, in order of energy
    order = torch.argsort(F, stable=True)[:12]
    assert torch.equal(opt.centres, X[order]) and torch.equal(opt.energies, F[order]) and opt.sigma == 0.5 * (fn.bounds[1] - fn.bounds[0]) / 2
    seen = []  # (k, restarts) after each pass
    while not opt.done:
        k, sigma, r = opt.centres.shape[0], opt.sigma, opt.restarts_done
        opt.step(loss_fn=fn)
        k2 = opt.centres.shape[0]
        if opt.restarts_done == r:
            assert k2 == (max(5, math.ceil(k / 2)) if opt.sigma < sigma else k)  # shrinks exactly when sigma halves
        seen.append((k2, opt.restarts_done))
    sizes = [k for k, r in seen if r == 0]
    assert sizes[0] == 12 and min(sizes) == 5 and sorted(sizes, reverse=True) == sizes
    assert [k for k, r in seen if r == 1][0] == 48  # the restart doubles the run's size, not the shrunk one
    # shrink=1 (the default) leaves the population alone
    y = torch.zeros(3, dtype=torch.float64)
    plain = QuantumDynamics([y], num_centres=24, bounds=fn.bounds, sigma_min=1e-3, restarts=0, seed=2)
    while not plain.done:
        plain.step(loss_fn=fn)
        assert plain.centres.shape[0] == 24


def test_multimodal_settings_solve_a_rastrigin_instance_the_defaults_miss():
    fn = shifted(Rastrigin, 10, seed=1000 + 5000)
    default = run(fn, 60_000, 1e-6, seed=1100)
    multimodal = run(fn, 60_000, 1e-6, seed=1100, **MULTIMODAL)
    assert default["evaluations_to_target"] is None and default["f"] > 0.5
    assert multimodal["f"] < 1e-6


def test_old_state_dicts_without_shrink_resume_unshrunk():
    fn = shifted(Rastrigin, 4, seed=3)
    a = torch.zeros(4, dtype=torch.float64)
    opt = QuantumDynamics([a], num_centres=12, bounds=fn.bounds, seed=1, restarts=1)
    for _ in range(10):
        opt.step(loss_fn=fn)
    state = copy.deepcopy(opt.state_dict())
    for key in ("shrink", "min_centres"):
        del state["quantum_dynamics"]["options"][key]
    del state["quantum_dynamics"]["k_run"]
    b = torch.zeros(4, dtype=torch.float64)
    other = QuantumDynamics([b], num_centres=12, bounds=fn.bounds, seed=1, restarts=1)
    other.load_state_dict(state)
    for _ in range(40):
        assert other.step(loss_fn=fn) == opt.step(loss_fn=fn)
    assert other.options["shrink"] == 1.0 and torch.equal(other.centres, opt.centres)


def test_population_is_evaluated_in_one_call():
    sizes = []

    def fn(p):
        sizes.append(p.shape[0])
        return p.square().sum(1)

    x = torch.zeros(3, dtype=torch.float64)
    opt = QuantumDynamics([x], num_centres=12, samples_per_centre=2, bounds=(-1, 1), seed=0)
    for _ in range(5):
        opt.step(loss_fn=fn)
    assert sizes[0] == 12 and set(sizes[1:]) <= {24, 1}  # centres, then 2 candidates per centre (+ a mean)


def test_unbounded_start_is_around_the_parameters():
    x = torch.full((6,), 3.0, dtype=torch.float64)
    opt = QuantumDynamics([x], num_centres=10, sigma=0.1, seed=0)
    opt.step(loss_fn=lambda p: (p - 3.0).square().sum(1))
    assert opt.best_value == 0.0  # centre 0 is the start point itself
    assert float((opt.centres - 3.0).abs().max()) < 1.0


def test_boltzmann_weights():
    f = torch.tensor([3.0, 1.0, 2.0, 1.0], dtype=torch.float64)
    w = boltzmann_weights(f, 1.0)
    assert float(w.sum()) == pytest.approx(1.0)
    assert w[1] == w[3] > w[2] > w[0]
    torch.testing.assert_close(boltzmann_weights(f, math.inf), torch.full((4,), 0.25, dtype=torch.float64))
    cold = boltzmann_weights(f, 1e-3)
    assert float(cold[1] + cold[3]) == pytest.approx(1.0)
    with_nan = boltzmann_weights(torch.tensor([1.0, math.inf, 2.0], dtype=torch.float64), 1.0)
    assert with_nan[1] == 0 and float(with_nan.sum()) == pytest.approx(1.0)
    # the scale of f does not matter (T is relative to the spread of f)
    torch.testing.assert_close(boltzmann_weights(f * 1000, 1.0), w)


def test_ensemble_noise_has_the_normalised_walker_covariance():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(30, 3, generator=g, dtype=torch.float64) @ torch.tensor([[3.0, 0, 0], [2.0, 0.5, 0], [0, 0, 0.2]], dtype=torch.float64)
    draws = ensemble_noise(centres, 200_000, 0.1, g)
    cov = torch.cov(centres.T)
    expected = 0.9 * cov / cov.diagonal().mean() + 0.1 * torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(torch.cov(draws.T), expected, atol=0.03, rtol=0.03)
    same = ensemble_noise(torch.ones(5, 3, dtype=torch.float64), 50_000, 0.1, g)  # collapsed walkers: isotropic
    torch.testing.assert_close(torch.cov(same.T), torch.eye(3, dtype=torch.float64), atol=0.03, rtol=0)


def test_bad_arguments_raise_clear_errors():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="num_centres must be an integer >= 1"):
        QuantumDynamics([x], num_centres=0)
    with pytest.raises(ValueError, match="sigma must be in"):
        QuantumDynamics([x], sigma=-1.0)
    with pytest.raises(ValueError, match="low < high"):
        QuantumDynamics([x], bounds=(1.0, -1.0))
    with pytest.raises(ValueError, match=r"mean_field must be in \[0.0, 1.0\]"):
        QuantumDynamics([x], mean_field=1.5)
    with pytest.raises(ValueError, match="diffusion must be one of ensemble, isotropic"):
        QuantumDynamics([x], diffusion="brownian")
    with pytest.raises(ValueError, match="sigma_min .* must be smaller than sigma"):
        QuantumDynamics([x], sigma=1e-3, sigma_min=1.0)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        QuantumDynamics([x], seed=-1)
    with pytest.raises(ValueError, match=r"shrink must be in \(0.0, 1.0\]"):
        QuantumDynamics([x], shrink=0.0)
    with pytest.raises(ValueError, match="min_centres must be an integer >= 2"):
        QuantumDynamics([x], min_centres=1)
    opt = QuantumDynamics([x], seed=0)
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()
    with pytest.raises(ValueError, match=r"must map a \(40, 3\) matrix to shape \(40,\)"):
        opt.step(loss_fn=lambda p: p.sum())
    with pytest.raises(ValueError, match="all parameters of a population must share one dtype"):
        QuantumDynamics([torch.zeros(2), torch.zeros(2, dtype=torch.float64)])


# ── neural networks ─────────────────────────────────────────────────────────────────────────────


def toy_classification(seed=0, n=128):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, n, 32)]


def test_gradient_free_training_through_fit_compares_on_the_same_batch():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = QuantumDynamics(model.parameters(), num_centres=8, sigma=0.5, seed=0)
    loader = toy_classification()
    with torch.no_grad():
        before = sum(float(F.cross_entropy(model(x), y)) for x, y in loader)
    history = fit(model, loader, opt, 8, progress=False)
    with torch.no_grad():
        after = sum(float(F.cross_entropy(model(x), y)) for x, y in loader)
    assert after < 0.7 * before
    assert history.epochs[-1].train_loss < history.epochs[0].train_loss
    # each step re-measures the centres on the batch and evaluates one candidate per centre
    assert opt.evaluations >= 2 * 8 * (len(loader) * 8 - 1)


def test_langevin_without_diffusion_is_heavy_ball_sgd():
    torch.manual_seed(0)
    a = digits_mlp(32)
    b = copy.deepcopy(a)
    sgd = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9)
    ql = QuantumLangevin(b.parameters(), lr=0.05, momentum=0.9, sigma=0.0, total_steps=10, seed=0)
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
        for model, opt in ((a, sgd), (b, ql)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_langevin_diffusion_scale_and_levels():
    x = torch.zeros(20_000, requires_grad=True)
    opt = QuantumLangevin([x], lr=0.04, sigma=0.5, momentum=0.0, levels=4, total_steps=100, seed=0)
    sigmas = []
    for _ in range(100):
        opt.zero_grad()
        (0.0 * x.sum()).backward()  # no drift: pure diffusion
        before = x.detach().clone()
        opt.step()
        sigmas.append(opt.sigma)
        if len(sigmas) == 1:
            step = x.detach() - before
            assert float(step.std()) == pytest.approx(0.5 * math.sqrt(0.04), rel=0.03)
    assert sigmas[0] == 0.5 and sigmas[-1] == 0.5 / 16 and opt.transitions == 4
    assert sorted(set(sigmas), reverse=True) == [0.5 / 2**k for k in range(5)]


def test_langevin_plateau_halves_sigma_and_replaces_the_worst_walker():
    w = torch.zeros(3, requires_grad=True)
    opt = QuantumLangevin([w], lr=0.01, sigma=0.2, walkers=3, anneal="plateau", patience=5, seed=0)

    def closure():
        loss = (w - 1.0).square().sum() * 0.0 + 1.0  # a flat energy: every step is a plateau
        loss.backward()
        return loss

    for _ in range(12):
        opt.step(closure)
    assert opt.transitions == 2 and opt.sigma == pytest.approx(0.05)


def test_langevin_trains_a_transformed_graph_module_through_fit_deterministically():
    results = []
    for _ in range(2):
        train, test, _ = digits_loaders(64, seed=0)  # fresh loaders: the shuffling generator is stateful
        torch.manual_seed(0)
        gm = qcd_fx.transform(digits_mlp(64), "qci", example_inputs=(torch.randn(2, 1, 8, 8),)).graph_module
        opt = QuantumLangevin(gm.parameters(), lr=0.05, sigma=1e-2, walkers=2, seed=3)
        history = fit(gm, train, opt, 3, val_loader=test, progress=False)
        results.append((history, [p.detach().clone() for p in gm.parameters()]))
    (h1, p1), (h2, p2) = results
    assert h1.final_val_accuracy > 0.85
    assert h1.epochs[-1].train_loss < h1.epochs[0].train_loss
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    assert h1.column("train_loss") == h2.column("train_loss")


def test_langevin_state_dict_round_trip():
    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        return model, QuantumLangevin(model.parameters(), lr=0.1, sigma=0.05, walkers=3, anneal="plateau", patience=3, seed=5)

    loader = toy_classification(n=64)
    m1, o1 = make()
    for x, y in loader * 2:
        o1.step(model=m1, batch=(x, y), loss_fn=F.cross_entropy)
    state = copy.deepcopy(o1.state_dict())
    for x, y in loader * 2:
        expected = o1.step(model=m1, batch=(x, y), loss_fn=F.cross_entropy)
    m2, o2 = make()
    o2.load_state_dict(state)
    for x, y in loader * 2:
        got = o2.step(model=m2, batch=(x, y), loss_fn=F.cross_entropy)
    assert got == expected
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


def test_langevin_bad_arguments():
    x = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="lr must be in"):
        QuantumLangevin([x], lr=0.0)
    with pytest.raises(ValueError, match="momentum must be in"):
        QuantumLangevin([x], momentum=1.0)
    with pytest.raises(ValueError, match="anneal must be one of levels, plateau"):
        QuantumLangevin([x], anneal="cosine")
    opt = QuantumLangevin([x])
    x.grad = torch.zeros(3)
    with pytest.raises(ValueError, match="needs total_steps"):
        opt.step()
    with pytest.raises(ValueError, match="walkers=1 only"):
        QuantumLangevin([x], walkers=2, total_steps=5).step()


@pytest.mark.slow
def test_sphere_30d_below_1e_6_within_budget():
    fn = shifted(Sphere, 30, seed=3)
    r = run(fn, 60_000, 1e-6, seed=0)
    assert r["f"] < 1e-6 and r["evaluations_to_target"] <= 60_000
