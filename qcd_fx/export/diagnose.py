"""A failed export or check in one line: the unsupported operator and the graph node it came from."""

from __future__ import annotations

import contextlib
import json
import linecache
import os
import re
from typing import Any

import torch
from torch import nn

from ..errors import first_line

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
    return f"{type(inner).__name__}{node_text}: {first_line(inner)}"


_USER_FRAME = re.compile(r'The following call raised this error:\s*\n\s*File "([^"]+)", line (\d+), in (\S+)(?:\n[ \t]+(\S.*))?')
_EXECUTING = re.compile(r"While executing %(\w+)")


def _where_in_source(filename: str, line: int, code: str | None = None) -> str:
    """``file.py:12 (`the line`)`` with the file relative to the current directory when inside it."""
    shown = filename
    with contextlib.suppress(ValueError):
        rel = os.path.relpath(filename)
        if not rel.startswith(".."):
            shown = rel
    code = (code or linecache.getline(filename, line)).strip()
    return f"{shown}:{line}" + (f" (`{code}`)" if code else "")


def data_dependent(e: BaseException, gm: nn.Module) -> str | None:
    """If ``torch.export`` failed because the computation depends on a tensor's *value* (Python
    control flow on a tensor, ``.item()`` feeding a shape, …), where that happens, in one phrase;
    else None. A traced file of such a model would keep the one path the example input takes."""
    chain = _chain(e)
    if not any(type(x).__name__ in ("GuardOnDataDependentSymNode", "DataDependentOutputException") or "data-dependent" in str(x) for x in chain):
        return None
    where, node = "", None
    for exc in chain:
        text = str(exc)
        m = _USER_FRAME.search(text)
        if m and not where:
            where = " at " + _where_in_source(m.group(1), int(m.group(2)), m.group(4))
        n = _EXECUTING.search(text)
        if n and node is None and isinstance(gm, torch.fx.GraphModule) and any(x.name == n.group(1) for x in gm.graph.nodes):
            node = n.group(1)
    if node:
        where += f" in graph node {_describe_node(gm, node)}"
    return where.strip() or "in the model"


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
    return first_line(_chain(e)[-1])


def _ort_failure(e: BaseException, proto, gm) -> str:
    """onnxruntime's error in one line, with the graph node the failing ONNX node came from."""
    text = first_line(e)
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
