"""What several commands do with their options: find the model, pick the input shapes (the inputs
themselves are made by :mod:`qcd_fx.inputs`)."""

from __future__ import annotations

import os

from ..errors import UsageError
from ..inputs import calibration_batches, parse_shape


def resolve_model(model: str | None, example: bool, weights: str | None, trust_pickle: bool, allow: list[str]):
    """(module, display name, default input shapes or None, source file or None)."""
    from ..io import load_model

    if example:
        if model:
            raise UsageError("give either MODEL or --example, not both")
        import torch

        from ..examples import DIGITS_INPUT_SHAPE, digits_cnn

        torch.manual_seed(0)
        return digits_cnn(), "example:digits_cnn", [DIGITS_INPUT_SHAPE], None
    if not model:
        raise UsageError("missing MODEL (torchvision:NAME, timm:NAME, package.module:factory, FILE.pt, FILE.pt2 or a Hugging Face directory); or use --example")
    from ..io import INPUT_SHAPES_KEY

    module = load_model(model, weights=weights, trust_pickle=trust_pickle, allow=allow)
    default_shape = getattr(module, "meta", {}).get(INPUT_SHAPES_KEY)
    from ..io import input_shape_of

    default_shape = input_shape_of(module, model) or default_shape
    source_file = model if os.path.exists(model) else None
    return module, model, default_shape, source_file


def example_inputs(shapes: list[str], default: list[tuple[int, ...]] | None, name: str, dtype: str | None = None, module=None):
    """The example inputs of ``--input-shape`` (or the model's default shapes), seeded; integer
    token ids for ``--dtype int64`` and by default for transformers text models."""
    import torch

    from ..inputs import example_inputs as make
    from ..inputs import parse_dtype
    from ..io import token_range

    vocab = token_range(module) if module is not None else None
    kind = parse_dtype(dtype)
    if kind is None and vocab:
        kind = torch.int64
    if kind is None and isinstance(module, torch.fx.GraphModule):  # a torch.export graph records its inputs' dtypes
        vals = [n.meta.get("val") for n in module.graph.nodes if n.op == "placeholder"]
        if vals and all(isinstance(v, torch.Tensor) and not v.is_floating_point() and v.dtype != torch.bool for v in vals):
            kind = torch.int64
    if shapes:
        return make([parse_shape(s) for s in shapes], dtype=kind, high=vocab)
    if default:
        return make(default, dtype=kind, high=vocab)
    raise UsageError(f"--input-shape is required for {name} (e.g. --input-shape 1,3,224,224)")


__all__ = ["calibration_batches", "example_inputs", "parse_shape", "resolve_model"]
