"""torchvision classification models as a test and benchmark zoo (``weights=None``; no downloads).

``build(name, small=True)`` constructs a model with an input size chosen to keep CPU runs short
while every architectural path stays exercised (ViTs get ``image_size=32``; MaxViT needs 224;
Inception-v3 at least 75).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

CI_SUBSET = (
    "resnet18",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "densenet121",
    "regnet_x_400mf",
    "shufflenet_v2_x0_5",
    "convnext_tiny",
    "vit_b_16",
    "swin_t",
    "squeezenet1_1",
    "googlenet",
)
"""Representative architectures the default test run covers (the ``zoo`` marker runs all)."""


def classification_models() -> list[str]:
    """Names of every torchvision classification model (80 in torchvision 0.29)."""
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def input_size(name: str, small: bool = False) -> int:
    """Square input side for ``name``: the model's native size, or a small one when ``small``."""
    if name.startswith("maxvit"):
        return 224  # its partitions need 224 (or 448)
    if name == "inception_v3":
        return 80 if small else 299
    if name.startswith("vit"):
        return (28 if name == "vit_h_14" else 32) if small else 224
    return 64 if small else 224


def build(name: str, small: bool = False, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """``(model in eval mode, input shape with batch 1)`` for a torchvision classification model.

    The model is built under ``torch.manual_seed(seed)`` and :func:`randomize_zero_weights` is
    applied, so outputs depend on every layer (torchvision zero-initialises some heads).
    """
    import torchvision.models as tvm

    kwargs = {}
    size = input_size(name, small)
    if name.startswith("vit") and small:
        kwargs["image_size"] = size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.manual_seed(seed)
        model = tvm.get_model(name, weights=None, **kwargs)
    randomize_zero_weights(model, seed)
    return model.eval(), (1, 3, size, size)


@torch.no_grad()
def randomize_zero_weights(model: nn.Module, seed: int = 0) -> int:
    """Give every all-zero floating-point weight (not bias) small random values; returns how many.

    torchvision initialises some heads to zero (ViT's classifier), which makes the output
    identically zero and any equality or parity check on it meaningless.
    """
    gen = torch.Generator().manual_seed(seed)
    changed = 0
    for name, p in model.named_parameters():
        if p.dim() >= 2 and p.is_floating_point() and not p.any():
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / fan_in**0.5)
            changed += 1
    return changed
