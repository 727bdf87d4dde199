"""What passes run with: the pipeline's context, and an fx interpreter that records shapes.

The pipeline builds one :class:`PassContext` per run and hands it to every pass
(``pass_(gm, context)``); passes read their example inputs and calibration batches from it,
never from ``gm.meta``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Interpreter, Node
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.utils._pytree import tree_map

from ..analysis import tensor_leaves  # noqa: F401 - the passes' import point


@dataclass(frozen=True)
class PassContext:
    """The run a pass is part of.

    ``example_inputs``: the positional inputs of the model (``None`` when the run has none);
    ``calibration``: batches (tuples of positional inputs) that data-driven passes score on —
    the user's calibration data, else the example inputs; ``tolerance``: the drift the pipeline
    allows a function-preserving pass.
    """

    example_inputs: tuple | None = None
    calibration: tuple[tuple, ...] = ()
    tolerance: float = 0.0


class Runner(Interpreter):
    """Interpreter that records shape metadata like ``ShapeProp`` and remembers the failing node.

    (``ShapeProp`` itself prints a traceback to stderr and re-raises a ``RuntimeError`` with the
    whole ``meta`` dict in it; the pipeline needs the node's name and a quiet failure.)
    With ``capture`` it keeps every node's tensor value, for locating drift.
    """

    def __init__(self, gm: GraphModule, capture: bool | set[str] = False):
        super().__init__(gm, garbage_collect_values=True)
        self.keep = capture if isinstance(capture, set) else None
        self.values: dict[str, Any] | None = {} if capture else None

    def run_node(self, n: Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as e:
            if not hasattr(e, "qcd_node"):  # innermost node first
                e.qcd_node = n.name
            raise
        found = False

        def meta(obj):
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        m = tree_map(meta, result)
        if found:
            n.meta["tensor_meta"] = m
        n.meta["type"] = type(result)
        if self.values is not None and (self.keep is None or n.name in self.keep):
            # a copy: a later in-place op (ReLU(inplace=True), add_) would change the kept value
            self.values[n.name] = tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, result)
        return result
