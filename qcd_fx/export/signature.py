"""Inputs and outputs of an exported model: names in the file, the batch axis, extra batches for checks."""

from __future__ import annotations

import inspect
import re
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten_with_path

from ..errors import ExportError


def _sanitize(name: str) -> str:
    name = re.sub(r"[^0-9A-Za-z_.]+", "_", str(name)).strip("_")
    return name or "value"


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        if n in seen:
            seen[n] += 1
            candidate = f"{n}_{seen[n]}"
            while candidate in seen:
                seen[n] += 1
                candidate = f"{n}_{seen[n]}"
            n = candidate
        seen.setdefault(n, 0)
        out.append(n)
    return out


def input_names(module: nn.Module, n_inputs: int) -> list[str]:
    """Readable names of the first ``n_inputs`` positional inputs: placeholder / parameter names."""
    names: list[str] = []
    if isinstance(module, torch.fx.GraphModule):
        names = [str(n.target).lstrip("*") for n in module.graph.nodes if n.op == "placeholder"]
    else:
        try:
            params = inspect.signature(module.forward).parameters.values()
            names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            names = []
    names = names[:n_inputs] + [f"input_{i}" for i in range(len(names), n_inputs)]
    return _unique([_sanitize(n) for n in names])


def output_names(outputs: Any) -> list[str]:
    """Names of the tensor leaves of ``outputs`` in pytree order (the order ONNX outputs take)."""
    names = []
    for path, leaf in tree_flatten_with_path(outputs)[0]:
        if not isinstance(leaf, torch.Tensor):
            continue
        parts = []
        for key in path:
            for attr in ("key", "name", "idx"):
                if hasattr(key, attr):
                    parts.append(str(getattr(key, attr)))
                    break
            else:
                parts.append(str(key))
        if not parts:
            names.append("output")
            continue
        name = "_".join(parts)
        if parts[0].isdigit():
            name = "output_" + name
        names.append(_sanitize(name))
    return _unique(names)


def _as_inputs(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        inputs = tuple(example_inputs)
        for i, t in enumerate(inputs):
            if not isinstance(t, torch.Tensor):
                raise ExportError(f"example input {i} is a {type(t).__name__}; ONNX export takes tensor inputs only")
        if not inputs:
            raise ExportError("export needs at least one example input tensor")
        return inputs
    raise ExportError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def _batch_inputs(inputs: tuple) -> list[bool]:
    """Which inputs carry the batch axis: those whose axis 0 equals the first input's."""
    first = next((t.shape[0] for t in inputs if t.dim() >= 1), None)
    return [t.dim() >= 1 and t.shape[0] == first for t in inputs]


def _second_batch(inputs: tuple, dynamic: list[bool], batch: int, seed: int = 1) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t, dyn in zip(inputs, dynamic):
        if not dyn:
            out.append(t)
        elif t.is_floating_point():
            # fresh values with the example's spread, so the second batch is new data
            std = float(t.std()) if t.numel() > 1 else 1.0
            new = torch.randn((batch, *t.shape[1:]), generator=gen, dtype=t.dtype) * (std or 1.0) + float(t.mean())
            out.append(new)
        else:  # indices, masks: reuse the example's rows (always valid values)
            idx = torch.arange(batch) % t.shape[0]
            out.append(t[idx])
    return tuple(out)


def _value_variants(inputs: tuple, seed: int = 3) -> list[tuple[str, tuple]]:
    """Inputs of the example's shapes with other statistics, for parity: all positive, all
    negative, and ten times larger. A file traced along one branch of a value-dependent
    ``if`` (or with a value baked in as a constant) differs from PyTorch on some of them.
    Only floating-point inputs change (indices and masks keep their valid values); none if
    there are none. An all-zero input is replaced by seeded normal values first."""
    if not any(t.is_floating_point() for t in inputs):
        return []
    gen = torch.Generator().manual_seed(seed)

    def base(t: torch.Tensor) -> torch.Tensor:
        if t.numel() and bool(t.abs().max() > 0):
            return t
        return torch.randn(t.shape, generator=gen, dtype=t.dtype)

    bases = [base(t) if t.is_floating_point() else t for t in inputs]

    def apply(fn) -> tuple:
        return tuple(fn(b) if t.is_floating_point() else t for t, b in zip(inputs, bases))

    return [
        ("|x|", apply(lambda b: b.abs())),
        ("-|x|", apply(lambda b: -b.abs())),
        ("10x", apply(lambda b: b * 10)),
    ]
