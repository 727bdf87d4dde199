"""Training on the bundled digits data: how a model takes the images, and the whole run."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..io import OutputFiles
from .files import output_paths, plot_history, require_matplotlib
from .loop import History, fit
from .optimizers import OPTIMIZERS, make_optimizer


def digits_input(model: nn.Module, x: Tensor) -> Callable[[Tensor], Tensor]:
    """How to feed digits images to ``model``: as ``(N, 1, 8, 8)`` images or flattened ``(N, 64)``."""
    errors = []
    for name, fn in (("(N, 1, 8, 8) images", lambda t: t), ("(N, 64) vectors", lambda t: t.flatten(1))):
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(fn(x[:2]))
        except Exception as e:  # noqa: BLE001 - the model rejects this layout; try the next one
            errors.append(f"{name}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
            continue
        finally:
            model.train(was)
        if not isinstance(out, Tensor) or out.shape != (2, 10):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            errors.append(f"{name}: output {shape}, expected (2, 10) class scores")
            continue
        return fn
    raise ValueError("the model does not fit the digits data (8x8 images, 10 classes): " + "; ".join(errors))


class _Flat(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.flatten(1))


def train_on_digits(
    model: nn.Module,
    optimizer_name: str,
    epochs: int,
    *,
    batch_size: int = 64,
    lr: float | None = None,
    seed: int = 0,
    out_prefix: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    optimizer_options: dict[str, Any] | None = None,
    save_model: Callable[[nn.Module, str], None] | None = None,
) -> History:
    """Train ``model`` on the bundled digits data (80/20 stratified split) and return the history.

    The history's validation columns are the **test** split (nothing is tuned on them here).
    ``seed`` fixes the shuffling and the optimizer's randomness (the model's initial weights are
    whatever ``model`` holds). The model may take ``(N, 1, 8, 8)`` images or ``(N, 64)`` vectors.

    With ``out_prefix`` (e.g. ``"runs/mlp"`` or ``"runs/mlp.pt"``) three files are written, each
    all or none (temporary files created before training, renamed at the end): ``<prefix>.pt`` (the trained model:
    ``save_model(model, path)`` if given, else ``torch.save(model.state_dict(), path)``),
    ``<prefix>.history.json`` and ``<prefix>.curve.png``. Existing files raise ``FileExistsError``
    before training starts unless ``overwrite=True``.
    """
    from ..data import digits_loaders

    if optimizer_name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer_name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    paths = output_paths(out_prefix, overwrite) if out_prefix is not None else None
    if paths is not None:
        require_matplotlib()  # before the training, not after it
    with OutputFiles() as files:
        # the temporary files exist from the start: an unwritable location fails before training
        tmp = {kind: files.reserve(path, f"{kind} output") for kind, path in paths.items()} if paths else {}
        train_loader, test_loader, _ = digits_loaders(batch_size, seed=seed)
        x0 = next(iter(test_loader))[0]
        feed = digits_input(model, x0)
        net = model if feed(x0).dim() == 4 else _Flat(model)
        opt = make_optimizer(optimizer_name, model.parameters(), lr=lr, seed=seed, **(optimizer_options or {}))
        history = fit(net, train_loader, opt, epochs, val_loader=test_loader, progress=progress, val_name="test")
        history.meta.update(
            optimizer=optimizer_name, lr=opt.param_groups[0]["lr"], batch_size=batch_size, seed=seed,
            data="digits (sklearn), 80/20 stratified split, split_seed=0; val_* columns are the test split",
            final_test_accuracy=history.final_val_accuracy, torch=torch.__version__,
        )  # fmt: skip
        if paths is None:
            return history
        if save_model is not None:
            save_model(model, tmp["model"])
        else:
            torch.save(model.state_dict(), tmp["model"])
        Path(tmp["history"]).write_text(json.dumps(history.to_dict(), indent=2) + "\n")
        plot_history({optimizer_name: history}, tmp["curve"], title=f"digits, {optimizer_name}")
        files.commit()  # all three, or (on any failure above) none
    history.meta["outputs"] = {k: str(v) for k, v in paths.items()}
    return history
