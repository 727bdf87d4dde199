"""``compress``: from a model and the user's data to a smaller deployed model, measured.

Prune with ``cdg-prune{target_macs=…}`` (in ``steps`` rounds, each followed by fine-tuning with
distillation from the original model), verify, export to ONNX with parity, and measure the
original and the result side by side: validation accuracy, parameters, MACs, weight bytes, eager
latency at batch 1 and 8 (interleaved medians), onnxruntime latency at batch 1, training-step
time and training memory (activations saved for backward, counted with saved-tensor hooks, plus
parameters, gradients and optimizer state).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .analysis import count_macs, count_params, interleaved_latency
from .datasets import Data, check_fits
from .errors import UsageError
from .train.loop import _logits, evaluate, fit
from .train.optimizers import OPTIMIZERS, make_optimizer
from .train.run import _Flat


@dataclass
class Measurement:
    """One model, measured."""

    accuracy: float | None
    params: int
    macs: int
    weight_bytes: int
    eager_ms_batch1: float
    eager_ms_batch8: float
    train_step_ms: float
    train_memory_bytes: int  # activations saved for backward + parameters + gradients + optimizer state
    train_activation_bytes: int
    onnx_ms_batch1: float | None = None


@dataclass
class CompressResult:
    graph_module: torch.fx.GraphModule
    before: Measurement
    after: Measurement
    rounds: list[dict[str, Any]] = field(default_factory=list)  # per round: target, macs, accuracy
    reports: list[dict[str, Any]] = field(default_factory=list)  # the transform report of every round
    onnx: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"before": asdict(self.before), "after": asdict(self.after), "rounds": self.rounds, "reports": self.reports, "onnx": self.onnx}

    def table(self):
        """A ``rich.table.Table``: one row per measure, before / after / ratio."""
        from rich.table import Table

        t = Table(title="qcd-fx compress", title_justify="left")
        for col in ("", "original", "compressed", "ratio"):
            t.add_column(col, justify="left" if not col else "right")
        b, a = self.before, self.after

        def row(name: str, x: float | None, y: float | None, fmt: str, lower_is_better: bool = True) -> None:
            ratio = f"{x / y:.2f}x" if lower_is_better and x and y else (f"{y - x:+.2f} pt" if x is not None and y is not None and not lower_is_better else "")
            t.add_row(name, "—" if x is None else format(x, fmt), "—" if y is None else format(y, fmt), ratio)

        row("accuracy (%)", None if b.accuracy is None else 100 * b.accuracy, None if a.accuracy is None else 100 * a.accuracy, ".2f", False)
        row("parameters", b.params, a.params, ",d")
        row("MACs (batch 1)", b.macs, a.macs, ",d")
        row("weights (KiB)", b.weight_bytes / 1024, a.weight_bytes / 1024, ".1f")
        row("eager latency, batch 1 (ms)", b.eager_ms_batch1, a.eager_ms_batch1, ".3f")
        row("eager latency, batch 8 (ms)", b.eager_ms_batch8, a.eager_ms_batch8, ".3f")
        row("onnxruntime latency, batch 1 (ms)", b.onnx_ms_batch1, a.onnx_ms_batch1, ".3f")
        row("training step (ms)", b.train_step_ms, a.train_step_ms, ".2f")
        row("training memory (KiB)", b.train_memory_bytes / 1024, a.train_memory_bytes / 1024, ".1f")
        return t


def _weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _train_probes(
    models: list[nn.Module], batch: tuple[torch.Tensor, torch.Tensor], optimizer: str, lr: float | None,
    min_rounds: int = 7, max_rounds: int = 40, budget_s: float = 1.0, block_s: float = 0.025,
) -> list[tuple[float, int, int]]:  # fmt: skip
    """Per model: (median ms of a training step, training memory bytes, activation bytes), on
    copies. After one step that counts what autograd saves and one warm-up step per model, the
    models take turns running blocks of consecutive steps — as a training loop runs them, so a
    small model is not timed with its caches just flushed by the other — each block at least
    ``block_s`` long (up to 20 steps), until every model has ``budget_s`` seconds of timed steps
    (``min_rounds`` to ``max_rounds`` turns). A step's time is its block's mean; the median over
    blocks is reported (the machine's noise hits both models alike)."""
    x, y = batch
    nets = [copy.deepcopy(m).train() for m in models]
    opts = [make_optimizer(optimizer, n.parameters(), lr=lr) if optimizer != "qimad" else torch.optim.Adam(n.parameters()) for n in nets]
    saved: list[dict[int, int]] = [{} for _ in nets]
    times: list[list[float]] = [[] for _ in nets]

    def packer(store: dict[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
        def pack(t: torch.Tensor) -> torch.Tensor:
            try:
                key = t.untyped_storage().data_ptr()
                store[key] = max(store.get(key, 0), t.untyped_storage().nbytes())
            except (RuntimeError, NotImplementedError):
                store[id(t)] = t.numel() * t.element_size()
            return t

        return pack

    def step(k: int, count: bool = False) -> None:
        net, opt = nets[k], opts[k]
        opt.zero_grad()
        if count:
            with torch.autograd.graph.saved_tensors_hooks(packer(saved[k]), lambda t: t):
                loss = torch.nn.functional.cross_entropy(_logits(net(x)), y)
        else:
            loss = torch.nn.functional.cross_entropy(_logits(net(x)), y)
        loss.backward()
        opt.step()

    blocks = []
    for k in range(len(nets)):
        step(k, count=True)
        t0 = time.perf_counter()
        step(k)  # warm-up; its time sizes the blocks
        blocks.append(max(1, min(20, math.ceil(block_s / max(time.perf_counter() - t0, 1e-6)))))
    rounds = 0
    while rounds < min_rounds or (rounds < max_rounds and min(sum(ts) * b for ts, b in zip(times, blocks)) < budget_s):
        for k in range(len(nets)):
            t0 = time.perf_counter()
            for _ in range(blocks[k]):
                step(k)
            times[k].append((time.perf_counter() - t0) / blocks[k])
        rounds += 1
    out = []
    for net, opt, store, ts in zip(nets, opts, saved, times):
        params = sum(p.numel() * p.element_size() for p in net.parameters())
        grads = sum(p.grad.numel() * p.grad.element_size() for p in net.parameters() if p.grad is not None)
        state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
        activations = sum(store.values())
        out.append((1e3 * statistics.median(ts), activations + params + grads + state, activations))
    return out


def measure(
    before: nn.Module, after: nn.Module, data: Data, *, batch_size: int, optimizer: str, lr: float | None, repeats: int = 20
) -> tuple[Measurement, Measurement]:
    """Both models measured side by side (latencies interleaved, medians)."""
    x1, x8 = data.example(1), data.example(8)
    _, val = data.loaders(batch_size)
    batch = next(iter(data.loaders(batch_size, seed=0)[0]))
    before.eval()
    after.eval()
    lat = {}
    for name, x in (("1", x1), ("8", x8)):
        with torch.no_grad():
            lat[name] = interleaved_latency({"before": lambda x=x: before(x), "after": lambda x=x: after(x)}, repeats=repeats, warmup=3)
    out = []
    probes = _train_probes([before, after], batch, optimizer, lr)
    for (key, model), (step_ms, memory, activations) in zip((("before", before), ("after", after)), probes):
        acc = evaluate(model, val)["accuracy"] if val is not None else None
        out.append(
            Measurement(
                accuracy=acc,
                params=count_params(model),
                macs=count_macs(model, (x1,)),
                weight_bytes=_weight_bytes(model),
                eager_ms_batch1=1e3 * lat["1"][key],
                eager_ms_batch8=1e3 * lat["8"][key],
                train_step_ms=step_ms,
                train_memory_bytes=memory,
                train_activation_bytes=activations,
            )  # fmt: skip
        )
        model.eval()
    return out[0], out[1]


def compress(
    model: nn.Module,
    data: Data,
    *,
    target_macs: float = 0.5,
    target_latency: float | None = None,
    steps: int = 1,
    epochs: int = 3,
    optimizer: str = "adam",
    lr: float | None = None,
    batch_size: int = 64,
    distill: float = 0.5,
    temperature: float = 2.0,
    criterion: str = "l1",
    calib: int = 4,
    seed: int = 0,
    progress: bool = True,
    on_step: Callable[[str], None] | None = None,
) -> CompressResult:
    """Prune ``model`` to ``target_macs`` of its MACs (a fraction) in ``steps`` rounds, fine-tuning
    ``epochs`` epochs after each with distillation from the original, and measure both models.
    With ``target_latency`` (a fraction) the rounds aim at the latency predicted for this machine
    instead (``cdg-prune{target_latency=…}``: each round ``target_latency ** (1/steps)`` of the
    current model's measured latency). The caller's model is not modified."""
    from .passes import transform

    step = on_step or (lambda _m: None)
    if not (0 < target_macs < 1):
        raise UsageError(f"--target-macs {target_macs} must be a fraction in (0, 1)")
    if target_latency is not None and not (0 < target_latency < 1):
        raise UsageError(f"--target-latency {target_latency} must be a fraction in (0, 1)")
    if steps < 1 or epochs < 0:
        raise UsageError("--steps must be >= 1 and --epochs >= 0")
    if optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    original = copy.deepcopy(model).eval()
    feed = check_fits(original, data)
    x1 = data.example(1)
    if feed(x1).dim() != x1.dim():
        original = _Flat(original)
    teacher = copy.deepcopy(original).eval()
    base_macs = count_macs(original, (x1,))
    calibration = data.batches(calib, batch_size)
    current: nn.Module = original
    rounds, reports = [], []
    for r in range(1, steps + 1):
        if target_latency is None:
            goal = int(base_macs * target_macs ** (r / steps))
            step(f"round {r}/{steps}: pruning to {goal:,} MACs")
            spec = f"cdg-prune{{target_macs={goal},criterion={criterion}}}"
        else:
            goal = target_latency ** (1 / steps)
            step(f"round {r}/{steps}: pruning to {goal:.3g} of the measured latency (predicted from this machine's layer table)")
            spec = f"cdg-prune{{target_latency={goal:.6g},criterion={criterion}}}"
        result = transform(current, spec, example_inputs=(x1,), calibration=calibration)
        reports.append(result.report.to_dict())
        latency = result.report.passes[-1].stats.get("latency") if result.report.passes else None
        current = result.graph_module
        if epochs:
            step(f"round {r}/{steps}: fine-tuning {epochs} epoch(s) with distillation")
            train, val = data.loaders(batch_size, seed=seed + r)
            opt = make_optimizer(optimizer, current.parameters(), lr=lr, seed=seed)
            fit(
                current,
                train,
                opt,
                epochs,
                val_loader=val,
                progress=progress,
                val_name=data.val_name,
                teacher=teacher,
                distill=distill,
                temperature=temperature,
            )
        current.eval()
        _, val = data.loaders(batch_size)
        acc = evaluate(current, val)["accuracy"] if val is not None else None
        rounds.append({"round": r, "target_macs" if target_latency is None else "target_latency": goal, "macs": count_macs(current, (x1,)), "accuracy": acc})
        if latency:
            rounds[-1]["latency"] = {k: latency[k] for k in ("original_s", "target_s", "predicted_s", "measured_s") if k in latency}
    step("measuring the original and the compressed model")
    before, after = measure(original, current, data, batch_size=batch_size, optimizer=optimizer, lr=lr)
    rounds.insert(0, {"round": 0, "target_macs": base_macs, "macs": before.macs, "accuracy": before.accuracy})
    return CompressResult(current, before, after, rounds, reports)


def onnx_latency(path: str, x: torch.Tensor, repeats: int = 20) -> float:
    """Median ms of onnxruntime on ``x`` (one thread)."""
    from .analysis import median_latency
    from .export.run import open_session

    session = open_session(path, threads=1)
    feed = {session.get_inputs()[0].name: x.numpy()}
    return 1e3 * median_latency(lambda: session.run(None, feed), repeats=repeats, warmup=3)


def plot_rounds(rounds: list[dict[str, Any]], path: str, title: str = "") -> None:
    """Accuracy against MACs, one point per round (round 0: the original)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    macs = [r["macs"] for r in rounds]
    acc = [100 * (r["accuracy"] or 0) for r in rounds]
    ax.plot(macs, acc, "o-")
    for r, m, a in zip(rounds, macs, acc):
        ax.annotate(str(r["round"]), (m, a), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("MACs (batch 1)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title or "accuracy against MACs")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


__all__ = ["CompressResult", "Measurement", "compress", "measure", "onnx_latency", "plot_rounds"]
