import math

import pytest
import torch

from qcd_fx.optim import testfunctions as tf
from qcd_fx.optim.testfunctions import FUNCTIONS, Ackley, Griewank, Rastrigin, Rosenbrock, Schwefel, Sphere, get, optimize

ALL = list(FUNCTIONS.values())


def box_points(fn, n, seed=0):
    lo, hi = fn.bounds
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, fn.dim, generator=g, dtype=torch.float64) * (hi - lo) + lo


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.name)
@pytest.mark.parametrize("dim", [2, 7])
def test_minimum_value_at_the_declared_optimum(cls, dim):
    fn = cls(dim)
    assert abs(float(fn(fn.optimum))) < 1e-9 * dim
    assert fn.f_opt == 0.0


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.name)
def test_optimum_is_a_local_minimum_and_values_are_nonnegative(cls):
    fn = cls(6, shift=0.3 if cls is not Schwefel else 0.0)
    g = torch.Generator().manual_seed(1)
    near = fn.optimum + 1e-3 * torch.randn(200, 6, generator=g, dtype=torch.float64)
    assert bool((fn(near) > fn(fn.optimum)).all())
    assert bool((fn(box_points(fn, 2000)) >= -1e-9).all())


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.name)
def test_batched_equals_one_point_at_a_time(cls):
    fn = cls(5)
    pts = box_points(fn, 16, seed=3)
    batched = fn(pts)
    assert batched.shape == (16,)
    rows = torch.stack([fn(p) for p in pts])
    torch.testing.assert_close(batched, rows, rtol=1e-12, atol=1e-12)
    assert fn(pts.view(4, 4, 5)).shape == (4, 4)


def test_textbook_values():
    ones = torch.ones(10, dtype=torch.float64)
    zeros = torch.zeros(10, dtype=torch.float64)
    assert float(Sphere(10)(ones)) == 10.0
    assert float(Rosenbrock(10)(zeros)) == 9.0  # (1 - 0)^2 for each of the 9 pairs
    assert float(Rastrigin(10)(ones)) == pytest.approx(10.0)  # cos(2 pi) = 1: 1 - 10 + 10 per coordinate
    assert float(Ackley(10)(ones)) == pytest.approx(20 - 20 * math.exp(-0.2), abs=1e-12)
    assert float(Griewank(2)(torch.tensor([math.pi * 2, 0.0], dtype=torch.float64))) == pytest.approx((2 * math.pi) ** 2 / 4000 + 1 - math.cos(2 * math.pi))
    assert float(Schwefel(3)(torch.zeros(3, dtype=torch.float64))) == pytest.approx(3 * tf.SCHWEFEL_CONSTANT)


@pytest.mark.parametrize("cls", [Sphere, Rosenbrock, Rastrigin, Ackley, Griewank], ids=lambda c: c.name)
def test_shift_translates(cls):
    s = torch.linspace(-0.5, 0.5, 4, dtype=torch.float64)
    plain, moved = cls(4), cls(4, shift=s)
    x = box_points(plain, 8) * 0.5
    torch.testing.assert_close(moved(x + s), plain(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(moved.optimum, plain.optimum + s)


def test_gradients_are_finite_at_the_optimum():
    for cls in ALL:
        fn = cls(4)
        x = fn.optimum.clone().requires_grad_(True)
        fn(x).backward()
        assert bool(torch.isfinite(x.grad).all()), cls.name


def test_bad_arguments():
    with pytest.raises(ValueError, match="dim must be an integer >= 2"):
        Rosenbrock(1)
    with pytest.raises(ValueError, match="dim must be an integer >= 1"):
        Sphere(0)
    with pytest.raises(ValueError, match="outside the search box"):
        Sphere(3, shift=6.0)
    with pytest.raises(ValueError, match="vector of length 3"):
        Sphere(3, shift=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 3\)"):
        Sphere(3)(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="unknown test function 'spere'"):
        get("spere", 3)
    assert isinstance(get(" Rastrigin ", 3), Rastrigin)


def test_optimize_harness_is_deterministic_and_counts_exactly():
    fn = Sphere(5, shift=1.0)
    a = optimize(fn, "random", max_evals=3000, seed=4)
    b = optimize(fn, "random", max_evals=3000, seed=4)
    assert a["f"] == b["f"] and a["evaluations"] == 3000 and a["stop"] == "budget"
    assert optimize(fn, "random", max_evals=3000, seed=5)["f"] != a["f"]
    # a target reached: the exact evaluation that reached it is reported, and the run stops there
    easy = optimize(fn, "random", max_evals=10_000, seed=0, target=40.0)
    assert easy["stop"] == "target" and easy["evaluations_to_target"] <= easy["evaluations"] <= 1024
    qd = optimize(fn, "quantum-dynamics", max_evals=20_000, seed=0, target=1e-6)
    assert qd["f"] <= 1e-6 and qd["stop"] == "target" and qd["evaluations_to_target"] <= qd["evaluations"]
    qi = optimize(fn, "qimad", max_evals=800, seed=0)
    assert qi["evaluations"] == 800 and math.isfinite(qi["f"])
    with pytest.raises(ValueError, match="unknown optimizer 'cma'"):
        optimize(fn, "cma")
    with pytest.raises(ValueError, match="max_evals"):
        optimize(fn, "random", max_evals=0)


# ── the CLI: qcd-fx optimize ────────────────────────────────────────────────────────────────────


def cli(*args):
    import qcd_fx.cli  # noqa: F401 - registers every command
    from typer.testing import CliRunner

    from qcd_fx.cli import app

    return CliRunner().invoke(app, ["optimize", *args], catch_exceptions=False)


def test_cli_prints_best_value_and_evaluations():
    result = cli("sphere", "--dim", "5", "--budget", "20000", "--target", "1e-6", "--shift", "1.5")
    assert result.exit_code == 0, result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    assert float(lines["best value"]) <= 1e-6
    assert int(lines["evaluations"]) <= 20000
    assert lines["target 1e-06"].startswith("reached after")
    again = cli("sphere", "--dim", "5", "--budget", "20000", "--target", "1e-6", "--shift", "1.5")
    strip = lambda out: [line for line in out.splitlines() if not line.startswith("stopped")]  # noqa: E731 - timing differs
    assert strip(again.stdout) == strip(result.stdout)
    rnd = cli("rastrigin", "-O", "random", "--budget", "500", "--seed", "3")
    assert rnd.exit_code == 0 and "evaluations: 500" in rnd.stdout and "stopped: budget" in rnd.stdout
    qimad = cli("ackley", "-d", "3", "-O", "qimad", "--budget", "400")
    assert qimad.exit_code == 0 and "evaluations: 400" in qimad.stdout
    multi = cli("rastrigin", "-d", "3", "--budget", "3000", "--multimodal", "--restarts", "0")
    assert multi.exit_code == 0 and "optimizer: quantum-dynamics (multimodal settings)" in multi.stdout
    plain = cli("rastrigin", "-d", "3", "--budget", "3000", "--restarts", "0")
    result_lines = lambda out: [line for line in out.splitlines() if line.startswith(("best value", "evaluations"))]  # noqa: E731
    assert result_lines(multi.stdout) != result_lines(plain.stdout)  # a different run (320 centres, shrinking)


@pytest.mark.parametrize(
    "args,fragment",
    [
        (("spere",), "unknown function 'spere'; choose one of sphere"),
        (("sphere", "--optimizer", "cma"), "unknown optimizer 'cma'; choose one of quantum-dynamics, qimad, random"),
        (("rosenbrock", "--dim", "1"), "--dim 1 is too small for rosenbrock; it needs at least 2"),
        (("sphere", "--budget", "0"), "--budget 0 must be a positive number"),
        (("sphere", "--shift", "9"), "outside the search box"),
        (("sphere", "--seed", "-1"), "--seed -1 must be >= 0"),
        (("sphere", "-O", "random", "--restarts", "2"), "--restarts applies to --optimizer quantum-dynamics only"),
        (("sphere", "-O", "qimad", "--multimodal"), "--multimodal applies to --optimizer quantum-dynamics only"),
    ],
)
def test_cli_errors_are_one_line(args, fragment):
    result = cli(*args)
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr
