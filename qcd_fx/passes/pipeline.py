"""The pipeline: run passes in order and verify the graph after every one of them.

After each pass: ``graph.lint()``, ``recompile()``, shape propagation on the example inputs
(``node.meta["tensor_meta"]``, as ``torch.fx.passes.shape_prop.ShapeProp`` records it), output
structure and shapes against the untransformed model, finiteness, MACs
(``torch.utils.flop_counter``) and the numerical drift of the outputs. A pass that declares
:attr:`~qcd_fx.passes.base.Pass.preserves_function` must leave the outputs bit-for-bit equal;
a violation raises :class:`~qcd_fx.errors.PostconditionError` naming the pass and the first
node whose value changed.

Verification runs in eval mode (no dropout, BatchNorm running statistics untouched) and under
``torch.no_grad``; the module's training flag is restored afterwards.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from ..analysis import count_params, eval_no_grad, mac_counter, sparsity_probe
from ..capture import check_capture
from ..errors import (
    InputShapeError,
    ModelRunError,
    OutOfMemoryError,
    PassError,
    PostconditionError,
    QcdFxError,
    UsageError,
    allocation_size,
    first_line,
    out_of_memory,
)
from ..inputs import bind_inputs, split_inputs
from ..report import PassRow, Report, Snapshot
from ..tracing import copy_module, fast_module_access, trace
from .base import Pass, parse_spec
from .runtime import PassContext, Runner, tensor_leaves

_SHAPE_WORDS = re.compile(
    r"shape|size|dimension|\bdims?\b|channels|mat1 and mat2|must match|expected (?:input|\d)|to have \d+|out of range|Given groups|invalid for input|broadcast",
    re.I,
)


def _shape_mismatch(e: BaseException) -> bool:
    """Whether a failed first run is about the inputs' shapes (as opposed to the model failing
    on its own: a bug, an unsupported dtype, an assertion of the model's)."""
    return isinstance(e, (RuntimeError, IndexError, ValueError, TypeError)) and bool(_SHAPE_WORDS.search(str(e)))


def _shape_str(inputs: Sequence[Any]) -> str:
    return ", ".join("x".join(map(str, t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__ for t in inputs)


@dataclass
class _Run:
    outputs: Any
    macs: int
    sparsity: dict[str, float]


def _forward(gm: GraphModule, inputs: tuple, capture: bool = False) -> tuple[_Run, Runner]:
    runner = Runner(gm, capture=capture)
    with eval_no_grad(gm), mac_counter() as macs, sparsity_probe(gm) as sparsity:
        out = runner.run(*inputs)
    return _Run(out, macs(), dict(sparsity)), runner


def _snapshot(gm: GraphModule) -> GraphModule:
    """A GraphModule over a copy of ``gm``'s graph that shares its modules (no weight copy)."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return GraphModule(gm, graph)


def _node_values(gm: GraphModule, inputs: tuple) -> dict[str, Any]:
    runner = Runner(gm, capture=True)
    with eval_no_grad(gm):
        runner.run(*inputs)
    return runner.values or {}


def _same(a: Any, b: Any) -> bool:
    la, lb = tensor_leaves(a), tensor_leaves(b)
    return len(la) == len(lb) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(la, lb))


def _nonfinite(value: Any) -> bool:
    return any(t.is_floating_point() and not torch.isfinite(t).all() for t in tensor_leaves(value))


@dataclass
class TransformResult:
    """What :func:`qcd_fx.transform` returns."""

    graph_module: GraphModule
    report: Report
    pipeline: "Pipeline"


class Pipeline:
    """An ordered list of passes; ``Pipeline.parse(spec)`` builds one from a spec string."""

    def __init__(self, passes: Iterable[Pass] = ()):
        self.passes = tuple(passes)
        for p in self.passes:
            if not isinstance(p, Pass):
                raise TypeError(f"Pipeline takes qcd_fx passes, got {type(p).__name__}")

    @classmethod
    def parse(cls, spec: str) -> "Pipeline":
        return cls(parse_spec(spec))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pipeline) and self.passes == other.passes

    def __hash__(self) -> int:
        return hash(self.passes)

    def __len__(self) -> int:
        return len(self.passes)

    def __iter__(self):
        return iter(self.passes)

    def __str__(self) -> str:
        return ",".join(p.spec() for p in self.passes)

    def __repr__(self) -> str:
        return f"Pipeline({list(self.passes)!r})"

    def run(
        self,
        model: nn.Module,
        example_inputs: Any = None,
        *,
        leaf_modules: Iterable[str] = (),
        copy_model: bool = True,
        tolerance: float = 0.0,
        calibration: Iterable[Any] | None = None,
        on_step: Callable[[str], None] | None = None,
        capture: str = "auto",
    ) -> TransformResult:
        """Trace ``model`` (unless it is a GraphModule), run every pass, verify after each.

        Args:
            model: an ``nn.Module`` or ``GraphModule``. It is deep-copied first unless
                ``copy_model=False``, so the caller's model and weights are never modified.
            example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs
                (``{"input_ids": ids, "attention_mask": mask}``); without them only
                ``lint``/``recompile`` are checked and the report has no MACs or drift.
            leaf_modules: module names, globs or class names to keep opaque while tracing.
            capture: ``"fx"`` (``torch.fx.symbolic_trace``), ``"export"`` (``torch.export``,
                needs example inputs) or ``"auto"`` (fx, else torch.export); see
                :func:`qcd_fx.trace`. The report's ``capture`` says which one ran and why.
            tolerance: allowed max-abs drift for function-preserving passes (default 0: exact).
            calibration: batches (like ``example_inputs``) that data-driven passes such as
                ``cdg-prune`` score channels on; default: the example inputs.
            on_step: called with a short description before each step (progress display).
        """
        step = on_step or (lambda _msg: None)
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) or tolerance < 0:
            raise UsageError(f"tolerance must be a finite number >= 0 (max-abs drift allowed), got {tolerance!r}")
        call = split_inputs(example_inputs)
        leaf_modules = tuple(leaf_modules)
        check_capture(capture)
        original = model
        step("capturing the graph")
        t0 = time.perf_counter()
        if copy_model:
            model = copy_module(model)
        gm = trace(model, example_inputs, leaf_modules, capture=capture)
        trace_seconds = time.perf_counter() - t0
        inputs = bind_inputs(gm, *call) if call is not None else None

        reference = None
        baseline_macs = None
        if inputs is not None:
            step("reference forward")
            try:
                base, _ = _forward(gm, inputs)
            except QcdFxError:
                raise
            except Exception as e:
                node = getattr(e, "qcd_node", None)
                at = f" (at node '{node}')" if node else ""
                if out_of_memory(e):
                    raise OutOfMemoryError(
                        f"not enough memory to run {type(original).__name__} on the example inputs ({_shape_str(inputs)}){at}{allocation_size(e)}; use a smaller input"
                    ) from e
                if _shape_mismatch(e):
                    raise InputShapeError(f"example inputs ({_shape_str(inputs)}) do not fit {type(original).__name__}{at}: {first_line(e)}") from e
                raise ModelRunError(
                    f"{type(original).__name__} fails on the example inputs ({_shape_str(inputs)}){at}: {type(e).__name__}: {first_line(e)}"
                ) from e
            reference = base.outputs
            baseline_macs = base.macs
        report = Report(
            model=type(original).__name__,
            pipeline=str(self),
            input_shapes=[list(t.shape) for t in inputs if isinstance(t, torch.Tensor)] if inputs else None,
            baseline=Snapshot(len(gm.graph.nodes), count_params(gm), baseline_macs),
            trace_seconds=trace_seconds,
            capture=_capture_dict(gm),
        )
        calib = [bind_inputs(gm, *split_inputs(b, "a calibration batch")) for b in calibration] if calibration is not None else ([inputs] if inputs else [])
        context = PassContext(example_inputs=inputs, calibration=tuple(calib), tolerance=tolerance)
        gm = self._run_passes(gm, context, reference, report, step)
        return TransformResult(fast_module_access(gm), report, self)

    def _run_passes(self, gm: GraphModule, context: PassContext, reference, report: Report, step) -> GraphModule:
        inputs, tolerance = context.example_inputs, context.tolerance
        previous = reference
        for p in self.passes:
            step(f"pass {p.spec()}")
            before = {n.name for n in gm.graph.nodes}
            snapshot = _snapshot(gm) if p.preserves_function and inputs is not None else None
            t0 = time.perf_counter()
            try:
                result = p(gm, context)
            except QcdFxError:
                raise
            except Exception as e:
                raise PassError(p.name, f"failed with {type(e).__name__}: {first_line(e)}") from e
            seconds = time.perf_counter() - t0
            if result is not None and result.graph_module is not gm:
                gm = result.graph_module
            step(f"verify {p.spec()}")
            t0 = time.perf_counter()
            run = self._verify(p, gm, inputs, previous, snapshot, tolerance)
            verify_seconds = time.perf_counter() - t0
            after = {n.name for n in gm.graph.nodes}
            drift_abs = drift_rel = None
            if run is not None:
                drift_abs, drift_rel = _drift(run.outputs, reference)
                previous = run.outputs
            row = PassRow(
                name=p.name,
                spec=p.spec(),
                modified=bool(result.modified) if result is not None else True,
                seconds=seconds,
                verify_seconds=verify_seconds,
                after=Snapshot(len(after), count_params(gm), run.macs if run else None),
                nodes_added=len(after - before),
                nodes_removed=len(before - after),
                drift_abs=drift_abs,
                drift_rel=drift_rel,
                notes=list(getattr(result, "notes", [])),
                stats=dict(getattr(result, "stats", {})),
            )
            if run is not None and run.sparsity:
                row.stats["csc_sparsity"] = run.sparsity
            report.passes.append(row)
        return gm

    @staticmethod
    def _verify(p: Pass, gm: GraphModule, inputs, reference, snapshot, tolerance) -> _Run | None:
        """Check ``gm`` after pass ``p``; ``reference``: the outputs before ``p``; ``snapshot``:
        the graph before ``p`` (only for function-preserving passes, to locate drift)."""
        try:
            gm.graph.lint()
        except Exception as e:
            raise PostconditionError(p.name, f"graph.lint() failed: {first_line(e)}") from e
        try:
            gm.recompile()
        except Exception as e:
            raise PostconditionError(p.name, f"recompile failed: {first_line(e)}") from e
        if inputs is None:
            return None
        try:
            run, _ = _forward(gm, inputs)
        except Exception as e:
            node = getattr(e, "qcd_node", None)
            raise PostconditionError(p.name, f"forward failed: {first_line(e)}", node) from e
        ref_leaves, new_leaves = tensor_leaves(reference), tensor_leaves(run.outputs)
        if len(ref_leaves) != len(new_leaves):
            raise PostconditionError(p.name, f"the model now returns {len(new_leaves)} tensors instead of {len(ref_leaves)}", "output")
        for i, (r, n) in enumerate(zip(ref_leaves, new_leaves)):
            if r.shape != n.shape:
                raise PostconditionError(p.name, f"output {i} changed shape {tuple(r.shape)} -> {tuple(n.shape)}", "output")
        if _nonfinite(run.outputs) and not _nonfinite(reference):
            node = _first_node(gm, inputs, lambda name, v: _nonfinite(v))
            raise PostconditionError(p.name, "outputs became non-finite (inf/nan)", node)
        if p.preserves_function:
            abs_drift, _ = _drift(run.outputs, reference)
            if abs_drift > tolerance:
                node, detail = None, ""
                if snapshot is not None:
                    values = _node_values(snapshot, inputs)
                    changed = _first_node(gm, inputs, lambda name, v: name in values and not _same(v, values[name]))
                    # no node of the old graph changed: the pass added something on the way to the output
                    node = _new_source(gm, changed or "output", values)
                    if node == "output":
                        node = None
                    elif node != changed:
                        detail = f"; it changes the value of '{changed}'" if changed else "; it changes the output"
                raise PostconditionError(p.name, f"declared function-preserving but outputs drifted by {abs_drift:.3g} (tolerance {tolerance}){detail}", node)
        return run


def _first_node(gm: GraphModule, inputs: tuple, bad: Callable[[str, Any], bool]) -> str | None:
    """Name of the first node (in graph order) whose value satisfies ``bad``."""
    runner = Runner(gm, capture=True)
    with eval_no_grad(gm):
        runner.run(*inputs)
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.name in runner.values and bad(node.name, runner.values[node.name]):
            return node.name
    return None


def _new_source(gm: GraphModule, name: str, original: dict) -> str:
    """The first node the pass added on the way into node ``name`` (``name`` itself if none)."""
    node = next(n for n in gm.graph.nodes if n.name == name)
    stack, seen = list(node.all_input_nodes), set()
    added = []
    while stack:
        cur = stack.pop()
        if cur.name in seen or cur.name in original:
            continue
        seen.add(cur.name)
        added.append(cur)
        stack.extend(cur.all_input_nodes)
    if not added:
        return name
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return min(added, key=order.__getitem__).name


def _drift(outputs: Any, reference: Any) -> tuple[float, float]:
    worst_abs, scale = 0.0, 0.0
    for o, r in zip(tensor_leaves(outputs), tensor_leaves(reference)):
        if not o.is_floating_point() or o.numel() == 0:
            if not torch.equal(o, r):
                worst_abs = float("inf")
            continue
        worst_abs = max(worst_abs, float((o.double() - r.double()).abs().max()))
        scale = max(scale, float(r.double().abs().max()))
    return worst_abs, (worst_abs / scale if scale > 0 else worst_abs)


def _capture_dict(gm: GraphModule) -> dict[str, Any] | None:
    info = gm.meta.get("capture")
    return info.to_dict() if info is not None else None


def transform(model: nn.Module, passes: "str | Pipeline | Sequence[Pass]", example_inputs: Any = None, **kwargs) -> TransformResult:
    """Trace ``model`` and run ``passes`` (spec string, :class:`Pipeline` or list of passes).

    See :meth:`Pipeline.run` for the keyword arguments.
    """
    if isinstance(passes, str):
        pipeline = Pipeline.parse(passes)
    elif isinstance(passes, Pipeline):
        pipeline = passes
    else:
        pipeline = Pipeline(passes)
    return pipeline.run(model, example_inputs, **kwargs)
