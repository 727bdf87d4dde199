"""The second front end: capture a model with ``torch.export`` (non-strict, batch dimension
dynamic) into an ordinary ``GraphModule`` the passes, the trainer, the file formats and the ONNX
exporter take like an fx trace.

``torch.export`` records ATen ops (``aten.linear``, ``aten.conv2d``, ``aten.batch_norm``,
``aten.scaled_dot_product_attention``…) with the parameters as ``get_attr`` nodes, and captures
train/eval behaviour as literals (``aten.dropout(x, p, train=False)``,
``aten.batch_norm(…, training=False, …)``). The capture runs in eval mode; afterwards every
dropout becomes an ``nn.Dropout`` and every batch norm an ``nn.BatchNorm*d`` holding the same
tensors, so ``gm.train()`` / ``gm.eval()`` switch them as in the original model and a re-export
(ONNX, ``.pt2``) in eval mode records the inference graph again.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node

from .errors import TraceError, first_line

CAPTURES = ("auto", "fx", "export")


@dataclass
class CaptureInfo:
    """How a graph was captured: the front end, why the other one was not used, and what
    ``torch.export`` fixed that the user may expect to vary."""

    front_end: str  # "fx" | "export"
    reason: str = ""  # why fx was not used (auto fell back), or "" when asked for explicitly
    specialized: list[str] = field(default_factory=list)
    dynamic: list[str] = field(default_factory=list)  # e.g. "input_ids dim 0 in [1, inf)"
    seconds: float = 0.0

    def describe(self) -> str:
        text = f"captured with {'torch.export' if self.front_end == 'export' else 'torch.fx'}"
        if self.reason:
            text += f" ({self.reason})"
        if self.dynamic:
            text += "; dynamic: " + ", ".join(self.dynamic)
        if self.specialized:
            text += "; specialised: " + ", ".join(self.specialized)
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"front_end": self.front_end, "reason": self.reason, "specialized": self.specialized, "dynamic": self.dynamic, "seconds": self.seconds}


def check_capture(capture: Any) -> str:
    if capture not in CAPTURES:
        from .errors import UsageError

        raise UsageError(f"capture must be one of {', '.join(CAPTURES)}, got {capture!r}")
    return capture


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


_NOISY_LOGGERS = ("torch._guards", "torch._dynamo", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes", "torch.onnx", "onnxscript")


@contextlib.contextmanager
def quiet(verbose: bool = False) -> Iterator[None]:
    """torch.export logs failed guards with tracebacks at ERROR level, and prints its graphs on
    stdout/stderr, before raising; the exception carries the same information, so keep both
    quiet during capture and export (``verbose``: let them through, for ``--debug``)."""
    import logging

    if verbose:
        yield
        return
    saved = []
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level))
        logger.setLevel(logging.CRITICAL + 1)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    """``Dim.AUTO`` on dim 0 of every tensor input: the batch dimension stays symbolic unless the
    model itself fixes it (then export specialises it, and :func:`_shapes_report` says so)."""
    auto = torch.export.Dim.AUTO

    def spec(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return {0: auto} if value.dim() >= 1 else None
        if isinstance(value, (list, tuple)):
            return type(value)(spec(v) for v in value)
        if isinstance(value, dict):
            return {k: spec(v) for k, v in value.items()}
        return None

    if not kwargs:
        return tuple(spec(a) for a in args)
    import inspect

    bound = inspect.signature(model.forward).bind(*args, **kwargs)  # export wants one entry per parameter
    return {name: spec(value) for name, value in bound.arguments.items()}


def _batch_of_two(value: Any) -> Any:
    """``value`` with every tensor of batch size 1 repeated to 2, when all tensors have batch 1."""
    from torch.utils._pytree import tree_leaves, tree_map

    tensors = [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
    if not tensors or any(t.dim() == 0 or t.shape[0] != 1 for t in tensors):
        return value
    return tree_map(lambda t: t.repeat(2, *([1] * (t.dim() - 1))) if isinstance(t, torch.Tensor) else t, value)


def _shapes_report(ep: Any) -> tuple[list[str], list[str]]:
    """(specialised, dynamic) descriptions of the user inputs' batch dimensions."""
    specialized, dynamic = [], []
    user_inputs = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == torch.export.graph_signature.InputKind.USER_INPUT and hasattr(s.arg, "name")]
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    for name in user_inputs:
        val = nodes[name].meta.get("val") if name in nodes else None
        if not isinstance(val, torch.Tensor) or val.dim() == 0:
            continue
        size = val.shape[0]
        if isinstance(size, torch.SymInt):
            rng = ep.range_constraints.get(size.node.expr)
            lower = getattr(rng, "lower", "?")
            upper = getattr(rng, "upper", "?")
            upper = "inf" if str(upper) in ("int_oo", "oo") else upper
            dynamic.append(f"{name} dim 0" + (f" (guarded to [{lower}, {upper}])" if (lower, upper) not in ((2, "inf"), (0, "inf"), (1, "inf")) else ""))
        else:
            specialized.append(f"{name} dim 0 = {size}")
    return specialized, dynamic


def export_capture(model: nn.Module, args: tuple, kwargs: dict, verbose: bool = False) -> tuple[GraphModule, CaptureInfo]:
    """``torch.export.export(model, args, kwargs, strict=False)`` with a dynamic batch dimension
    (static shapes if the model cannot take one), as a plain ``GraphModule`` with train/eval
    switchable dropout and batch norm. Raises :class:`TraceError` with torch's first line."""
    from .export.diagnose import data_dependent

    t0 = time.perf_counter()
    # a batch of 1 is specialised by torch.export (sizes 0 and 1 always are): capture on the
    # same inputs repeated to a batch of 2, so the graph keeps a symbolic batch dimension
    wide_args, wide_kwargs = _batch_of_two((args, kwargs))
    with _eval_mode(model), quiet(verbose):
        try:
            try:
                ep = torch.export.export(model, wide_args, wide_kwargs, dynamic_shapes=_dynamic_shapes(model, wide_args, wide_kwargs), strict=False)
            except Exception as e:
                if data_dependent(e, model) is not None:
                    raise
                ep = torch.export.export(model, args, kwargs, strict=False)
        except Exception as e:
            where = data_dependent(e, model)
            what = f"the computation depends on tensor values {where}" if where else f"{type(e).__name__}: {first_line(e)}"
            err = TraceError(f"torch.export cannot capture {type(model).__name__}: {what}")
            err.detail = what
            raise err from e
    specialized, dynamic = _shapes_report(ep)
    gm = _plain_graph_module(ep.module(), type(model).__name__)
    gm.train(model.training)  # dropout and batch norm behave as in the model the user gave
    return gm, CaptureInfo("export", specialized=specialized, dynamic=dynamic, seconds=time.perf_counter() - t0)


def _plain_graph_module(exported: GraphModule, class_name: str) -> GraphModule:
    """``ep.module()`` refuses ``.train()``/``.eval()`` and calls an input-guard module; rebuild
    it as a plain GraphModule (same tensors, same pytree calling convention) without the guard,
    with dropout and batch norm as modules."""
    graph = exported.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    gm = GraphModule(exported, graph, class_name)
    _dropout_modules(gm)
    _batch_norm_modules(gm)
    for name, _ in list(gm.named_children()):
        if name == "_guards_fn":
            delattr(gm, name)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _unique_name(gm: GraphModule, base: str) -> str:
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


_DROPOUT = {"dropout": nn.Dropout, "feature_dropout": nn.Dropout2d, "alpha_dropout": nn.AlphaDropout}


def _dropout_modules(gm: GraphModule) -> None:
    aten = torch.ops.aten
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        kind = node.target.overloadpacket.__name__
        if kind not in _DROPOUT or node.target.overloadpacket not in (aten.dropout, aten.feature_dropout, aten.alpha_dropout):
            continue
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        name = _unique_name(gm, f"dropout_{node.name}")
        gm.add_submodule(name, _DROPOUT[kind](float(p)))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (node.args[0],))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)


def _owner(gm: GraphModule, targets: list[str]) -> str | None:
    """The module path holding exactly these tensors (``layer1.0.bn1`` for its weight, bias,
    running stats), if they share one."""
    parents = {t.rpartition(".")[0] for t in targets}
    return parents.pop() if len(parents) == 1 else None


def _batch_norm_modules(gm: GraphModule) -> None:
    """``aten.batch_norm(x, w, b, mean, var, training, momentum, eps, cudnn)`` with all four
    tensors as ``get_attr`` of one module -> that module becomes an ``nn.BatchNorm{1,2,3}d``."""
    aten = torch.ops.aten
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or getattr(node.target, "overloadpacket", None) is not aten.batch_norm:
            continue
        x, w, b, mean, var, _training, momentum, eps = node.args[:8]
        tensors = [w, b, mean, var]
        if not all(isinstance(t, Node) and t.op == "get_attr" for t in tensors):
            continue
        path = _owner(gm, [t.target for t in tensors])
        shape = getattr(x.meta.get("val"), "shape", None)
        if path is None or shape is None or not 2 <= len(shape) <= 5:
            continue
        old = gm.get_submodule(path)
        if any(True for _ in old.children()):
            continue
        weight, bias = gm.get_parameter(w.target), gm.get_parameter(b.target)
        cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)]
        bn = cls(weight.shape[0], eps=float(eps), momentum=float(momentum), affine=True, track_running_stats=True)
        bn.weight, bn.bias = weight, bias
        bn.running_mean = gm.get_buffer(mean.target)
        bn.running_var = gm.get_buffer(var.target)
        tracked = getattr(old, "num_batches_tracked", None)
        if isinstance(tracked, torch.Tensor):
            bn.num_batches_tracked = tracked
        parent, _, leaf = path.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, bn)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(path, (x,))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
