"""onnxscript's rewrite rules, minus the ones that change results or cannot match.

``ONNXProgram.optimize`` runs onnxscript's optimizer, which reads its rules from the private
``onnxscript.rewriter._DEFAULT_REWRITE_RULES`` at call time. :func:`faithful_rewrites` replaces
that tuple for the duration of one ``optimize`` call (under a lock, restored afterwards), so
nothing else in the process sees the change. The names it relies on are checked against the
onnxscript range this was written for (``ONNXSCRIPT_RANGE``, pinned in ``pyproject.toml``);
if they have moved, export fails with one line saying so instead of silently running the
defaults (whose ``x + 0 -> x`` rule deletes ``x + 1e-8``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from ..errors import ExportError

ONNXSCRIPT_RANGE = ">=0.7,<0.8"
_LOCK = threading.Lock()


def _unsupported(what: str) -> ExportError:
    try:
        from importlib.metadata import version

        have = version("onnxscript")
    except Exception:  # noqa: BLE001 - only for the message
        have = "unknown"
    return ExportError(
        f"onnxscript {have} has no {what}, which qcd-fx adjusts to keep exported results exact; "
        f"install a supported version: pip install 'onnxscript{ONNXSCRIPT_RANGE}'"
    )


def _approximate_no_op_rules() -> set[int]:
    try:
        from onnxscript.rewriter.rules.common import _no_op

        exact = {id(_no_op.dropout_zero_rule), id(_no_op.dropout_inference_rule)}
        return {id(r) for r in _no_op.rules.rules if id(r) not in exact}
    except (ImportError, AttributeError):
        raise _unsupported("onnxscript.rewriter.rules.common._no_op rule set") from None


def faithful_rules(rules: tuple, slices: int) -> tuple:
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
    drop = _approximate_no_op_rules()
    if not drop & {id(r) for r in rules}:
        raise _unsupported("approximate no-op rules among its default rewrite rules")
    return tuple(r for r in rules if id(r) not in drop and not (slices < 2 and getattr(r, "name", None) == "SlicesSplit"))


@contextlib.contextmanager
def faithful_rewrites(model) -> Iterator[None]:
    """Within the block, onnxscript's optimizer uses :func:`faithful_rules` for ``model``."""
    import onnxscript.rewriter as rewriter

    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if not isinstance(rules, tuple):
        raise _unsupported("onnxscript.rewriter._DEFAULT_REWRITE_RULES")
    nodes = list(model.graph.all_nodes())
    for function in model.functions.values():
        nodes.extend(function.all_nodes())
    slices = sum(node.op_type == "Slice" for node in nodes)
    ours = faithful_rules(rules, slices)
    with _LOCK:
        rewriter._DEFAULT_REWRITE_RULES = ours
        try:
            yield
        finally:
            rewriter._DEFAULT_REWRITE_RULES = rules
