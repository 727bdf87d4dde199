"""``csc``: insert state-compression masking (CSC) on the model output, activations or named nodes."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node
from torch.nn.modules.conv import _ConvNd
from torch.utils._pytree import tree_flatten, tree_map

from ..nn import StateCompression
from .base import Pass, PassOutcome, option, register
from .runtime import PassContext
from .graph_utils import free_name, insert_module_after

ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.ELU, nn.SELU, nn.CELU,
    nn.LeakyReLU, nn.PReLU, nn.Softplus,
)  # fmt: skip
"""Activation modules ``target=activations`` masks after (not gates such as Sigmoid/Hardsigmoid)."""

_ACT_NAMES = ("relu", "relu_", "relu6", "gelu", "silu", "silu_", "hardswish", "hardswish_", "mish", "mish_",
              "elu", "elu_", "selu", "selu_", "celu", "celu_", "leaky_relu", "leaky_relu_", "prelu", "softplus")  # fmt: skip
ACTIVATION_FUNCTIONS = frozenset(
    f for ns in (F, torch, torch._C._nn) for name in _ACT_NAMES if callable(f := getattr(ns, name, None))
)
ACTIVATION_METHODS = frozenset(_ACT_NAMES)

_CHANNELS_FIRST = (_ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
                   nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)  # fmt: skip
_FEATURES_LAST = (nn.Linear, nn.LayerNorm, nn.MultiheadAttention, nn.Embedding)
_LAYOUT_CHANGERS = {"view", "reshape", "permute", "transpose", "flatten", "movedim", "unflatten"}


def is_activation(gm: GraphModule, node: Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), ACTIVATION_MODULES)
    if node.op == "call_function":
        return node.target in ACTIVATION_FUNCTIONS
    if node.op == "call_method":
        return node.target in ACTIVATION_METHODS
    return False


def feature_dim(gm: GraphModule, node: Node, max_steps: int = 64) -> int:
    """Where the features of ``node``'s value lie: ``1`` (channels first) or ``-1`` (last).

    Rank <= 2 values (known from shape propagation) use ``-1`` (the same axis as 1 for 2-D).
    Otherwise the nearest producing layer decides: Conv/BatchNorm/GroupNorm/pooling -> 1,
    Linear/LayerNorm/attention/embedding -> -1; a reshape/permute on the way, or no layer, -> -1.
    """
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    if shape is not None and len(shape) <= 2:
        return -1
    cur: Node | None = node
    for _ in range(max_steps):
        if cur is None:
            break
        if cur.op == "call_module":
            m = gm.get_submodule(cur.target)
            if isinstance(m, _CHANNELS_FIRST):
                return 1
            if isinstance(m, _FEATURES_LAST):
                return -1
        name = getattr(cur.target, "__name__", cur.target)
        if cur.op in ("call_method", "call_function") and name in _LAYOUT_CHANGERS:
            return -1
        cur = next((a for a in cur.all_input_nodes if a.op != "get_attr"), None)
    return -1


@register
@dataclass(frozen=True)
class CSC(Pass):
    """Insert state-compression masking (CSC) ``T * sigmoid(|T| / (s(T) + eps) - alpha)``.

    ``target``: ``output`` (every tensor the model returns, as the seed does), ``activations``
    (after every ReLU/GELU/SiLU/… module or function), or node-name globs
    (``[layer1*,fc]``; matched against node names and module paths). ``dim``: softmax axis of
    the entropy term; ``auto`` picks the feature axis (see :func:`feature_dim`). ``hard``:
    zero the entries the soft mask would scale below 0.5 (inference-time sparsity).
    """

    name = "csc"
    summary = "insert state-compression masking (CSC) on the output, activations or named nodes"

    alpha: float = option("entropy threshold alpha (seed: 0.5)", default=0.5)
    target: str | tuple[str, ...] = option("output | activations | [glob,...] of node names / module paths", default="output")
    dim: int | None = option("softmax axis of the entropy term; auto: the feature axis", default=None, aliases={"auto": None})
    hard: bool = option("zero entries whose soft mask is below 0.5 (inference sparsity)", default=False)

    def __post_init__(self):
        if isinstance(self.target, list):
            object.__setattr__(self, "target", tuple(self.target))
        if isinstance(self.target, tuple) and not self.target:
            raise ValueError("target list is empty")

    def call(self, gm: GraphModule, context: PassContext) -> PassOutcome:
        graph = gm.graph
        notes: list[str] = []
        dims: dict[str, int] = {}
        if self.target == "output":
            out = next(n for n in reversed(graph.nodes) if n.op == "output")
            leaves = [a for a in tree_flatten(out.args[0])[0] if isinstance(a, Node)]
            replaced: dict[Node, Node] = {}
            for leaf in leaves:
                if leaf in replaced:
                    continue
                if not _is_tensor(leaf):
                    notes.append(f"skipped output '{leaf.name}': not a floating-point tensor")
                    continue
                dim = self._dim(gm, leaf)
                target = free_name(gm, "output_csc")
                gm.add_submodule(target, StateCompression(self.alpha, dim, self.hard))
                with graph.inserting_before(out):
                    replaced[leaf] = graph.call_module(target, (leaf,))
                dims[target] = dim
            out.args = (tree_map(lambda a: replaced.get(a, a) if isinstance(a, Node) else a, out.args[0]),)
            sites = len(replaced)
        else:
            if self.target == "activations":
                chosen = [n for n in graph.nodes if is_activation(gm, n)]
            else:
                globs = (self.target,) if isinstance(self.target, str) else self.target
                chosen = [n for n in graph.nodes if n.op not in ("placeholder", "output", "get_attr") and _matches(n, globs)]
                if not chosen:
                    notes.append(f"no node matched {list(globs)}")
            sites = 0
            for node in chosen:
                if not _is_tensor(node):
                    notes.append(f"skipped '{node.name}': not a floating-point tensor")
                    continue
                dim = self._dim(gm, node)
                base = f"{node.target}_csc" if node.op == "call_module" else f"csc_{node.name}"
                new = insert_module_after(gm, node, StateCompression(self.alpha, dim, self.hard), base)
                dims[new.target] = dim
                sites += 1
        return PassOutcome(gm, sites > 0, notes, {"masks": sites, "dims": sorted(set(dims.values()))})

    def _dim(self, gm: GraphModule, node: Node) -> int:
        return self.dim if self.dim is not None else feature_dim(gm, node)


def _matches(node: Node, globs) -> bool:
    names = [node.name]
    if node.op == "call_module":
        names.append(str(node.target))
    return any(fnmatch.fnmatchcase(name, g) for g in globs for name in names)


def _is_tensor(node: Node) -> bool:
    """False only when shape propagation says the value is not a floating-point tensor."""
    if "type" in node.meta and not issubclass(node.meta["type"], torch.Tensor):
        return False
    meta = node.meta.get("tensor_meta")
    if meta is None:
        return True
    return hasattr(meta, "dtype") and meta.dtype.is_floating_point
