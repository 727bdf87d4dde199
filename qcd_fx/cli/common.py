"""What several commands do with their options: find the model, make example and calibration inputs."""

from __future__ import annotations

import os

from ..errors import UsageError


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` -> ``(1, 3, 224, 224)``; one-line error otherwise."""
    parts = [p.strip() for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise UsageError(f"--input-shape {text!r} is not a comma-separated list of integers (e.g. 1,3,224,224)") from None
    if not shape or any(s < 1 for s in shape):
        raise UsageError(f"--input-shape {text!r} must list positive sizes (e.g. 1,3,224,224)")
    return shape


def resolve_model(model: str | None, example: bool, weights: str | None, trust_pickle: bool, allow: list[str]):
    """(module, display name, default input shapes or None, source file or None)."""
    from ..io import load_model

    if example:
        if model:
            raise UsageError("give either MODEL or --example, not both")
        from ..examples import DIGITS_INPUT_SHAPE, digits_cnn

        import torch

        torch.manual_seed(0)
        return digits_cnn(), "example:digits_cnn", [DIGITS_INPUT_SHAPE], None
    if not model:
        raise UsageError("missing MODEL (torchvision:NAME, package.module:factory or FILE.pt); or use --example")
    from ..io import INPUT_SHAPES_KEY

    module = load_model(model, weights=weights, trust_pickle=trust_pickle, allow=allow)
    default_shape = getattr(module, "meta", {}).get(INPUT_SHAPES_KEY)
    if model.startswith("torchvision:"):
        from ..zoo import input_size

        size = input_size(model.split(":", 1)[1])
        default_shape = [(1, 3, size, size)]
    source_file = model if os.path.exists(model) else None
    return module, model, default_shape, source_file


def example_inputs(shapes: list[str], default: list[tuple[int, ...]] | None, name: str):
    import torch

    if shapes:
        parsed = [parse_shape(s) for s in shapes]
    elif default:
        parsed = [tuple(s) for s in default]
    else:
        raise UsageError(f"--input-shape is required for {name} (e.g. --input-shape 1,3,224,224)")
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(s, generator=gen) for s in parsed)


def calibration_batches(inputs: tuple, count: int, data: str | None) -> list[tuple]:
    """``count`` calibration batches shaped like ``inputs``: random (seeded) or from a data set."""
    import torch

    if data is None:
        gen = torch.Generator().manual_seed(1)
        return [inputs] + [tuple(torch.randn(t.shape, generator=gen) for t in inputs) for _ in range(count - 1)]
    if data != "digits":
        raise UsageError(f"--data {data!r} is not a known data set; known: digits")
    if len(inputs) != 1 or tuple(inputs[0].shape[1:]) not in ((1, 8, 8), (64,)):
        raise UsageError(f"--data digits gives 1x8x8 images (or 64 features), but the model takes {_shapes(inputs)}")
    from ..data import load_digits_split

    x = load_digits_split().x_train.reshape((-1, *inputs[0].shape[1:]))
    size = max(inputs[0].shape[0], 32)
    return [(x[i * size : (i + 1) * size],) for i in range(min(count, len(x) // size))]


def _shapes(inputs: tuple) -> str:
    return ", ".join("x".join(map(str, t.shape)) for t in inputs)
