"""One rule per kind of op: how a node's channels relate to its inputs' (unify, bind, tie,
freeze) and which literals and attributes follow the kept channels. Which Python spelling
(module class, ``torch.nn.functional``, tensor method, ``torch.*``, ATen overload) is which kind
is decided in :mod:`.spellings`."""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.fx import Node
from torch.nn.modules.conv import _ConvNd

from .core import ArgRewrite, Chan, Info, MergedParam, ParamRef, _Analyzer, _op_name, _Unsupported


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _tensor_args(node: Node) -> list[Node]:
    return [a for a in node.args if isinstance(a, Node)] + [v for v in node.kwargs.values() if isinstance(v, Node)]


def _combine(an: _Analyzer, node: Node, operands: Sequence[Any], out_shape: tuple[int, ...] | None) -> Info:
    """Broadcasting combination of operands (element-wise semantics)."""
    if out_shape is None:
        # non-tensor result (e.g. shape arithmetic): operands carry no channel meaning here
        return None
    rank = len(out_shape)
    chans: list[tuple[int, np.ndarray]] = []
    others: list[tuple[Any, tuple[int, ...]]] = []
    params: list[ParamRef] = []
    for op in operands:
        if not isinstance(op, Node):
            continue
        info = an.info.get(op)
        shape = an.shape(op)
        if shape is None:
            continue
        offset = rank - len(shape)
        if isinstance(info, Chan) and shape[info.axis] == out_shape[info.axis + offset] and shape[info.axis] > 1:
            chans.append((info.axis + offset, info.atoms))
        else:
            others.append((op, shape))
        if isinstance(info, ParamRef):
            params.append(info)
    if not chans:
        if len(params) == 1 and len(others) == 1 and others[0][1] == out_shape:
            return params[0]  # a parameter scaled by a number keeps its identity
        shared = _shared_param_axis(an, operands, params, out_shape)
        if shared is not None:
            return shared
        for p in params:
            an.pin(p.name, f"{node.name}: parameter combined with untracked values")
        return None
    axis, atoms = chans[0]
    for ax, at in chans[1:]:
        if ax != axis:
            for _, at2 in chans:
                an.freeze(at2, f"{node.name}: channels on two different axes")
            return None
        an.union(atoms, at)
    for op, shape in others:
        offset = rank - len(shape)
        own = axis - offset
        size = shape[own] if own >= 0 else 1
        if size == 1:
            continue
        info = an.info.get(op)
        if isinstance(info, ParamRef) and info.axes[own] is not None:
            an.bind(info.name, info.axes[own], atoms)
        else:
            an.freeze(atoms, f"{node.name}: combined with a tensor whose channels are not tracked")
    return Chan(axis, atoms)


def _shared_param_axis(an: _Analyzer, operands: Sequence[Any], params: list, out_shape: tuple[int, ...]) -> Info:
    """Parameters broadcast together (a factorised position embedding: ``pos_y[:, :, None] +
    pos_x[:, None, :]``) with one output axis that is a dim of every one of them: that axis
    carries channels (every parameter's dim bound to them); their other dims stay whole. None
    when some operand is not a parameter or no single axis is shared."""
    nodes = [op for op in operands if isinstance(op, Node)]
    if len(params) < 2 or len(params) != len(nodes):
        return None
    rank = len(out_shape)
    aligned = []
    for op, p in zip(nodes, params):
        shape = an.shape(op)
        if shape is None:
            return None
        aligned.append([None] * (rank - len(shape)) + [a if s > 1 else None for a, s in zip(p.axes, shape)])
    axes = [d for d in range(rank) if out_shape[d] > 1 and all(al[d] is not None for al in aligned)]
    if len(axes) != 1:
        return None
    axis = axes[0]
    atoms = an.param_atoms(params[0].name, aligned[0][axis], f"{params[0].name} (channels)")
    for p, al in zip(params, aligned):
        an.bind(p.name, al[axis], atoms)
        for d, dim in enumerate(al):
            if dim is not None and d != axis:
                an.pin_dim(p.name, dim, "parameter dim broadcast against another parameter")
    return Chan(axis, atoms)


def rule_elementwise(an: _Analyzer, node: Node) -> Info:
    ops = list(node.args) + list(node.kwargs.values())
    return _combine(an, node, ops, an.shape(node))


def rule_passthrough(an: _Analyzer, node: Node, *_: Any) -> Info:
    """Shape-preserving op on its first input (activations, dropout, casts, contiguous…)."""
    src = node.args[0] if node.args else next(iter(node.kwargs.values()))
    info = an.of(src)
    if isinstance(info, (Chan, ParamRef)) and an.shape(src) == an.shape(node):
        return info
    if isinstance(info, Chan):
        an.freeze(info.atoms, f"{node.name}: changes the shape")
    return None


def rule_spatial(an: _Analyzer, node: Node, *_: Any) -> Info:
    """Pooling, padding-free resampling: keeps axes 0 and 1, changes the spatial axes."""
    info = an.of(node.args[0])
    out = an.shape(node)
    if isinstance(info, Chan):
        if info.axis == 1 and out is not None and len(out) > 1 and out[1] == len(info.atoms):
            return info
    shape = an.shape(node.args[0])
    if isinstance(info, ParamRef) and out is not None and shape is not None and len(out) == len(shape) > 1 and tuple(out[:2]) == tuple(shape[:2]):
        # a parameter resampled (a position embedding interpolated to the input's grid): its
        # axes 0 and 1 stay its dims, the resampled ones are no longer any of its dims
        _pin_param_dims(an, info, [info.axes[d] for d in range(2, len(shape)) if shape[d] > 1], f"{node.name}: parameter resampled")
        return ParamRef(info.name, (*info.axes[:2], *[None] * (len(out) - 2)))
    an.freeze_info(info, f"{node.name}: pools over the channel axis")
    return None


def _pin_param_dims(an: _Analyzer, info: ParamRef, dims: list, reason: str) -> None:
    """Leave dims of a parameter whole: a value derived from it no longer follows them."""
    for dim in dims:
        if dim is not None:
            an.pin_dim(info.name, dim, reason)


def rule_pad_module(an: _Analyzer, node: Node, m: nn.Module) -> Info:
    """``nn.ConstantPad2d``/``ZeroPad2d``/``ReflectionPad2d``/…: ``F.pad`` with the module's ``padding``."""
    return rule_pad(an, node, tuple(m.padding))


def rule_pad(an: _Analyzer, node: Node, pad: Any = None) -> Info:
    info = an.of(node.args[0])
    if pad is None:
        pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    shape = an.shape(node.args[0])
    if isinstance(info, Chan) and shape is not None and isinstance(pad, (tuple, list)):
        rank = len(shape)
        touched = {rank - 1 - i // 2 for i, p in enumerate(pad) if not isinstance(p, int) or p != 0}
        if info.axis not in touched:
            return info
        an.freeze(info.atoms, f"{node.name}: pads the channel axis")
        return None
    an.freeze_info(info, f"{node.name}: unknown padding")
    return None


def _module_tensor(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _conv(
    an: _Analyzer, node: Node, path: str, weight: str, bias: str | None, groups: int, transposed: bool, x: Any, groups_arg: tuple[int | str, ...] | None = None
) -> Info:
    info = an.of(x)
    in_shape = an.shape(x)
    wt = an.tensors[an.canon[weight]]
    label = path or node.name
    if in_shape is None:
        raise _Unsupported("convolution input shape unknown")
    if isinstance(info, Chan) and info.axis != 1:
        an.freeze(info.atoms, f"{node.name}: convolution over the channel axis")
        info = None
    if isinstance(info, ParamRef):
        an.pin(info.name, f"{node.name}: parameter convolved")
        info = None
    in_atoms = info.atoms if isinstance(info, Chan) else None
    if transposed:
        out_atoms = an.param_atoms(weight, 1, f"{label} (out channels)")
        if groups != 1:
            an.freeze(out_atoms, f"{node.name}: grouped transposed convolution")
            if in_atoms is not None:
                an.freeze(in_atoms, f"{node.name}: grouped transposed convolution")
        elif in_atoms is not None:
            an.bind(weight, 0, in_atoms)
    elif groups == 1:
        out_atoms = an.param_atoms(weight, 0, f"{label} (out channels)")
        if in_atoms is not None:
            an.bind(weight, 1, in_atoms)
    else:
        cin, cout = in_shape[1], wt.shape[0]
        cpg_in, cpg_out = cin // groups, cout // groups
        out_atoms = an.param_atoms(weight, 0, f"{label} (out channels)")
        if in_atoms is None or (cpg_out % cpg_in if cpg_in <= cpg_out else 1):
            why = f"{node.name}: grouped convolution with {'untracked input' if in_atoms is None else 'uneven channels per group'}"
            an.freeze(out_atoms, why)
            if in_atoms is not None:
                an.freeze(in_atoms, why)
        elif cpg_in != cpg_out and cpg_in == 1:
            # depthwise with a channel multiplier m: input channel g feeds outputs g*m .. g*m+m-1;
            # a channel goes with its m outputs (whole groups), and the group count follows
            table = out_atoms.reshape(groups, cpg_out)
            for j in range(cpg_out):
                an.union(table[:, j], in_atoms)
            if path:
                an.rewrite_attr(path, "groups", in_atoms)
            elif groups_arg is not None:
                an.arg_rewrites.append(ArgRewrite(node.name, groups_arg, in_atoms, int))
            else:
                an.freeze(in_atoms, f"{node.name}: grouped convolution with a computed group count")
        elif cpg_in != cpg_out:
            # grouped with a channel multiplier: the group count stays; the same local input
            # channels, and the same local output channels, go in every group
            an.bind(weight, 1, an.tie(in_atoms, groups))
            an.tie(out_atoms, groups)
        else:
            an.union(out_atoms, in_atoms)
            if cpg_in == 1:  # depthwise: whole groups go with their channel
                if path:
                    an.rewrite_attr(path, "groups", in_atoms)
                elif groups_arg is not None:
                    an.arg_rewrites.append(ArgRewrite(node.name, groups_arg, in_atoms, int))
            else:  # grouped: the same local channels in every group
                local = an.tie(in_atoms, groups)
                an.bind(weight, 1, local)
    if bias is not None:
        an.bind(bias, 0, out_atoms)
    if path:
        an.rewrite_attr(path, "out_channels", out_atoms)
        if in_atoms is not None:
            an.rewrite_attr(path, "in_channels", in_atoms)
    an.producers[node.name] = Chan(1, out_atoms)
    return Chan(1, out_atoms)


def rule_conv_module(an: _Analyzer, node: Node, m: _ConvNd) -> Info:
    p = node.target
    return _conv(an, node, p, f"{p}.weight", f"{p}.bias" if m.bias is not None else None, m.groups, m.transposed, node.args[0])


def rule_conv_function(an: _Analyzer, node: Node) -> Info:
    args = list(node.args)
    names = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
    values = {n: (args[i] if i < len(args) else node.kwargs.get(n)) for i, n in enumerate(names)}
    w, b = an.of(values["weight"]), an.of(values["bias"])
    groups = values["groups"] if values["groups"] is not None else 1
    if (
        not isinstance(w, ParamRef)
        or w.axes != tuple(range(len(w.axes)))
        or not isinstance(groups, int)
        or (values["bias"] is not None and not isinstance(b, ParamRef))
    ):
        raise _Unsupported("functional convolution with computed weights")
    groups_arg = (6,) if len(args) > 6 else ("groups",) if "groups" in node.kwargs else None
    if groups > 1 and groups_arg is None:
        raise _Unsupported("functional grouped convolution without its groups argument")
    transposed = "transpose" in _op_name(node)
    return _conv(an, node, "", w.name, b.name if isinstance(b, ParamRef) else None, groups, transposed, values["input"], groups_arg)


def _linear(an: _Analyzer, node: Node, path: str, weight: str, bias: str | None, x: Any, out_dim: int = 0) -> Info:
    """``x @ W^T + b`` with ``W``'s output features on ``out_dim`` (1 for ``addmm(b, x, W)``:
    GPT-2's ``Conv1D`` stores ``W`` as in × out)."""
    in_dim = 1 - out_dim
    info = an.of(x)
    shape = an.shape(x)
    label = path or (weight[: -len(".weight")] if weight.endswith(".weight") else node.name)
    if shape is None:
        raise _Unsupported("linear input shape unknown")
    last = len(shape) - 1
    out_atoms = an.param_atoms(weight, out_dim, f"{label} (out features)")
    if isinstance(info, Chan):
        if info.axis == last:
            an.bind(weight, in_dim, info.atoms)
            if path:
                an.rewrite_attr(path, "in_features", info.atoms)
        else:
            # a Linear over another axis (MLP-Mixer's token mixing): the channels pass through on
            # their axis; this layer's own width is not tracked (a value has one channel axis), so
            # it stays, and so does the next layer's input
            an.freeze(out_atoms, f"{node.name}: linear layer over a non-channel axis (its width is kept)")
            if bias is not None:
                an.bind(bias, 0, out_atoms)
            if path:
                an.rewrite_attr(path, "out_features", out_atoms)
            return Chan(info.axis, info.atoms)
    elif isinstance(info, ParamRef):
        an.pin(info.name, f"{node.name}: parameter fed to a linear layer")
    if bias is not None:
        an.bind(bias, 0, out_atoms)
    if path:
        an.rewrite_attr(path, "out_features", out_atoms)
    chan = Chan(last, out_atoms)
    an.producers[node.name] = chan
    return chan


def rule_linear_module(an: _Analyzer, node: Node, m: nn.Linear) -> Info:
    p = node.target
    return _linear(an, node, p, f"{p}.weight", f"{p}.bias" if m.bias is not None else None, node.args[0])


def rule_linear_function(an: _Analyzer, node: Node) -> Info:
    args = list(node.args)
    w = an.of(args[1] if len(args) > 1 else node.kwargs.get("weight"))
    b_arg = args[2] if len(args) > 2 else node.kwargs.get("bias")
    b = an.of(b_arg)
    computed_bias = isinstance(b, Chan) and b.axis == 0 and an.shape(b_arg) is not None and len(an.shape(b_arg)) == 1
    if not isinstance(w, ParamRef) or w.axes != (0, 1) or (b_arg is not None and not isinstance(b, ParamRef) and not computed_bias):
        raise _Unsupported("functional linear with computed weights")
    out = _linear(an, node, "", w.name, b.name if isinstance(b, ParamRef) else None, args[0])
    if computed_bias:  # BEiT's torch.cat((q_bias, k_bias, v_bias)): its channels are the out features
        an.union(b.atoms, an.param_atoms(w.name, 0))
    return out


def rule_addmm(an: _Analyzer, node: Node) -> Info:
    """``addmm(bias, x, W)`` with ``W`` a parameter (in × out): a linear layer (GPT-2's ``Conv1D``
    as ``torch.export`` records it)."""
    args = list(node.args) + [None] * (3 - len(node.args))
    b, w = an.of(args[0]), an.of(args[2])
    beta = node.kwargs.get("beta", args[3] if len(args) > 3 else 1)
    alpha = node.kwargs.get("alpha", args[4] if len(args) > 4 else 1)
    if not isinstance(w, ParamRef) or w.axes != (0, 1) or not isinstance(b, ParamRef) or (beta, alpha) != (1, 1):
        raise _Unsupported("addmm with computed weights")
    bshape = an.shape(args[0])
    if bshape is None or len(bshape) != 1:
        raise _Unsupported("addmm with a broadcast bias")
    return _linear(an, node, "", w.name, b.name, args[1], out_dim=1)


def rule_embedding_function(an: _Analyzer, node: Node) -> Info:
    """``aten.embedding(weight, indices)`` / ``F.embedding(indices, weight)``: the rows' width is
    the output's last axis."""
    aten_order = isinstance(node.target, torch._ops.OpOverload)
    w_arg = node.args[0] if aten_order else (node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"))
    w = an.of(w_arg)
    shape = an.shape(node)
    if not isinstance(w, ParamRef) or w.axes != (0, 1) or shape is None:
        raise _Unsupported("embedding of a computed table")
    atoms = an.param_atoms(w.name, 1, f"{w.name} (embedding dim)")
    chan = Chan(len(shape) - 1, atoms)
    an.producers[node.name] = chan
    return chan


def rule_unsqueeze(an: _Analyzer, node: Node) -> Info:
    info = an.of(node.args[0])
    out = an.shape(node)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if out is None or not isinstance(dim, int):
        _unknown(an, node, info)
        return None
    dim = _norm_axis(dim, len(out))
    if isinstance(info, Chan):
        return Chan(info.axis + (1 if dim <= info.axis else 0), info.atoms)
    if isinstance(info, ParamRef):
        axes = list(info.axes)
        axes.insert(dim, None)
        own = tuple(range(an.tensors[info.name].dim())) if info.name in an.tensors else None
        if own is not None and tuple(axes[:dim] + [dim] + axes[dim + 1 :]) == own and an.tensors[info.name].shape[dim] == 1:
            # the size-1 dim a squeeze took away comes back where it was (Mamba's depthwise conv
            # weight: ``w.squeeze(1)`` for its kernel, ``.unsqueeze(1)`` for F.conv1d): the parameter itself
            return ParamRef(info.name, own)
        return ParamRef(info.name, tuple(axes))
    return None


def rule_squeeze(an: _Analyzer, node: Node) -> Info:
    info = an.of(node.args[0])
    shape = an.shape(node.args[0])
    if info is None or shape is None:
        return None
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None:
        removed = [d for d, s in enumerate(shape) if s == 1]
    else:
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not all(isinstance(d, int) for d in dims):
            return _unknown(an, node, info)
        removed = [_norm_axis(d, len(shape)) for d in dims if shape[_norm_axis(d, len(shape))] == 1]
    if isinstance(info, Chan):
        if info.axis in removed:
            an.freeze(info.atoms, f"{node.name}: squeezes the channel axis")
            return None
        return Chan(info.axis - sum(1 for d in removed if d < info.axis), info.atoms)
    return ParamRef(info.name, tuple(a for d, a in enumerate(info.axes) if d not in removed))


def rule_select(an: _Analyzer, node: Node) -> Info:
    """``x.select(dim, i)`` / ``aten.select.int`` (``x[:, 0]``, a class token): one position of
    ``dim``; channels on another axis pass through."""
    info = an.of(node.args[0])
    shape = an.shape(node.args[0])
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if info is None or shape is None or not isinstance(dim, int):
        _unknown(an, node, info)
        return None
    dim = _norm_axis(dim, len(shape))
    if isinstance(info, Chan):
        if info.axis == dim:
            an.freeze(info.atoms, f"{node.name}: selects one channel")
            return None
        return Chan(info.axis - (1 if dim < info.axis else 0), info.atoms)
    if info.axes[dim] is not None and shape[dim] > 1:
        an.pin(info.name, f"{node.name}: parameter indexed")
        return None
    return ParamRef(info.name, tuple(a for d, a in enumerate(info.axes) if d != dim))


def _unknown(an: _Analyzer, node: Node, info: Info) -> None:
    """Dims computed at run time: the channels this op touches are left alone."""
    if info is not None:
        an.freeze_info(info, f"{node.name}: computed dims")


def _channel_norm(
    an: _Analyzer, node: Node, path: str, tensors: list[str], num_groups: int | None, x: Any = None, groups_arg: tuple[int | str, ...] | None = None
) -> Info:
    info = an.of(node.args[0] if x is None else x)
    if not isinstance(info, Chan):
        if isinstance(info, ParamRef):
            an.pin(info.name, f"{node.name}: normalised parameter")
        return None
    if info.axis != 1:
        an.freeze(info.atoms, f"{node.name}: channel norm over a value with channels on axis {info.axis}")
        return None
    atoms = info.atoms
    if num_groups is not None and num_groups == len(atoms) > 1:  # one channel per group: groups go with it
        if path:
            an.rewrite_attr(path, "num_groups", atoms)
        if groups_arg is not None:
            an.arg_rewrites.append(ArgRewrite(node.name, groups_arg, atoms, int))
    elif num_groups is not None and num_groups > 1:  # the same local channels in every group
        an.tie(atoms, num_groups)
    for t in tensors:
        an.bind(t, 0, atoms)
    attr = "num_channels" if num_groups is not None else "num_features"
    if path:
        an.rewrite_attr(path, attr, atoms)
    return info


_NORM_SIGNATURES = {  # torch.nn.functional's positional order
    "batch_norm": ("input", "running_mean", "running_var", "weight", "bias"),
    "instance_norm": ("input", "running_mean", "running_var", "weight", "bias"),
    "group_norm": ("input", "num_groups", "weight", "bias"),
}
_ATEN_NORM_SIGNATURES = {  # ATen's (torch.export): affine parameters before the running statistics
    "batch_norm": ("input", "weight", "bias", "running_mean", "running_var"),
    "instance_norm": ("input", "weight", "bias", "running_mean", "running_var"),
    "group_norm": ("input", "num_groups", "weight", "bias"),
}


def rule_norm_function(an: _Analyzer, node: Node) -> Info:
    """``F.batch_norm`` / ``F.instance_norm`` / ``F.group_norm`` (what fx records when it traces
    into a norm module's ``forward``, e.g. timm's ``BatchNormAct2d``) and their ATen overloads
    (other argument order): per-channel statistics and affine parameters on axis 1, bound like
    the module forms'."""
    kind = _op_name(node)
    names = (_ATEN_NORM_SIGNATURES if isinstance(node.target, torch._ops.OpOverload) else _NORM_SIGNATURES)[kind]
    bound = dict(zip(names, node.args))
    bound.update({k: v for k, v in node.kwargs.items() if k in names})
    tensors, owners = [], set()
    for key in names[1:]:
        arg = bound.get(key)
        if key == "num_groups" or arg is None:
            continue
        ref = an.of(arg)
        if not isinstance(ref, ParamRef):
            raise _Unsupported(f"{kind} with a computed {key}")
        tensors.append(ref.name)
        owners.add(ref.name.rpartition(".")[0])
    num_groups = None
    groups_arg = None
    if kind == "group_norm":
        num_groups = bound.get("num_groups")
        if not isinstance(num_groups, int):
            raise _Unsupported("group_norm with a computed num_groups")
        groups_arg = (1,) if len(node.args) > 1 else ("num_groups",) if "num_groups" in node.kwargs else None
        info = an.of(bound["input"])
        if isinstance(info, Chan) and num_groups == len(info.atoms) > 1 and groups_arg is None:
            raise _Unsupported("group_norm with one channel per group and no num_groups argument")
    x = an.of(bound["input"])
    if isinstance(x, (MergedParam, ParamRef)):
        return _normalised_param(an, node, x, tensors, kind)
    # the module that holds the parameters keeps its attributes in step (num_features, …)
    path = owners.pop() if len(owners) == 1 else ""
    if path:
        owner = an.gm.get_submodule(path)
        if not hasattr(owner, "num_channels" if kind == "group_norm" else "num_features"):
            path = ""
    return _channel_norm(an, node, path, tensors, num_groups, x=bound["input"], groups_arg=groups_arg)


def _normalised_param(an: _Analyzer, node: Node, x: MergedParam | ParamRef, tensors: list[str], kind: str) -> Info:
    """Weight standardization (BiT, NFNet: ``batch_norm(w.reshape(1, out, -1), …)``): a norm of a
    parameter per entry of axis 1 over the merged rest. Pruning the dims behind axis 1 drops
    whole slices with their statistics (and the norm's own weight and bias entries); pruning a
    merged dim changes what the statistics average over, as pruning changes any layer's inputs."""
    channel = x.axes[1] if len(x.axes) > 1 else None
    if kind not in ("batch_norm", "instance_norm") or not isinstance(channel, int):
        an.pin(x.name, f"{node.name}: normalised parameter")
        return None
    atoms = an.param_atoms(x.name, channel)
    for t in tensors:
        an.bind(t, 0, atoms)
    return x


def rule_batchnorm(an: _Analyzer, node: Node, m: nn.Module) -> Info:
    p = node.target
    names = [n for n in ("weight", "bias", "running_mean", "running_var") if getattr(m, n, None) is not None]
    return _channel_norm(an, node, p, [f"{p}.{n}" for n in names], None)


def rule_groupnorm(an: _Analyzer, node: Node, m: nn.GroupNorm) -> Info:
    p = node.target
    names = [n for n in ("weight", "bias") if getattr(m, n, None) is not None]
    return _channel_norm(an, node, p, [f"{p}.{n}" for n in names], m.num_groups)


def _layer_norm(an: _Analyzer, node: Node, x: Any, ndims: int, weight: str | None, bias: str | None, path: str, shape_arg: tuple[int, ...] | None) -> Info:
    info = an.of(x)
    shape = an.shape(x)
    if not isinstance(info, Chan) or shape is None:
        if isinstance(info, ParamRef):
            an.pin(info.name, f"{node.name}: normalised parameter")
        return None
    rank = len(shape)
    if info.axis < rank - ndims:
        return info  # channels outside the normalised dims pass through
    if ndims != 1:
        an.freeze(info.atoms, f"{node.name}: layer norm over several dims including the channel axis")
        return None
    for t in (weight, bias):
        if t is not None:
            an.bind(t, 0, info.atoms)
    if path:
        an.rewrite_attr(path, "normalized_shape", info.atoms, lambda n: (n,))
    if shape_arg is not None:
        an.arg_rewrites.append(ArgRewrite(node.name, shape_arg, info.atoms, lambda n: (n,)))
    return info


def rule_layernorm_module(an: _Analyzer, node: Node, m: nn.LayerNorm) -> Info:
    p = node.target
    w = f"{p}.weight" if getattr(m, "weight", None) is not None else None
    b = f"{p}.bias" if getattr(m, "bias", None) is not None else None
    return _layer_norm(an, node, node.args[0], len(m.normalized_shape), w, b, p, None)


def rule_layernorm_function(an: _Analyzer, node: Node) -> Info:
    args = list(node.args)
    shape = args[1] if len(args) > 1 else node.kwargs.get("normalized_shape")
    w_arg = args[2] if len(args) > 2 else node.kwargs.get("weight")
    b_arg = args[3] if len(args) > 3 else node.kwargs.get("bias")
    w, b = an.of(w_arg), an.of(b_arg)
    if not isinstance(shape, (tuple, list)) or not all(isinstance(s, int) for s in shape):
        raise _Unsupported("layer_norm with a computed normalized_shape")
    if (w_arg is not None and not isinstance(w, ParamRef)) or (b_arg is not None and not isinstance(b, ParamRef)):
        raise _Unsupported("layer_norm with computed affine parameters")
    return _layer_norm(an, node, args[0], len(shape), w.name if w else None, b.name if b else None, "", (1,) if len(args) > 1 else None)


def rule_rmsnorm_function(an: _Analyzer, node: Node) -> Info:
    """``F.rms_norm(x, normalized_shape, weight, eps)`` / ``aten.rms_norm``: a layer norm without bias."""
    args = list(node.args)
    shape = args[1] if len(args) > 1 else node.kwargs.get("normalized_shape")
    w_arg = args[2] if len(args) > 2 else node.kwargs.get("weight")
    w = an.of(w_arg)
    if not isinstance(shape, (tuple, list)) or not all(isinstance(s, int) for s in shape):
        raise _Unsupported("rms_norm with a computed normalized_shape")
    if w_arg is not None and not isinstance(w, ParamRef):
        raise _Unsupported("rms_norm with a computed weight")
    return _layer_norm(an, node, args[0], len(shape), w.name if w else None, None, "", (1,) if len(args) > 1 else None)


def rule_mha(an: _Analyzer, node: Node, m: nn.MultiheadAttention) -> Info:
    p = node.target
    args = list(node.args)
    q, k, v = (args + [None] * 3)[:3]
    q = q if q is not None else node.kwargs.get("query")
    k = k if k is not None else node.kwargs.get("key")
    v = v if v is not None else node.kwargs.get("value")
    infos = [an.of(t) for t in (q, k, v)]
    e = m.embed_dim
    ok = m._qkv_same_embed_dim and all(isinstance(i, Chan) and len(i.atoms) == e and i.axis == len(an.shape(t)) - 1 for i, t in zip(infos, (q, k, v)))
    if not ok or m.bias_k is not None or m.add_zero_attn:
        raise _Unsupported("MultiheadAttention with separate q/k/v widths, untracked inputs, bias_k or add_zero_attn")
    atoms = infos[0].atoms
    for i in infos[1:]:
        an.union(atoms, i.atoms)
    an.tie(atoms, m.num_heads)  # the same head dim in every head
    three = np.concatenate([atoms, atoms, atoms])
    an.bind(f"{p}.in_proj_weight", 0, three)
    an.bind(f"{p}.in_proj_weight", 1, atoms)
    if m.in_proj_bias is not None:
        an.bind(f"{p}.in_proj_bias", 0, three)
    an.bind(f"{p}.out_proj.weight", 0, atoms)
    an.bind(f"{p}.out_proj.weight", 1, atoms)
    if m.out_proj.bias is not None:
        an.bind(f"{p}.out_proj.bias", 0, atoms)
    for attr in ("embed_dim", "kdim", "vdim"):
        an.rewrite_attr(p, attr, atoms)
    an.rewrite_attr(p, "head_dim", atoms, lambda n, h=m.num_heads: n // h)
    an.rewrite_attr(f"{p}.out_proj", "in_features", atoms)
    an.rewrite_attr(f"{p}.out_proj", "out_features", atoms)
    out = Chan(infos[0].axis, atoms)
    return (out, None)


_RNN_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def rule_rnn(an: _Analyzer, node: Node, m: nn.RNNBase) -> Info:
    """``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` of one layer (Sequencer's bidirectional LSTMs): the
    input features are consumed like a Linear's (columns of ``weight_ih``); the hidden units are
    a family of their own — unit ``j`` owns row ``j`` of every gate block of ``weight_ih``,
    ``weight_hh`` and the biases, column ``j`` of ``weight_hh``, and position ``j`` of the output
    in each direction (the directions share ``hidden_size``, so unit ``j`` goes in both)."""
    p = node.target
    gates = _RNN_GATES.get(m.mode)
    x = node.args[0] if node.args else node.kwargs.get("input")
    info, shape = an.of(x), an.shape(x)
    supported = gates is not None and m.num_layers == 1 and not getattr(m, "proj_size", 0) and shape is not None
    hx = node.args[1] if len(node.args) > 1 else node.kwargs.get("hx")
    if not supported or hx is not None:
        raise _Unsupported(f"no pruning rule for {type(m).__name__} with several layers, projections or a given initial state")
    sfx = ["", "_reverse"] if m.bidirectional else [""]
    if isinstance(info, Chan) and info.axis == len(shape) - 1 and len(info.atoms) == m.input_size:
        for s in sfx:
            an.bind(f"{p}.weight_ih_l0{s}", 1, info.atoms)
        an.rewrite_attr(p, "input_size", info.atoms)
    elif info is not None:
        an.freeze_info(info, f"{node.name}: recurrent layer over untracked features")
    units = an.new_atoms(m.hidden_size, f"{p} (hidden units)")
    rows = np.tile(units, gates)
    for s in sfx:
        an.bind(f"{p}.weight_ih_l0{s}", 0, rows)
        an.bind(f"{p}.weight_hh_l0{s}", 0, rows)
        an.bind(f"{p}.weight_hh_l0{s}", 1, units)
        if m.bias:
            an.bind(f"{p}.bias_ih_l0{s}", 0, rows)
            an.bind(f"{p}.bias_hh_l0{s}", 0, rows)
    an.rewrite_attr(p, "hidden_size", units)
    rank = len(shape)
    output = Chan(rank - 1, np.tile(units, len(sfx)))
    state = Chan(2 if rank == 3 else 1, units)  # h_n (and c_n): (directions, N, H), unbatched (directions, H)
    return (output, (state, state) if m.mode == "LSTM" else state)


def rule_embedding(an: _Analyzer, node: Node, m: nn.Embedding) -> Info:
    p = node.target
    atoms = an.param_atoms(f"{p}.weight", 1, f"{p} (embedding dim)")
    an.rewrite_attr(p, "embedding_dim", atoms)
    shape = an.shape(node)
    chan = Chan(len(shape) - 1, atoms) if shape else None
    if chan is not None:
        an.producers[node.name] = chan
    return chan


def rule_prelu(an: _Analyzer, node: Node, m: nn.PReLU) -> Info:
    info = an.of(node.args[0])
    if m.num_parameters == 1 or not isinstance(info, Chan):
        return rule_passthrough(an, node)
    if info.axis != 1:
        an.freeze(info.atoms, f"{node.name}: PReLU weights on axis 1")
        return None
    an.bind(f"{node.target}.weight", 0, info.atoms)
    an.rewrite_attr(node.target, "num_parameters", info.atoms)
    return info


def rule_interface_gate(an: _Analyzer, node: Node, m: nn.Module) -> Info:
    info = an.of(node.args[0])
    shape = an.shape(node.args[0])
    p = node.target
    axis = m.channel_dim if m.channel_dim >= 0 else (len(shape) - 1 if shape else -1)
    if not isinstance(info, Chan) or info.axis != axis:
        for name, _ in m.named_parameters():
            an.pin(f"{p}.{name}", f"{node.name}: gate over untracked channels")
        if isinstance(info, Chan):
            an.freeze(info.atoms, f"{node.name}: gate over another axis")
        return None
    atoms = info.atoms
    if m.rank is None:
        an.bind(f"{p}.projector_delta", 0, atoms)
        an.bind(f"{p}.projector_delta", 1, atoms)
    else:
        an.bind(f"{p}.projector_u", 0, atoms)
        an.bind(f"{p}.projector_v", 0, atoms)
    an.bind(f"{p}.projector_bias", 0, atoms)
    an.bind(f"{p}.estimator_weight", 1, atoms)
    an.rewrite_attr(p, "width", atoms)
    return info


def rule_compression(an: _Analyzer, node: Node, m: nn.Module) -> Info:
    return rule_passthrough(an, node)


def rule_flatten_module(an: _Analyzer, node: Node, m: nn.Module) -> Info:
    return _reshape(an, node, node.args[0], None)


_ATTENTION_OPS = frozenset({"scaled_dot_product_attention", "matmul", "bmm", "baddbmm", "einsum", "_scaled_dot_product_flash_attention",
                            "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu"})  # fmt: skip
_LAYOUT_OPS = frozenset(
    """permute transpose contiguous clone to type_as float half mul add sub neg truediv div cat slice
    getitem unbind unsqueeze expand expand_as reshape view _unsafe_view split split_with_sizes chunk narrow select squeeze repeat repeat_interleave
    dropout alias detach""".split()
)


def _feeds_attention(node: Node, rank: int, depth: int = 12) -> bool:
    """Whether a reshaped value flows, through layout and element-wise ops (a rotary embedding, a
    scale, q/k/v unbinding, a key/value repeat), into an attention product within ``depth`` ops.
    Reshapes that merge axes back (fewer axes than the split) end the search: ShuffleNet's channel
    shuffle splits and merges, attention keeps the heads apart."""
    frontier, seen = [node], {node}
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for user in n.users:
                if user in seen:
                    continue
                seen.add(user)
                name = _op_name(user)
                if name in _ATTENTION_OPS:
                    return True
                if name not in _LAYOUT_OPS:
                    continue
                meta = user.meta.get("tensor_meta")
                shape = getattr(meta, "shape", None)
                if name in ("reshape", "view", "_unsafe_view") and shape is not None and len(shape) < rank:
                    continue
                nxt.append(user)
        frontier = nxt
    return False


def _reshape(an: _Analyzer, node: Node, src: Any, literal: dict[int, tuple[int, ...]] | None) -> Info:
    """Map channels through a row-major reshape; ``literal``: out axis -> args path of a literal size."""
    info = an.of(src)
    in_shape, out_shape = an.shape(src), an.shape(node)
    if in_shape is None or out_shape is None:
        raise _Unsupported("reshape with unknown shapes")
    if isinstance(info, ParamRef):
        squeezed_in = [(d, s) for d, s in enumerate(in_shape) if s != 1]
        squeezed_out = [d for d, s in enumerate(out_shape) if s != 1]
        if [s for _, s in squeezed_in] == [out_shape[d] for d in squeezed_out]:
            axes: list[int | None] = [None] * len(out_shape)
            for (d_in, _), d_out in zip(squeezed_in, squeezed_out):
                axes[d_out] = info.axes[d_in]
            _param_literals(an, node, info, axes, literal, out_shape)  # `scale.view(64, 1, 1)`: the 64 follows the parameter's width
            full = tuple(an.tensors[an.canon.get(info.name, info.name)].shape)
            if tuple(out_shape) == full and all(a is None or a == d for d, a in enumerate(axes)):
                return ParamRef(info.name, tuple(range(len(full))))  # back to its own shape (a 1x1 conv's size-1 dims)
            return ParamRef(info.name, tuple(axes))
        kept, lost = _kept_axes(in_shape, out_shape, info.axes)
        if not lost:  # a gathered table's rows reshaped (relative position biases): its own dims stay whole
            _param_literals(an, node, info, kept, literal, out_shape)
            return ParamRef(info.name, kept)
        merged = _merged_axes(in_shape, out_shape, info.axes)
        if merged is not None and not any(isinstance(merged[d], tuple) for d in (literal or {})):
            _param_literals(an, node, info, [a if isinstance(a, int) else None for a in merged], literal, out_shape)
            return MergedParam(info.name, merged)
        if any(a is not None for a in kept):  # a position table's tokens reshaped to a grid: the dims it loses stay whole
            _pin_param_dims(an, info, lost, f"{node.name}: parameter dim reshaped")
            _param_literals(an, node, info, kept, literal, out_shape)
            return ParamRef(info.name, kept)
        an.pin(info.name, f"{node.name}: parameter reshaped")
        return None
    if isinstance(info, MergedParam):  # back to the parameter's own shape (`reshape_as(weight)`)
        dims = [d for a in info.axes if a is not None for d in (a if isinstance(a, tuple) else (a,))]
        if not literal and dims == list(range(len(out_shape))) and tuple(out_shape) == tuple(an.tensors[an.canon.get(info.name, info.name)].shape):
            return ParamRef(info.name, tuple(range(len(out_shape))))
        an.pin(info.name, f"{node.name}: parameter reshaped")
        return None
    if not isinstance(info, Chan):
        return None
    total = math.prod(in_shape)
    if total > 50_000_000:
        an.freeze(info.atoms, f"{node.name}: reshape too large to analyse")
        return None
    bshape = [1] * len(in_shape)
    bshape[info.axis] = len(info.atoms)
    full = np.broadcast_to(info.atoms.reshape(bshape), in_shape).reshape(out_shape)
    varying = [d for d in range(len(out_shape)) if out_shape[d] > 1 and not (full == np.take(full, [0], axis=d)).all()]
    if not varying:
        return None
    index = tuple(slice(None) if d in varying else 0 for d in range(len(out_shape)))
    table = full[index]
    if len(varying) == 1:
        chan = Chan(varying[0], np.ascontiguousarray(table))
    elif an.attention == "heads" and _feeds_attention(node, len(out_shape)):
        # (…, heads, head_dim) on the way into attention: a head is one unit (its head_dim
        # positions pruned together, and the same head of any leading axis, e.g. timm's q/k/v
        # axis of a fused qkv); the channels are the heads. The rank may stay (GC ViT's global
        # query: (B, H, W, C) -> (B, H*W, heads, head_dim))
        heads = varying[-2]
        table = table.reshape(-1, out_shape[heads], out_shape[varying[-1]])
        an.union(np.broadcast_to(table[:1, :, :1], table.shape).ravel(), table.ravel())
        chan = Chan(heads, np.ascontiguousarray(table[0, :, 0]))
    else:  # split into several axes: tie each column across the leading axes (attention=dims: each head_dim position across the heads)
        free = varying[-1]
        table = table.reshape(-1, out_shape[free])
        for r in range(1, table.shape[0]):
            an.union(table[0], table[r])
        chan = Chan(free, np.ascontiguousarray(table[0]))
    if literal:
        counted = {chan.axis: chan.atoms}
        for axis, path in literal.items():
            if axis in counted:
                atoms = counted[axis]
                an.arg_rewrites.append(ArgRewrite(node.name, path, atoms, int))
    return chan


def _param_literals(an: _Analyzer, node: Node, info: ParamRef, axes: Sequence, literal: dict | None, out_shape: tuple[int, ...]) -> None:
    """A literal size in a parameter's reshape on an axis that is one of its dims (``axes[i]``)
    follows that dim's pruned width."""
    for d_out, path in (literal or {}).items():
        if axes[d_out] is not None and out_shape[d_out] > 1:
            an.arg_rewrites.append(ArgRewrite(node.name, path, an.param_atoms(info.name, axes[d_out]), int))


def _kept_axes(in_shape: tuple[int, ...], out_shape: tuple[int, ...], axes: tuple) -> tuple[tuple, list]:
    """The axes of a parameter-derived value after a reshape, for the parameter dims it keeps
    whole (row-major: an out axis of the same size with the same number of elements before it)
    while the axes that are no parameter dim (rows gathered by an index) split or merge; and the
    parameter dims that do not come through whole."""
    out: list[int | None] = [None] * len(out_shape)
    lost = []
    for d, a in enumerate(axes):
        if a is None or in_shape[d] == 1:
            continue
        before = math.prod(in_shape[:d])
        e = next((e for e, size in enumerate(out_shape) if size == in_shape[d] and math.prod(out_shape[:e]) == before), None)
        if e is None:
            lost.append(a)
        else:
            out[e] = a
    return tuple(out), lost


def _merged_axes(in_shape: tuple[int, ...], out_shape: tuple[int, ...], axes: tuple) -> tuple | None:
    """The axes of a parameter reshaped so that each value axis is one dim or a run of adjacent
    dims merged (row-major), or None when the reshape also splits a dim."""
    dims = [(d, s) for d, s in enumerate(in_shape) if s != 1]
    out: list[int | tuple[int, ...] | None] = []
    i = 0
    for size in out_shape:
        if size == 1:
            out.append(None)
            continue
        run, prod = [], 1
        while i < len(dims) and prod < size:
            run.append(axes[dims[i][0]])
            prod *= dims[i][1]
            i += 1
        if prod != size or any(a is None for a in run):
            return None
        out.append(run[0] if len(run) == 1 else tuple(run))
    return tuple(out) if i == len(dims) else None


def _shape_literals(node: Node, start: int) -> dict[int, tuple[int, ...]]:
    """Out axis -> args path, for integer literals in a view/reshape shape argument."""
    args = node.args[start:]
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        return {i: (start, i) for i, a in enumerate(args[0]) if isinstance(a, int) and a != -1}
    return {i: (start + i,) for i, a in enumerate(args) if isinstance(a, int) and a != -1}


def _size_reads(an: _Analyzer, value: Node, limit: int = 64) -> list[tuple[Node, int | None]]:
    """The (tensor node, axis) pairs a computed size reads: ``x.shape[k]``, ``x.size(k)``,
    ``x.size()[k]``, through arithmetic; (node, None) for any other tensor it depends on."""
    out: list[tuple[Node, int | None]] = []
    stack, seen = [value], set()
    while stack and len(seen) < limit:
        n = stack.pop()
        if n in seen or not isinstance(n, Node):
            continue
        seen.add(n)
        if n.op == "call_method" and n.target == "size" and len(n.args) > 1 and isinstance(n.args[1], int):
            out.append((n.args[0], n.args[1]))
            continue
        if n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[1], int) and isinstance(n.args[0], Node):
            shape_of = n.args[0]
            if (shape_of.op == "call_function" and shape_of.target is getattr and shape_of.args[1] == "shape") or (
                shape_of.op == "call_method" and shape_of.target == "size" and len(shape_of.args) == 1
            ):
                out.append((shape_of.args[0], n.args[1]))
                continue
        if n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[1], slice) and isinstance(n.args[0], Node):
            shape_of = n.args[0]  # x.shape[:-1]: the axes in the slice (timm's restore_shape + (-1,))
            rank = len(an.shape(shape_of.args[0]) or ()) if shape_of.args else 0
            if rank and shape_of.op == "call_function" and shape_of.target is getattr and shape_of.args[1] == "shape":
                out.extend((shape_of.args[0], axis) for axis in range(rank)[n.args[1]])
                continue
        if isinstance(an.info.get(n), (Chan, ParamRef)):
            out.append((n, None))
            continue
        stack.extend(n.all_input_nodes)
    return out


def _same_channels(a: np.ndarray, b: np.ndarray) -> bool:
    """The same channels, possibly shuffled or with tied blocks folded (one set holds the other)."""
    sa, sb = np.unique(a), np.unique(b)
    common = np.intersect1d(sa, sb, assume_unique=True)
    return len(common) == min(len(sa), len(sb)) > 0


def _computed_sizes(an: _Analyzer, node: Node, sizes: Any, path: tuple[int, ...] | None, start: int = 0) -> bool | list:
    """A view/reshape whose shape holds sizes computed at run time. Batch and token counts (axes
    without channels) are fine. One that counts channels (``C = x.shape[2]``;
    ``qkv.reshape(B, N, 3, heads, C // heads)``, ``y.reshape(B, N, C)``) would fall out of step
    with the reshaped value once either is pruned: when it is the only such size and the shape
    has no ``-1``, the pruned graph reshapes with ``-1`` there (the size follows the value).
    ``path``: where ``sizes`` sit in the node's args (size ``i`` at ``(*path, start + i)``; None: a
    keyword). True when a size became ``-1``, False when none counts channels, else the
    ``(index, source node, its info)`` of the sizes that do (see :func:`_computed_reshape`)."""
    listed = sizes if isinstance(sizes, (tuple, list)) else [sizes]
    reshaped = an.of(node.args[0])
    counting: list[tuple[int, Node, Info]] = []
    for i, value in enumerate(listed):
        if not isinstance(value, Node):
            continue
        for src, axis in _size_reads(an, value):
            info = an.info.get(src)
            if isinstance(info, Chan) and isinstance(reshaped, Chan) and _same_channels(info.atoms, reshaped.atoms):
                continue  # counts the reshaped value's own channels (ShuffleNet's channel shuffle): stays in step
            counts_channels = isinstance(info, ParamRef) or (
                isinstance(info, Chan) and (axis is None or _norm_axis(axis, len(an.shape(src) or (0,) * (axis + 1))) == info.axis)
            )
            if counts_channels:
                counting.append((i, src, info))
    if not counting:
        return False
    if path is not None and not _one_value_shape(an, node, sizes) and len({i for i, _, _ in counting}) == 1 and -1 not in listed:
        an.arg_rewrites.append(ArgRewrite(node.name, (*path, start + counting[0][0]), np.zeros(0, np.int64), lambda _n: -1))
        return True
    return counting


def _one_value_shape(an: _Analyzer, node: Node, sizes: Any) -> bool:
    """The shape is one computed value (a tuple: ``x.reshape(x.shape[:-1] + (-1,))``), not a list of
    sizes: none of its entries can be rewritten."""
    if not isinstance(sizes, (tuple, list)):
        return isinstance(sizes, Node)
    return len(sizes) == 1 and isinstance(sizes[0], Node) and len(an.shape(node) or ()) != 1


def _computed_reshape(an: _Analyzer, node: Node, sizes: Any, path: tuple[int, ...] | None, start: int, literal: dict) -> Info:
    """A view/reshape with sizes computed at run time (:func:`_computed_sizes`); the size of the
    axis the result's channels land on, when computed from another tensor (``y.reshape(B, N, C)``
    with ``C = x.shape[-1]`` of an untracked input), also becomes ``-1`` in the pruned graph. When
    the shape has a ``-1`` already (DaViT's ``proj(y).view(-1, 7, 7, C)``), a size counting
    channels on the result's channel axis becomes the pruned count of those channels; any other
    size counting channels leaves them and the reshaped value's channels alone."""
    counting = _computed_sizes(an, node, sizes, path, start)
    result = _reshape(an, node, node.args[0], literal)
    rewritten = counting is True
    whole = _one_value_shape(an, node, sizes)
    if isinstance(counting, list):
        if isinstance(result, Chan) and path is not None and not whole and all(i == result.axis for i, _, _ in counting):
            an.arg_rewrites.append(ArgRewrite(node.name, (*path, start + result.axis), result.atoms, int))
            rewritten = True
        else:
            reshaped = an.of(node.args[0])
            for _, src, info in counting:
                why = f"{node.name}: a size computed from the channels of '{src.name}'"
                an.freeze_info(info, why)
                an.freeze_info(reshaped, why)
    listed = list(sizes) if isinstance(sizes, (tuple, list)) else [sizes]
    if (
        isinstance(result, Chan)
        and path is not None
        and not rewritten
        and not whole
        and -1 not in listed
        and result.axis < len(listed)
        and isinstance(listed[result.axis], Node)
    ):
        an.arg_rewrites.append(ArgRewrite(node.name, (*path, start + result.axis), np.zeros(0, np.int64), lambda _n: -1))
    return result


def rule_view_method(an: _Analyzer, node: Node) -> Info:
    if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):
        return _computed_reshape(an, node, node.args[1], (1,), 0, _shape_literals(node, 1))
    return _computed_reshape(an, node, node.args[1:], (), 1, _shape_literals(node, 1))


def rule_reshape_function(an: _Analyzer, node: Node) -> Info:
    shape_arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("shape")
    literal = {i: (1, i) for i, a in enumerate(shape_arg) if isinstance(a, int) and a != -1} if isinstance(shape_arg, (tuple, list)) else {}
    return _computed_reshape(an, node, shape_arg, (1,) if len(node.args) > 1 and isinstance(shape_arg, (tuple, list)) else None, 0, literal)


def rule_flatten(an: _Analyzer, node: Node) -> Info:
    return _reshape(an, node, node.args[0], None)


def _permutation(node: Node, rank: int, name: str | None = None) -> list[int] | None:
    name = name or _op_name(node)
    args = list(node.args[1:])
    if name == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        if not dims and "dims" in node.kwargs:
            dims = node.kwargs["dims"]
        return [_norm_axis(d, rank) for d in dims] if all(isinstance(d, int) for d in dims) else None
    if name in ("transpose", "swapaxes", "swapdims"):
        d0, d1 = (args + [node.kwargs.get("dim0"), node.kwargs.get("dim1")])[:2]
        if not isinstance(d0, int) or not isinstance(d1, int):
            return None
        perm = list(range(rank))
        a, b = _norm_axis(d0, rank), _norm_axis(d1, rank)
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    if name in ("t", "numpy_T"):  # `x.t()`, `x.T` (every dim reversed)
        return list(reversed(range(rank)))
    if name in ("mT", "mH", "matrix_H", "adjoint"):  # `x.mT`, `x.mH`, `x.adjoint()`: the last two dims
        if rank < 2:
            return None
        return [*range(rank - 2), rank - 1, rank - 2]
    if name == "movedim":
        src, dst = args[0], args[1]
        if not isinstance(src, int) or not isinstance(dst, int):
            return None
        order = list(range(rank))
        s = order.pop(_norm_axis(src, rank))
        order.insert(_norm_axis(dst, rank), s)
        return order
    return None


def rule_permute(an: _Analyzer, node: Node, name: str | None = None) -> Info:
    info = an.of(node.args[0])
    shape = an.shape(node.args[0])
    if info is None or shape is None:
        return None
    perm = _permutation(node, len(shape), name)
    if perm is None:
        raise _Unsupported("permutation with computed dims")
    if isinstance(info, Chan):
        return Chan(perm.index(info.axis), info.atoms)
    if isinstance(info, ParamRef):
        return ParamRef(info.name, tuple(info.axes[p] for p in perm))
    return None


def rule_expand(an: _Analyzer, node: Node) -> Info:
    info = an.of(node.args[0])
    in_shape, out_shape = an.shape(node.args[0]), an.shape(node)
    if info is None or in_shape is None or out_shape is None:
        return None
    offset = len(out_shape) - len(in_shape)
    if isinstance(info, Chan):
        axis = info.axis + offset
        literal = _shape_literals(node, 1).get(axis) if _op_name(node) == "expand" else None
        if literal is not None:  # `k[:, :, None].expand(B, kv_heads, g, N, D)`: the width follows the channels
            an.arg_rewrites.append(ArgRewrite(node.name, literal, info.atoms, int))
        return Chan(axis, info.atoms)
    if isinstance(info, ParamRef):
        axes = [None] * offset + [a if in_shape[i] == out_shape[i + offset] else None for i, a in enumerate(info.axes)]
        return ParamRef(info.name, tuple(axes))
    return None


def rule_expand_as(an: _Analyzer, node: Node) -> Info:
    """``x.expand_as(other)``: an expand to ``other``'s shape, which decides the channel axis's
    width at run time, so ``x``'s channels and ``other``'s on that axis are one group (when ``x``
    broadcasts there, the result has ``other``'s channels)."""
    x, other = node.args[0], node.args[1]
    info, oinfo = an.of(x), an.of(other)
    in_shape, out_shape = an.shape(x), an.shape(node)
    if in_shape is None or out_shape is None:
        return None
    offset = len(out_shape) - len(in_shape)
    if isinstance(info, Chan):
        axis = info.axis + offset
        if isinstance(oinfo, Chan) and oinfo.axis == axis:
            an.union(info.atoms, oinfo.atoms)
            return Chan(axis, info.atoms)
        an.freeze(info.atoms, f"{node.name}: expanded to the shape of a tensor whose channels are not tracked")
        return None
    if isinstance(oinfo, Chan) and (oinfo.axis - offset < 0 or in_shape[oinfo.axis - offset] == 1):
        return Chan(oinfo.axis, oinfo.atoms)
    if isinstance(oinfo, Chan):
        an.freeze(oinfo.atoms, f"{node.name}: a tensor with untracked channels expanded to these")
    if isinstance(info, ParamRef):
        an.pin(info.name, f"{node.name}: parameter expanded")
    return None


def rule_repeat(an: _Analyzer, node: Node) -> Info:
    """``x.repeat(*sizes)``: tiles ``x``; ``k`` copies along the channel axis carry the channels ``k``
    times over (removing a channel removes every copy)."""
    info = an.of(node.args[0])
    in_shape = an.shape(node.args[0])
    sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    if in_shape is None or not isinstance(sizes, (list, tuple)):
        raise _Unsupported("repeat with computed sizes")
    offset = len(sizes) - len(in_shape)
    if isinstance(info, Chan):
        axis = info.axis + offset
        k = sizes[axis]
        if not isinstance(k, int):  # a count computed at run time elsewhere (XCiT's pos.repeat(B, 1, 1, 1)) is fine
            raise _Unsupported("repeat along the channel axis with a computed count")
        return Chan(axis, info.atoms if k == 1 else np.tile(info.atoms, k))
    if isinstance(info, ParamRef):
        if all(sizes[d + offset] == 1 for d, a in enumerate(info.axes) if a is not None and in_shape[d] > 1):
            return ParamRef(info.name, (None,) * offset + tuple(info.axes))
        an.pin(info.name, f"{node.name}: parameter repeated")
    return None


def rule_repeat_interleave(an: _Analyzer, node: Node) -> Info:
    """``x.repeat_interleave(k, dim)``: every entry ``k`` times along ``dim``. Channels on another
    axis pass through (GC ViT repeats a global query over the batch's windows); on the channel
    axis each channel's ``k`` copies carry it; without ``dim`` the tensor is flattened."""
    info = an.of(node.args[0])
    shape = an.shape(node.args[0])
    repeats = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if isinstance(info, Chan) and shape is not None and isinstance(dim, int):
        dim = _norm_axis(dim, len(shape))
        if dim != info.axis:
            return Chan(info.axis, info.atoms)
        if isinstance(repeats, int):
            return Chan(dim, np.repeat(info.atoms, repeats))
    an.freeze_info(info, f"{node.name}: repeat_interleave over the channels")
    return None


def rule_roll(an: _Analyzer, node: Node) -> Info:
    """``torch.roll(x, shifts, dims)``: a cyclic shift (Swin's shifted windows); channels on an axis
    it does not shift pass through, a shift across them or of the flattened tensor mixes them."""
    info = an.of(node.args[0])
    shape = an.shape(node.args[0])
    dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dims")
    dims = [dims] if isinstance(dims, int) else dims
    if isinstance(info, Chan) and shape is not None and isinstance(dims, (list, tuple)) and dims and all(isinstance(d, int) for d in dims):
        if info.axis not in [_norm_axis(d, len(shape)) for d in dims]:
            return Chan(info.axis, info.atoms)
    an.freeze_info(info, f"{node.name}: rolls the channels")
    return None


def rule_unfold(an: _Analyzer, node: Node) -> Info:
    """``x.unfold(dim, size, step)``: sliding windows along ``dim``, each window a new last axis
    (HaloNet's overlapping key/value blocks). Channels on another axis keep their axis; windows
    across the channels mix them."""
    info = an.of(node.args[0])
    shape = an.shape(node.args[0])
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dimension")
    if isinstance(info, Chan) and shape is not None and isinstance(dim, int) and _norm_axis(dim, max(len(shape), 1)) != info.axis:
        return Chan(info.axis, info.atoms)
    an.freeze_info(info, f"{node.name}: unfolds windows across the channels")
    return None


def rule_im2col(an: _Analyzer, node: Node, *_: Any) -> Info:
    """``F.unfold`` / ``nn.Unfold`` (im2col): ``(N, C, H, W) -> (N, C*k, L)``, each channel's
    ``k`` kernel taps contiguous on axis 1 (VOLO's outlook attention): the taps carry their
    channel."""
    info = an.of(node.args[0])
    shape, out = an.shape(node.args[0]), an.shape(node)
    if isinstance(info, Chan) and info.axis == 1 and shape is not None and out is not None and len(shape) == 4 and len(out) == 3:
        if shape[1] == len(info.atoms) and out[1] % shape[1] == 0:
            return Chan(1, np.repeat(info.atoms, out[1] // shape[1]))
    an.freeze_info(info, f"{node.name}: im2col over untracked channels")
    return None


def rule_col2im(an: _Analyzer, node: Node, *_: Any) -> Info:
    """``F.fold`` / ``nn.Fold`` (col2im): ``(N, C*k, L) -> (N, C, H, W)``, summing each channel's
    ``k`` taps: channels whose taps all carry the same channel come out as that channel."""
    info = an.of(node.args[0])
    shape, out = an.shape(node.args[0]), an.shape(node)
    if isinstance(info, Chan) and info.axis == 1 and shape is not None and out is not None and len(shape) == 3 and len(out) == 4:
        if out[1] and shape[1] == len(info.atoms) and shape[1] % out[1] == 0:
            taps = info.atoms.reshape(out[1], shape[1] // out[1])
            if (taps == taps[:, :1]).all():
                return Chan(1, taps[:, 0].copy())
    an.freeze_info(info, f"{node.name}: col2im over untracked channels")
    return None


def rule_cat(an: _Analyzer, node: Node) -> Info:
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    out_shape = an.shape(node)
    if out_shape is None or not isinstance(dim, int):
        raise _Unsupported("cat with unknown shapes")
    dim = _norm_axis(dim, len(out_shape))
    infos = [an.of(t) for t in tensors]
    if len(out_shape) == 1:  # vectors of parameters (BEiT's q, k, v biases): their entries are channels
        infos = [_vector_channels(an, i) for i in infos]
    if any(isinstance(i, Chan) and i.axis == dim for i in infos):
        parts = []
        for t, i in zip(tensors, infos):
            size = an.shape(t)[dim]
            if isinstance(i, Chan) and i.axis == dim:
                parts.append(i.atoms)
            else:
                fresh = an.new_atoms(size, f"{node.name} (untracked part)")
                an.freeze(fresh, f"{node.name}: concatenated with untracked channels")
                an.freeze_info(i, f"{node.name}: channels on another axis than the concatenation")
                parts.append(fresh)
        return Chan(dim, np.concatenate(parts))
    return _combine(an, node, list(tensors), out_shape)


def _vector_channels(an: _Analyzer, info: Info) -> Info:
    """A one-dimensional parameter or buffer as a value whose entries are channels (its dim 0's
    atoms); anything else unchanged."""
    if isinstance(info, ParamRef) and info.axes == (0,) and an.tensors[an.canon.get(info.name, info.name)].dim() == 1:
        return Chan(0, an.param_atoms(info.name, 0, f"{info.name} (entries)"))
    return info


def rule_stack(an: _Analyzer, node: Node) -> Info:
    tensors = node.args[0]
    out = _combine(an, node, list(tensors), an.shape(tensors[0]) if tensors else None)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if isinstance(out, Chan) and isinstance(dim, int):
        rank = len(an.shape(node))
        return Chan(out.axis + (1 if _norm_axis(dim, rank) <= out.axis else 0), out.atoms)
    return None


def rule_chunk_split(an: _Analyzer, node: Node) -> Info:
    name = _op_name(node)
    src = node.args[0]
    info = an.of(src)
    shape = an.shape(src)
    if name == "split_with_sizes":
        name = "split"
    if name == "chunk":
        n = node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks")
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    else:
        n = node.args[1] if len(node.args) > 1 else node.kwargs.get("split_size_or_sections", node.kwargs.get("split_size", node.kwargs.get("split_sizes")))
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if shape is None or not isinstance(dim, int):
        raise _Unsupported("split with unknown shapes")
    dim = _norm_axis(dim, len(shape))
    size = shape[dim]
    if name == "chunk":
        step = -(-size // n)
        sizes = [min(step, size - i) for i in range(0, size, step)]
    elif isinstance(n, int):
        sizes = [min(n, size - i) for i in range(0, size, n)]
    elif isinstance(n, (list, tuple)) and all(isinstance(s, int) for s in n):
        sizes = list(n)
    else:
        raise _Unsupported("split with computed sizes")
    if isinstance(info, Chan) and info.axis == dim:
        if name == "split" and isinstance(n, (list, tuple)):
            pieces, start = [], 0
            for i, s in enumerate(sizes):
                atoms = info.atoms[start : start + s]
                an.arg_rewrites.append(ArgRewrite(node.name, (1, i), atoms, int))
                an.keep_some(atoms)
                pieces.append(Chan(dim, atoms))
                start += s
            return tuple(pieces)
        if len(set(sizes)) != 1:
            an.freeze(info.atoms, f"{node.name}: uneven {name} along the channel axis")
            return tuple(None for _ in sizes)
        if name == "split" and len(node.args) < 2:
            raise _Unsupported("split with its size as a keyword")
        an.tie(info.atoms, len(sizes))
        table = info.atoms.reshape(len(sizes), -1)
        if name == "split":  # an int piece size shrinks with the pieces (chunk's count does not change)
            an.arg_rewrites.append(ArgRewrite(node.name, (1,), table[0], int))
        return tuple(Chan(dim, table[i]) for i in range(len(sizes)))
    if isinstance(info, ParamRef):
        an.pin(info.name, f"{node.name}: parameter split")
        return tuple(None for _ in sizes)
    return tuple(info for _ in sizes)


def rule_getitem(an: _Analyzer, node: Node) -> Info:
    src, idx = node.args[0], node.args[1]
    info = an.of(src)
    if isinstance(info, tuple):
        return info[idx] if isinstance(idx, int) and -len(info) <= idx < len(info) else None
    in_shape = an.shape(src)
    if info is None or in_shape is None or not isinstance(src, Node) or an.shape(node) is None:
        return None
    idx = idx if isinstance(idx, tuple) else (idx,)
    tensor_at = [k for k, i in enumerate(idx) if isinstance(i, Node)]
    if len(tensor_at) == 1 and all(i == slice(None) for k, i in enumerate(idx) if k != tensor_at[0]):
        return _gather(an, node, info, in_shape, tensor_at[0], idx[tensor_at[0]])
    if any(isinstance(i, Node) or (not isinstance(i, (int, slice)) and i is not None and i is not Ellipsis) for i in idx):
        an.freeze_info(info, f"{node.name}: advanced indexing")
        return None
    # expand the ellipsis
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    positions: list[int | None] = []  # where each entry sits in the index tuple (None: implied)
    for pos, i in enumerate(idx):
        if i is Ellipsis:
            expanded += [slice(None)] * (len(in_shape) - n_real)
            positions += [None] * (len(in_shape) - n_real)
        else:
            expanded.append(i)
            positions.append(pos)
    pad = len(in_shape) - sum(1 for i in expanded if i is not None)
    expanded += [slice(None)] * pad
    positions += [None] * pad
    mapping: dict[int, int | None] = {}
    partial: dict[int, tuple[int, slice, int | None]] = {}  # in axis -> (out axis, slice, position)
    out_axis = 0
    in_axis = 0
    for i, pos in zip(expanded, positions):
        if i is None:
            out_axis += 1
            continue
        if isinstance(i, int):
            mapping[in_axis] = None
        else:
            full = i == slice(None) or (i.start in (None, 0) and i.stop is None and i.step in (None, 1))
            mapping[in_axis] = out_axis if full else -1
            if not full:
                partial[in_axis] = (out_axis, i, pos)
            out_axis += 1
        in_axis += 1
    if isinstance(info, Chan):
        target = mapping.get(info.axis)
        if target == -1:
            kept = _channel_slice(an, node, info, in_shape[info.axis], *partial[info.axis])
            if kept is not None:
                return kept
        if target is None or target == -1:
            an.freeze(info.atoms, f"{node.name}: slices the channel axis")
            return None
        return Chan(target, info.atoms)
    if isinstance(info, ParamRef):
        axes: list[int | None] = [None] * len(an.shape(node))
        for a_in, a_out in mapping.items():
            if a_out is not None and a_out >= 0:
                axes[a_out] = info.axes[a_in]
            elif a_out == -1 or (a_out is None and info.axes[a_in] is not None and in_shape[a_in] > 1):
                an.pin(info.name, f"{node.name}: parameter indexed")
                return None
        return ParamRef(info.name, tuple(axes))
    return None


def _gather(an: _Analyzer, node: Node, info: Info, in_shape: tuple[int, ...], axis: int, index: Node) -> Info:
    """``x[:, idx]`` with one integer tensor ``idx`` (LeViT's ``attention_biases[:, bias_idxs]``):
    axis ``axis`` is replaced by ``idx``'s axes; channels (or a parameter's dims) on other axes
    pass through, channels on ``axis`` itself are left alone."""
    idx_shape = an.shape(index)
    meta = index.meta.get("tensor_meta")
    if idx_shape is None or meta is None or meta.dtype.is_floating_point or meta.dtype == torch.bool:
        an.freeze_info(info, f"{node.name}: advanced indexing")
        return None

    def moved(a: int) -> int:
        return a if a < axis else a - 1 + len(idx_shape)

    if isinstance(info, Chan):
        if info.axis == axis:
            an.freeze(info.atoms, f"{node.name}: gathers along the channel axis")
            return None
        return Chan(moved(info.axis), info.atoms)
    if isinstance(info, ParamRef):
        dim = info.axes[axis]
        if dim is not None and (an.canon.get(info.name, info.name), dim) in an.bindings:
            an.pin(info.name, f"{node.name}: parameter gathered along a dim that carries channels")
        axes: list[int | None] = [None] * (len(in_shape) - 1 + len(idx_shape))
        for a, t in enumerate(info.axes):
            if a != axis:
                axes[moved(a)] = t
        return ParamRef(info.name, tuple(axes))
    return None


def rule_index(an: _Analyzer, node: Node) -> Info:
    """``aten.index.Tensor(x, [None, idx])``: ``x[:, idx]`` as ``torch.export`` writes it."""
    src, indices = node.args[0], node.args[1]
    info, shape = an.of(src), an.shape(src)
    if info is None or shape is None:
        return None
    tensors = [k for k, i in enumerate(indices) if i is not None]
    if len(tensors) == 1 and isinstance(indices[tensors[0]], Node):
        return _gather(an, node, info, shape, tensors[0], indices[tensors[0]])
    an.freeze_info(info, f"{node.name}: advanced indexing")
    return None


def _channel_slice(an: _Analyzer, node: Node, info: Chan, size: int, out_axis: int, sl: slice, pos: int | None) -> Info:
    """``x[:, :c]`` or ``x[:, c:]`` along the channels (GhostNet keeps the first ``out_chs`` of a
    concatenation): the kept channels are a prefix or suffix of the atoms, and after pruning
    the bound becomes the number of kept atoms before it (pruning keeps the order). Other
    slices (steps, both bounds) return None: the caller leaves the group alone."""
    start, stop, step = sl.start, sl.stop, sl.step
    if pos is None or step not in (None, 1) or not all(v is None or isinstance(v, int) for v in (start, stop)):
        return None
    start = 0 if start is None else (start + size if start < 0 else start)
    stop = size if stop is None else (stop + size if stop < 0 else stop)
    start, stop = max(0, min(start, size)), max(0, min(stop, size))
    path = (1, pos) if isinstance(node.args[1], tuple) else (1,)
    if start == 0 and 0 < stop <= size:  # (stop == size: a slice that keeps everything, spelt with the width)
        an.arg_rewrites.append(ArgRewrite(node.name, path, info.atoms[:stop], lambda n: slice(None, n, None)))
        an.keep_some(info.atoms[:stop])
        return Chan(out_axis, info.atoms[:stop])
    if stop == size and 0 < start < size:
        an.arg_rewrites.append(ArgRewrite(node.name, path, info.atoms[:start], lambda n: slice(n, None, None)))
        an.keep_some(info.atoms[start:])
        return Chan(out_axis, info.atoms[start:])
    return None


def rule_slice(an: _Analyzer, node: Node) -> Info:
    """``aten.slice.Tensor(x, dim, start, end, step)`` (``x[:, :c]`` as ``torch.export`` writes it):
    a prefix or suffix of the channels, with the bound following the kept channels, like
    :func:`_channel_slice`; slices of other axes pass the channels through."""
    args = list(node.args) + [None] * (5 - len(node.args))
    x, dim, start, end, step = args[:5]
    dim = 0 if dim is None else dim
    info, shape = an.of(x), an.shape(x)
    if shape is None or not all(v is None or isinstance(v, int) for v in (dim, start, end, step)):
        raise _Unsupported("slice with computed bounds")
    dim = _norm_axis(dim, len(shape))
    size = shape[dim]
    lo = 0 if start is None else (start + size if start < 0 else start)
    hi = size if end is None else (end + size if end < 0 else end)
    lo, hi = max(0, min(lo, size)), max(0, min(hi, size))
    full = lo == 0 and hi == size and step in (None, 1)
    if isinstance(info, ParamRef):
        if not full and info.axes[dim] is not None and size > 1:
            an.pin(info.name, f"{node.name}: parameter sliced")
            return None
        return info
    if not isinstance(info, Chan) or info.axis != dim or full:
        return info if isinstance(info, Chan) else None
    if step in (None, 1) and lo == 0 and len(node.args) > 3:
        an.arg_rewrites.append(ArgRewrite(node.name, (3,), info.atoms[:hi], int))
        an.keep_some(info.atoms[:hi])
        return Chan(dim, info.atoms[:hi])
    if step in (None, 1) and hi == size and len(node.args) > 2:
        an.arg_rewrites.append(ArgRewrite(node.name, (2,), info.atoms[:lo], int))
        an.keep_some(info.atoms[lo:])
        return Chan(dim, info.atoms[lo:])
    an.freeze(info.atoms, f"{node.name}: slices the channel axis")
    return None


def _reduction(an: _Analyzer, node: Node, dims_at: int, keepdim_at: int | None = None, out_shape: Any = ...) -> Info:
    """A reduction whose ``dim`` is positional argument ``dims_at`` (``keepdim`` the next one, or
    ``keepdim_at``); ``out_shape``: the result's shape when the node's own is not one tensor's."""
    keepdim_at = dims_at + 1 if keepdim_at is None else keepdim_at
    dims = node.args[dims_at] if len(node.args) > dims_at else node.kwargs.get("dim")
    keepdim = node.args[keepdim_at] if len(node.args) > keepdim_at else node.kwargs.get("keepdim", False)
    return _reduce(an, node, dims, keepdim, an.shape(node) if out_shape is ... else out_shape)


def _reduce(an: _Analyzer, node: Node, dims: Any, keepdim: Any, out_shape: tuple[int, ...] | None) -> Info:
    info = an.of(node.args[0])
    in_shape = an.shape(node.args[0])
    if not isinstance(info, (Chan, ParamRef)) or in_shape is None:
        return None
    if isinstance(info, ParamRef):
        an.pin(info.name, f"{node.name}: parameter reduced")
        return None
    if dims is None:  # over everything: a scalar
        return None
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not all(isinstance(d, int) for d in dims):
        raise _Unsupported("reduction over computed dims")
    dims = [_norm_axis(d, len(in_shape)) for d in dims]
    if info.axis in dims:
        return None
    axis = info.axis if keepdim else info.axis - sum(1 for d in dims if d < info.axis)
    if out_shape is None or len(out_shape) <= axis:
        return None
    return Chan(axis, info.atoms)


def rule_reduce(an: _Analyzer, node: Node) -> Info:
    """``mean``/``sum``/``amax`` over ``dim``: channels on a kept axis pass through."""
    return _reduction(an, node, 1)


def rule_norm(an: _Analyzer, node: Node) -> Info:
    """``x.norm(p, dim, keepdim)``, ``torch.norm`` and ``torch.linalg.vector_norm(x, ord, dim,
    keepdim)`` (ConvNeXt-V2's GRN): a reduction whose dims come after the order argument."""
    return _reduction(an, node, 2)


def rule_var(an: _Analyzer, node: Node) -> Info:
    """``var``/``std`` (``torch.var(x, dim, unbiased, keepdim)`` or ``correction=``/``keepdim=``
    keywords; ``aten.var.correction``): a reduction, ``keepdim`` fourth when positional.
    ``var_mean``/``std_mean`` return both statistics, each with the reduction's channels."""
    keepdim_at = 3 if len(node.args) > 3 else 99
    if _op_name(node) in ("var_mean", "std_mean"):
        shapes = node.meta.get("tensor_meta")
        shape = tuple(shapes[0].shape) if isinstance(shapes, (tuple, list)) and shapes and hasattr(shapes[0], "shape") else None
        info = _reduction(an, node, 1, keepdim_at, out_shape=shape)
        return (info, info)
    return _reduction(an, node, 1, keepdim_at)


def rule_logsumexp(an: _Analyzer, node: Node) -> Info:
    """``logsumexp(x, dim, keepdim)``: a reduction (a router's z-loss over its experts)."""
    return _reduction(an, node, 1)


def _selection(an: _Analyzer, node: Node, dim: Any, keepdim: bool, what: str) -> Info:
    """(values, indices) of a selection along ``dim`` (``topk``, ``max``/``min`` with a dim): channels
    on another axis go to both; selecting along the channel axis itself (a router's top-k of its
    experts) leaves those channels alone, since the indices name channels."""
    info = an.of(node.args[0])
    shape = an.shape(node.args[0])
    if isinstance(info, ParamRef):
        an.pin(info.name, f"{node.name}: parameter {what}")
        return (None, None)
    if not isinstance(info, Chan) or shape is None:
        return (None, None)
    if not isinstance(dim, int):
        raise _Unsupported(f"{what} over a computed dim")
    dim = _norm_axis(dim, len(shape))
    if dim == info.axis:
        an.freeze(info.atoms, f"{node.name}: {what} along the channel axis (the indices name channels)")
        return (None, None)
    axis = info.axis if keepdim or info.axis < dim else info.axis - 1
    return (Chan(axis, info.atoms), Chan(axis, info.atoms))


def rule_topk(an: _Analyzer, node: Node) -> Info:
    """``topk(x, k, dim=-1, largest, sorted)``."""
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1)
    return _selection(an, node, dim, True, "top-k")


def rule_max_dim(an: _Analyzer, node: Node) -> Info:
    """``max(x, dim, keepdim)`` / ``min``: values and indices along ``dim``."""
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    return _selection(an, node, dim, bool(keepdim), "max/min")


def rule_grouped_mm(an: _Analyzer, node: Node) -> Info:
    """``grouped_mm(x, W, offs)`` (mixture-of-experts layers: transformers'
    ``grouped_mm_fallback``, ``aten._grouped_mm``): rows of ``x`` (S, K) sorted by expert, ``W``
    (experts, K, N) a parameter; like a linear layer whose weight is shared by every expert, so
    ``K`` binds to ``W``'s axis 1 and the output's ``N`` channels are ``W``'s axis 2 (the experts
    axis is kept)."""
    x = node.args[0]
    w = an.of(node.args[1] if len(node.args) > 1 else node.kwargs.get("mat_b", node.kwargs.get("weight")))
    shape = an.shape(x)
    bias = node.kwargs.get("bias", node.args[3] if len(node.args) > 3 else None)
    if not isinstance(w, ParamRef) or len(w.axes) != 3 or w.axes[0] is None or shape is None or len(shape) != 2 or bias is not None:
        raise _Unsupported("grouped matmul with computed weights")
    k_dim, n_dim = w.axes[1], w.axes[2]
    if k_dim is None or n_dim is None:
        raise _Unsupported("grouped matmul with computed weights")
    info = an.of(x)
    if isinstance(info, Chan) and info.axis == 1:
        an.bind(w.name, k_dim, info.atoms)
    elif isinstance(info, Chan):
        an.freeze(info.atoms, f"{node.name}: grouped matmul over a non-channel axis")
    elif isinstance(info, ParamRef):
        an.pin(info.name, f"{node.name}: parameter fed to a grouped matmul")
    out = an.param_atoms(w.name, n_dim, f"{w.name} (out features)")
    chan = Chan(1, out)
    an.producers[node.name] = chan
    return chan


def rule_unbind(an: _Analyzer, node: Node) -> Info:
    """``qkv.unbind(0)`` (timm attention): one output per index of ``dim``; channels on another
    axis go to every output, channels on ``dim`` itself are left alone."""
    info = an.of(node.args[0])
    in_shape = an.shape(node.args[0])
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if in_shape is None or not isinstance(dim, int):
        raise _Unsupported("unbind with unknown shapes")
    dim = _norm_axis(dim, len(in_shape))
    n = in_shape[dim]
    if isinstance(info, Chan):
        if info.axis == dim:
            an.freeze(info.atoms, f"{node.name}: unbind along the channel axis")
            return tuple(None for _ in range(n))
        axis = info.axis - (1 if info.axis > dim else 0)
        return tuple(Chan(axis, info.atoms) for _ in range(n))
    if isinstance(info, ParamRef):
        an.pin(info.name, f"{node.name}: parameter unbound")
    return tuple(None for _ in range(n))


def rule_reshape_as(an: _Analyzer, node: Node) -> Info:
    """``x.reshape_as(y)`` / ``x.view_as(y)``: a reshape to ``y``'s (traced) shape."""
    return _reshape(an, node, node.args[0], None)


def rule_sdpa(an: _Analyzer, node: Node) -> Info:
    """``F.scaled_dot_product_attention(q, k, v)``: q and k share their last axis (contracted),
    the output has v's. Pruning that axis of q/k keeps the softmax scale of the original width
    (``scale=`` is set to ``1/sqrt(E)`` of the unpruned graph when it was implicit)."""
    q, k, v = (node.args + (None, None, None))[:3] if len(node.args) >= 3 else (node.kwargs.get("query"), node.kwargs.get("key"), node.kwargs.get("value"))
    iq, ik, iv = an.of(q), an.of(k), an.of(v)
    shape_q, shape_v = an.shape(q), an.shape(v)
    if shape_q is None or shape_v is None:
        raise _Unsupported("attention with unknown shapes")
    heads = len(shape_q) - 3
    if heads >= 0 and any(isinstance(i, Chan) and i.axis == heads for i in (iq, ik, iv)):
        return _sdpa_heads(an, node, heads, (q, k, v), (iq, ik, iv))
    last = len(shape_q) - 1
    if isinstance(iq, Chan) and isinstance(ik, Chan) and iq.axis == ik.axis == last:
        an.union(iq.atoms, ik.atoms)
        if node.kwargs.get("scale") is None and len(node.args) < 7:
            scale = 1.0 / math.sqrt(shape_q[-1])
            an.arg_rewrites.append(ArgRewrite(node.name, ("scale",), iq.atoms, lambda _n, s=scale: s))
    else:
        an.freeze_info(iq, f"{node.name}: attention query channels not on the last axis")
        an.freeze_info(ik, f"{node.name}: attention key channels not on the last axis")
    for extra in list(node.args[3:]) + [node.kwargs.get("attn_mask")]:
        an.freeze_info(an.of(extra) if isinstance(extra, Node) else None, f"{node.name}: attention mask")
    if isinstance(iv, Chan) and iv.axis == len(shape_v) - 1:
        return Chan(iv.axis, iv.atoms)
    an.freeze_info(iv, f"{node.name}: attention value channels not on the last axis")
    return None


def _sdpa_heads(an: _Analyzer, node: Node, axis: int, qkv: tuple, infos: tuple) -> Info:
    """Attention over channels that are whole heads (axis -3 of ``(…, heads, tokens, head_dim)``):
    query, key and value heads are pruned together; with grouped-query attention
    (``enable_gqa``: ``g`` query heads per key/value head) a key/value head and its ``g`` query
    heads are one unit. A mask or bias with one slice per head follows the heads."""
    iq, ik, iv = infos
    if not all(isinstance(i, Chan) and i.axis == axis for i in infos):
        for i in infos:
            an.freeze_info(i, f"{node.name}: attention heads of query, key and value not all tracked")
        return None
    an.union(ik.atoms, iv.atoms)
    nq, nk = len(iq.atoms), len(ik.atoms)
    if nq == nk:
        an.union(iq.atoms, ik.atoms)
    elif nk and nq % nk == 0:  # grouped-query attention: query head h reads key/value head h // g
        g = nq // nk
        an.union(iq.atoms, np.repeat(ik.atoms, g))
    else:
        for i in infos:
            an.freeze(i.atoms, f"{node.name}: {nq} query heads over {nk} key/value heads")
        return None
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    shape_o = an.shape(node)
    if isinstance(mask, Node) and shape_o is not None:
        mshape = an.shape(mask)
        offset = len(shape_o) - len(mshape) if mshape is not None else 0
        own = axis - offset
        if mshape is not None and own >= 0 and mshape[own] > 1:
            info = an.of(mask)
            if isinstance(info, Chan) and info.axis == own:
                an.union(info.atoms, iq.atoms)
            elif isinstance(info, ParamRef) and info.axes[own] is not None:
                an.bind(info.name, info.axes[own], iq.atoms)
            else:
                an.freeze(iq.atoms, f"{node.name}: an attention mask with one slice per head")
    return Chan(axis, iq.atoms)


def rule_matmul(an: _Analyzer, node: Node) -> Info:
    a, b = node.args[0], node.args[1]
    ia, ib = an.of(a), an.of(b)
    sa, sb, so = an.shape(a), an.shape(b), an.shape(node)
    if sa is None or sb is None or so is None or len(sa) < 2 or len(sb) < 2:
        raise _Unsupported("matmul of vectors or unknown shapes")
    ka, kb = len(sa) - 1, len(sb) - 2
    out: Info = None
    # contracted axis
    ca = ia.atoms if isinstance(ia, Chan) and ia.axis == ka else None
    cb = ib.atoms if isinstance(ib, Chan) and ib.axis == kb else None
    if ca is not None and cb is not None:
        an.union(ca, cb)
    elif ca is not None:
        if isinstance(ib, ParamRef) and ib.axes[kb] is not None:
            an.bind(ib.name, ib.axes[kb], ca)
        else:
            an.freeze(ca, f"{node.name}: contracted with untracked channels")
    elif cb is not None:
        if isinstance(ia, ParamRef) and ia.axes[ka] is not None:
            an.bind(ia.name, ia.axes[ka], cb)
        else:
            an.freeze(cb, f"{node.name}: contracted with untracked channels")
    # free axes
    if isinstance(ia, Chan) and ia.axis == len(sa) - 2:
        out = Chan(len(so) - 2, ia.atoms)
    if isinstance(ib, Chan) and ib.axis == len(sb) - 1:
        if out is not None:
            an.freeze(ib.atoms, f"{node.name}: channels on both matmul outputs")
        else:
            out = Chan(len(so) - 1, ib.atoms)
    elif isinstance(ib, ParamRef) and ib.axes[len(sb) - 1] is not None and (ca is not None or ia is None) and out is None:
        atoms = an.param_atoms(ib.name, ib.axes[len(sb) - 1], f"{node.name} (out features)")
        out = Chan(len(so) - 1, atoms)
        an.producers[node.name] = out
    batch_a = len(so) - len(sa) + ia.axis if isinstance(ia, Chan) and ia.axis < len(sa) - 2 else None
    batch_b = len(so) - len(sb) + ib.axis if isinstance(ib, Chan) and ib.axis < len(sb) - 2 else None
    if (batch_a is not None or batch_b is not None) and out is None:
        # channels on a batch axis (attention heads in q @ k^T, attn @ v): broadcast like an
        # element-wise op; the other side must have the same channels there or size 1
        axis = batch_a if batch_a is not None else batch_b
        ok = True
        for i, side in ((ia, sa), (ib, sb)):
            own = axis - (len(so) - len(side))
            if own < 0 or side[own] == 1:
                continue
            if not (isinstance(i, Chan) and i.axis == own):
                ok = False
        if ok and (batch_a is None or batch_b is None or batch_a == batch_b):
            if batch_a is not None and batch_b is not None:
                an.union(ia.atoms, ib.atoms)
            return Chan(axis, (ia if batch_a is not None else ib).atoms)
    for i, side in ((ia, sa), (ib, sb)):
        if isinstance(i, Chan) and i.axis < len(side) - 2:
            an.freeze(i.atoms, f"{node.name}: channels on a matmul batch axis")
        if isinstance(i, ParamRef) and i is not ib:
            an.pin(i.name, f"{node.name}: parameter in a matmul")
    return out


def _einsum_labels(equation: str, shapes: list[tuple[int, ...]]) -> tuple[list[list[str]], list[str]] | None:
    """Per operand and for the output, the label of every axis of an explicit (``->``)
    equation; ``...`` becomes one label per broadcast axis, aligned from the right."""
    equation = equation.replace(" ", "")
    if "->" not in equation:
        return None
    lhs, rhs = equation.split("->")
    terms = lhs.split(",")
    if len(terms) != len(shapes):
        return None
    width = max((len(s) - len(t.replace("...", "")) for t, s in zip(terms, shapes) if "..." in t), default=0)

    def expand(term: str, rank: int | None) -> list[str] | None:
        if "..." not in term:
            return list(term)
        head, tail = term.split("...")
        n = (rank - len(head) - len(tail)) if rank is not None else width
        return [*head, *(f"...{width - n + i}" for i in range(n)), *tail]

    ops = [expand(t, len(s)) for t, s in zip(terms, shapes)]
    out = expand(rhs, None)
    if any(o is None or len(o) != len(s) for o, s in zip(ops, shapes)) or out is None:
        return None
    return ops, out


def rule_einsum(an: _Analyzer, node: Node) -> Info:
    """``torch.einsum(eq, a, b, …)`` / ``aten.einsum(eq, [a, b, …])`` with an explicit output:
    channels follow their label — into the output where it stays (every operand with that label
    carries the same channels or binds a parameter dim to them), contracted with the same
    channels of the other operands or a parameter's dim (a linear layer written as an einsum);
    a parameter's dim on an output label with no channels starts them (its out features)."""
    equation = node.args[0]
    operands = list(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else list(node.args[1:])
    infos = [an.of(o) for o in operands]
    shapes = [an.shape(o) for o in operands]
    out_shape = an.shape(node)
    parsed = _einsum_labels(equation, shapes) if isinstance(equation, str) and None not in shapes and out_shape is not None else None
    if parsed is None:
        raise _Unsupported("einsum without an explicit output or with unknown shapes")
    labels, out = parsed
    by_label: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for i, ls in enumerate(labels):
        for axis, label in enumerate(ls):
            by_label[label].append((i, axis))
    chan_labels = {labels[i][info.axis] for i, info in enumerate(infos) if isinstance(info, Chan)}
    result: Info = None
    for label in sorted(chan_labels):
        chans = [(i, a) for i, a in by_label[label] if isinstance(infos[i], Chan) and infos[i].axis == a]
        atoms = infos[chans[0][0]].atoms
        if max(shapes[i][a] for i, a in by_label[label]) > 1 and any(shapes[i][a] == 1 for i, a in chans):
            for i, _ in chans:  # one channel broadcast over the label: its width must stay
                an.freeze(infos[i].atoms, f"{node.name}: einsum broadcasts a single channel")
            continue
        members = [(i, a) for i, a in by_label[label] if shapes[i][a] > 1 or (i, a) in chans]  # size-1 operands broadcast
        ok = True
        for i, a in members:
            info = infos[i]
            if isinstance(info, Chan) and info.axis == a:
                an.union(atoms, info.atoms)
            elif isinstance(info, ParamRef) and info.axes[a] is not None:
                an.bind(info.name, info.axes[a], atoms)
            else:
                ok = False
        if not ok:
            an.freeze(atoms, f"{node.name}: einsum over channels another operand does not track")
            continue
        if label in out:
            if result is not None:
                an.freeze(atoms, f"{node.name}: channels on two einsum output axes")
                an.freeze(result.atoms, f"{node.name}: channels on two einsum output axes")
                return None
            result = Chan(out.index(label), atoms)
    if result is None:  # a parameter's dim on an output label starts the output's channels
        starts = [
            (label, i, a) for label in out for i, a in by_label[label] if isinstance(infos[i], ParamRef) and infos[i].axes[a] is not None and shapes[i][a] > 1
        ]
        if len(starts) == 1:
            label, i, a = starts[0]
            if all(i2 == i for i2, _ in by_label[label]):
                result = Chan(out.index(label), an.param_atoms(infos[i].name, infos[i].axes[a], f"{node.name} (out features)"))
                an.producers[node.name] = result
    for info, ls, shape in zip(infos, labels, shapes):  # a parameter dim on a label without channels keeps its size
        if isinstance(info, ParamRef):
            for a, label in enumerate(ls):
                key = (an.canon.get(info.name, info.name), info.axes[a])
                if key in an.bindings and shape[a] > 1 and label not in chan_labels and not (result is not None and label == out[result.axis]):
                    an.freeze(an.bindings[key], f"{node.name}: parameter dim in an einsum without channels")
    return result


def rule_softmax(an: _Analyzer, node: Node) -> Info:
    return rule_passthrough(an, node)


def rule_stochastic_depth(an: _Analyzer, node: Node) -> Info:
    return rule_passthrough(an, node)


def rule_patch_merging_pad(an: _Analyzer, node: Node) -> Info:
    """torchvision Swin's ``_patch_merging_pad``: pads H, W and concatenates 4 shifted copies on C."""
    info = an.of(node.args[0])
    shape = an.shape(node.args[0])
    if isinstance(info, Chan) and shape is not None and info.axis == len(shape) - 1:
        return Chan(info.axis, np.concatenate([info.atoms] * 4))
    an.freeze_info(info, f"{node.name}: patch merging of untracked channels")
    return None


def rule_shifted_window_attention(an: _Analyzer, node: Node) -> Info:
    """torchvision Swin's ``shifted_window_attention``: like ``nn.MultiheadAttention``, its head
    dims are ``C // num_heads`` of the input width C, so internal dims are tied to the residual
    channels and the same head dim is pruned in every head."""
    names = ["input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads", "shift_size",
             "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale", "training"]  # fmt: skip
    values = {n: (node.args[i] if i < len(node.args) else node.kwargs.get(n)) for i, n in enumerate(names)}
    info = an.of(values["input"])
    shape = an.shape(values["input"])
    refs = {k: an.of(values[k]) for k in ("qkv_weight", "proj_weight", "qkv_bias", "proj_bias")}
    heads = values["num_heads"]
    if not isinstance(info, Chan) or shape is None or info.axis != len(shape) - 1 or not isinstance(heads, int):
        raise _Unsupported("shifted_window_attention over untracked channels")
    if any(values[k] is not None and not isinstance(r, ParamRef) for k, r in refs.items()):
        raise _Unsupported("shifted_window_attention with computed weights")
    atoms = info.atoms
    an.tie(atoms, heads)
    three = np.concatenate([atoms, atoms, atoms])
    an.bind(refs["qkv_weight"].name, 0, three)
    an.bind(refs["qkv_weight"].name, 1, atoms)
    an.bind(refs["proj_weight"].name, 0, atoms)
    an.bind(refs["proj_weight"].name, 1, atoms)
    if isinstance(refs["qkv_bias"], ParamRef):
        an.bind(refs["qkv_bias"].name, 0, three)
    if isinstance(refs["proj_bias"], ParamRef):
        an.bind(refs["proj_bias"].name, 0, atoms)
    return Chan(info.axis, atoms)


def rule_no_tensor(an: _Analyzer, node: Node) -> Info:
    """Ops that read only metadata (size, dim, shape, _assert)."""
    return None


_TRANSPOSING_ATTRIBUTES = {"T": "numpy_T", "mT": "mT", "mH": "mH", "H": "numpy_T"}


def rule_getattr(an: _Analyzer, node: Node) -> Info:
    """``getattr(x, name)`` as fx records a tensor property: ``x.T`` / ``x.mT`` / ``x.mH`` are
    permutations; anything else (``x.shape``, ``x.dtype``, …) is metadata."""
    name = node.args[1] if len(node.args) > 1 else None
    if name in _TRANSPOSING_ATTRIBUTES and isinstance(an.shape(node), tuple):
        return rule_permute(an, node, _TRANSPOSING_ATTRIBUTES[name])
    return None


for _rule in (rule_view_method, rule_reshape_function, rule_reshape_as, rule_norm_function):
    _rule.accepts_merged = True  # these rules read MergedParam values (weight standardization); see _Analyzer.visit
