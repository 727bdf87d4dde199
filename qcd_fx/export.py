"""ONNX export for inference, verified against onnxruntime.

:func:`export_onnx` exports a module (normally a qcd-fx ``GraphModule``) with
``torch.onnx.export(..., dynamo=True)``, writes the file atomically and, with ``check=True``
(the default), proves the file before it is renamed into place:

* ``onnx.checker.check_model`` on the serialized model;
* one onnxruntime ``CPUExecutionProvider`` session, run on the example inputs and on a second
  batch size (which proves the dynamic batch axis), compared with PyTorch eager outputs of the
  same module in eval mode: every output must match within ``atol`` (1e-4) absolute or within
  ``rtol`` (1e-5) relative to the output's largest magnitude (random-init models such as
  Inception-v3 have outputs in the thousands, where float32 rounding alone exceeds 1e-4).

A failed export or a failed check raises :class:`~qcd_fx.errors.ExportError` with one line
(the unsupported operator and the graph node it came from, or the output that differs) and
leaves no file behind.

Exporters. The dynamo exporter (``torch.onnx.export(dynamo=True)``, the default since torch
2.9) is used first. Only if it fails, and ``fallback=True``, the deprecated TorchScript exporter
is tried; the report's ``exporter`` says which one produced the file and ``fallback_reason``
why the dynamo exporter did not. (A GraphModule needs explicit ``input_names``/``output_names``
for the TorchScript exporter's ``dynamic_axes`` — without them it fails with
``'Graph' object has no attribute 'outputs'`` — so both exporters get the same names.)

Names. Inputs are named after the module's ``forward`` parameters (the GraphModule's
placeholders, e.g. ``x``); outputs after their position in the returned structure: a single
tensor is ``output``, a tuple ``output_0, output_1, …``, a dict uses its keys (``logits``,
``aux``), nested structures join the keys with ``_``.

Dynamic batch. Axis 0 of the inputs becomes the symbolic ``batch`` axis. ``torch.export``
specialises sizes 0 and 1, so from a batch-1 example some models (ConvNeXt) cannot get a
dynamic batch axis; a batch-1 example is therefore captured with a batch of 2 (parity is still
checked on the caller's batch and on another). A model whose batch really is fixed gets an
error that says so; export it with ``dynamic_batch=False``.

Where the time goes (``benchmarks/onnx_export.py``, CI subset + ResNet-50 with ``qci,csc`` at
native input size, medians on a shared 2-core machine): of 13.6 s per export, torch.onnx's
decomposition re-trace takes 6.1 s, ``torch.export`` capture 2.9 s, the onnxscript optimizer
1.0 s, translation 0.5 s and the ONNX function registry (rebuilt by torch on every call) 0.4 s;
qcd-fx's own steps — serialize once (the bytes feed the checker and onnxruntime; nothing is
re-read from disk), write the file in a thread while the checks run, ``onnx.checker``, one
onnxruntime session for both batch sizes, two eager reference forwards — take 0.9 s (7 %).
Export time grows with the node count, and every gate adds ~12 ATen ops, so gated graphs
export 2-3x slower than the untransformed model (5.3 s median).
One exporter cost is cut here: onnxscript's ``SlicesSplit`` rewrite costs O(nodes^2) even on
graphs without ``Slice`` nodes; it is skipped where it cannot match. And one exporter defect is
avoided: onnxscript's ``x + 0 -> x`` rewrite matches ``x + 1e-8``, deleting the seed's epsilon
(see :func:`_faithful_rules`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import linecache
import os
import re
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_flatten_with_path

from .analysis import eval_no_grad
from .errors import ExportError, UsageError
from .io import atomic_path

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-5
_PROTO_LIMIT = 1_800_000_000  # protobuf's hard limit is 2 GiB for the whole model; weights above this go to a .data file
_EXPORTERS = ("dynamo", "torchscript")


# ---------------------------------------------------------------------------------------------
# Report


@dataclass
class BatchParity:
    """PyTorch vs onnxruntime on one batch of inputs."""

    batch: int | None  # size of the batch axis (None: inputs without one)
    max_abs: float  # max |onnxruntime - pytorch| over all outputs
    max_rel: float  # max over outputs of max_abs(output) / max |pytorch output|
    worst_output: str  # the output with the largest max_abs
    ok: bool


@dataclass
class ExportReport:
    """What :func:`export_onnx` did and measured."""

    path: str | None
    exporter: str  # "dynamo" or "torchscript" (fallback)
    opset: int
    nodes: int  # nodes of the main graph (plus those of local functions, if any)
    op_types: dict[str, int]
    domains: list[str]  # operator domains used; [""] means plain ONNX ops only
    file_bytes: int  # .onnx plus .onnx.data when weights are stored externally
    external_data: bool
    export_seconds: float  # torch.onnx.export itself
    total_seconds: float  # everything, checks included
    input_names: list[str]
    output_names: list[str]
    input_shapes: list[list[int | str]]  # as stored in the file; a str is a symbolic axis
    dynamic_batch: bool  # the file's batch axis is symbolic
    checked: bool
    checker_ok: bool | None = None  # onnx.checker.check_model passed (None: not checked)
    parity: list[BatchParity] = field(default_factory=list)
    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step (see export_onnx)
    fallback_reason: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def max_abs(self) -> float | None:
        return max((p.max_abs for p in self.parity), default=None)

    @property
    def max_rel(self) -> float | None:
        return max((p.max_rel for p in self.parity), default=None)

    @property
    def ok(self) -> bool:
        return not self.checked or (bool(self.checker_ok) and all(p.ok for p in self.parity))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(max_abs=self.max_abs, max_rel=self.max_rel, ok=self.ok)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def summary(self) -> str:
        """One line for people."""
        size = f"{self.file_bytes / 1e6:.1f} MB" + (" (weights in .data)" if self.external_data else "")
        line = f"{self.exporter} exporter, opset {self.opset}, {self.nodes} nodes, {size}, export {self.export_seconds:.1f} s"
        if self.checked:
            batches = "/".join(str(p.batch) for p in self.parity)
            line += f"; onnx.checker ok; onnxruntime vs PyTorch max abs {self.max_abs:.2g}, max rel {self.max_rel:.2g} (batch {batches})"
        if self.fallback_reason:
            line += f"; dynamo exporter failed: {self.fallback_reason}"
        return line


# ---------------------------------------------------------------------------------------------
# Names


def _sanitize(name: str) -> str:
    name = re.sub(r"[^0-9A-Za-z_.]+", "_", str(name)).strip("_")
    return name or "value"


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        if n in seen:
            seen[n] += 1
            candidate = f"{n}_{seen[n]}"
            while candidate in seen:
                seen[n] += 1
                candidate = f"{n}_{seen[n]}"
            n = candidate
        seen.setdefault(n, 0)
        out.append(n)
    return out


def input_names(module: nn.Module, n_inputs: int) -> list[str]:
    """Readable names of the first ``n_inputs`` positional inputs: placeholder / parameter names."""
    names: list[str] = []
    if isinstance(module, torch.fx.GraphModule):
        names = [str(n.target).lstrip("*") for n in module.graph.nodes if n.op == "placeholder"]
    else:
        try:
            params = inspect.signature(module.forward).parameters.values()
            names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            names = []
    names = names[:n_inputs] + [f"input_{i}" for i in range(len(names), n_inputs)]
    return _unique([_sanitize(n) for n in names])


def output_names(outputs: Any) -> list[str]:
    """Names of the tensor leaves of ``outputs`` in pytree order (the order ONNX outputs take)."""
    names = []
    for path, leaf in tree_flatten_with_path(outputs)[0]:
        if not isinstance(leaf, torch.Tensor):
            continue
        parts = []
        for key in path:
            for attr in ("key", "name", "idx"):
                if hasattr(key, attr):
                    parts.append(str(getattr(key, attr)))
                    break
            else:
                parts.append(str(key))
        if not parts:
            names.append("output")
            continue
        name = "_".join(parts)
        if parts[0].isdigit():
            name = "output_" + name
        names.append(_sanitize(name))
    return _unique(names)


# ---------------------------------------------------------------------------------------------
# Helpers


def _as_inputs(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        inputs = tuple(example_inputs)
        for i, t in enumerate(inputs):
            if not isinstance(t, torch.Tensor):
                raise ExportError(f"example input {i} is a {type(t).__name__}; ONNX export takes tensor inputs only")
        if not inputs:
            raise ExportError("export needs at least one example input tensor")
        return inputs
    raise ExportError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")




def _first_line(e: BaseException | str) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    return text.splitlines()[0].strip() if text else (type(e).__name__ if isinstance(e, BaseException) else "")


def _tensor_leaves(out: Any) -> list[torch.Tensor]:
    return [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]


@contextlib.contextmanager
def _captured_output() -> Iterator[list[str]]:
    """Capture what native code writes to file descriptors 1 and 2 (the TorchScript exporter
    logs its whole IR graph there on failure); yields a list that receives the captured text."""
    captured: list[str] = []
    import sys

    saved = []
    try:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        with tempfile.TemporaryFile(mode="w+b") as tmp:
            for fd in (1, 2):
                try:
                    saved.append((fd, os.dup(fd)))
                    os.dup2(tmp.fileno(), fd)
                except OSError:  # no such descriptor (embedded interpreters)
                    pass
            try:
                yield captured
            finally:
                for fd, copy in reversed(saved):
                    os.dup2(copy, fd)
                    os.close(copy)
                saved.clear()
                tmp.seek(0)
                captured.append(tmp.read().decode(errors="replace"))
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)


def _timed(timings: dict[str, float], key: str):
    @contextlib.contextmanager
    def block():
        t0 = time.perf_counter()
        try:
            yield
        finally:
            timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0

    return block()


# ---------------------------------------------------------------------------------------------
# Locating a failure: the operator and the graph node it came from


_OP_PATTERNS = (
    re.compile(r"OpOverload\(op='([^']+)'"),  # dynamo exporter: DispatchError
    re.compile(r"target=torch\.ops\.([\w.]+?)(?:\.default)?\]"),
    re.compile(r"operator '([^']+)'"),  # TorchScript exporter: UnsupportedOperatorError
    re.compile(r"Could not find an implementation for (\w+\(\d+\))"),  # onnxruntime
)


def _chain(e: BaseException) -> list[BaseException]:
    out, seen = [], set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def _unsupported_op(e: BaseException) -> str | None:
    for exc in reversed(_chain(e)):  # innermost first
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
        for pattern in _OP_PATTERNS:
            m = pattern.search(text)
            if m:
                return m.group(1)
    return None


def _exporter_node(e: BaseException) -> torch.fx.Node | None:
    """The exported-program node the dynamo exporter was translating when it failed (a local
    variable of its translation loop; None if the failure happened elsewhere)."""
    found = None
    for exc in _chain(e):
        tb = exc.__traceback__
        while tb is not None:
            node = tb.tb_frame.f_locals.get("node")
            if isinstance(node, torch.fx.Node) and "torch/onnx" in tb.tb_frame.f_code.co_filename.replace(os.sep, "/"):
                found = node
            tb = tb.tb_next
        if found is not None:
            return found
    return None


def _gm_frame_node(e: BaseException, gm: nn.Module) -> str | None:
    """The GraphModule node whose generated code line was executing when ``e`` was raised."""
    if not isinstance(gm, torch.fx.GraphModule):
        return None
    names = {n.name for n in gm.graph.nodes}
    for exc in _chain(e):
        tb, hit = exc.__traceback__, None
        while tb is not None:
            code = tb.tb_frame.f_code
            if code.co_filename.startswith("<eval_with_key>") and tb.tb_frame.f_locals.get("self") is gm:
                line = linecache.getline(code.co_filename, tb.tb_lineno)
                m = re.match(r"\s*(\w+)\s*=", line)
                if m and m.group(1) in names:
                    hit = m.group(1)
            tb = tb.tb_next
        if hit:
            return hit
    return None


def _source_of(node: torch.fx.Node, gm: nn.Module) -> str | None:
    """Map a node of the exported program back to a node of ``gm``."""
    if not isinstance(gm, torch.fx.GraphModule):
        stack = node.meta.get("nn_module_stack") or {}
        return next(iter(stack.values()))[0] if stack else None
    names = {n.name for n in gm.graph.nodes}
    # 1. provenance recorded by torch.export / decompositions (deepest source first)
    sources: list[tuple[int, Any]] = []

    def walk(items, depth):
        for s in items or ():
            sources.append((depth, s))
            walk(getattr(s, "from_node", None), depth + 1)

    walk(node.meta.get("from_node"), 0)
    own = id(gm.graph)
    for _, s in sorted(sources, key=lambda x: -x[0]):
        if getattr(s, "graph_id", None) == own and getattr(s, "name", None) in names:
            return s.name
    # 2. the module call it sits in
    stack = node.meta.get("nn_module_stack") or {}
    targets = {str(n.target): n.name for n in gm.graph.nodes if n.op == "call_module"}
    for path, _cls in stack.values():
        if path in targets:
            return targets[path]
    # 3. any recorded source name that is a node of gm
    for _, s in sorted(sources, key=lambda x: -x[0]):
        if getattr(s, "name", None) in names:
            return s.name
    return None


def _describe_node(gm: nn.Module, name: str) -> str:
    """``'name'`` plus what the node is, when that adds information."""
    node = next((n for n in gm.graph.nodes if n.name == name), None) if isinstance(gm, torch.fx.GraphModule) else None
    if node is None:
        return f"'{name}'"
    if node.op == "call_module":
        cls = type(gm.get_submodule(node.target)).__name__
        return f"'{name}' ({cls})" if str(node.target).replace(".", "_") == name else f"'{name}' ({cls} '{node.target}')"
    if node.op == "call_function":
        target = getattr(node.target, "__name__", str(node.target))
        return f"'{name}'" if target == name else f"'{name}' ({target})"
    if node.op == "call_method":
        return f"'{name}' (.{node.target}())"
    return f"'{name}'"


def describe_failure(e: BaseException, gm: nn.Module) -> str:
    """One line: what the exporter could not handle and where in ``gm``."""
    op = _unsupported_op(e)
    enode = _exporter_node(e)
    where = decomposed_from = None
    if enode is not None:
        where = _source_of(enode, gm)
        if op is None and enode.op == "call_function":
            op = str(enode.target)
        original = enode.meta.get("original_aten")
        if op is not None and original is not None and str(original).rsplit(".", 1)[0] != op.rsplit(".", 1)[0]:
            decomposed_from = str(original).removesuffix(".default")
    if where is None:
        where = _gm_frame_node(e, gm)
    node_text = f" at graph node {_describe_node(gm, where)}" if where else ""
    if op:
        origin = f" (decomposed from {decomposed_from})" if decomposed_from else ""
        return f"no ONNX implementation of operator '{op.removesuffix('.default')}'{origin}{node_text}"
    inner = _chain(e)[-1]
    return f"{type(inner).__name__}{node_text}: {_first_line(inner)}"


# ---------------------------------------------------------------------------------------------
# The exporters


def _batch_inputs(inputs: tuple) -> list[bool]:
    """Which inputs carry the batch axis: those whose axis 0 equals the first input's."""
    first = next((t.shape[0] for t in inputs if t.dim() >= 1), None)
    return [t.dim() >= 1 and t.shape[0] == first for t in inputs]


def _dynamic_shapes(inputs: tuple, dynamic_batch: bool) -> tuple | None:
    if not dynamic_batch:
        return None
    batch = torch.export.Dim("batch")
    return tuple({0: batch} if dyn else None for dyn in _batch_inputs(inputs))


def _capture_inputs(inputs: tuple, dynamic_batch: bool) -> tuple:
    """The inputs ``torch.export`` traces with. A batch of 1 is special to it (sizes 0 and 1 are
    specialised, so e.g. ConvNeXt's batch axis cannot be made dynamic from a batch-1 example);
    trace with a batch of 2 instead. Parity is still checked on the caller's inputs."""
    dyn = _batch_inputs(inputs)
    if not dynamic_batch or not any(dyn) or next(t.shape[0] for t, d in zip(inputs, dyn) if d) != 1:
        return inputs
    return _second_batch(inputs, dyn, 2, seed=2)


_NOISY_LOGGERS = ("torch._guards", "torch._dynamo", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes", "torch.onnx", "onnxscript")


@contextlib.contextmanager
def _quiet_loggers() -> Iterator[None]:
    """torch.export logs failed guards with tracebacks at ERROR level before raising; the
    exception carries the same information, so keep the log quiet during export."""
    import logging

    saved = []
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level))
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def _dynamo_export(module, inputs, names_in, names_out, dynamic_batch, opset, timings=None):
    program = torch.onnx.export(
        module,
        inputs,
        dynamo=True,
        input_names=names_in,
        output_names=names_out,
        dynamic_shapes=_dynamic_shapes(inputs, dynamic_batch),
        opset_version=opset,
        verbose=False,
        optimize=False,  # run below, without rules that change results or cannot match
        external_data=False,
    )
    t0 = time.perf_counter()
    with _faithful_rewrites(program.model):
        program.optimize()
    if timings is not None:
        timings["optimize"] = timings.get("optimize", 0.0) + time.perf_counter() - t0
    return program


def _faithful_rules(rules: tuple, slices: int) -> tuple:
    """onnxscript's default rewrite rules without the ones that change results or cannot match.

    1. ``x + 0``, ``x - 0``, ``x * 1``, ``x / 1`` -> ``x`` (onnxscript 0.7's ``_no_op`` rules)
       match constants *approximately* (``abs_tol=1e-8``, ``rel_tol=1e-5``), so they delete
       ``s + 1e-8``: the seed's epsilon in the CSC mask and the QCI gate. Without it a saturated
       softmax (s = -0.0) divides by -0.0 and flips the CSC mask from 1 to 0 (Inception-v3's
       random-init logits ~1e8: onnxruntime differed from PyTorch by 90 %). Dropped always;
       onnxruntime's own optimizer removes exact no-ops.
    2. ``SlicesSplit``: its multi-output matcher enumerates every node of the graph for every node
       it tries, O(nodes^2) even without a single ``Slice``; gates triple a graph's node count and
       made this one rule ~80 % of the optimizer's time (ShuffleNet-v2 with ``qci,csc``: 7.8 s
       -> 1.5 s, the same 823 nodes). Dropped only where it cannot match (< 2 ``Slice`` nodes).
    """
    drop: set[int] = set()
    try:
        from onnxscript.rewriter.rules.common import _no_op

        exact = {id(_no_op.dropout_zero_rule), id(_no_op.dropout_inference_rule)}
        drop |= {id(r) for r in _no_op.rules.rules if id(r) not in exact}
    except (ImportError, AttributeError):
        pass
    return tuple(r for r in rules if id(r) not in drop and not (slices < 2 and getattr(r, "name", None) == "SlicesSplit"))


@contextlib.contextmanager
def _faithful_rewrites(model) -> Iterator[None]:
    """Optimize ``model`` with :func:`_faithful_rules` instead of onnxscript's defaults (which
    ``ONNXProgram.optimize`` reads from ``onnxscript.rewriter._DEFAULT_REWRITE_RULES``)."""
    try:
        import onnxscript.rewriter as rewriter

        rules = rewriter._DEFAULT_REWRITE_RULES
    except (ImportError, AttributeError):  # another onnxscript: its defaults (parity is still checked)
        yield
        return
    nodes = list(model.graph.all_nodes())
    for function in model.functions.values():
        nodes.extend(function.all_nodes())
    slices = sum(node.op_type == "Slice" for node in nodes)
    rewriter._DEFAULT_REWRITE_RULES = _faithful_rules(rules, slices)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


def _torchscript_export(module, inputs, names_in, names_out, dynamic_batch, opset, tmp_path):
    axes = None
    if dynamic_batch:
        axes = {n: {0: "batch"} for n, dyn in zip(names_in, _batch_inputs(inputs)) if dyn}
        axes.update({n: {0: "batch"} for n in names_out})
    log_was = torch._C._jit_is_onnx_log_enabled()
    try:
        with _captured_output():
            torch.onnx.export(
                module,
                inputs,
                tmp_path,
                dynamo=False,
                input_names=names_in,
                output_names=names_out,
                dynamic_axes=axes,
                opset_version=opset or 17,
                do_constant_folding=True,
            )
    finally:
        torch._C._jit_set_onnx_log_enabled(log_was)  # torch <= 2.14 leaves its IR log switched on


# ---------------------------------------------------------------------------------------------
# onnxruntime


def onnxruntime_session(model: bytes | str, threads: int | None = None):
    """An onnxruntime CPU session for a serialized model or a path (``threads``: intra-op threads)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def _feed(session, inputs: Sequence[torch.Tensor]) -> dict[str, Any]:
    return {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs)}


def compare_outputs(ort_outputs: Sequence[Any], torch_outputs: Sequence[torch.Tensor], names: Sequence[str], atol: float, rtol: float, batch: int | None) -> BatchParity:
    """Max abs / rel difference of onnxruntime outputs from PyTorch's; ``ok`` per the tolerances."""
    if len(ort_outputs) != len(torch_outputs):
        raise ExportError(f"the ONNX model returns {len(ort_outputs)} outputs, PyTorch {len(torch_outputs)}")
    worst_abs, worst_rel, worst_name, ok = 0.0, 0.0, names[0] if names else "output", True
    for name, o, r in zip(names, ort_outputs, torch_outputs):
        o = torch.from_numpy(o) if not isinstance(o, torch.Tensor) else o
        if tuple(o.shape) != tuple(r.shape):
            raise ExportError(f"onnxruntime output '{name}' has shape {tuple(o.shape)}, PyTorch {tuple(r.shape)} (batch {batch})")
        if not r.is_floating_point():
            diff = 0.0 if torch.equal(o.to(r.dtype), r) else float("inf")
            scale = 1.0
        else:
            od, rd = o.double(), r.double()
            both_nan = torch.isnan(od) & torch.isnan(rd)
            same_inf = torch.isinf(od) & (od == rd)
            d = (od - rd).abs().masked_fill(both_nan | same_inf, 0.0)
            diff = float(torch.nan_to_num(d, nan=float("inf")).max()) if d.numel() else 0.0
            finite = rd[torch.isfinite(rd)]
            scale = float(finite.abs().max()) if finite.numel() else 0.0
        rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
        ok = ok and (diff <= atol or rel <= rtol)
        if diff > worst_abs:
            worst_abs, worst_name = diff, name
        worst_rel = max(worst_rel, rel)
    return BatchParity(batch, worst_abs, worst_rel, worst_name, ok)


def _second_batch(inputs: tuple, dynamic: list[bool], batch: int, seed: int = 1) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t, dyn in zip(inputs, dynamic):
        if not dyn:
            out.append(t)
        elif t.is_floating_point():
            # fresh values with the example's spread, so the second batch is new data
            std = float(t.std()) if t.numel() > 1 else 1.0
            new = torch.randn((batch, *t.shape[1:]), generator=gen, dtype=t.dtype) * (std or 1.0) + float(t.mean())
            out.append(new)
        else:  # indices, masks: reuse the example's rows (always valid values)
            idx = torch.arange(batch) % t.shape[0]
            out.append(t[idx])
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Export


def export_onnx(
    gm: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike | None,
    *,
    dynamic_batch: bool = True,
    opset: int | None = None,
    check: bool = True,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    check_batch: int | None = None,
    fallback: bool = True,
) -> ExportReport:
    """Export ``gm`` to ONNX at ``path`` for inference and (``check``) verify it.

    Args:
        gm: a ``GraphModule`` (any ``nn.Module`` works); exported in eval mode, not modified.
        example_inputs: a tensor or tuple of tensors (positional inputs of ``forward``).
        path: the ``.onnx`` file to write (atomically); ``None`` exports and verifies without
            writing (a dry run). Weights beyond ~1.8 GB go to ``path + ".data"``.
        dynamic_batch: make axis 0 of every input whose axis 0 equals the first input's a
            symbolic ``batch`` axis.
        opset: ONNX opset (default: the exporter's, 20 for torch 2.14's dynamo exporter).
        check: run ``onnx.checker`` and compare onnxruntime with PyTorch on the example inputs
            and on a second batch size (``check_batch``, default batch + 1); a mismatch beyond
            ``atol`` absolute *and* ``rtol`` relative to the output's magnitude raises.
        fallback: if the dynamo exporter fails, try the TorchScript exporter.

    Returns:
        An :class:`ExportReport`. ``timings`` holds seconds per step: ``reference`` (eager
        forwards), ``export``, ``serialize``, ``write``, ``checker``, ``session`` (onnxruntime
        session creation), ``onnxruntime`` (runs) and ``compare``.

    Raises:
        ExportError: one line naming the unsupported operator and the node, or the mismatch.
    """
    import onnx

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    inputs = _as_inputs(example_inputs)
    if opset is not None and not (7 <= int(opset) <= onnx.defs.onnx_opset_version()):
        raise UsageError(f"opset {opset} is outside what this onnx supports (7..{onnx.defs.onnx_opset_version()})")
    if check_batch is not None and check_batch < 1:
        raise UsageError(f"check_batch must be >= 1, got {check_batch}")
    model_name = type(gm).__name__

    with eval_no_grad(gm):
        with _timed(timings, "reference"):
            try:
                reference = gm(*inputs)
            except Exception as e:
                raise ExportError(f"{model_name} fails on the example inputs before export: {describe_failure(e, gm)}") from e
        ref_leaves = _tensor_leaves(reference)
        if not ref_leaves:
            raise ExportError(f"{model_name} returns no tensors; there is nothing to export")
        names_in = input_names(gm, len(inputs))
        names_out = output_names(reference)

        exporter, fallback_reason = "dynamo", None
        program = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with _timed(timings, "export"):
                try:
                    with _quiet_loggers():
                        program = _dynamo_export(gm, _capture_inputs(inputs, dynamic_batch), names_in, names_out, dynamic_batch, opset, timings)
                except Exception as e:
                    dynamo_error = e
                    reason = describe_failure(e, gm)
                    if _is_batch_constraint(e) and dynamic_batch:
                        raise ExportError(
                            f"the batch axis of {model_name}'s inputs cannot be dynamic ({_first_line(_chain(e)[-1])}); export with a static batch (dynamic_batch=False, --static-batch)"
                        ) from e
                    if not fallback:
                        raise ExportError(f"ONNX export of {model_name} failed: {reason}") from e
                    exporter, fallback_reason = "torchscript", reason
        warning_lines = sorted({_first_line(str(w.message)) for w in caught})

        # Serialize once: the bytes feed the file, the checker and onnxruntime.
        external = False
        tmp_dir = None
        try:
            if program is not None:
                with _timed(timings, "serialize"):
                    weight_bytes = _initializer_bytes(program)
                    external = weight_bytes > _PROTO_LIMIT
                    proto = None if external else program.model_proto
                    data = None if external else proto.SerializeToString()
            else:
                tmp_dir = tempfile.mkdtemp(prefix=".qcd_fx_onnx.", dir=_directory(path))
                ts_path = os.path.join(tmp_dir, "model.onnx")
                with warnings.catch_warnings(record=True) as caught2, _timed(timings, "export"):
                    warnings.simplefilter("always")
                    try:
                        with _quiet_loggers():
                            _torchscript_export(gm, inputs, names_in, names_out, dynamic_batch, opset, ts_path)
                    except Exception as e:
                        ts_reason = _ts_reason(e)
                        raise ExportError(f"ONNX export of {model_name} failed: {fallback_reason}; the TorchScript exporter fails too ({ts_reason})") from dynamo_error
                warning_lines += sorted({_first_line(str(w.message)) for w in caught2} - set(warning_lines))
                with _timed(timings, "serialize"):
                    if os.path.getsize(ts_path) > _PROTO_LIMIT or os.listdir(tmp_dir) != ["model.onnx"]:
                        raise ExportError(f"the TorchScript exporter wrote {model_name} with external weights, which qcd-fx does not verify; reduce the model or fix the dynamo export ({fallback_reason})")
                    with open(ts_path, "rb") as f:
                        data = f.read()
                    proto = onnx.load_model_from_string(data)

            report = _write_and_check(
                program, proto, data, external, path, gm, inputs, reference, names_in, names_out, dynamic_batch, check, check_batch, atol, rtol, timings, exporter
            )
        finally:
            if tmp_dir is not None:
                import shutil

                shutil.rmtree(tmp_dir, ignore_errors=True)

    report.fallback_reason = fallback_reason
    report.warnings = warning_lines
    report.total_seconds = time.perf_counter() - t_start
    return report


def _directory(path) -> str | None:
    return os.path.dirname(os.path.abspath(os.fspath(path))) if path is not None else None


def _is_batch_constraint(e: BaseException) -> bool:
    for exc in _chain(e):
        text = str(exc)
        if "Constraints violated" in text and "batch" in text:
            return True
    return False


def _ts_reason(e: BaseException) -> str:
    op = _unsupported_op(e)
    if op:
        return f"'{op}' unsupported"
    return _first_line(_chain(e)[-1])


def _initializer_bytes(program) -> int:
    total = 0
    for value in program.model.graph.initializers.values():
        const = value.const_value
        if const is not None:
            total += getattr(const, "nbytes", 0) or 0
    return total


def _write_and_check(program, proto, data, external, path, gm, inputs, reference, names_in, names_out, dynamic_batch, check, check_batch, atol, rtol, timings, exporter) -> ExportReport:
    import onnx

    with contextlib.ExitStack() as stack:
        # 1. write (to a temporary name beside the target; renamed only after the checks pass)
        target_for_checks: bytes | str
        if path is None and not external:
            file_bytes = len(data)
            target_for_checks = data
        elif not external:
            tmp = stack.enter_context(atomic_path(path))
            # write in a thread while the checks below run on the bytes in memory (file writes
            # release the GIL); joined before the rename, or before the removal on failure
            writer = _Writer(tmp, data, timings)
            stack.callback(writer.join)
            file_bytes = len(data)
            target_for_checks = data
        else:
            onnx_tmp = stack.enter_context(_atomic_with_data(path) if path is not None else _scratch_with_data())
            with _timed(timings, "write"):
                program.save(onnx_tmp, external_data=True)
            file_bytes = sum(os.path.getsize(p) for p in (onnx_tmp, onnx_tmp + ".data") if os.path.exists(p))
            target_for_checks = onnx_tmp

        # 2. structure of the file
        if proto is None:  # external weights: the graph without them
            with _timed(timings, "serialize"):
                proto = onnx.load(target_for_checks, load_external_data=False)
        graph = proto.graph
        initializer_names = {i.name for i in graph.initializer}
        if data is not None:  # the weights live on in `data`; no second copy while onnxruntime loads them
            graph.ClearField("initializer")
        op_types: dict[str, int] = {}
        domains = set()
        for node in list(graph.node) + [n for fn in proto.functions for n in fn.node]:
            op_types[node.op_type] = op_types.get(node.op_type, 0) + 1
            domains.add(node.domain if node.domain != "ai.onnx" else "")
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        onnx_inputs = [i for i in graph.input if i.name not in initializer_names]
        shapes = [[d.dim_param if d.HasField("dim_param") else d.dim_value for d in i.type.tensor_type.shape.dim] for i in onnx_inputs]
        dynamic = [bool(s) and isinstance(s[0], str) for s in shapes]
        report = ExportReport(
            path=None if path is None else os.fspath(path),
            exporter=exporter,
            opset=opset,
            nodes=len(graph.node) + sum(len(fn.node) for fn in proto.functions),
            op_types=dict(sorted(op_types.items())),
            domains=sorted(domains),
            file_bytes=file_bytes,
            external_data=external,
            export_seconds=timings.get("export", 0.0),
            total_seconds=0.0,
            input_names=[i.name for i in onnx_inputs],
            output_names=[o.name for o in graph.output],
            input_shapes=shapes,
            dynamic_batch=any(dynamic),
            checked=check,
            timings=timings,
            atol=atol,
            rtol=rtol,
        )
        if len(onnx_inputs) != len(inputs):
            raise ExportError(f"the ONNX model takes {len(onnx_inputs)} inputs, {type(gm).__name__} {len(inputs)}; non-tensor or unused inputs cannot be exported")
        if dynamic_batch and not any(dynamic):
            raise ExportError(f"the exporter made the batch axis of {type(gm).__name__} static; export with a static batch (dynamic_batch=False, --static-batch)")

        # 3. checks
        if check:
            with _timed(timings, "checker"):
                try:
                    onnx.checker.check_model(target_for_checks, full_check=True)
                except Exception as e:
                    raise ExportError(f"onnx.checker rejects the exported {type(gm).__name__}: {_first_line(e)}") from e
            report.checker_ok = True
            with _timed(timings, "session"):
                try:
                    session = onnxruntime_session(target_for_checks)
                except Exception as e:
                    raise ExportError(f"onnxruntime cannot load the exported {type(gm).__name__}: {_ort_failure(e, proto, gm)}") from e
            batches = [(inputs, _tensor_leaves(reference))]
            batch = inputs[0].shape[0] if inputs[0].dim() >= 1 else None
            if any(dynamic) and batch is not None:
                b2 = check_batch or batch + 1
                if b2 != batch:
                    second = _second_batch(inputs, dynamic, b2)
                    with _timed(timings, "reference"):
                        batches.append((second, _tensor_leaves(gm(*second))))
            for batch_inputs, expected in batches:
                with _timed(timings, "onnxruntime"):
                    try:
                        got = session.run(None, _feed(session, batch_inputs))
                    except Exception as e:
                        raise ExportError(f"onnxruntime fails to run the exported {type(gm).__name__}: {_ort_failure(e, proto, gm)}") from e
                with _timed(timings, "compare"):
                    b = batch_inputs[0].shape[0] if batch_inputs[0].dim() >= 1 else None
                    parity = compare_outputs(got, expected, report.output_names, atol, rtol, b)
                report.parity.append(parity)
                if not parity.ok:
                    raise ExportError(
                        f"onnxruntime output '{parity.worst_output}' differs from PyTorch by {parity.max_abs:.3g} "
                        f"(relative {parity.max_rel:.3g}; tolerance {atol:g} absolute or {rtol:g} relative) at batch {b}; the file was not written"
                    )
            del session
    return report


class _Writer:
    """Write ``data`` to ``path`` in a background thread; :meth:`join` waits and re-raises."""

    def __init__(self, path: str, data: bytes, timings: dict[str, float]):
        import threading

        self.error: BaseException | None = None
        self.timings = timings
        self.thread = threading.Thread(target=self._run, args=(path, data), name="qcd_fx-onnx-write", daemon=True)
        self.thread.start()

    def _run(self, path: str, data: bytes) -> None:
        t0 = time.perf_counter()
        try:
            with open(path, "wb") as f:
                f.write(data)
        except BaseException as e:  # re-raised in join()
            self.error = e
        self.seconds = time.perf_counter() - t0

    def join(self) -> None:
        t0 = time.perf_counter()
        self.thread.join()
        self.timings["write"] = getattr(self, "seconds", 0.0)
        self.timings["write_wait"] = time.perf_counter() - t0
        if self.error is not None:
            raise ExportError(f"writing the ONNX file failed: {self.error}") from self.error


@contextlib.contextmanager
def _atomic_with_data(path) -> Iterator[str]:
    """Like :func:`qcd_fx.io.atomic_path` for a model with external weights: yields a path in a
    temporary directory beside ``path`` whose weights file is named ``basename(path) + ".data"``
    (the name the .onnx refers to); on success moves the weights, then the .onnx, into place."""
    path = os.fspath(path)
    tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(os.path.abspath(path)))
    tmp = os.path.join(tmp_dir, os.path.basename(path))
    try:
        yield tmp
        os.replace(tmp + ".data", path + ".data")
        os.replace(tmp, path)
    finally:
        import shutil

        shutil.rmtree(tmp_dir, ignore_errors=True)


@contextlib.contextmanager
def _scratch_with_data() -> Iterator[str]:
    """A throw-away location for a model with external weights (dry runs)."""
    with tempfile.TemporaryDirectory(prefix="qcd_fx_onnx.") as tmp_dir:
        yield os.path.join(tmp_dir, "model.onnx")


def _ort_failure(e: BaseException, proto, gm) -> str:
    """onnxruntime's error in one line, with the graph node the failing ONNX node came from."""
    text = _first_line(e)
    m = re.search(r"node with name '([^']+)'|Node \(([^)]+)\)", str(e))
    where = ""
    if m:
        onnx_name = m.group(1) or m.group(2)
        node = next((n for n in proto.graph.node if n.name == onnx_name), None)
        if node is not None:
            props = {p.key: p.value for p in node.metadata_props}
            scopes = props.get("pkg.torch.onnx.name_scopes")
            if scopes:
                try:
                    scope = [s for s in json.loads(scopes.replace("'", '"')) if s]
                except ValueError:
                    scope = []
                if scope:
                    where = f" (graph node {_describe_node(gm, _node_for_scope(gm, scope[0]))})"
    return text + where


def _node_for_scope(gm, scope: str) -> str:
    if isinstance(gm, torch.fx.GraphModule):
        for n in gm.graph.nodes:
            if n.op == "call_module" and str(n.target) == scope:
                return n.name
    return scope


# ---------------------------------------------------------------------------------------------
# Latency


def interleaved_latency(fns: dict[str, Callable[[], object]], repeats: int = 10, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, calling them in turn (a, b, a, b, …) so that
    load from other processes affects all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


__all__ = [
    "BatchParity",
    "ExportReport",
    "compare_outputs",
    "describe_failure",
    "export_onnx",
    "input_names",
    "interleaved_latency",
    "onnxruntime_session",
    "output_names",
]
