"""Dependency rules of ``cdg-prune`` for ops the zoo models do not exercise: Embedding, PReLU,
functional (transposed) convolutions, GroupNorm/InstanceNorm, stack, pad and ``x @ W``.

Each model is pruned by the pass (half of every group, criterion=random). Where channels go, the
tensors shrink consistently, the model keeps its output shape and computes what the original
computes with the removed channels' weight slices zeroed; where they cannot, the report says why.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcd_fx
from qcd_fx.errors import PipelineSpecError
from qcd_fx.passes.dependency import analyze
from qcd_fx.passes.prune import _ensure_shapes, _scores, _select

OUTPUT_ONLY = {"model output (its width never changes)": 1}  # the only group left alone: the classifier's


def prune(model, x, ratio=0.5, attention="heads"):
    """(pruned graph module, report row) of ``cdg-prune{criterion=random}``."""
    result = qcd_fx.transform(model.eval(), f"cdg-prune{{ratio={ratio},criterion=random,attention={attention}}}", example_inputs=(x,))
    gm = result.graph_module
    with torch.no_grad():
        assert gm(x).shape == model(x).shape
    return gm, result.report.passes[0]


def zeroed(model, x, ratio, attention="heads"):
    """The output of ``model`` with every weight slice of the channels the pass removes zeroed
    (the same analysis and random scores as :func:`prune`)."""
    gm = qcd_fx.trace(copy.deepcopy(model).eval())
    _ensure_shapes(gm, [(x,)], "test")
    deps = analyze(gm, attention=attention)
    keep = deps.kept_atoms(_select(deps, _scores(gm, deps, "random", {}, 0), 1, ratio=ratio))
    tensors = {**dict(gm.named_parameters(remove_duplicate=False)), **dict(gm.named_buffers(remove_duplicate=False))}
    with torch.no_grad():
        for (name, dim), atoms in deps.bindings.items():
            tensors[name].index_fill_(dim, torch.from_numpy(np.nonzero(~keep[atoms])[0]), 0.0)
        return gm(x)


def assert_prunes_exactly(model, x, ratio=0.5, attention="heads"):
    """Only the classifier is left alone and the pruned model equals the zeroed original;
    returns the pruned graph module."""
    gm, row = prune(model, x, ratio, attention)
    assert row.stats["channels_removed"] > 0 and row.stats["skip_reasons"] == OUTPUT_ONLY, row.stats
    with torch.no_grad():
        out, ref = gm(x), zeroed(model, x, ratio, attention)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6), float((out - ref).abs().max())
    return gm


def shapes(gm):
    return {k: tuple(v.shape) for k, v in gm.state_dict().items()}


def conv_images():
    return torch.randn(2, 3, 8, 8)


# --- Embedding --------------------------------------------------------------------------------


class EmbeddingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.fc = nn.Linear(16, 12)
        self.head = nn.Linear(12, 5)

    def forward(self, idx):
        return self.head(torch.relu(self.fc(self.emb(idx)))).mean(1)


class TiedLM(nn.Module):
    """The embedding matrix is also the output projection: the vocabulary stays, the width goes."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.mid = nn.Linear(16, 16)

    def forward(self, idx):
        h = self.emb(idx)
        h = h + torch.relu(self.mid(h))
        return F.linear(h, self.emb.weight)


def test_embedding_dim_is_pruned_with_its_consumers():
    gm = assert_prunes_exactly(EmbeddingNet(), torch.randint(0, 20, (2, 5)))
    assert gm.emb.weight.shape == (20, 8) and gm.emb.embedding_dim == 8
    assert gm.fc.in_features == 8 and gm.fc.weight.shape == (6, 8)


def test_tied_embedding_and_output_projection_prune_together():
    gm = assert_prunes_exactly(TiedLM(), torch.randint(0, 20, (2, 5)))
    assert gm.emb.weight.shape == (20, 8) and gm.mid.weight.shape == (8, 8)


# --- PReLU ------------------------------------------------------------------------------------


class PReLUNet(nn.Module):
    def __init__(self, num_parameters):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3)
        self.act = nn.PReLU(num_parameters)
        self.b = nn.Conv2d(16, 4, 1)
        with torch.no_grad():
            self.act.weight.uniform_(-1, 1)  # distinct slopes: a misaligned slice changes the output

    def forward(self, x):
        return self.b(self.act(self.a(x))).mean((2, 3))


@pytest.mark.parametrize("num_parameters,kept", [(16, 8), (1, 1)])
def test_prelu_slopes_follow_their_channels(num_parameters, kept):
    gm = assert_prunes_exactly(PReLUNet(num_parameters), conv_images())
    assert gm.a.out_channels == 8 and gm.act.num_parameters == kept and gm.act.weight.shape == (kept,)


class PReLUOnSequence(nn.Module):
    """PReLU's slopes run along axis 1 (the 6 positions), the Linear's features along axis 2."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.act = nn.PReLU(6)
        self.b = nn.Linear(16, 4)

    def forward(self, x):
        return self.b(self.act(self.a(x)))


def test_prelu_across_another_axis_leaves_the_group_alone():
    gm, row = prune(PReLUOnSequence(), torch.randn(2, 6, 8))
    assert shapes(gm) == shapes(PReLUOnSequence())
    assert row.stats["skip_reasons"] == {"PReLU weights on axis 1": 1, **OUTPUT_ONLY}


# --- functional convolutions ------------------------------------------------------------------


class FunctionalConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(16, 3, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(16))
        self.dw = nn.Parameter(torch.randn(16, 1, 3, 3) * 0.3)  # depthwise: groups given positionally
        self.w2 = nn.Parameter(torch.randn(4, 16, 1, 1) * 0.3)

    def forward(self, x):
        h = torch.relu(F.conv2d(x, self.w1, self.b1, padding=1))
        h = F.conv2d(h, self.dw, None, 1, 1, 1, 16)
        return F.conv2d(h, self.w2).mean((2, 3))


def test_functional_conv_weights_shrink_and_groups_follow():
    gm = assert_prunes_exactly(FunctionalConvs(), conv_images())
    assert shapes(gm) == {"w1": (8, 3, 3, 3), "b1": (8,), "dw": (8, 1, 3, 3), "w2": (4, 8, 1, 1)}
    assert [n.args[6] for n in gm.graph.nodes if n.target is torch.conv2d and len(n.args) > 6] == [8]


class ConvTranspose(nn.Module):
    def __init__(self, functional):
        super().__init__()
        self.functional = functional
        self.a = nn.Conv2d(3, 16, 3)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)  # weight (in, out, kH, kW)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = F.conv_transpose2d(h, self.up.weight, self.up.bias, stride=2) if self.functional else self.up(h)
        return self.head(torch.relu(h)).mean((2, 3))


@pytest.mark.parametrize("functional", [False, True])
def test_conv_transpose_prunes_both_sides(functional):
    gm = assert_prunes_exactly(ConvTranspose(functional), conv_images())
    assert gm.up.weight.shape == (8, 4, 2, 2) and gm.up.bias.shape == (4,) and gm.head.in_channels == 4


# --- GroupNorm / InstanceNorm -----------------------------------------------------------------


class Normed(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3)
        self.norm = norm
        self.b = nn.Conv2d(16, 4, 1)
        with torch.no_grad():
            for p in norm.parameters():
                p.uniform_(0.5, 1.5)
            if getattr(norm, "running_var", None) is not None:
                norm.running_mean.uniform_(-0.5, 0.5)
                norm.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.b(torch.relu(self.norm(self.a(x)))).mean((2, 3))


@pytest.mark.parametrize(
    "norm",
    [nn.InstanceNorm2d(16, affine=True), nn.InstanceNorm2d(16, affine=True, track_running_stats=True), nn.GroupNorm(16, 16)],
    ids=["instance", "instance-running-stats", "groupnorm-one-channel-per-group"],
)
def test_per_channel_norms_prune_exactly(norm):
    gm = assert_prunes_exactly(Normed(norm), conv_images())
    assert all(t.shape == (8,) for t in gm.norm.state_dict().values() if t.dim())
    attr = "num_features" if isinstance(norm, nn.InstanceNorm2d) else "num_groups"
    assert getattr(gm.norm, attr) == 8


def test_groupnorm_drops_the_same_local_channels_in_every_group():
    model = Normed(nn.GroupNorm(4, 16)).eval()
    x = conv_images()
    gm, row = prune(model, x)
    assert gm.norm.num_groups == 4 and gm.norm.num_channels == 8 and row.stats["skip_reasons"] == OUTPUT_ONLY
    kept = torch.isin(model.a.bias, gm.a.bias).nonzero().squeeze(1)
    assert len(kept) == 8 and len(set(map(tuple, (kept.view(4, 2) % 4).tolist()))) == 1
    # the group statistics change (fewer channels), so compare with the original restricted to the kept channels
    with torch.no_grad():
        h = F.group_norm(model.a(x)[:, kept], 4, model.norm.weight[kept], model.norm.bias[kept], model.norm.eps)
        ref = F.conv2d(torch.relu(h), model.b.weight[:, kept], model.b.bias).mean((2, 3))
        assert torch.allclose(gm(x), ref, rtol=1e-5, atol=1e-6)


# --- stack, pad -------------------------------------------------------------------------------


class StackSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3)
        self.b = nn.Conv2d(3, 16, 3)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(torch.stack([self.a(x), self.b(x)]).relu().sum(0)).mean((2, 3))


class StackInterleave(nn.Module):
    """Stacked on a new last axis and flattened: the head sees a0 b0 a1 b1 ..."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(8, 16)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(torch.stack([self.a(x), self.b(x)], -1).flatten(1))


def test_stacked_producers_prune_together():
    model = StackSum()
    gm = assert_prunes_exactly(model, conv_images())
    assert gm.a.out_channels == gm.b.out_channels == gm.head.in_channels == 8
    assert torch.equal(torch.isin(model.a.bias, gm.a.bias), torch.isin(model.b.bias, gm.b.bias))  # the same channels


def test_stack_then_flatten_keeps_interleaved_columns():
    gm = assert_prunes_exactly(StackInterleave(), torch.randn(2, 8))
    assert gm.a.out_features == gm.b.out_features == 8 and gm.head.in_features == 16


class Padded(nn.Module):
    def __init__(self, pad, mode="constant"):
        super().__init__()
        self.pad, self.mode = pad, mode
        self.a = nn.Conv2d(3, 16, 3)
        self.b = nn.Conv2d(16 + sum(pad[4:]), 4, 3)

    def forward(self, x):
        return self.b(F.pad(torch.relu(self.a(x)), self.pad, mode=self.mode)).mean((2, 3))


@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_spatial_padding_passes_channels_through(mode):
    gm = assert_prunes_exactly(Padded((1, 1, 2, 0), mode), conv_images())
    assert gm.a.out_channels == gm.b.in_channels == 8


def test_padding_the_channel_axis_leaves_the_group_alone():
    gm, row = prune(Padded((0, 0, 0, 0, 0, 2)), conv_images())
    assert gm.a.weight.shape == (16, 3, 3, 3) and gm.b.weight.shape == (4, 18, 3, 3)
    assert row.stats["skip_reasons"] == {"pads the channel axis": 1, **OUTPUT_ONLY}


# --- x @ W ------------------------------------------------------------------------------------


class MatmulNet(nn.Module):
    def __init__(self, stem):
        super().__init__()
        self.stem = nn.Linear(8, 8) if stem else nn.Identity()
        self.w1 = nn.Parameter(torch.randn(8, 16) * 0.3)
        self.b1 = nn.Parameter(torch.randn(16))
        self.w2 = nn.Parameter(torch.randn(16, 4) * 0.3)

    def forward(self, x):
        return torch.relu(self.stem(x) @ self.w1 + self.b1) @ self.w2


@pytest.mark.parametrize("stem", [True, False], ids=["after-linear", "on-the-input"])
def test_matmul_with_a_parameter_produces_channels(stem):
    gm = assert_prunes_exactly(MatmulNet(stem), torch.randn(2, 8))
    assert gm.w1.shape == ((4, 8) if stem else (8, 8)) and gm.b1.shape == (8,) and gm.w2.shape == (8, 4)


# --- frozen channels ---------------------------------------------------------------------------


class PartlyFrozen(nn.Module):
    """c's last 4 channels meet untracked values (frozen), its first 4 are d's; the stem is unrelated."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.d = nn.Conv2d(8, 4, 3, padding=1)
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        side = x.mean(1, keepdim=True).expand(-1, 4, -1, -1)
        return self.head(self.c(h) + torch.cat([self.d(h), side], 1)).mean((2, 3))


def test_frozen_channels_do_not_join_unrelated_groups():
    """Frozen channels once linked every group that had some into one ranking: the stem and c/d
    shared one ratio, and at 0.9 the stem lost every channel (a zero-width conv)."""
    gm = assert_prunes_exactly(PartlyFrozen(), conv_images(), ratio=0.9)
    assert (gm.stem.out_channels, gm.c.out_channels, gm.d.out_channels) == (1, 5, 1)


class _ExpandAsRepeat(nn.Module):
    """A gate broadcast with ``expand_as`` and a ``repeat`` along the channels (MoE/recurrent idioms)."""

    def __init__(self):
        super().__init__()
        self.a, self.g, self.b = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = self.a(x)
        h = h * self.g(x).mean(0, keepdim=True).expand_as(h)
        h2 = h.repeat(1, 2)  # every channel twice: removing one removes both copies
        return self.b(h2[:, :16] + h2[:, 16:])


def test_expand_as_ties_both_sides_and_repeat_tiles_the_channels():
    torch.manual_seed(0)
    model, x = _ExpandAsRepeat(), torch.randn(3, 8)
    gm = assert_prunes_exactly(model, x)
    assert shapes(gm)["a.weight"] == shapes(gm)["g.weight"] == (8, 8) and shapes(gm)["b.weight"] == (4, 8)
    exported = qcd_fx.transform(model, "cdg-prune{ratio=0.5,criterion=l1}", example_inputs=(x,), capture="export")
    assert exported.report.passes[0].stats["skip_reasons"] == OUTPUT_ONLY
    assert exported.graph_module(x).shape == (3, 4)


# --- recurrent layers -------------------------------------------------------------------------


class Recurrent(nn.Module):
    """Sequencer's block: a bidirectional LSTM over the rows of a (B, H, W, C) map and another
    over its columns, concatenated and projected; then a GRU whose last state is the summary."""

    def __init__(self, cell="lstm"):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.rows = nn.LSTM(16, 8, batch_first=True, bidirectional=True)
        self.cols = nn.LSTM(16, 8, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(32, 16)
        self.gru = nn.GRU(16, 12, batch_first=True)
        self.head = nn.Linear(12 + 16, 3)

    def forward(self, x):  # (B, H, W, 6)
        B, H, W, _ = x.shape
        x = self.inp(x)
        C = x.shape[-1]
        v, _ = self.rows(x.permute(0, 2, 1, 3).reshape(-1, H, C))
        v = v.reshape(B, W, H, -1).permute(0, 2, 1, 3)
        h, _ = self.cols(x.reshape(-1, W, C))
        x = x + self.fc(torch.cat([v, h.reshape(B, H, W, -1)], dim=-1))
        seq, state = self.gru(x.reshape(B, H * W, C))
        return self.head(torch.cat([state[0] + seq.mean(1), x.mean((1, 2))], dim=-1))


def test_recurrent_layers_prune_hidden_units_and_inputs_exactly():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 6)
    gm = assert_prunes_exactly(Recurrent(), x)
    assert (gm.rows.hidden_size, gm.rows.input_size, gm.gru.hidden_size, gm.gru.input_size) == (4, 8, 6, 8)
    assert gm.rows.weight_ih_l0_reverse.shape == (16, 8) and gm.rows.weight_hh_l0.shape == (16, 4) and gm.fc.weight.shape == (8, 16)
    assert gm.head.weight.shape == (3, 6 + 8)
    out = gm(x)
    out.sum().backward()  # trains: the recurrent kernel runs on the pruned weights
    assert gm.rows.weight_hh_l0.grad.shape == (16, 4)


def test_recurrent_layer_with_an_initial_state_is_left_alone():
    class WithState(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.lstm, self.head = nn.Linear(6, 16), nn.LSTM(16, 8, batch_first=True), nn.Linear(8, 3)
            self.h0 = nn.Parameter(torch.zeros(1, 1, 8))

        def forward(self, x):
            h0 = self.h0.expand(1, x.shape[0], 8).contiguous()
            return self.head(self.lstm(self.inp(x), (h0, h0))[0].mean(1))

    gm, row = prune(WithState(), torch.randn(2, 5, 6))
    assert gm.lstm.hidden_size == 8 and gm.lstm.input_size == 16 and gm.inp.out_features == 16
    assert "no pruning rule for LSTM with several layers, projections or a given initial state" in row.stats["skip_reasons"], row.stats


# --- attention: whole heads or narrower heads ---------------------------------------------------


class ThreeHeads(nn.Module):
    """timm's ViT attention with 3 heads: a fused qkv reshaped to (B, N, 3, heads, head_dim)."""

    def __init__(self, dim=24, heads=3):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.inp, self.qkv, self.proj, self.head = nn.Linear(8, dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, 3)

    def forward(self, x):
        x = self.inp(x)
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, self.heads * self.head_dim)
        return self.head(x + self.proj(y)).mean(1)


@pytest.mark.parametrize("attention, qkv_rows, proj_in", [("heads", 3 * 16, 16), ("dims", 3 * 12, 12)])
def test_attention_loses_whole_heads_or_the_same_dims_in_every_head(attention, qkv_rows, proj_in):
    torch.manual_seed(0)
    gm = assert_prunes_exactly(ThreeHeads(), torch.randn(2, 5, 8), attention=attention)
    assert gm.qkv.weight.shape == (qkv_rows, 12) and gm.proj.weight.shape == (12, proj_in)


def test_attention_option_is_checked():
    with pytest.raises(PipelineSpecError, match="attention"):
        qcd_fx.Pipeline.parse("cdg-prune{attention=columns}")
