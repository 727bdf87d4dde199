"""Per-epoch checkpoints of :func:`~qcd_fx.train.fit`, so that a killed run resumes and loses nothing.

``fit(..., checkpoint=PATH)`` writes PATH after every epoch and, when PATH exists at the start,
resumes from it: the epochs it holds are not run again, and the resumed run ends with the same
weights and :class:`~qcd_fx.train.History` as an uninterrupted run with the same seed (bit for
bit on one process; under ``torch.distributed`` up to the float order of the gradient
all-reduce, which the restart does not change either). A checkpoint holds:

* ``model`` — the model's state dict (the module inside ``DistributedDataParallel``);
* ``optimizer`` — the optimizer's state dict (QIMAD's includes its swarm and its generator),
  and ``scheduler`` — the learning-rate scheduler's, when it has one;
* ``epoch`` — the epochs completed: the sampler's position (checkpoints are taken between
  epochs, so the next epoch starts at its first batch; an epoch cut short is run again whole);
* ``rng`` — per rank, the torch CPU generator's state (and CUDA's, where available) and the
  states of the data loader's ``torch.Generator`` objects (:class:`~qcd_fx.distributed.ShardedBatches`,
  ``RandomSampler``, ``DataLoader(generator=)``), which fix the next epoch's permutation;
* ``history`` — the :class:`~qcd_fx.train.History` so far, as plain lists and dicts;
* ``identity`` — the model's parameter and buffer names, shapes and dtypes and the optimizer's
  class and group sizes, so that a checkpoint of another model or optimizer is refused.

Rank 0 writes, atomically (:func:`qcd_fx.io.atomic_path`: a temporary file next to PATH, then
``os.replace``), so a worker killed at any moment leaves the previous complete checkpoint. Files
are read with ``torch.load(weights_only=True)``: tensors and plain containers only, no pickled
objects. Under ``torch.distributed`` every rank reads PATH (a shared or local file system).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..errors import QcdFxError, first_line

FORMAT = "qcd-fx checkpoint"
VERSION = 1


class CheckpointError(QcdFxError):
    """A checkpoint that cannot be read or does not belong to this model, optimizer or run."""


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` (the model itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def loader_generators(loader: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects that decide the order of ``loader``'s batches: its own
    (``DataLoader(generator=)``), its sampler's and batch sampler's (one level of nesting), each once."""
    found: list[torch.Generator] = []
    seen: set[int] = set()

    def add(obj: Any) -> None:
        gen = getattr(obj, "generator", None)
        if isinstance(gen, torch.Generator) and id(gen) not in seen:
            seen.add(id(gen))
            found.append(gen)

    for holder in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if holder is None:
            continue
        add(holder)
        add(getattr(holder, "sampler", None))
    return found


def identity(model: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
    """What a checkpoint must match: parameter/buffer names, shapes, dtypes; optimizer class, group sizes."""
    tensors = [[name, list(t.shape), str(t.dtype).removeprefix("torch.")] for name, t in unwrap(model).state_dict().items() if isinstance(t, Tensor)]
    return {"model": tensors, "optimizer": type(optimizer).__name__, "groups": [len(g["params"]) for g in optimizer.param_groups]}


def _rng_state(generators: list[torch.Generator]) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "loader": [g.get_state() for g in generators]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: Optimizer,
    epoch: int,
    history: dict[str, Any],
    generators: list[torch.Generator],
    scheduler: Any = None,
) -> None:
    """Write the checkpoint after ``epoch`` completed epochs. Under ``torch.distributed`` every rank
    calls this (the ranks' RNG states are gathered) and rank 0 writes; elsewhere the process writes."""
    from .. import distributed
    from ..io import atomic_path

    rng = [_rng_state(generators)]
    if distributed.active():
        gathered: list[Any] = [None] * distributed.world()
        torch.distributed.all_gather_object(gathered, rng[0])
        rng = gathered
    if not distributed.is_main():
        return
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "epoch": int(epoch),
        "world": distributed.world(),
        "identity": identity(model, optimizer),
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None and hasattr(scheduler, "state_dict") else None,
        "rng": rng,
        "history": history,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint (``torch.load(weights_only=True)``); :class:`CheckpointError` when it is not one."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holding objects weights_only refuses
        raise CheckpointError(f"cannot read checkpoint {os.fspath(path)}: {first_line(e)}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{os.fspath(path)} is not a qcd-fx checkpoint")
    if data.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {os.fspath(path)} has version {data.get('version')!r}; this qcd-fx reads version {VERSION}")
    missing = [k for k in ("epoch", "identity", "model", "optimizer", "rng", "history") if k not in data]
    if missing:
        raise CheckpointError(f"checkpoint {os.fspath(path)} is incomplete (no {missing[0]!r})")
    return data


def _difference(saved: list, current: list) -> str:
    mine = {row[0]: row[1:] for row in current}
    theirs = {row[0]: row[1:] for row in saved}
    for name, spec in theirs.items():
        if name not in mine:
            return f"it has {name!r}, this model does not"
        if mine[name] != spec:
            return f"{name!r} is {spec[0]} {spec[1]} there, {mine[name][0]} {mine[name][1]} here"
    extra = next((name for name in mine if name not in theirs), None)
    return f"this model has {extra!r}, the checkpoint does not" if extra else "the same tensors in another order"


def restore(
    data: dict[str, Any],
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: Optimizer,
    generators: list[torch.Generator],
    scheduler: Any = None,
) -> None:
    """Put a :func:`load`-ed checkpoint back into ``model``, ``optimizer``, ``scheduler``, the
    loader's generators and the torch RNG; :class:`CheckpointError` when it belongs to another run."""
    from .. import distributed

    name = os.fspath(path)
    saved, current = data["identity"], identity(model, optimizer)
    if saved.get("model") != current["model"]:
        raise CheckpointError(f"checkpoint {name} was written for a different model ({_difference(saved.get('model') or [], current['model'])})")
    if saved.get("optimizer") != current["optimizer"] or saved.get("groups") != current["groups"]:
        raise CheckpointError(
            f"checkpoint {name} was written with optimizer {saved.get('optimizer')} ({saved.get('groups')} parameters per group), "
            f"this run uses {current['optimizer']} ({current['groups']})"
        )
    then, now = data.get("scheduler") is not None, scheduler is not None and hasattr(scheduler, "state_dict")
    if then != now:
        raise CheckpointError(
            f"checkpoint {name} was written {'with' if then else 'without'} a learning-rate scheduler, this run has {'one' if now else 'none'}"
        )
    rng = data["rng"]
    mine = rng[distributed.rank()] if distributed.rank() < len(rng) else rng[0]
    if len(mine["loader"]) != len(generators):
        raise CheckpointError(f"checkpoint {name} holds {len(mine['loader'])} data-loader generator state(s), this training loader has {len(generators)}")
    try:
        unwrap(model).load_state_dict(data["model"])
        optimizer.load_state_dict(data["optimizer"])
        if now:
            scheduler.load_state_dict(data["scheduler"])
        for gen, state in zip(generators, mine["loader"]):
            gen.set_state(state)
        torch.set_rng_state(mine["torch"])
        if "cuda" in mine and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(mine["cuda"])
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"checkpoint {name} does not fit this run: {first_line(e)}") from None


__all__ = ["FORMAT", "VERSION", "CheckpointError", "identity", "load", "loader_generators", "restore", "save", "unwrap"]
