"""``qcd-fx optimize``: run a global optimizer on a standard test function (registered on the
``qcd-fx`` Typer app when this module is imported; ``qcd_fx.cli`` imports it)."""

from __future__ import annotations

import math
from typing import Annotated, Optional

import typer

from ..errors import UsageError
from .app import app, friendly, out
from .options import DebugOpt


@app.command("optimize")
@friendly
def optimize_command(
    function: Annotated[str, typer.Argument(help="sphere, rosenbrock, rastrigin, ackley, griewank or schwefel", show_default=False)],
    dim: Annotated[int, typer.Option("--dim", "-d", help="number of dimensions")] = 10,
    optimizer: Annotated[str, typer.Option("--optimizer", "-O", help="quantum-dynamics, qimad or random")] = "quantum-dynamics",
    budget: Annotated[int, typer.Option("--budget", "-b", help="maximum number of function evaluations")] = 100_000,
    seed: Annotated[int, typer.Option("--seed", help="seed of the optimizer (and of the start point)")] = 0,
    target: Annotated[Optional[float], typer.Option("--target", help="stop as soon as f <= TARGET")] = None,
    shift: Annotated[float, typer.Option("--shift", help="move the optimum by SHIFT in every coordinate")] = 0.0,
    restarts: Annotated[
        Optional[int], typer.Option("--restarts", help="quantum-dynamics: restarts with twice the centres after convergence (default: while budget remains)")
    ] = None,
    multimodal: Annotated[
        bool, typer.Option("--multimodal", help="quantum-dynamics: the settings for rugged functions (320 centres shrinking to 40; slower on smooth ones)")
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """Minimise FUNCTION inside its standard box and print the best value and the evaluations used."""
    from ..optim import testfunctions as tf

    name = function.strip().lower()
    if name not in tf.FUNCTIONS:
        raise UsageError(f"unknown function {function!r}; choose one of {', '.join(tf.FUNCTIONS)}")
    if optimizer not in tf.OPTIMIZERS:
        raise UsageError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(tf.OPTIMIZERS)}")
    min_dim = tf.FUNCTIONS[name].min_dim
    if dim < min_dim:
        raise UsageError(f"--dim {dim} is too small for {name}; it needs at least {min_dim}")
    if budget < 1:
        raise UsageError(f"--budget {budget} must be a positive number of evaluations")
    if seed < 0:
        raise UsageError(f"--seed {seed} must be >= 0")
    if restarts is not None and restarts < 0:
        raise UsageError(f"--restarts {restarts} must be >= 0")
    if restarts is not None and optimizer != "quantum-dynamics":
        raise UsageError("--restarts applies to --optimizer quantum-dynamics only")
    if multimodal and optimizer != "quantum-dynamics":
        raise UsageError("--multimodal applies to --optimizer quantum-dynamics only")
    if target is not None and not math.isfinite(target):
        raise UsageError(f"--target {target} must be a finite number")
    if not math.isfinite(shift):
        raise UsageError(f"--shift {shift} must be a finite number")
    try:
        fn = tf.get(name, dim, shift)
    except ValueError as e:
        raise UsageError(f"--shift {shift}: {e}") from None
    from ..optim.quantum_dynamics import MULTIMODAL

    options = dict(MULTIMODAL) if multimodal else {}
    if restarts is not None:
        options["restarts"] = restarts
    result = tf.optimize(fn, optimizer, max_evals=budget, seed=seed, target=target, options=options)
    lo, hi = fn.bounds
    out.print(f"function: {name}, dim {dim}, box [{lo:g}, {hi:g}], minimum 0 at x_i = {fn.argmin_value + shift:g}", highlight=False)
    out.print(f"optimizer: {optimizer}{' (multimodal settings)' if multimodal else ''}, seed {seed}, budget {budget}", highlight=False)
    out.print(f"best value: {result['f']:.6g}", highlight=False)
    if result.get("x") is not None:
        x = [float(v) for v in result["x"].flatten()]
        shown = ", ".join(f"{v:.6g}" for v in x[:8]) + (f", … ({len(x) - 8} more)" if len(x) > 8 else "")
        out.print(f"best point: [{shown}]", highlight=False, markup=False)
    out.print(f"evaluations: {result['evaluations']}", highlight=False)
    if target is not None:
        reached = result["evaluations_to_target"]
        out.print(f"target {target:g}: " + (f"reached after {reached} evaluations" if reached else "not reached"), highlight=False)
    out.print(f"stopped: {result['stop']} ({result['seconds']:.2f} s)", highlight=False)
