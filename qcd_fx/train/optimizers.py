"""The optimizers ``qcd-fx train`` and :func:`~qcd_fx.train.train_on_digits` know by name."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer

OPTIMIZERS = ("sgd", "adam", "cce", "cce-seed", "qimad")
"""Names accepted by :func:`make_optimizer` and :func:`train_on_digits`."""


DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3, "cce": 0.1, "cce-seed": 0.1, "qimad": 2e-3}
"""Default learning rates (digits; chosen on a validation split by ``benchmarks/optimizers.py``)."""


def make_optimizer(name: str, params: Iterable, *, lr: float | None = None, seed: int = 0, **options: Any) -> Optimizer:
    """Build one of :data:`OPTIMIZERS` with the project's defaults (``lr=None``: :data:`DEFAULT_LR`).

    ``sgd`` is SGD with momentum 0.9 (``foreach``); ``adam`` is Adam (``foreach``); ``cce`` is
    :class:`~qcd_fx.optim.CCE` with its defaults; ``cce-seed`` is CCE with ``mode="seed"``;
    ``qimad`` is :class:`~qcd_fx.optim.QIMAD` (8 agents) seeded with ``seed``. ``options`` are
    passed on to the optimizer's constructor.
    """
    from ..optim import CCE, QIMAD

    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0 or not math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    lr = DEFAULT_LR[name] if lr is None else float(lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, **{"momentum": 0.9, "foreach": True, **options})
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, **{"foreach": True, **options})
    if name == "cce":
        return CCE(params, lr=lr, **options)
    if name == "cce-seed":
        return CCE(params, lr=lr, **{"mode": "seed", **options})
    return QIMAD(params, lr=lr, **{"seed": seed, **options})
