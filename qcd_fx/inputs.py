"""Inputs qcd-fx makes up when the user gives only shapes: example inputs for tracing and checks,
and calibration batches for passes that measure activations (``cdg-prune``).

Everything is seeded, so two runs with the same shapes see the same numbers: example inputs
are drawn from generator seed 0 (the batch ``qcd-fx transform`` and ``qcd-fx run`` both use),
extra calibration batches from seed 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .errors import OutOfMemoryError, UsageError, out_of_memory

KNOWN_DATA = ("digits",)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``"1x3x224x224"``) -> ``(1, 3, 224, 224)``; a one-line UsageError otherwise."""
    parts = [p.strip() for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise UsageError(f"--input-shape {text!r} is not a comma-separated list of integers (e.g. 1,3,224,224)") from None
    if not shape or any(s < 1 for s in shape):
        raise UsageError(f"--input-shape {text!r} must list positive sizes (e.g. 1,3,224,224)")
    return shape


def example_inputs(shapes: Sequence[Sequence[int]], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """One float tensor ~ N(0, 1) per shape, from a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        try:
            out.append(torch.randn(tuple(s), generator=gen))
        except (RuntimeError, MemoryError) as e:
            if not out_of_memory(e):
                raise
            gb = math.prod(int(d) for d in s) * 4 / 1e9
            raise OutOfMemoryError(f"not enough memory for an example input of shape {'x'.join(map(str, s))} ({gb:.3g} GB of float32)") from None
    return tuple(out)


def calibration_batches(inputs: tuple[torch.Tensor, ...], count: int, data: str | None = None) -> list[tuple[torch.Tensor, ...]]:
    """``count`` calibration batches shaped like ``inputs``: the inputs themselves plus seeded
    N(0, 1) batches, or (``data="digits"``) consecutive batches of the digits training split
    (at least 32 images each; as many as the split holds, up to ``count``)."""
    if count < 1:
        raise UsageError(f"the number of calibration batches must be >= 1, got {count}")
    if data is None:
        gen = torch.Generator().manual_seed(1)
        return [inputs] + [tuple(torch.randn(t.shape, generator=gen) for t in inputs) for _ in range(count - 1)]
    if data not in KNOWN_DATA:
        raise UsageError(f"--data {data!r} is not a known data set; known: {', '.join(KNOWN_DATA)}")
    if len(inputs) != 1 or tuple(inputs[0].shape[1:]) not in ((1, 8, 8), (64,)):
        raise UsageError(f"--data digits gives 1x8x8 images (or 64 features), but the model takes {describe_shapes(inputs)}")
    from .data import load_digits_split

    x = load_digits_split().x_train.reshape((-1, *inputs[0].shape[1:]))
    size = max(inputs[0].shape[0], 32)
    return [(x[i * size : (i + 1) * size],) for i in range(min(count, len(x) // size))]


def describe_shapes(tensors: Sequence[torch.Tensor]) -> str:
    """``"1x3x224x224, 1x10"``."""
    return ", ".join("x".join(map(str, t.shape)) for t in tensors)


__all__ = ["KNOWN_DATA", "calibration_batches", "describe_shapes", "example_inputs", "parse_shape"]
