"""Channel-dependency analysis over an fx graph: which channels must be pruned together.

Every channel of every prunable tensor dimension is an *atom* (an integer). Walking the graph in
order with the shapes from shape propagation, each value gets a :class:`Chan` (the axis that
carries channels and the atom of every position along it), a :class:`ParamRef` (the value *is* a
parameter or buffer, possibly expanded or permuted), or ``None`` (no prunable structure). Small
op rules then say how atoms relate:

* Conv/Linear/Embedding start a new family of atoms on their output side (one per output
  channel) and *bind* their input-side weight dimension to the input's atoms;
* element-wise ops, norms, residual adds and ``cat`` on other axes *unify* atoms position by
  position (a broadcast size-1 axis couples nothing), and a parameter that meets channels (a
  class token, a layer scale, a positional embedding) is bound along that axis;
* ``cat`` along the channel axis lays atoms side by side (offsets for free);
* ``view``/``reshape``/``flatten``/``permute``/``transpose`` map atoms through the row-major
  layout (flatten C·H·W repeats each atom H·W times; a split C -> (g, C/g) *ties* the atoms of
  one column across the g rows, which makes channel shuffle a permutation of tied units);
* depthwise convolutions unify input and output atoms (groups shrink with them); grouped
  convolutions additionally tie the same local index across groups (groups stay);
* ``nn.MultiheadAttention`` ties its internal projection dims to the residual width (the module
  has one ``embed_dim``) and the same head dim across heads;
* anything without a rule *freezes* the atoms it touches (never guess), and so do the model's
  inputs and outputs, so no classifier — Linear or Conv — ever loses a class.

Atoms that end up connected form a *unit* (channels removed together); families connected by
units form a *group* (one ratio, one ranking). Frozen units (connected to atom 0) stay.
The analysis also records every tensor dimension to slice, every module attribute and every
graph constant (reshape sizes, ``normalized_shape``) to rewrite, keyed by the atoms they count.
"""

from torch.fx import GraphModule

from .core import FROZEN, ArgRewrite, AttrRewrite, Chan, Dependencies, Group, ParamRef
from .core import _Analyzer as _Analyzer
from .spellings import rule_for


def analyze(gm: GraphModule, attention: str = "heads") -> Dependencies:
    """Channel dependencies of ``gm``; needs ``node.meta["tensor_meta"]`` (shape propagation).
    ``attention``: ``"heads"`` — a channel axis split into (heads, head_dim) on its way into
    attention has whole heads as its units; ``"dims"`` — the same head_dim position of every
    head is one unit (heads stay, each gets narrower)."""
    if attention not in ("heads", "dims"):
        raise ValueError(f"attention must be 'heads' or 'dims', got {attention!r}")
    an = _Analyzer(gm, rule_for)
    an.attention = attention
    an.run()
    return an.finish()


__all__ = ["FROZEN", "ArgRewrite", "AttrRewrite", "Chan", "Dependencies", "Group", "ParamRef", "analyze"]
