"""Training a model on a data spec (:mod:`qcd_fx.datasets`) with one of the bundled optimizers,
optionally distilling from a teacher, and writing the model, the history and the curve."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..datasets import Data, check_fits
from ..io import OutputFiles
from .files import output_paths, plot_history, require_matplotlib
from .loop import History, fit
from .optimizers import OPTIMIZERS, make_optimizer


class _Flat(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Any:
        return self.model(x.flatten(1))


def train_on_data(
    model: nn.Module,
    data: Data,
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
    teacher: nn.Module | None = None,
    distill: float = 0.5,
    temperature: float = 2.0,
    checkpoint: str | os.PathLike | None = None,
) -> History:
    """Train ``model`` on ``data`` and return the history (validation columns: ``data.val``).

    ``seed`` fixes the shuffling and the optimizer's randomness (the model's initial weights are
    whatever ``model`` holds). The model takes the data's inputs as they are, or flattened (an
    MLP on images); :func:`~qcd_fx.datasets.check_fits` says why not otherwise. ``teacher``:
    distil from it (see :func:`~qcd_fx.train.fit`; it gets the same inputs). ``checkpoint``: write
    one after every epoch and resume from it when it exists (see :func:`~qcd_fx.train.fit`).

    With ``out_prefix`` (e.g. ``"runs/mlp"``) three files are written, all or none (temporary
    files created before training, renamed at the end): ``<prefix>.pt`` (``save_model(model,
    path)`` if given, else the state dict), ``<prefix>.history.json`` and ``<prefix>.curve.png``.
    Existing files raise ``FileExistsError`` before training unless ``overwrite=True``.
    """
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
        feed = check_fits(model, data)
        flat = feed(data.example(1)).dim() != data.example(1).dim()
        net = _Flat(model) if flat else model
        if teacher is not None:
            teacher = _Flat(teacher) if flat and check_fits(teacher, data)(data.example(1)).dim() != data.example(1).dim() else teacher
        train_loader, val_loader = data.loaders(batch_size, seed=seed, eval_batch_size=512)
        opt = make_optimizer(optimizer_name, model.parameters(), lr=lr, seed=seed, **(optimizer_options or {}))
        history = fit(
            net, train_loader, opt, epochs, val_loader=val_loader, progress=progress, val_name=data.val_name,
            teacher=teacher, distill=distill, temperature=temperature, checkpoint=checkpoint,
        )  # fmt: skip
        history.meta.update(
            optimizer=optimizer_name, lr=opt.param_groups[0]["lr"], batch_size=batch_size, seed=seed, data=data.spec,
            final_val_accuracy=history.final_val_accuracy, torch=torch.__version__,
        )  # fmt: skip
        if data.spec == "digits":
            history.meta.update(data="digits (sklearn), 80/20 stratified split, split_seed=0; val_* columns are the test split",
                                final_test_accuracy=history.final_val_accuracy)  # fmt: skip
        if teacher is not None:
            history.meta.update(distill=distill, temperature=temperature)
        if paths is None:
            return history
        if save_model is not None:
            save_model(model, tmp["model"])
        else:
            torch.save(model.state_dict(), tmp["model"])
        Path(tmp["history"]).write_text(json.dumps(history.to_dict(), indent=2) + "\n")
        plot_history({optimizer_name: history}, tmp["curve"], title=f"{data.spec}, {optimizer_name}")
        files.commit()  # all three, or (on any failure above) none
    history.meta["outputs"] = {k: str(v) for k, v in paths.items()}
    return history
