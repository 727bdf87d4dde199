"""Spellings -> kinds: every way fx (or ``torch.export``) can write an op, mapped onto the rule
of its kind in :mod:`.rules`. Adding a spelling is one line here."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node
from torch.nn.modules.conv import _ConvNd

from .core import _qualname, _Unsupported
from .rules import (
    rule_addmm,
    rule_batchnorm,
    rule_cat,
    rule_chunk_split,
    rule_col2im,
    rule_compression,
    rule_conv_function,
    rule_conv_module,
    rule_einsum,
    rule_elementwise,
    rule_embedding,
    rule_embedding_function,
    rule_expand,
    rule_expand_as,
    rule_flatten,
    rule_flatten_module,
    rule_getattr,
    rule_getitem,
    rule_grouped_mm,
    rule_groupnorm,
    rule_im2col,
    rule_index,
    rule_interface_gate,
    rule_layernorm_function,
    rule_layernorm_module,
    rule_linear_function,
    rule_linear_module,
    rule_logsumexp,
    rule_matmul,
    rule_max_dim,
    rule_mha,
    rule_no_tensor,
    rule_norm,
    rule_norm_function,
    rule_pad,
    rule_pad_module,
    rule_passthrough,
    rule_patch_merging_pad,
    rule_permute,
    rule_prelu,
    rule_reduce,
    rule_repeat,
    rule_repeat_interleave,
    rule_reshape_as,
    rule_reshape_function,
    rule_rmsnorm_function,
    rule_rnn,
    rule_roll,
    rule_sdpa,
    rule_select,
    rule_shifted_window_attention,
    rule_slice,
    rule_softmax,
    rule_spatial,
    rule_squeeze,
    rule_stack,
    rule_stochastic_depth,
    rule_topk,
    rule_unbind,
    rule_unfold,
    rule_unsqueeze,
    rule_var,
    rule_view_method,
)

ELEMENTWISE_NAMES = frozenset(
    """add sub mul truediv div floordiv mod pow neg pos abs and_ or_ xor invert eq ne lt le gt ge
    add_ sub_ mul_ div_ true_divide rsub relu relu_ relu6 gelu silu silu_ hardswish hardswish_ hardsigmoid
    hardsigmoid_ sigmoid sigmoid_ tanh tanh_ mish elu elu_ selu celu leaky_relu leaky_relu_ softplus
    hardtanh hardtanh_ exp log sqrt rsqrt clamp clamp_ clip where dropout dropout_ alpha_dropout
    feature_alpha_dropout alias dropout1d dropout2d dropout3d erf square reciprocal sin cos float half double
    to type_as contiguous clone detach masked_fill logit addcmul addcdiv lerp maximum minimum fmod remainder
    sign floor ceil round trunc frac expm1 log1p log2 log10 sinh cosh nan_to_num exp_ sqrt_ neg_ mul__ copysign
    hardshrink softshrink tanhshrink softsign threshold glu_ relu6_ gelu_ multiply masked_fill_ zeros_like ones_like
    empty_like full_like""".split()
)

MODULE_RULES: dict[type, Callable] = {}
for _cls in (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Mish,
             nn.ELU, nn.SELU, nn.CELU, nn.LeakyReLU, nn.Softplus, nn.Hardtanh, nn.Identity, nn.Dropout,
             nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Softmax, nn.LogSoftmax):  # fmt: skip
    MODULE_RULES[_cls] = rule_passthrough
for _cls in (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
             nn.modules.pooling._AdaptiveMaxPoolNd, nn.Upsample):  # fmt: skip
    MODULE_RULES[_cls] = rule_spatial
for _cls in (nn.modules.padding._ConstantPadNd, nn.modules.padding._ReflectionPadNd, nn.modules.padding._ReplicationPadNd,
             nn.modules.padding._CircularPadNd):  # fmt: skip
    MODULE_RULES[_cls] = rule_pad_module
MODULE_RULES[_ConvNd] = rule_conv_module
MODULE_RULES[nn.Linear] = rule_linear_module
MODULE_RULES[nn.modules.batchnorm._BatchNorm] = rule_batchnorm
MODULE_RULES[nn.modules.instancenorm._InstanceNorm] = rule_batchnorm
MODULE_RULES[nn.GroupNorm] = rule_groupnorm
MODULE_RULES[nn.LayerNorm] = rule_layernorm_module
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    MODULE_RULES[nn.RMSNorm] = rule_layernorm_module
MODULE_RULES[nn.MultiheadAttention] = rule_mha
MODULE_RULES[nn.Embedding] = rule_embedding
MODULE_RULES[nn.PReLU] = rule_prelu
MODULE_RULES[nn.Flatten] = rule_flatten_module
MODULE_RULES[nn.RNNBase] = rule_rnn
MODULE_RULES[nn.Unfold] = rule_im2col
MODULE_RULES[nn.Fold] = rule_col2im


def _register_qcd_modules() -> None:
    from ...nn import InterfaceGate, StateCompression

    MODULE_RULES[InterfaceGate] = rule_interface_gate
    MODULE_RULES[StateCompression] = rule_compression


_register_qcd_modules()

FUNCTION_RULES: dict[Any, Callable] = {
    torch.cat: rule_cat,
    torch.concat: rule_cat,
    torch.stack: rule_stack,
    torch.repeat_interleave: rule_repeat_interleave,
    torch.roll: rule_roll,
    torch.flatten: rule_flatten,
    torch.reshape: rule_reshape_function,
    torch.permute: rule_permute,
    torch.transpose: rule_permute,
    torch.swapaxes: rule_permute,
    torch.movedim: rule_permute,
    torch.t: rule_permute,
    torch.adjoint: rule_permute,
    torch.chunk: rule_chunk_split,
    torch.split: rule_chunk_split,
    torch.matmul: rule_matmul,
    torch.einsum: rule_einsum,
    torch.bmm: rule_matmul,
    torch.norm: rule_norm,
    F.scaled_dot_product_attention: rule_sdpa,
    torch.linalg.vector_norm: rule_norm,
    torch.unbind: rule_unbind,
    torch.unsqueeze: rule_unsqueeze,
    torch.squeeze: rule_squeeze,
    torch.select: rule_select,
    torch.addmm: rule_addmm,
    F.embedding: rule_embedding_function,
    operator.matmul: rule_matmul,
    operator.getitem: rule_getitem,
    getattr: rule_getattr,
    torch._assert: rule_no_tensor,
    torch.mean: rule_reduce,
    torch.sum: rule_reduce,
    torch.amax: rule_reduce,
    torch.var: rule_var,
    torch.std: rule_var,
    torch.var_mean: rule_var,
    torch.std_mean: rule_var,
    torch.softmax: rule_softmax,
    torch.log_softmax: rule_softmax,
    F.softmax: rule_softmax,
    F.log_softmax: rule_softmax,
    F.linear: rule_linear_function,
    torch._C._nn.linear: rule_linear_function,
    F.conv1d: rule_conv_function,
    F.conv2d: rule_conv_function,
    F.conv3d: rule_conv_function,
    torch.conv1d: rule_conv_function,
    torch.conv2d: rule_conv_function,
    torch.conv3d: rule_conv_function,
    F.conv_transpose1d: rule_conv_function,
    F.conv_transpose2d: rule_conv_function,
    F.conv_transpose3d: rule_conv_function,
    F.layer_norm: rule_layernorm_function,
    F.rms_norm: rule_rmsnorm_function,
    F.batch_norm: rule_norm_function,
    F.instance_norm: rule_norm_function,
    F.group_norm: rule_norm_function,
    F.adaptive_avg_pool1d: rule_spatial,
    F.adaptive_avg_pool2d: rule_spatial,
    F.adaptive_avg_pool3d: rule_spatial,
    F.adaptive_max_pool2d: rule_spatial,
    F.avg_pool2d: rule_spatial,
    F.max_pool2d: rule_spatial,
    F.interpolate: rule_spatial,
    F.pad: rule_pad,
    F.unfold: rule_im2col,
    F.fold: rule_col2im,
    torch.nn.functional.normalize: rule_passthrough,
}
FUNCTION_RULES_BY_NAME: dict[str, Callable] = {
    "torchvision.ops.stochastic_depth.stochastic_depth": rule_stochastic_depth,
    "torchvision.models.swin_transformer._patch_merging_pad": rule_patch_merging_pad,
    "torchvision.models.swin_transformer.shifted_window_attention": rule_shifted_window_attention,
    "torch.nn.functional.pad": rule_pad,
    "torch._C._nn.pad": rule_pad,
    # transformers' mixture-of-experts matmul, a custom op so that torch.export keeps it whole
    "torch._ops.transformers.grouped_mm_fallback.default": rule_grouped_mm,
}
METHOD_RULES: dict[str, Callable] = {
    "view": rule_view_method,
    "reshape": rule_view_method,
    "flatten": rule_flatten,
    "permute": rule_permute,
    "transpose": rule_permute,
    "swapaxes": rule_permute,
    "movedim": rule_permute,
    "t": rule_permute,
    "adjoint": rule_permute,
    "expand": rule_expand,
    "expand_as": rule_expand_as,
    "repeat": rule_repeat,
    "repeat_interleave": rule_repeat_interleave,
    "roll": rule_roll,
    "unfold": rule_unfold,
    "chunk": rule_chunk_split,
    "split": rule_chunk_split,
    "mean": rule_reduce,
    "sum": rule_reduce,
    "amax": rule_reduce,
    "var": rule_var,
    "std": rule_var,
    "size": rule_no_tensor,
    "dim": rule_no_tensor,
    "softmax": rule_softmax,
    "log_softmax": rule_softmax,
    "matmul": rule_matmul,
    "bmm": rule_matmul,
    "norm": rule_norm,
    "unbind": rule_unbind,
    "unsqueeze": rule_unsqueeze,
    "squeeze": rule_squeeze,
    "select": rule_select,
    "reshape_as": rule_reshape_as,
    "view_as": rule_reshape_as,
}


def _aten_table() -> dict[Any, Callable]:
    """ATen overload packets (what ``torch.export`` records) whose arguments come in the order of
    the ``torch``/``F`` spelling their rule reads. Packets missing from this torch are skipped."""
    aten = torch.ops.aten
    names = {
        rule_cat: ["cat", "concat"],
        rule_stack: ["stack"],
        rule_reshape_function: ["view", "reshape", "_unsafe_view"],
        rule_flatten: ["flatten"],
        rule_permute: ["permute", "transpose", "t", "swapaxes", "movedim", "numpy_T", "mT", "mH", "matrix_H", "adjoint"],
        rule_expand: ["expand"],
        rule_expand_as: ["expand_as"],
        rule_repeat: ["repeat"],
        rule_repeat_interleave: ["repeat_interleave"],
        rule_roll: ["roll"],
        rule_unfold: ["unfold"],
        rule_im2col: ["im2col"],
        rule_col2im: ["col2im"],
        rule_chunk_split: ["split", "chunk", "split_with_sizes"],
        rule_unbind: ["unbind"],
        rule_unsqueeze: ["unsqueeze"],
        rule_squeeze: ["squeeze"],
        rule_reshape_as: ["reshape_as", "view_as"],
        rule_select: ["select"],
        rule_addmm: ["addmm"],
        rule_index: ["index"],
        rule_embedding_function: ["embedding"],
        rule_matmul: ["matmul", "bmm"],
        rule_einsum: ["einsum"],
        rule_reduce: ["mean", "sum", "amax", "amin"],
        rule_logsumexp: ["logsumexp"],
        rule_norm: ["linalg_vector_norm"],
        rule_topk: ["topk"],
        rule_grouped_mm: ["_grouped_mm"],
        rule_softmax: ["softmax", "_softmax", "log_softmax", "_log_softmax"],
        rule_linear_function: ["linear"],
        rule_conv_function: ["conv1d", "conv2d", "conv3d"],
        rule_layernorm_function: ["layer_norm"],
        rule_rmsnorm_function: ["rms_norm"],
        rule_var: ["var", "std", "var_mean", "std_mean"],
        rule_norm_function: ["group_norm", "instance_norm", "batch_norm"],
        rule_sdpa: ["scaled_dot_product_attention"],
        rule_spatial: [
            "adaptive_avg_pool1d",
            "adaptive_avg_pool2d",
            "adaptive_avg_pool3d",
            "adaptive_max_pool2d",
            "avg_pool2d",
            "max_pool2d",
            "upsample_nearest1d",
            "upsample_nearest2d",
            "upsample_nearest3d",
            "upsample_linear1d",
            "upsample_bilinear2d",
            "upsample_bicubic2d",
            "upsample_trilinear3d",
            "avg_pool1d",
            "avg_pool3d",
            "max_pool1d",
            "max_pool3d",
            "adaptive_max_pool1d",
            "adaptive_max_pool3d",
        ],
        rule_pad: ["pad", "constant_pad_nd"],
        rule_slice: ["slice"],
        rule_no_tensor: ["sym_size", "sym_numel", "_assert_tensor_metadata"],
    }
    table: dict[Any, Callable] = {}
    for rule, ops in names.items():
        for op in ops:
            packet = getattr(aten, op, None)
            if packet is not None:
                table[packet] = rule
    for packet in (aten.max, aten.min):  # only the (values, indices) overload: max.other is element-wise
        table[packet.dim] = rule_max_dim
    return table


ATEN_RULES = _aten_table()

_ELEMENTWISE_MODULES = ("_operator", "operator", "torch", "torch.nn.functional", "torch._C._nn", "math")


def rule_for(gm: GraphModule, node: Node) -> Callable:
    """The rule of ``node``'s kind, from its spelling; raises ``_Unsupported`` (naming the op)
    when no table knows it (the analysis then leaves the channels it touches alone)."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        for cls in type(m).__mro__:
            rule = MODULE_RULES.get(cls)
            if rule is not None:
                return lambda an, n, rule=rule, m=m: rule(an, n, m)
        raise _Unsupported(f"no pruning rule for module {type(m).__name__}")
    if node.op == "call_function":
        target = node.target
        rule = FUNCTION_RULES.get(target) or FUNCTION_RULES_BY_NAME.get(_qualname(target))
        if rule is None and isinstance(target, torch._ops.OpOverload):
            rule = ATEN_RULES.get(target) or ATEN_RULES.get(target.overloadpacket)
            if rule is None and target.overloadpacket.__name__ in ELEMENTWISE_NAMES:
                rule = rule_elementwise
        if rule is None and getattr(target, "__name__", "") in ELEMENTWISE_NAMES and getattr(target, "__module__", "") in _ELEMENTWISE_MODULES:
            rule = rule_elementwise
        if rule is None:
            raise _Unsupported(f"no pruning rule for {_qualname(target)}")
        return rule
    rule = METHOD_RULES.get(node.target)
    if rule is None and node.target in ELEMENTWISE_NAMES:
        rule = rule_elementwise
    if rule is None:
        raise _Unsupported(f"no pruning rule for method .{node.target}()")
    return rule
