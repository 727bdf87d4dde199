"""Inputs qcd-fx makes up when the user gives only shapes: example inputs for tracing and checks,
and calibration batches for passes that measure activations (``cdg-prune``).

Everything is seeded, so two runs with the same shapes see the same numbers: example inputs
are drawn from generator seed 0 (the batch ``qcd-fx transform`` and ``qcd-fx run`` both use),
extra calibration batches from seed 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .errors import OutOfMemoryError, UsageError, out_of_memory


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


INPUT_DTYPES = {"float32": torch.float32, "float": torch.float32, "int64": torch.int64, "long": torch.int64}


def parse_dtype(text: str | None) -> torch.dtype | None:
    if text is None:
        return None
    if text not in INPUT_DTYPES:
        raise UsageError(f"--dtype {text!r} is not one of float32, int64")
    return INPUT_DTYPES[text]


def example_inputs(shapes: Sequence[Sequence[int]], seed: int = 0, dtype: torch.dtype | None = None, high: int | None = None) -> tuple[torch.Tensor, ...]:
    """One tensor per shape from a generator seeded with ``seed``: float ~ N(0, 1), or with
    ``dtype=torch.int64`` integers in ``[0, high)`` (token ids; ``high`` default 2)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        try:
            if dtype is not None and not dtype.is_floating_point:
                out.append(torch.randint(0, high or 2, tuple(s), generator=gen, dtype=dtype))
                continue
            out.append(torch.randn(tuple(s), generator=gen))
        except (RuntimeError, MemoryError) as e:
            if not out_of_memory(e):
                raise
            gb = math.prod(int(d) for d in s) * 4 / 1e9
            raise OutOfMemoryError(f"not enough memory for an example input of shape {'x'.join(map(str, s))} ({gb:.3g} GB of float32)") from None
    return tuple(out)


def calibration_batches(inputs: tuple[torch.Tensor, ...], count: int, data: Any = None) -> list[tuple[torch.Tensor, ...]]:
    """``count`` calibration batches shaped like ``inputs``: the inputs themselves plus seeded
    N(0, 1) batches, or consecutive batches of the training part of ``data`` (a
    :class:`qcd_fx.datasets.Data`; at least 32 samples each; as many as it holds, up to ``count``)."""
    if count < 1:
        raise UsageError(f"the number of calibration batches must be >= 1, got {count}")
    if data is None:
        gen = torch.Generator().manual_seed(1)

        def like(t: torch.Tensor) -> torch.Tensor:  # integer inputs (token ids) stay in the example's range
            if t.is_floating_point():
                return torch.randn(t.shape, generator=gen)
            return torch.randint(int(t.min()), int(t.max()) + 1, t.shape, generator=gen, dtype=t.dtype) if t.numel() else t.clone()

        return [inputs] + [tuple(like(t) for t in inputs) for _ in range(count - 1)]
    batches = data.batches(count, max(inputs[0].shape[0], 32))
    want = tuple(inputs[0].shape[1:])
    got = tuple(batches[0][0].shape[1:])
    if len(inputs) != 1 or (got != want and (math.prod(got), ) != want):
        raise UsageError(f"--data {data.spec!r} gives inputs of shape {'x'.join(map(str, got))}, but the model takes {describe_shapes(inputs)}")
    if got != want:  # an MLP over images: the data flattened
        batches = [(b[0].flatten(1),) for b in batches]
    return batches


def split_inputs(example_inputs: Any, what: str = "example_inputs") -> tuple[tuple, dict[str, Any]] | None:
    """A tensor, a tuple/list of positional inputs, or a dict of keyword inputs (``{"input_ids":
    ids, "attention_mask": mask}``) -> ``(args, kwargs)``; ``None`` stays ``None``."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, dict):
        bad = [k for k in example_inputs if not isinstance(k, str) or not k.isidentifier()]
        if bad:
            raise UsageError(f"{what}: keyword input names must be identifiers, got {bad[0]!r}")
        return (), dict(example_inputs)
    raise UsageError(f"{what} must be a tensor, a tuple of positional inputs or a dict of keyword inputs, got {type(example_inputs).__name__}")


def input_names(gm: torch.fx.GraphModule) -> list[str]:
    """The names ``gm.forward`` takes its inputs by, in order."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is not None:
        return [a for a in info.orig_args if a != "self"]
    return [n.target.lstrip("*") for n in gm.graph.nodes if n.op == "placeholder"]


def bind_inputs(gm: torch.fx.GraphModule, args: tuple, kwargs: dict[str, Any]) -> tuple:
    """Positional inputs for ``gm`` (and for an fx ``Interpreter`` over it) from ``args`` and
    keyword inputs, in the order of its ``forward``; inputs left out take the placeholder's
    default. A one-line UsageError for an unknown or missing name."""
    if not kwargs:
        return tuple(args)
    names = input_names(gm)
    unknown = [k for k in kwargs if k not in names]
    if unknown:
        raise UsageError(f"{type(gm).__name__} takes no input named {unknown[0]!r}; its inputs: {', '.join(names)}")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    defaults = {n.target.lstrip("*"): n.args[0] for n in placeholders if n.args} if len(placeholders) == len(names) else {}
    last = max(names.index(k) for k in kwargs)
    out = list(args)
    for name in names[len(args) : last + 1]:
        if name in kwargs:
            out.append(kwargs[name])
        elif name in defaults:
            out.append(defaults[name])
        else:
            raise UsageError(f"no example value for input {name!r} of {type(gm).__name__} (inputs: {', '.join(names)})")
    return tuple(out)


def describe_shapes(tensors: Sequence[torch.Tensor]) -> str:
    """``"1x3x224x224, 1x10"``."""
    return ", ".join("x".join(map(str, t.shape)) for t in tensors)


__all__ = ["bind_inputs", "calibration_batches", "describe_shapes", "example_inputs", "input_names", "parse_shape", "split_inputs"]
