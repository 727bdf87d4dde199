"""Training on the bundled digits data: how a model takes the images, and the whole run."""

from __future__ import annotations

from typing import Any

from torch import nn

from .loop import History


def train_on_digits(
    model: nn.Module,
    optimizer_name: str,
    epochs: int,
    **kwargs: Any,
) -> History:
    """Train ``model`` on the bundled digits data (80/20 stratified split) and return the history:
    :func:`~qcd_fx.train.run.train_on_data` with ``load_data("digits")``. The history's
    validation columns are the **test** split (nothing is tuned on them here). The model may
    take ``(N, 1, 8, 8)`` images or ``(N, 64)`` vectors."""
    from ..datasets import load_data
    from .run import train_on_data

    return train_on_data(model, load_data("digits"), optimizer_name, epochs, **kwargs)
