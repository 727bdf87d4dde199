"""One rule per kind of op, whatever its spelling: a module, ``torch.nn.functional``, a tensor
method, ``torch.*`` or the ATen overload ``torch.export`` records. The same network pruned from
its fx trace and from its ``torch.export`` graph keeps the same channels."""

import torch
import torch.nn.functional as F
from torch import nn

import qcd_fx
from qcd_fx.passes.dependency import rules
from qcd_fx.passes.dependency.spellings import ATEN_RULES, FUNCTION_RULES, METHOD_RULES, MODULE_RULES


def test_spellings_of_one_kind_share_its_rule():
    aten = torch.ops.aten
    assert FUNCTION_RULES[torch.cat] is ATEN_RULES[aten.cat] is rules.rule_cat
    assert FUNCTION_RULES[F.group_norm] is ATEN_RULES[aten.group_norm] is rules.rule_norm_function
    assert FUNCTION_RULES[F.batch_norm] is FUNCTION_RULES[F.instance_norm] is rules.rule_norm_function
    assert METHOD_RULES["split"] is FUNCTION_RULES[torch.split] is ATEN_RULES[aten.split] is rules.rule_chunk_split
    assert METHOD_RULES["unbind"] is FUNCTION_RULES[torch.unbind] is ATEN_RULES[aten.unbind] is rules.rule_unbind
    assert FUNCTION_RULES[F.scaled_dot_product_attention] is ATEN_RULES[aten.scaled_dot_product_attention] is rules.rule_sdpa
    assert MODULE_RULES[nn.Linear] is rules.rule_linear_module and FUNCTION_RULES[F.linear] is ATEN_RULES[aten.linear]


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.a(x))
        left, right = y.split(8, dim=1)
        z = torch.cat([right, left], 1).view(x.shape[0], 16)
        return self.c(self.b(z)[:, :8] * 2)


def test_export_graph_prunes_like_the_fx_trace():
    torch.manual_seed(0)
    model = Mixed().eval()
    x = torch.randn(2, 8)
    spec = "cdg-prune{criterion=l1}"
    from_fx = qcd_fx.transform(model, spec, example_inputs=x)
    exported = torch.export.export(model, (x,)).module()
    assert any(isinstance(n.target, torch._ops.OpOverload) for n in exported.graph.nodes)  # ATen spellings
    from_export = qcd_fx.transform(exported, spec, example_inputs=x)
    widths = lambda r: sorted(tuple(w) for w in r.report.passes[0].stats["widths"].values())  # noqa: E731
    assert widths(from_fx) == widths(from_export) == [(16, 8), (16, 8)]
    assert not any("no pruning rule" in n for n in from_export.report.notes())
    torch.testing.assert_close(from_export.graph_module(x), from_fx.graph_module(x))


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.inorm = nn.InstanceNorm2d(16, affine=True, track_running_stats=True)
        self.c2 = nn.Conv2d(16, 24, 3, padding=1)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        y = torch.relu(self.inorm(self.bn(self.c1(x))))
        a, b = torch.split(self.c2(y), [8, 16], dim=1)  # split_with_sizes in ATen
        return self.head(torch.cat([b, a], 1).mean((2, 3)))


def test_aten_norms_take_their_own_argument_order():
    """``aten.batch_norm``/``aten.instance_norm`` put weight and bias before the running statistics
    (``F.*`` puts them after): an ``ep.module()`` graph, where they stay ATen ops, prunes like the
    fx trace; ``aten.split_with_sizes`` like ``torch.split``."""
    torch.manual_seed(0)
    model = ConvBN().eval()
    model.bn.running_mean.uniform_(-1, 1)
    x = torch.randn(2, 3, 8, 8)
    spec = "cdg-prune{criterion=l1}"
    from_fx = qcd_fx.transform(model, spec, example_inputs=x)
    exported = torch.export.export(model, (x,)).module()
    targets = {getattr(n.target, "__name__", "") for n in exported.graph.nodes}
    assert {"batch_norm.default", "instance_norm.default", "split_with_sizes.default"} <= targets
    from_export = qcd_fx.transform(exported, spec, example_inputs=x)
    assert not [n for n in from_export.report.notes() if "no pruning rule" in n], from_export.report.notes()
    widths = lambda r: sorted(tuple(w) for w in r.report.passes[0].stats["widths"].values())  # noqa: E731
    assert widths(from_fx) == widths(from_export)
    torch.testing.assert_close(from_export.graph_module(x), from_fx.graph_module(x))


def _pruned_in_both_front_ends(model, x, spec="cdg-prune{ratio=0.5,criterion=l1}"):
    """(capture, pruned graph module) from the fx trace and from the torch.export graph; in
    each only the model's output is left alone."""
    for capture in ("fx", "export"):
        result = qcd_fx.transform(model, spec, example_inputs=x, capture=capture)
        assert result.report.notes() == ["cdg-prune: 1 group(s) left alone: model output (its width never changes)"], (capture, result.report.notes())
        yield capture, result.graph_module


class TransposedWeights(nn.Module):
    """Linear layers written as ``x @ W.T`` (transformers' FalconLinear), ``x @ W.mT`` and
    ``x @ W.t()``: every spelling of a transpose carries the weight's dims."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(16, 8))
        self.w2 = nn.Parameter(torch.randn(12, 16))
        self.w3 = nn.Parameter(torch.randn(4, 12))

    def forward(self, x):
        return torch.relu(torch.relu(x @ self.w1.T) @ self.w2.mT) @ self.w3.t()


def test_transposing_properties_carry_a_parameters_dims():
    torch.manual_seed(0)
    model = TransposedWeights().eval()
    x = torch.randn(2, 8)
    spec = "cdg-prune{criterion=l1}"
    for capture in ("fx", "export"):
        result = qcd_fx.transform(model, spec, example_inputs=x, capture=capture)
        widths = sorted(tuple(w) for w in result.report.passes[0].stats["widths"].values())
        assert widths == [(12, 6), (16, 8)], (capture, widths)
        assert [tuple(p.shape) for p in result.graph_module.parameters()] == [(8, 8), (6, 8), (4, 6)]
        assert not [n for n in result.report.notes() if "untracked" in n], (capture, result.report.notes())
        assert result.graph_module(x).shape == (2, 4)


class StdConv(nn.Conv2d):
    """Weight standardization as BiT and timm's ScaledStdConv2d (NFNets) write it: the weight
    normalised per output channel over its fan-in by ``F.batch_norm`` on ``(1, out, in*k*k)``,
    with a per-channel gain as the norm's weight."""

    def __init__(self, cin, cout, k):
        super().__init__(cin, cout, k, padding=k // 2)
        self.gain = nn.Parameter(torch.rand(cout, 1, 1, 1) + 0.5)

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, weight=(self.gain * 0.5).view(-1), training=True, momentum=0.0, eps=1e-6)
        return F.conv2d(x, w.reshape_as(self.weight), self.bias, self.stride, self.padding)


class StdNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = StdConv(3, 16, 3), StdConv(16, 32, 1), StdConv(32, 8, 3)

        self.pad = nn.ConstantPad2d(1, 0.0)  # timm's BiT stem pads with a module

    def forward(self, x):
        return self.c3(torch.relu(self.c2(self.pad(torch.relu(self.c1(x)))))).mean((2, 3))


def test_weight_standardized_convs_prune_in_both_front_ends():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    for capture, gm in _pruned_in_both_front_ends(StdNet().eval(), x, "cdg-prune{criterion=l1}"):
        shapes = {k: tuple(v.shape) for k, v in gm.state_dict().items()}
        assert shapes["c1.weight"] == (8, 3, 3, 3) and shapes["c1.gain"] == (8, 1, 1, 1), (capture, shapes)
        assert shapes["c2.weight"] == (16, 8, 1, 1) and shapes["c3.weight"] == (8, 16, 3, 3), (capture, shapes)
        assert gm(x).shape == (2, 8) and bool(torch.isfinite(gm(x)).all())
        # the pruned model is the same network with fewer channels: a fresh StdNet of those widths, given its weights, agrees
        small = StdNet().eval()
        small.c1, small.c2, small.c3 = StdConv(3, 8, 3), StdConv(8, 16, 1), StdConv(16, 8, 3)
        small.load_state_dict(gm.state_dict())
        torch.testing.assert_close(gm(x), small(x))


class PrefixRopeAttention(nn.Module):
    """DINOv3's attention: a rotary embedding on the patch tokens only, the prefix token split
    off with ``torch.split(x, [1, n], dim=-2)`` (``aten.split_with_sizes``) and put back."""

    def __init__(self, dim=32, heads=4, tokens=9):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.register_buffer("cos", torch.rand(tokens - 1, dim // heads))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = (p(x).view(b, n, self.heads, c // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        (q0, qp), (k0, kp) = torch.split(q, [1, n - 1], dim=-2), torch.split(k, [1, n - 1], dim=-2)
        q, k = torch.cat([q0, qp * self.cos], dim=-2), torch.cat([k0, kp * self.cos], dim=-2)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return x + self.o(y)


def test_attention_heads_prune_through_a_token_split():
    torch.manual_seed(0)
    model = PrefixRopeAttention().eval()
    x = torch.randn(2, 9, 32)
    result = qcd_fx.transform(model, "cdg-prune{ratio=0.5,criterion=l1}", example_inputs=x, capture="export")
    assert any("split_with_sizes" in str(n.target) for n in result.graph_module.graph.nodes)
    assert not [n for n in result.report.notes() if "attention" in n], result.report.notes()  # only the residual stream is left alone
    gm = result.graph_module
    assert gm.q.weight.shape == gm.k.weight.shape == gm.v.weight.shape == (16, 32) and gm.o.weight.shape == (32, 16)
    assert gm(x).shape == (2, 9, 32)


class Statistics(nn.Module):
    """Norms written with statistics ops (timm's RmsNorm2d uses ``var``; LayerNorm2d variants
    ``var_mean``), ``F.rms_norm`` and ``nn.RMSNorm``."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 1)
        self.w = nn.Parameter(torch.rand(16) + 0.5)
        self.rms = nn.RMSNorm(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        y = self.c1(x)
        y = y * torch.rsqrt(y.var(dim=(2, 3), keepdim=True) + 1e-5) + y.std(dim=(2, 3), keepdim=True)
        y = self.c2(torch.relu(y))
        var, mean = torch.var_mean(y, dim=(2, 3), unbiased=False, keepdim=True)
        y = self.c3((y - mean) / (var + 1e-5).sqrt())
        z = F.rms_norm(y.mean((2, 3)), (16,), self.w, 1e-6)
        return self.head(self.rms(z))


def test_statistics_and_rms_norms_have_rules():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    for capture, gm in _pruned_in_both_front_ends(Statistics().eval(), x):
        assert gm.c1.weight.shape[0] == 8 and gm.c2.weight.shape[0] == 8 and gm.c3.weight.shape[0] == 8, capture
        assert gm.rms.weight.shape == gm.w.shape == (8,) and gm.head.weight.shape == (4, 8), capture
        assert gm(x).shape == (2, 4)


class ShapeReadAttention(nn.Module):
    """timm's attention: sizes read from ``x.shape`` at run time (``C // heads`` for the head
    size, ``C`` to merge the heads back) while the residual stream and the heads prune apart."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.inp, self.qkv, self.proj, self.head = nn.Linear(8, dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, 3)

    def forward(self, x):
        x = self.inp(x)
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        return self.head(x + self.proj(y)).mean(1)


def test_sizes_read_from_the_channel_axis_become_minus_one():
    torch.manual_seed(0)
    model = ShapeReadAttention().eval()
    x = torch.randn(2, 5, 8)
    result = qcd_fx.transform(model, "cdg-prune{ratio=0.5,criterion=l1}", example_inputs=x, capture="fx")
    assert result.report.notes() == ["cdg-prune: 1 group(s) left alone: model output (its width never changes)"], result.report.notes()
    gm = result.graph_module
    assert gm.inp.weight.shape == (16, 8) and gm.qkv.weight.shape == (48, 16) and gm.proj.weight.shape == (16, 16)
    reshapes = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "reshape"]
    assert [n.args[-1] for n in reshapes] == [-1, -1]  # the sizes computed from C follow the pruned values
    assert gm(x).shape == (2, 3)
    with torch.no_grad():
        assert torch.equal(qcd_fx.trace(gm)(x), gm(x))


class EinsumNet(nn.Module):
    """A linear layer, attention heads and a relative-position term written as einsums (MViTv2,
    SAM's ViT): every operand of a label carries its channels."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.heads = heads
        self.w = nn.Parameter(torch.randn(3 * dim, dim) / 4)
        self.rel = nn.Parameter(torch.randn(5, 5, dim // heads))
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, x):
        b, n, c = x.shape
        qkv = torch.einsum("bnc,dc->bnd", x, self.w).reshape(b, n, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = torch.einsum("bhqd,bhkd->bhqk", q, k) + torch.einsum("bhqd,qkd->bhqk", q, self.rel)
        y = torch.einsum("bhqk,bhkd->bhqd", attn.softmax(-1), v).transpose(1, 2).reshape(b, n, c)
        return self.head(x + self.proj(y)).mean(1)


def test_einsum_carries_channels_along_its_labels():
    torch.manual_seed(0)
    model = EinsumNet().eval()
    x = torch.randn(2, 5, 16)
    for capture in ("fx", "export"):
        result = qcd_fx.transform(model, "cdg-prune{ratio=0.5,criterion=l1}", example_inputs=x, capture=capture)
        assert not [n for n in result.report.notes() if "einsum" in n], (capture, result.report.notes())
        gm = result.graph_module
        assert gm.w.shape[0] < 48 and gm.proj.weight.shape[1] == gm.w.shape[0] // 3, (capture, gm.w.shape)
        assert gm(x).shape == (2, 2)


class SingleChannelEinsum(nn.Module):
    """A one-channel gate in an einsum (an attention-pooling score: ``Linear(d, 1)``), once with
    every operand one wide on that label and once broadcast over a wide operand."""

    def __init__(self):
        super().__init__()
        self.score, self.value, self.gate, self.head = nn.Linear(8, 1), nn.Linear(8, 16), nn.Linear(8, 1), nn.Linear(16, 3)

    def forward(self, x):
        g = self.score(x)
        w = torch.einsum("bnc,bmc->bnm", g, g).softmax(-1)
        v = torch.relu(self.value(x))
        v = torch.einsum("bnc,bnc->bnc", self.gate(x), v)  # the single channel broadcasts over v's
        return self.head(torch.einsum("bnm,bmd->bnd", w, v)).mean(1)


def test_einsum_over_a_single_channel():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    for capture in ("fx", "export"):
        result = qcd_fx.transform(SingleChannelEinsum().eval(), "cdg-prune{ratio=0.5,criterion=l1}", example_inputs=x, capture=capture)
        gm = result.graph_module
        assert gm.score.weight.shape == gm.gate.weight.shape == (1, 8), capture
        assert gm.value.weight.shape == (16, 8) and gm.head.weight.shape == (3, 16), capture  # broadcast onto: left alone
        assert any("einsum broadcasts a single channel" in n for n in result.report.notes()), (capture, result.report.notes())
        assert gm(x).shape == (2, 3)


class ConcatenatedBias(nn.Module):
    """BEiT's attention: ``F.linear(x, qkv.weight, torch.cat((q_bias, k_bias, v_bias)))`` with a
    zero key bias kept as a buffer; the bias entries are the qkv layer's out features."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.inp, self.qkv, self.proj, self.head = nn.Linear(8, dim), nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim), nn.Linear(dim, 3)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(dim)), nn.Parameter(torch.randn(dim))
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)

    def forward(self, x):
        x = self.inp(x)
        b, n, _ = x.shape
        qkv = F.linear(x, weight=self.qkv.weight, bias=torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        q, k, v = qkv.reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return self.head(x + self.proj(y)).mean(1)


def test_a_bias_concatenated_from_parameters_prunes_with_its_layer():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    for capture, gm in _pruned_in_both_front_ends(ConcatenatedBias().eval(), x):
        assert gm.qkv.weight.shape[0] < 48 and gm.q_bias.shape == gm.k_bias.shape == gm.v_bias.shape == (gm.qkv.weight.shape[0] // 3,), capture
        assert gm.proj.weight.shape[1] == gm.q_bias.shape[0]
        assert gm(x).shape == (2, 3)


class KeywordGroups(nn.Module):
    """timm's BlurPool2d (``F.conv2d(x, filt, stride=2, groups=channels)``, a fixed per-channel
    filter buffer) and a group norm with one channel per group, both with the group count as a
    keyword: it follows the pruned width."""

    def __init__(self):
        super().__init__()
        self.channels = 16
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1)
        self.register_buffer("filt", torch.ones(16, 1, 3, 3) / 9)
        self.gw, self.gb = nn.Parameter(torch.rand(16) + 0.5), nn.Parameter(torch.zeros(16))

    def forward(self, x):
        y = F.conv2d(F.pad(self.c1(x), (1, 1, 1, 1), mode="reflect"), self.filt, stride=2, groups=self.channels)
        y = F.group_norm(torch.relu(y), num_groups=self.channels, weight=self.gw, bias=self.gb)
        return self.c2(y)


def test_group_counts_given_as_keywords_follow_the_pruned_width():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    for capture, gm in _pruned_in_both_front_ends(KeywordGroups().eval(), x):
        assert gm.c1.weight.shape[0] == gm.filt.shape[0] == gm.gw.shape[0] == 8 and gm.c2.weight.shape[1] == 8, capture
        assert gm(x).shape == (2, 4, 4, 4)


class GlobalQueryAttention(nn.Module):
    """GC ViT's global attention: a query computed once per image, repeated over the image's
    windows with ``repeat_interleave`` on the batch axis and split into heads by a reshape that
    keeps the rank ((B, H, W, C) -> (B, H*W, heads, head_dim)); a relative position bias gathered
    from a (positions, heads) table by an index buffer, reshaped and added per head."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.inp, self.q, self.kv, self.proj, self.head = (
            nn.Linear(8, dim),
            nn.Linear(dim, dim),
            nn.Linear(dim, 2 * dim),
            nn.Linear(dim, dim),
            nn.Linear(dim, 3),
        )
        self.table = nn.Parameter(torch.randn(25, heads))
        self.register_buffer("index", torch.arange(81) % 25)

    def forward(self, x):  # (B, 6, 3, 8): two 3x3 windows per image
        x = self.inp(x)
        b, h, w, c = x.shape
        windows = x.reshape(2 * b, 9, c)
        q_global = self.q(x[:, :3])
        q = q_global.repeat_interleave(windows.shape[0] // q_global.shape[0], dim=0)
        q = q.reshape(2 * b, 9, self.heads, self.head_dim).permute(0, 2, 1, 3)
        k, v = self.kv(windows).reshape(2 * b, 9, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.table[self.index].view(9, 9, self.heads).permute(2, 0, 1).unsqueeze(0)
        attn = (q * self.head_dim**-0.5) @ k.transpose(-2, -1) + bias
        y = (attn.softmax(-1) @ v).transpose(1, 2).reshape(2 * b, 9, c)
        return self.head(x + self.proj(y).reshape(b, h, w, c)).mean((1, 2))


def test_global_query_attention_with_a_gathered_position_bias_prunes_whole_heads():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 3, 8)
    for capture, gm in _pruned_in_both_front_ends(GlobalQueryAttention().eval(), x):
        heads = gm.table.shape[1]
        assert heads < 4 and gm.q.weight.shape[0] == heads * 4 and gm.kv.weight.shape[0] == 2 * heads * 4, capture
        assert gm.proj.weight.shape[1] == heads * 4 and gm.inp.weight.shape[0] == 8, capture
        assert gm(x).shape == (2, 3)


class WindowedResidual(nn.Module):
    """DaViT's window partition and reverse: ``view(-1, wh, ww, C)`` with ``C`` read from the
    input's shape and a ``-1`` already in the shape; the channel count follows the pruned width."""

    def __init__(self):
        super().__init__()
        self.inp, self.fc, self.proj, self.head = nn.Linear(8, 16), nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 3)

    def forward(self, x):  # (B, 4, 4, 8)
        x = self.inp(x)
        b, h, w, c = x.shape
        windows = x.view(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, c)
        y = self.proj(torch.relu(self.fc(windows))).view(-1, 2, 2, c)
        y = y.view(b, h // 2, w // 2, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        return self.head(x + y).mean((1, 2))


def test_a_channel_count_beside_a_minus_one_follows_the_pruned_width():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 4, 8)
    for capture, gm in _pruned_in_both_front_ends(WindowedResidual().eval(), x):
        assert gm.inp.weight.shape[0] == gm.proj.weight.shape[0] == 8 and gm.fc.weight.shape == (16, 8), capture
        assert gm(x).shape == (2, 3)


class RestoredShape(nn.Module):
    """timm's MaxViT attention: ``restore_shape = x.shape[:-1]`` and later
    ``y.reshape(restore_shape + (-1,))`` -- one computed value for the whole shape, reading only
    the axes before the channels."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.inp, self.qkv, self.proj, self.head = nn.Linear(8, dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, 3)

    def forward(self, x):  # (B, H, W, 8)
        x = self.inp(x)
        b, restore = x.shape[0], x.shape[:-1]
        q, k, v = self.qkv(x).view(b, -1, self.heads, 3 * 8).transpose(1, 2).chunk(3, dim=3)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(restore + (-1,))
        return self.head(x + self.proj(y)).mean((1, 2))


def test_a_shape_computed_as_one_value_is_left_as_it_is():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 3, 8)
    for capture, gm in _pruned_in_both_front_ends(RestoredShape().eval(), x):
        assert gm.inp.weight.shape[0] == 8 and gm.qkv.weight.shape[0] < 48 and gm.proj.weight.shape[1] == gm.qkv.weight.shape[0] // 3, capture
        assert gm(x).shape == (2, 3)


class InterpolatedPositions(nn.Module):
    """A position table for a 4x4 grid resampled to the input's 2x2 grid (timm's dynamic-size
    ViTs, Qwen3-ViT): reshaped to a grid, interpolated, flattened back and added to the tokens.
    Its channel dim follows the residual stream; its token dim is left whole."""

    def __init__(self, dim=16):
        super().__init__()
        self.embed, self.fc, self.head = nn.Conv2d(3, dim, 2, stride=2), nn.Linear(dim, dim), nn.Linear(dim, 3)
        self.pos = nn.Parameter(torch.randn(1, 16, dim))

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)  # (B, 4, dim)
        grid = self.pos.reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(grid, size=(2, 2), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(1, 4, -1)
        t = t + pos
        return self.head(t + torch.relu(self.fc(t))).mean(1)


def test_a_resampled_position_table_follows_the_channels():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    for capture, gm in _pruned_in_both_front_ends(InterpolatedPositions().eval(), x):
        assert gm.embed.weight.shape[0] == gm.fc.weight.shape[0] == 8 and gm.pos.shape == (1, 16, 8), capture
        assert gm(x).shape == (2, 3)


class ShiftedWindows(nn.Module):
    """Swin's shifted windows: ``torch.roll`` over the spatial axes of a (B, H, W, C) map, and
    back; a roll over the channel axis mixes the channels and is left alone."""

    def __init__(self):
        super().__init__()
        self.inp, self.fc, self.mix, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 12), nn.Linear(12, 3)

    def forward(self, x):  # (B, 4, 4, 8)
        x = self.inp(x)
        y = torch.roll(x, shifts=(-1, -1), dims=(1, 2))
        x = x + torch.roll(torch.relu(self.fc(y)), shifts=(1, 1), dims=(1, 2))
        return self.head(self.mix(x).roll(1, -1)).mean((1, 2))


def test_roll_over_spatial_axes_keeps_the_channels():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 4, 8)
    result = qcd_fx.transform(ShiftedWindows().eval(), "cdg-prune{ratio=0.5,criterion=l1}", example_inputs=x, capture="fx")
    gm = result.graph_module
    assert gm.inp.weight.shape[0] == gm.fc.weight.shape[0] == 8 and gm.mix.weight.shape == (12, 8), result.report.notes()
    assert any("rolls the channels" in n for n in result.report.notes()), result.report.notes()
    assert gm(x).shape == (2, 3)


class FactorisedPositions(nn.Module):
    """Position terms built from parameters alone: a factorised table (NaFlexViT: rows resampled
    to the grid with a 1-D interpolation, broadcast against columns and flattened) and a
    projection of a fixed grid repeated over the batch with a computed count (XCiT's
    ``pos.repeat(B, 1, 1)``). Their channel dims follow the residual stream."""

    def __init__(self, dim=16):
        super().__init__()
        self.embed, self.proj, self.fc, self.head = nn.Conv2d(3, dim, 2, stride=2), nn.Conv2d(4, dim, 1), nn.Linear(dim, dim), nn.Linear(dim, 3)
        self.pos_y, self.pos_x = nn.Parameter(torch.randn(1, 8, dim)), nn.Parameter(torch.randn(1, 4, dim))
        self.register_buffer("grid", torch.randn(1, 4, 4, 4))

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)  # (B, 16, dim)
        rows = F.interpolate(self.pos_y.permute(0, 2, 1), size=4, mode="linear", align_corners=False).permute(0, 2, 1)
        t = t + (rows[:, :, None] + self.pos_x[:, None, :]).flatten(1, 2)
        t = t + self.proj(self.grid).flatten(2).transpose(1, 2).repeat(x.shape[0], 1, 1)
        return self.head(t + torch.relu(self.fc(t))).mean(1)


def test_position_terms_built_from_parameters_follow_the_channels():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    for capture, gm in _pruned_in_both_front_ends(FactorisedPositions().eval(), x):
        assert gm.embed.weight.shape[0] == gm.proj.weight.shape[0] == 8 and gm.pos_y.shape == (1, 8, 8) and gm.pos_x.shape == (1, 4, 8), capture
        assert gm(x).shape == (2, 3)


class NormsAndLikes(nn.Module):
    """ConvNeXt-V2's GRN through ``torch.linalg.vector_norm`` (``aten.linalg_vector_norm`` once
    exported), a zero tensor shaped like the activations (``zeros_like``) and ``masked_fill_``."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1)
        self.gamma = nn.Parameter(torch.rand(1, 16, 1, 1))

    def forward(self, x):
        y = torch.relu(self.c1(x))
        g = torch.linalg.vector_norm(y, ord=2, dim=(2, 3), keepdim=True)
        y = y + self.gamma * (y * (g / (g.mean(dim=1, keepdim=True) + 1e-6)))
        y = y + torch.zeros_like(y).masked_fill_(y < 0, 1.0)
        return self.c2(y)


def test_vector_norms_and_tensors_shaped_like_the_activations_keep_the_channels():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    for capture, gm in _pruned_in_both_front_ends(NormsAndLikes().eval(), x):
        assert gm.c1.weight.shape[0] == gm.gamma.shape[1] == gm.c2.weight.shape[1] == 8, capture
        assert gm(x).shape == (2, 4, 6, 6)


class SlidingWindows(nn.Module):
    """Sliding windows over the spatial axes: ``Tensor.unfold`` twice (HaloNet's overlapping
    key/value blocks) and im2col / col2im (``F.unfold`` then ``F.fold``, VOLO's outlook
    attention; ``nn.Unfold`` / ``nn.Fold`` with ``modules``). The channels pass through both;
    ``Tensor.unfold`` across the channel axis mixes them and is left alone."""

    def __init__(self, modules=False, across=False):
        super().__init__()
        self.a, self.b, self.c, self.head = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 1), nn.Conv2d(16, 12, 1), nn.Linear(12, 3)
        self.unfold = nn.Unfold(3, padding=1) if modules else None
        self.fold = nn.Fold((8, 8), 3, padding=1) if modules else None
        self.across = across

    def forward(self, x):  # (B, 3, 8, 8)
        y = torch.relu(self.a(x))
        w = F.pad(y, [1, 1, 1, 1]).unfold(2, 4, 2).unfold(3, 4, 2)  # (B, 16, 4, 4, 4, 4)
        y = y + F.interpolate(w.mean((-2, -1)), size=(8, 8))
        cols = self.unfold(y) if self.unfold is not None else F.unfold(y, 3, padding=1)  # (B, 16*9, 64)
        y = self.fold(cols * 0.5) if self.fold is not None else F.fold(cols * 0.5, (8, 8), 3, padding=1)
        y = self.c(torch.relu(self.b(y)))
        if self.across:
            y = y.unfold(1, 4, 4).mean(-1).repeat(1, 4, 1, 1)
        return self.head(y.mean((2, 3)))


def test_sliding_windows_keep_the_channels():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    for model in (SlidingWindows(), SlidingWindows(modules=True)):
        for capture, gm in _pruned_in_both_front_ends(model.eval(), x):
            assert gm.get_parameter("a.weight").shape[0] == 8 and gm.get_parameter("c.weight").shape == (6, 8, 1, 1), capture
            assert gm(x).shape == (2, 3)


def test_unfold_across_the_channels_leaves_them_alone():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    result = qcd_fx.transform(SlidingWindows(across=True).eval(), "cdg-prune{ratio=0.5,criterion=l1}", example_inputs=x, capture="fx")
    gm = result.graph_module
    assert gm.c.weight.shape == (12, 8, 1, 1) and gm.a.weight.shape[0] == 8, result.report.notes()
    assert any("unfolds windows across the channels" in n for n in result.report.notes()), result.report.notes()


class SqueezedDepthwise(nn.Module):
    """Mamba's causal depthwise convolution on its slow path: the ``nn.Conv1d``'s weight is
    squeezed to (channels, kernel) and unsqueezed back for ``F.conv1d`` with ``groups`` = channels."""

    def __init__(self, width=16, kernel=4):
        super().__init__()
        self.inp, self.out = nn.Linear(8, width), nn.Linear(width, 8)
        self.conv = nn.Conv1d(width, width, kernel, groups=width, padding=kernel - 1)

    def forward(self, x):  # (B, T, 8)
        h = self.inp(x).transpose(1, 2)
        w = self.conv.weight.squeeze(1)
        h = F.conv1d(h, w.unsqueeze(1), self.conv.bias, padding=self.conv.kernel_size[0] - 1, groups=self.conv.groups)[..., : x.shape[1]]
        return self.out(F.silu(h).transpose(1, 2))


def test_a_depthwise_weight_squeezed_and_unsqueezed_back_is_the_parameter():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8)
    for capture, gm in _pruned_in_both_front_ends(SqueezedDepthwise().eval(), x):
        assert gm.get_parameter("conv.weight").shape == (8, 1, 4) and gm.get_parameter("inp.weight").shape == (8, 8), capture
        assert gm(x).shape == (2, 6, 8)
