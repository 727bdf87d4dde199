"""Output files of a training run: the names beside a prefix, and the learning-curve plot."""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..errors import require
from ..io import atomic_write
from .loop import History


def output_paths(out_prefix: str | os.PathLike, overwrite: bool) -> dict[str, Path]:
    prefix = Path(out_prefix)
    base = prefix.name[: -len(".pt")] if prefix.name.endswith(".pt") else prefix.name
    if not base:
        raise ValueError(f"output prefix {str(out_prefix)!r} has no file name")
    paths = {
        "model": prefix.with_name(base + ".pt"),
        "history": prefix.with_name(base + ".history.json"),
        "curve": prefix.with_name(base + ".curve.png"),
    }
    if not prefix.parent.is_dir():
        raise ValueError(f"output directory {str(prefix.parent)!r} does not exist")
    if not overwrite:
        existing = [str(p) for p in paths.values() if p.exists()]
        if existing:
            raise FileExistsError(f"{existing[0]} exists; choose another output name or pass overwrite=True (--force)")
    return paths


def require_matplotlib() -> None:
    """The learning-curve plot needs matplotlib (the ``plot`` extra): say so before any work."""
    require("matplotlib", "data", "the learning-curve plot (OUT.curve.png)")


def plot_history(histories: dict[str, History], path: str | os.PathLike, title: str = "") -> None:
    """Learning curves (training loss, validation accuracy per epoch) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for label, h in histories.items():
        ep = h.column("epoch")
        ax_loss.plot(ep, h.column("train_loss"), label=label)
        acc = [a if a is not None else math.nan for a in h.column("val_accuracy")]
        ax_acc.plot(ep, [100 * a for a in acc], label=label)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_yscale("log")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy (%)")
    ax_acc.grid(alpha=0.3)
    ax_loss.grid(alpha=0.3)
    ax_acc.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    target = Path(path)
    try:
        atomic_write(target, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
