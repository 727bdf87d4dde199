"""A small, honest training loop for (transformed) models: :func:`fit`, :func:`evaluate`, and
:func:`train_on_digits`, which the ``qcd-fx train`` command wraps.

:func:`fit` drives three kinds of optimizer:

* population optimizers (:class:`~qcd_fx.optim.QIMAD`): ``optimizer.step(model=, batch=, loss_fn=)``,
  which evaluates every agent on the same batch in one vectorised call (and tells the optimizer
  the total number of steps, so its cooling schedule runs);
* closure optimizers (``torch.optim.LBFGS``, or any optimizer with ``requires_closure = True``):
  ``optimizer.step(closure)``;
* everything else: ``zero_grad`` / ``backward`` / ``step``.

It returns a :class:`History` (per epoch: mean training loss, training accuracy where the
optimizer's forward pass is visible, validation loss and accuracy, wall time of the training
part of the epoch, learning rate). Each epoch prints one line on stderr (under a Rich bar in a
terminal); ``progress=False`` turns both off.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    train_accuracy: float | None
    val_loss: float | None
    val_accuracy: float | None
    seconds: float
    lr: float | None


@dataclass
class History:
    """What :func:`fit` measured, one :class:`EpochRecord` per epoch, plus free-form ``meta``."""

    epochs: list[EpochRecord] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def column(self, name: str) -> list:
        return [getattr(e, name) for e in self.epochs]

    @property
    def final_val_accuracy(self) -> float | None:
        return self.epochs[-1].val_accuracy if self.epochs else None

    def epochs_to(self, accuracy: float) -> int | None:
        """First epoch (1-based) whose validation accuracy is >= ``accuracy``, or None."""
        for e in self.epochs:
            if e.val_accuracy is not None and e.val_accuracy >= accuracy:
                return e.epoch
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"epochs": [asdict(e) for e in self.epochs], "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        return cls([EpochRecord(**e) for e in data["epochs"]], dict(data.get("meta", {})))


def _to_device(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    return batch


def _split(batch: Any) -> tuple[Any, Tensor]:
    if not isinstance(batch, (list, tuple)) or len(batch) != 2:
        raise ValueError("each batch must be a pair (inputs, targets)")
    return batch[0], batch[1]


def _call(model: nn.Module, inputs: Any) -> Tensor:
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def _correct(out: Tensor, target: Tensor) -> int | None:
    if out.dim() != 2 or target.dim() != 1 or target.dtype not in (torch.int64, torch.int32):
        return None
    return int((out.argmax(1) == target).sum())


def _logits(out: Any) -> Tensor:
    """The class scores of a model output: a tensor, or a ``ModelOutput``/dict's ``logits``."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    raise ValueError(f"the model returns a {type(out).__name__}; training needs class scores (a tensor or .logits)")


def _distilled(loss_fn: LossFn, teacher: nn.Module, inputs: Any, alpha: float, temperature: float) -> LossFn:
    """``loss_fn`` mixed with the soft-target loss against ``teacher``'s outputs on ``inputs``."""
    with torch.no_grad():
        soft = F.log_softmax(_logits(_call(teacher, inputs)).float() / temperature, dim=-1)

    def loss(out: Tensor, target: Tensor) -> Tensor:
        log_p = F.log_softmax(_logits(out).float() / temperature, dim=-1)
        kl = F.kl_div(log_p, soft, log_target=True, reduction="batchmean") * temperature**2
        return (1 - alpha) * loss_fn(out, target) + alpha * kl

    return loss


def _is_population(optimizer: Optimizer) -> bool:
    return bool(getattr(optimizer, "population_based", False))


def _needs_closure(optimizer: Optimizer) -> bool:
    return isinstance(optimizer, torch.optim.LBFGS) or bool(getattr(optimizer, "requires_closure", False))


def _lr(optimizer: Optimizer) -> float | None:
    lr = optimizer.param_groups[0].get("lr") if optimizer.param_groups else None
    return float(lr) if isinstance(lr, (int, float, Tensor)) else None


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, loss_fn: LossFn = F.cross_entropy, device: torch.device | str | None = None) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` (eval mode) over ``loader``; the training flag is restored.

    Returns ``{"loss", "accuracy", "n"}``; ``accuracy`` is NaN if the outputs are not class scores.
    """
    dev = torch.device(device) if device is not None else None
    was_training = model.training
    model.eval()
    total = correct = 0
    loss_sum = 0.0
    accuracy_known = True
    try:
        for batch in loader:
            inputs, target = _split(_to_device(batch, dev))
            out = _call(model, inputs)
            n = len(target)
            loss_sum += float(loss_fn(out, target)) * n
            c = _correct(out, target)
            if c is None:
                accuracy_known = False
            else:
                correct += c
            total += n
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    return {"loss": loss_sum / total, "accuracy": correct / total if accuracy_known else math.nan, "n": total}


def _epoch_line(record: EpochRecord, epochs: int, val_name: str = "val") -> str:
    line = f"epoch {record.epoch}/{epochs}: loss {record.train_loss:.4f}"
    if record.train_accuracy is not None:
        line += f", train acc {100 * record.train_accuracy:.2f}%"
    if record.val_loss is not None:
        line += f", {val_name} loss {record.val_loss:.4f}"
    if record.val_accuracy is not None and math.isfinite(record.val_accuracy):
        line += f", {val_name} acc {100 * record.val_accuracy:.2f}%"
    return line + f" ({record.seconds:.1f} s)"


def _resume(
    path: str | os.PathLike | None,
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: Any,
    train_loader: Iterable,
    history: History,
    epochs: int,
    progress: bool,
) -> int:
    """Restore the checkpoint at ``path`` if there is one (see :mod:`.checkpoint`); the epochs it holds."""
    if path is None or not os.path.exists(path):
        return 0
    from . import checkpoint as ckpt

    data = ckpt.load(path)
    done = int(data["epoch"])
    if done > epochs:
        raise ckpt.CheckpointError(f"checkpoint {os.fspath(path)} holds {done} epochs, more than the {epochs} asked for")
    ckpt.restore(data, path, model=model, optimizer=optimizer, scheduler=scheduler, generators=ckpt.loader_generators(train_loader))
    history.epochs.extend(History.from_dict(data["history"]).epochs)
    if progress:
        print(f"resuming from {os.fspath(path)} after epoch {done}/{epochs}", file=sys.stderr)
    return done


def fit(
    model: nn.Module,
    train_loader: Iterable,
    optimizer: Optimizer,
    epochs: int,
    *,
    val_loader: Iterable | None = None,
    loss_fn: LossFn = F.cross_entropy,
    scheduler: Any = None,
    progress: bool = True,
    device: torch.device | str | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    val_name: str = "val",
    teacher: nn.Module | None = None,
    distill: float = 0.5,
    temperature: float = 2.0,
    checkpoint: str | os.PathLike | None = None,
) -> History:
    """Train ``model`` for ``epochs`` passes over ``train_loader`` and return the :class:`History`.

    ``scheduler`` (optional) is stepped once per epoch. ``on_epoch`` is called with each record.
    ``val_name`` names ``val_loader``'s split in the per-epoch lines (``"test"``, …).
    Batches must be ``(inputs, targets)`` pairs; ``inputs`` may be a tuple of positional inputs.
    A non-finite training loss stops training with a ``FloatingPointError`` naming the epoch/step.

    Knowledge distillation: with a ``teacher`` (e.g. the unpruned model), the training loss is
    ``(1 - distill) * loss_fn(out, target) + distill * T² * KL(softmax(teacher/T) ‖ softmax(out/T))``
    (Hinton et al.'s soft targets at ``temperature`` T; the T² keeps the gradient scale); the
    teacher runs in eval mode without gradients. Validation uses ``loss_fn`` alone.

    ``checkpoint``: a file written (atomically, by rank 0) after every epoch with everything
    needed to resume — weights, optimizer (QIMAD's swarm included), scheduler, epoch, RNG and data
    generator states, the history so far (:mod:`qcd_fx.train.checkpoint`). When it exists at the
    start, training resumes after its last epoch, and ends as an uninterrupted run would (same
    weights and history); a checkpoint of another model or optimizer raises ``CheckpointError``.
    """
    if teacher is not None and not (0 <= distill <= 1 and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"distill must be in [0, 1] and temperature > 0, got {distill!r}, {temperature!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if not isinstance(optimizer, Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    from .. import distributed

    dev = torch.device(device) if device is not None else None
    parallel = distributed.active()
    if parallel:
        if _is_population(optimizer):  # the agents are split over the ranks, not the data: no DDP, whole batches
            if not getattr(optimizer, "distributed_ready", False):
                raise ValueError(
                    f"fit across {distributed.world()} ranks takes gradient optimizers, QIMAD or QuantumDynamics; {type(optimizer).__name__} runs in one process"
                )
            train_loader = distributed.whole_batches(train_loader)
        elif _needs_closure(optimizer):
            raise ValueError(f"fit across {distributed.world()} ranks takes gradient optimizers; {type(optimizer).__name__} runs in one process")
        elif not isinstance(model, nn.parallel.DistributedDataParallel) and not any(map(distributed.is_sharded, model.parameters())):
            model = nn.parallel.DistributedDataParallel(model)  # gradients averaged over the ranks (FSDP averages its own)
        progress = progress and distributed.is_main()
    base_loss = loss_fn
    if teacher is not None:
        teacher.eval()
    history = History(meta={"optimizer": type(optimizer).__name__, "epochs": epochs})
    start = _resume(checkpoint, model, optimizer, scheduler, train_loader, history, epochs, progress)
    population = _is_population(optimizer)
    closure_style = not population and _needs_closure(optimizer)
    if population and hasattr(optimizer, "set_total_steps"):
        try:
            steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
        except TypeError:
            steps_per_epoch = None
        if steps_per_epoch:
            optimizer.set_total_steps(epochs * steps_per_epoch, only_if_unset=True)

    # one line per epoch on stderr (kept in a terminal and in a log); in a terminal a Rich bar
    # under the lines shows the running epoch
    console = bar = None
    if progress:
        from rich.console import Console

        console = Console(file=sys.stderr, highlight=False)
        if console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            bar = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                console=console, transient=True,
            )  # fmt: skip
            bar.start()
    try:
        task = None
        if bar is not None:
            try:
                total = len(train_loader)  # type: ignore[arg-type]
            except TypeError:
                total = None
            task = bar.add_task("train", total=total, epoch=0, epochs=epochs, info="")
        for epoch in range(start + 1, epochs + 1):
            model.train()
            if bar is not None:
                bar.reset(task, epoch=epoch, epochs=epochs, info="")
            loss_sum = 0.0
            seen = correct = 0
            accuracy_known = not population
            t0 = time.perf_counter()
            for step, batch in enumerate(train_loader, 1):
                inputs, target = _split(_to_device(batch, dev))
                n = len(target)
                loss_fn = base_loss if teacher is None else _distilled(base_loss, teacher, inputs, distill, temperature)
                if population:
                    loss_value = float(optimizer.step(model=model, batch=(inputs, target), loss_fn=loss_fn))
                    c = None
                elif closure_style:
                    seen_out: list[Tensor] = []

                    def closure() -> Tensor:
                        optimizer.zero_grad()
                        out = _call(model, inputs)
                        loss = loss_fn(out, target)
                        loss.backward()
                        if not seen_out:
                            seen_out.append(out.detach())
                        return loss

                    ret = optimizer.step(closure)
                    loss_value = float(ret.detach()) if isinstance(ret, Tensor) else float(ret)
                    c = _correct(seen_out[0], target) if seen_out else None
                else:
                    optimizer.zero_grad()
                    out = _call(model, inputs)
                    loss = loss_fn(out, target)
                    if parallel:  # DDP averages the ranks' gradients; weight each by its share of the global batch
                        (n_global,) = distributed.all_reduce_sum([float(n)])
                        (loss * (n * distributed.world() / n_global)).backward()
                    else:
                        loss.backward()
                    optimizer.step()
                    loss_value = float(loss.detach())
                    c = _correct(out.detach(), target)
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"training loss is {loss_value} at epoch {epoch}, step {step}; lower the learning rate")
                loss_sum += loss_value * n
                seen += n
                if c is None:
                    accuracy_known = False
                else:
                    correct += c
                if bar is not None:
                    bar.update(task, advance=1, info=f"loss {loss_sum / seen:.4f}")
            seconds = time.perf_counter() - t0
            if parallel and not population:  # the epoch's sums over every rank's share (population: every rank saw every batch)
                loss_sum, seen, correct, known = distributed.all_reduce_sum([loss_sum, seen, correct, float(accuracy_known)])
                seen, correct = int(seen), int(correct)
                accuracy_known = known == distributed.world()
            if seen == 0:
                raise ValueError("fit: the training loader yielded no batches")
            lr = _lr(optimizer)
            if scheduler is not None:
                scheduler.step()
            val = evaluate(model, val_loader, base_loss, dev) if val_loader is not None else None
            record = EpochRecord(
                epoch=epoch, train_loss=loss_sum / seen, train_accuracy=correct / seen if accuracy_known else None,
                val_loss=val["loss"] if val else None, val_accuracy=val["accuracy"] if val else None,
                seconds=seconds, lr=lr,
            )  # fmt: skip
            history.epochs.append(record)
            if console is not None:
                console.print(_epoch_line(record, epochs, val_name), markup=False, soft_wrap=True)
            if checkpoint is not None:  # before on_epoch: what it does (or raises) comes after the saved epoch
                from . import checkpoint as ckpt

                ckpt.save(checkpoint, model=model, optimizer=optimizer, epoch=epoch, history=history.to_dict(),
                          generators=ckpt.loader_generators(train_loader), scheduler=scheduler)  # fmt: skip
            if on_epoch is not None:
                on_epoch(record)
    finally:
        if bar is not None:
            bar.stop()
    return history
