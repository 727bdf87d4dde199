"""Small graph-editing helpers shared by the passes."""

from __future__ import annotations

from torch import nn
from torch.fx import GraphModule, Node


def free_name(gm: GraphModule, base: str) -> str:
    """``base`` or ``base_1``, ``base_2``… whichever is not yet an attribute path of ``gm``."""
    name, i = base, 0
    while _exists(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _exists(gm: GraphModule, path: str) -> bool:
    obj = gm
    for part in path.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def insert_module_after(gm: GraphModule, node: Node, module: nn.Module, name: str) -> Node:
    """Add ``module`` under a free variant of ``name`` and route every user of ``node`` through it.

    Returns the new ``call_module`` node, which takes ``node`` as its only input.
    """
    target = free_name(gm, name)
    gm.add_submodule(target, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(target, (node,))
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    return new


def module_of(gm: GraphModule, node: Node) -> nn.Module | None:
    """The module a ``call_module`` node calls, else None."""
    if node.op != "call_module":
        return None
    return gm.get_submodule(node.target)
