"""Measurements of models: parameters, MACs (``torch.utils.flop_counter``), sparsity, latency."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode


def node_shape(node: Any) -> tuple[int, ...] | None:
    """The shape that shape propagation recorded for an fx ``Node`` (``tensor_meta``); None for anything
    else, or a node whose value is not a tensor or was not propagated."""
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def count_params(module: nn.Module) -> int:
    """Number of parameter elements (a parameter shared by several modules counts once)."""
    return sum(p.numel() for p in module.parameters())


@contextlib.contextmanager
def mac_counter() -> Iterator[Callable[[], int]]:
    """Count multiply-accumulates of the code inside the block; call the yielded function after.

    MACs are ``torch.utils.flop_counter``'s FLOPs / 2 (it counts matmuls and convolutions,
    not element-wise ops).
    """
    mode = FlopCounterMode(display=False)
    with mode:
        yield lambda: mode.get_total_flops() // 2


def count_macs(module: nn.Module, example_inputs: tuple) -> int:
    """MACs of one forward pass of ``module`` on ``example_inputs`` (no gradients)."""
    with torch.no_grad(), mac_counter() as macs:
        module(*example_inputs)
    return macs()


@contextlib.contextmanager
def sparsity_probe(module: nn.Module) -> Iterator[dict[str, float]]:
    """Record the fraction of exact zeros in the output of every hard state-compression module.

    Yields a dict (qualified module name -> zero fraction of the last forward) that fills as the
    model runs inside the block.
    """
    from .nn import StateCompression

    found: dict[str, float] = {}
    handles = []
    for name, m in module.named_modules():
        if isinstance(m, StateCompression) and m.hard:

            def hook(_m, _inp, out, name=name):
                found[name] = float((out == 0).float().mean()) if out.numel() else 0.0

            handles.append(m.register_forward_hook(hook))
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


def measure_sparsity(module: nn.Module, example_inputs: tuple) -> dict[str, float]:
    """Zero fraction produced by each hard CSC module on one forward of ``example_inputs``."""
    with torch.no_grad(), sparsity_probe(module) as found:
        module(*example_inputs)
    return dict(found)


def interleaved_latency(fns: dict[str, Callable[[], object]], repeats: int = 10, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, calling them in turn (a, b, a, b, …) so that
    load from other processes affects all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def median_latency(fn: Callable[[], object], repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


CHECK_SEED = 0


@contextlib.contextmanager
def same_random_draws(seed: int = CHECK_SEED) -> Iterator[None]:
    """Run the block from a fixed random state and restore the caller's afterwards: a model that
    draws random numbers in its forward (random masking, noise, sampled durations) draws the same
    ones in every run of a check, and checking does not move the user's random stream."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def eval_no_grad(module: nn.Module) -> Iterator[None]:
    """Run ``module`` in eval mode without autograd, from the same random state each time
    (:func:`same_random_draws`); restore every submodule's mode afterwards."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad(), same_random_draws():
            yield
    finally:
        for m, training in modes.items():
            m.training = training


def tensor_leaves(out: Any) -> list[torch.Tensor]:
    """The tensors in a (nested) output, in pytree order."""
    return [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
