"""Tracing models into ``torch.fx.GraphModule`` with a leaf policy and readable failures."""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import os
import traceback
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Tracer
from torch.fx.graph import CodeGen

from .errors import TraceError, UsageError

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(__file__)


def _qcd_leaf_types() -> tuple[type, ...]:
    from .nn import InterfaceGate, StateCompression

    return (InterfaceGate, StateCompression)


class QcdTracer(Tracer):
    """``torch.fx.Tracer`` that keeps qcd-fx's own modules and user-named modules opaque.

    ``leaf_modules`` entries match a module's qualified name (``layer1.0``), a glob of it
    (``layer*.0``), or its class name (``Bottleneck``).
    """

    def __init__(self, leaf_modules: Iterable[str] = (), **kwargs):
        super().__init__(**kwargs)
        self.leaf_patterns = tuple(leaf_modules)
        self.failed_in: tuple[str, str] | None = None  # (qualified name, class name)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, _qcd_leaf_types()):
            return True
        cls = type(m).__name__
        for pat in self.leaf_patterns:
            if pat == cls or fnmatch.fnmatchcase(module_qualified_name, pat):
                return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # innermost module first
                self.failed_in = (self.path_of_module(m), type(m).__name__)
            raise


def _user_frame(exc: BaseException) -> str | None:
    """``file:line (code)`` of the innermost frame outside torch and qcd-fx."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        path = os.path.abspath(frame.filename)
        if path.startswith(_TORCH_DIR) or path.startswith(_OWN_DIR):
            continue
        code = f" `{frame.line.strip()}`" if frame.line else ""
        return f"{os.path.basename(path)}:{frame.lineno}{code}"
    return None


def _describe(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "cannot be used as inputs to control flow" in msg:
        return "Python control flow (if/while/bool) on a traced tensor"
    if "co_varnames is too small" in msg:
        return "its forward is wrapped by a decorator that fx cannot trace through (co_varnames is too small)"
    if "iteration" in msg.lower() and "proxy" in msg.lower():
        return "iteration over a traced tensor"
    return f"{type(exc).__name__}: {msg}"


class FastModuleAccess(CodeGen):
    """fx's code generator, but submodules are reached through their ``_modules`` dicts.

    fx writes a call of ``features.0.0`` as ``getattr(getattr(self.features, "0"), "0")(x)``:
    every step falls back to ``nn.Module.__getattr__``, a Python function. Across the ~150 module
    calls of MobileNetV3-small that costs about 7 % of a batch-1 forward, and makes a traced
    model slower than the eager one. ``self._modules['features']._modules['0']._modules['0'](x)``
    is three dict lookups. Module hierarchy, names, ``state_dict`` keys and hooks are unchanged;
    only the text of ``forward`` differs.
    """

    def _gen_python_code(self, nodes, root_module, namespace, **kwargs):  # noqa: ANN001 - fx's private signature
        from torch.fx.graph import _format_target

        code = super()._gen_python_code(nodes, root_module, namespace, **kwargs)
        targets = sorted({n.target for n in nodes if n.op == "call_module" and "." in n.target}, key=len, reverse=True)
        src = code.src
        for target in targets:
            fast = root_module + "".join(f"._modules[{atom!r}]" for atom in target.split("."))
            src = src.replace(_format_target(root_module, target) + "(", fast + "(")
        code.src = src
        return code


def fast_module_access(gm: GraphModule) -> GraphModule:
    """Regenerate ``gm.forward`` with :class:`FastModuleAccess` (in place; returns ``gm``).

    Graphs with a code generator of their own (``torch.export``, pytree codegen) are left alone.
    """
    if type(gm.graph._codegen) is CodeGen:
        gm.graph.set_codegen(FastModuleAccess())
        gm.recompile()
    return gm


_MODULE_DICTS = ("_parameters", "_buffers", "_modules")


def _state_containers(model: nn.Module):
    """(owner, key, value) for every plain attribute of every submodule, and the containers
    (dict, list) among them: what a forward may write to (caches such as timm LeViT's
    ``attention_bias_cache``)."""
    for m in model.modules():
        for key, value in m.__dict__.items():
            if key not in _MODULE_DICTS:
                yield m, key, value


@contextlib.contextmanager
def preserved_module_state(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's plain attributes, and the contents of its dict/list attributes,
    after the block: tracing runs ``forward`` on Proxies, and a forward that caches values
    (``self.cache[key] = …``) would otherwise leave Proxies in the caller's model."""
    saved = []
    for m, key, value in _state_containers(model):
        contents = dict(value) if isinstance(value, dict) else list(value) if isinstance(value, list) else None
        saved.append((m, key, value, contents))
    attrs = [(m, {k: v for k, v in m.__dict__.items() if k not in _MODULE_DICTS}) for m in model.modules()]
    try:
        yield
    finally:
        for m, before in attrs:
            for k in [k for k in m.__dict__ if k not in _MODULE_DICTS and k not in before]:
                del m.__dict__[k]
            m.__dict__.update(before)
        for _m, _key, value, contents in saved:
            if isinstance(value, dict):
                value.clear()
                value.update(contents)
            elif isinstance(value, list):
                value[:] = contents


def copy_module(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also when a forward has cached tensors that are not graph leaves
    (timm LeViT/EfficientFormer after one call with gradients on: plain ``deepcopy`` refuses
    them); those are copied detached."""
    memo: dict[int, Any] = {}

    def visit(value: Any, depth: int = 0) -> None:
        if isinstance(value, torch.Tensor):
            if not value.is_leaf and id(value) not in memo:
                memo[id(value)] = value.detach().clone()
        elif depth < 3 and isinstance(value, dict):
            for v in value.values():
                visit(v, depth + 1)
        elif depth < 3 and isinstance(value, (list, tuple)):
            for v in value:
                visit(v, depth + 1)

    for _m, _key, value in _state_containers(model):
        visit(value)
    return copy.deepcopy(model, memo)


def _check_leaf_patterns(model: nn.Module, patterns: tuple[str, ...]) -> None:
    """Every leaf pattern must match a submodule (its path, a glob of paths, or its class name):
    a misspelt ``--leaf`` would otherwise be ignored silently."""
    if not patterns:
        return
    import difflib

    paths, classes = [], set()
    for path, m in model.named_modules():
        if path:
            paths.append(path)
            classes.add(type(m).__name__)
    for pat in patterns:
        if not isinstance(pat, str) or not pat:
            raise UsageError(f"a leaf module pattern must be a non-empty string, got {pat!r}")
        if pat in classes or any(fnmatch.fnmatchcase(p, pat) for p in paths):
            continue
        close = difflib.get_close_matches(pat, sorted(classes) + paths, n=3, cutoff=0.5)
        hint = f"; close: {', '.join(close)}" if close else f"; its classes include {', '.join(sorted(classes)[:6])}" if classes else ""
        raise UsageError(f"--leaf {pat!r} matches no module of {type(model).__name__} (a module path, a glob of paths, or a class name){hint}")


def _fx_trace(model: nn.Module, leaf_modules: tuple[str, ...], concrete_args: dict | None) -> GraphModule:
    """Symbolically trace ``model`` with :class:`QcdTracer`. The traced module shares parameters with
    ``model``; deep-copy first if the result will be modified in place. Failure raises
    :class:`~qcd_fx.errors.TraceError` naming the construct, the module it sits in, and the
    ``--leaf`` option that keeps that module opaque.
    """
    tracer = QcdTracer(leaf_modules)
    with preserved_module_state(model):  # the caller's model is left as it was (caches, constants fx adds)
        try:
            graph = tracer.trace(model, concrete_args=concrete_args)
        except Exception as e:
            what = _describe(e)
            where = _user_frame(e)
            at = f" at {where}" if where else ""
            if tracer.failed_in and tracer.failed_in[0]:
                path, cls = tracer.failed_in
                hint = f" in module '{path}' ({cls}); keep it opaque with --leaf {path} (or --leaf {cls})"
            else:
                hint = f" in the top-level {type(model).__name__}.forward"
            err = TraceError(f"cannot trace {type(model).__name__} with torch.fx: {what}{at}{hint}; torch.export may capture it: --capture export (capture=\"export\")")
            err.detail = f"{what}{at}{hint}"
            raise err from e
        gm = GraphModule(tracer.root, graph, type(model).__name__)  # copies what the graph reads from the root
    return fast_module_access(gm)


def trace(
    model: nn.Module,
    example_inputs: Any = None,
    leaf_modules: Iterable[str] = (),
    concrete_args: dict | None = None,
    *,
    capture: str = "auto",
    verbose: bool = False,
) -> GraphModule:
    """Capture ``model`` as a :class:`GraphModule`.

    ``capture="fx"``: ``torch.fx.symbolic_trace`` with :class:`QcdTracer` (module calls stay
    ``call_module`` nodes; ``leaf_modules`` kept opaque). ``capture="export"``:
    ``torch.export.export`` (non-strict, batch dimension dynamic) on ``example_inputs``
    (a tensor, a tuple of positional inputs or a dict of keyword inputs), see
    :mod:`qcd_fx.capture`. ``"auto"`` (default): fx, and torch.export when fx fails and example
    inputs are given. ``gm.meta["capture"]`` (a :class:`~qcd_fx.capture.CaptureInfo`) says which
    front end captured the graph and why.

    A :class:`GraphModule` is returned as is. The result shares parameters with ``model``;
    deep-copy first if it will be modified in place. Failure raises
    :class:`~qcd_fx.errors.TraceError` naming the construct and the module it sits in.
    """
    from .capture import CaptureInfo, check_capture, export_capture
    from .inputs import split_inputs

    check_capture(capture)
    if isinstance(model, GraphModule):
        return model
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected a torch.nn.Module to trace, got {type(model).__name__}")
    if isinstance(example_inputs, (tuple, list)) and example_inputs and all(isinstance(a, str) for a in example_inputs):
        raise UsageError("trace(model, example_inputs, leaf_modules=...): module names to keep opaque go in leaf_modules=")
    call = split_inputs(example_inputs)
    leaf_modules = tuple(leaf_modules)
    _check_leaf_patterns(model, leaf_modules)
    if capture == "export" and leaf_modules:
        raise UsageError("--leaf applies to torch.fx tracing; torch.export captures every module (drop --leaf or use --capture fx)")
    reason, fx_error = "", None
    if capture in ("auto", "fx"):
        import time

        t0 = time.perf_counter()
        try:
            gm = _fx_trace(model, leaf_modules, concrete_args)
            gm.meta["capture"] = CaptureInfo("fx", seconds=time.perf_counter() - t0)
            return gm
        except TraceError as e:
            if capture == "fx" or call is None:
                if call is None and capture == "auto":
                    raise TraceError(f"{e}; give example inputs to capture it") from e.__cause__
                raise
            fx_error = e
            reason = f"torch.fx failed: {getattr(e, 'detail', e)}"
    if call is None:
        raise UsageError("capture='export' needs example inputs (torch.export runs the model on them)")
    args, kwargs = call
    with preserved_module_state(model):
        try:
            gm, info = export_capture(model, args, kwargs, verbose=verbose)
        except TraceError as e:
            if fx_error is None:
                raise
            raise TraceError(f"cannot trace {type(model).__name__} with torch.fx: {fx_error.detail}; torch.export fails too: {e.detail}") from e
    info.reason = reason
    gm.meta["capture"] = info
    return gm
