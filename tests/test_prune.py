import copy

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import qcd_fx
from qcd_fx import zoo
from qcd_fx.analysis import count_macs, count_params
from qcd_fx.errors import PipelineSpecError, PreconditionError
from qcd_fx.examples import digits_mlp
from qcd_fx.passes import Pipeline
from qcd_fx.passes.dependency import analyze
from qcd_fx.passes.prune import _ensure_shapes, _select, apply_pruning, cdg_freeze

PRUNE_MODELS = (
    "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "vgg11_bn", "densenet121", "efficientnet_b0",
    "regnet_x_400mf", "shufflenet_v2_x1_0", "squeezenet1_1", "googlenet", "convnext_tiny", "vit_b_16", "swin_t",
)  # fmt: skip
BN_CNNS = ("resnet18", "mobilenet_v3_small", "densenet121", "efficientnet_b0", "regnet_x_400mf", "shufflenet_v2_x1_0", "squeezenet1_1", "googlenet")


def outputs_close(a, b, rel=1e-5):
    scale = float(b.abs().max())
    return float((a - b).abs().max()) <= rel * max(scale, 1e-30)


@pytest.mark.parametrize("name", PRUNE_MODELS)
def test_zoo_models_prune_at_half(name):
    model, shape = zoo.build(name, small=True)
    x = torch.randn((2, *shape[1:]))
    result = qcd_fx.transform(model, "cdg-prune{ratio=0.5}", example_inputs=(x,))
    gm = result.graph_module
    row = result.report.passes[0]
    base = result.report.baseline
    with torch.no_grad():
        ref = model(x)
        out = gm(x)
    assert out.shape == ref.shape  # the classifier keeps every class
    assert row.after.macs < 0.5 * base.macs and row.after.params < 0.6 * base.params
    assert row.stats["groups_pruned"] > 0 and row.stats["channels_removed"] > 0
    # an ordinary GraphModule: it re-traces to the same function, trains, and saves
    with torch.no_grad():
        assert torch.equal(qcd_fx.trace(gm)(x), out)
    gm.train()
    gm(x).square().mean().backward()
    assert all(p.grad is not None for p in gm.parameters() if p.requires_grad)


# ONNX parity of every pruned model in the list; the default run exports the architectures the
# qci,csc export test (tests/test_export.py) leaves to `-m slow`, and a few more; all with `-m slow`
PRUNE_EXPORT_DEFAULT = ("resnet50", "mobilenet_v2", "vgg11_bn", "densenet121", "shufflenet_v2_x1_0", "googlenet", "swin_t")


@pytest.mark.parametrize("name", [n if n in PRUNE_EXPORT_DEFAULT else pytest.param(n, marks=pytest.mark.slow) for n in PRUNE_MODELS])
def test_pruned_models_export_to_onnx_with_parity(name, tmp_path):
    from test_export import assert_onnx_parity

    model, shape = zoo.build(name, small=True)
    x = torch.randn((2, *shape[1:]))
    gm = qcd_fx.transform(model, "cdg-prune{ratio=0.5}", example_inputs=(x,)).graph_module
    report = assert_onnx_parity(gm, (x,), str(tmp_path / f"{name}.onnx"))
    assert report.exporter == "dynamo" and report.fallback_reason is None, report


@pytest.mark.parametrize("name", BN_CNNS)
def test_pruning_equals_zeroing_the_removed_channels(name):
    """Zero every weight slice of the channels to remove: the pruned network computes the same
    function as that zeroed network (exact for BatchNorm CNNs; LayerNorm/attention renormalise)."""
    model, shape = zoo.build(name, small=True)
    x = torch.randn((2, *shape[1:]))
    gm = qcd_fx.trace(copy.deepcopy(model))
    _ensure_shapes(gm, [(x,)], "test")
    deps = analyze(gm)
    removed = _select(deps, np.random.default_rng(0).random(deps.num_atoms), 1, ratio=0.5)
    keep = deps.kept_atoms(removed)
    tensors = {**dict(gm.named_parameters(remove_duplicate=False)), **dict(gm.named_buffers(remove_duplicate=False))}
    with torch.no_grad():
        for (tname, dim), atoms in deps.bindings.items():
            idx = torch.from_numpy(np.nonzero(~keep[atoms])[0])
            if len(idx):
                tensors[tname].index_fill_(dim, idx, 0.0)
        zeroed = gm.eval()(x)
        pruned = copy.deepcopy(gm)
        apply_pruning(pruned, deps, removed)
        assert count_params(pruned) < 0.6 * count_params(gm)
        assert outputs_close(pruned.eval()(x), zeroed)


class Chain(nn.Module):
    """A plain conv chain: pruning ratio r scales MACs by about (1 - r)^2."""

    def __init__(self, w=64, depth=5):
        super().__init__()
        layers = [nn.Conv2d(3, w, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(w, 10, 1)

    def forward(self, x):
        return self.head(self.body(x)).mean((2, 3))


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_macs_fall_by_the_square_of_the_kept_fraction(ratio):
    model = Chain().eval()
    x = torch.randn(1, 3, 16, 16)
    result = qcd_fx.transform(model, f"cdg-prune{{ratio={ratio},criterion=l1}}", example_inputs=x)
    macs_ratio = result.report.baseline.macs / result.report.final.macs
    expected = 1 / (1 - ratio) ** 2
    # the input and output layers keep one side: the measured ratio lies a little below the ideal
    assert 0.8 * expected <= macs_ratio <= expected
    assert macs_ratio == pytest.approx(count_macs(model, (x,)) / count_macs(result.graph_module, (x,)))


def test_never_empties_a_layer_and_rounds():
    model = Chain(w=24).eval()
    x = torch.randn(1, 3, 8, 8)
    gm = qcd_fx.transform(model, "cdg-prune{ratio=0.99,criterion=l1}", example_inputs=x).graph_module
    convs = [m for m in gm.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs[:-1]] == [1] * (len(convs) - 1) and convs[-1].out_channels == 10
    gm8 = qcd_fx.transform(model, "cdg-prune{ratio=0.7,round_to=8,criterion=l1}", example_inputs=x).graph_module
    assert all(c.out_channels % 8 == 0 for c in gm8.modules() if isinstance(c, nn.Conv2d) and c.out_channels != 10)


def test_squeezenet_keeps_its_conv_classifier():
    model, shape = zoo.build("squeezenet1_1", small=True)
    gm = qcd_fx.transform(model, "cdg-prune{ratio=0.5}", example_inputs=torch.randn(shape)).graph_module
    assert gm.get_submodule("classifier.1").out_channels == 1000


def test_criteria_differ_and_are_deterministic():
    model, shape = zoo.build("resnet18", small=True)
    x = torch.randn(2, *shape[1:])
    kept = {}
    for crit in ("cdg", "l1", "l2", "random"):
        gm = qcd_fx.transform(model, f"cdg-prune{{criterion={crit}}}", example_inputs=x).graph_module
        kept[crit] = gm.get_submodule("layer1.0.conv1").weight.detach().clone()
        again = qcd_fx.transform(model, f"cdg-prune{{criterion={crit}}}", example_inputs=x).graph_module
        assert torch.equal(again.get_submodule("layer1.0.conv1").weight, kept[crit])
    assert not torch.equal(kept["l1"], kept["random"]) and not torch.equal(kept["cdg"], kept["random"])


class ResBlock(nn.Module):
    """Two groups: the residual width (stem and b, one unit per channel pair) and a's width."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 24, 3, padding=1)
        self.b = nn.Conv2d(24, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)
        with torch.no_grad():
            self.head.weight.mul_(3)  # puts the output's efficiency among the channels' (some below, some above)

    def forward(self, x):
        h = self.stem(x)
        h = h + self.b(torch.relu(self.a(torch.relu(h))))
        return self.head(h.mean((2, 3)))


def seed_efficiency(t, dim=None):
    """The seed's E = (I - S)/(I + S + 1e-8), softmax over the last axis: I = mean |t| and S = the mean of
    -p log p, over everything (dim=None) or along ``dim`` (per channel when channels are last)."""
    p = t.softmax(-1)
    info, ent = t.abs().mean(dim), -(p * p.log()).mean(dim)
    return (info - ent) / (info + ent + 1e-8)


def test_threshold_auto_is_the_seed_rule():
    """Exactly the units whose E (the mean over the unit's channels) is below the output's E go."""
    model = ResBlock().eval()
    x = torch.randn(4, 3, 8, 8)
    acts = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o)) for n in ("stem", "a", "b")]
    with torch.no_grad():
        threshold = float(seed_efficiency(model(x)))
    for h in hooks:
        h.remove()
    eff = {n: seed_efficiency(a.movedim(1, -1).flatten(0, 2), 0) for n, a in acts.items()}  # per channel, channels last
    expected = {"a": eff["a"] >= threshold, "residual": (eff["stem"] + eff["b"]) / 2 >= threshold}
    assert all(0 < int(k.sum()) < len(k) for k in expected.values())  # both groups lose some units, keep others
    result = qcd_fx.transform(model, "cdg-prune{threshold=auto}", example_inputs=x)
    assert result.report.passes[0].stats["output_efficiency"] == pytest.approx(threshold, rel=1e-5)
    gm = result.graph_module
    kept = {name: torch.isin(getattr(model, name).bias, getattr(gm, name).bias) for name in ("stem", "a", "b")}
    assert torch.equal(kept["a"], expected["a"])
    assert torch.equal(kept["stem"], expected["residual"]) and torch.equal(kept["b"], expected["residual"])


def test_target_macs_search():
    model = Chain().eval()
    x = torch.randn(1, 3, 16, 16)
    result = qcd_fx.transform(model, "cdg-prune{target_macs=0.4,criterion=l1}", example_inputs=x)
    frac = result.report.final.macs / result.report.baseline.macs
    assert 0.3 <= frac <= 0.4


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(16, 32)
        self.weak = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
        self.strong = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
        self.head = nn.Linear(32, 4)
        with torch.no_grad():
            self.weak[2].weight.mul_(1e-4)
            self.weak[2].bias.zero_()
            self.strong[2].weight.mul_(20)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.weak(x)
        x = x + self.strong(x)
        return self.head(x)


def test_node_scope_removes_inefficient_residual_branches():
    model = Residual().eval()
    x = torch.randn(8, 16)
    result = qcd_fx.transform(model, "cdg-prune{scope=nodes}", example_inputs=x)
    gm = result.graph_module
    assert result.report.passes[0].stats["branches_removed"] == ["add"]
    assert not hasattr(gm, "weak") and hasattr(gm, "strong")
    assert torch.allclose(gm(x), model(x), atol=1e-2)  # the weak branch contributed ~nothing
    both = qcd_fx.transform(model, "cdg-prune{scope=both,criterion=l1}", example_inputs=x)
    assert both.report.final.params < result.report.final.params


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 32)
        self.shared = nn.Linear(32, 32)  # called twice
        self.out = nn.Linear(32, 8)
        self.back = nn.Linear(8, 32)

    def forward(self, x):
        h = torch.relu(self.shared(torch.relu(self.a(x))))
        h = self.shared(h + torch.relu(self.back(self.out(h))))
        return self.out(h)


def test_shared_modules_prune_consistently():
    model = Tied().eval()
    x = torch.randn(4, 8)
    gm = qcd_fx.transform(model, "cdg-prune{criterion=l1}", example_inputs=x).graph_module
    assert gm.shared.weight.shape[0] == gm.shared.weight.shape[1] < 32
    assert gm(x).shape == (4, 8)


class Opaque(nn.Module):
    def forward(self, x):
        return x.flip(1) if x.sum() > -1e9 else x


class WithLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3)
        self.leaf = Opaque()
        self.b = nn.Conv2d(16, 16, 3)
        self.c = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(self.leaf(self.a(x))))).mean((2, 3))


def test_untracked_ops_leave_their_group_alone_and_say_why():
    x = torch.randn(1, 3, 10, 10)
    result = qcd_fx.transform(WithLeaf().eval(), "cdg-prune{criterion=l1}", example_inputs=x, leaf_modules=["Opaque"])
    gm = result.graph_module
    assert gm.a.out_channels == 16 and gm.b.out_channels == 8
    assert any("no pruning rule for module Opaque" in n for n in result.report.notes())
    assert result.report.passes[0].stats["skip_reasons"] == {"no pruning rule for module Opaque": 1, "model output (its width never changes)": 1}


@pytest.mark.parametrize(
    "spec,message",
    [
        ("cdg-prune{ratio=1.5}", "ratio must be in [0, 1)"),
        ("cdg-prune{ratio=0.3,target_macs=0.5}", "only one of ratio, target_macs, target_latency and threshold=auto"),
        ("cdg-prune{threshold=auto,criterion=l1}", "needs criterion=cdg"),
        ("cdg-prune{round_to=0}", "round_to must be >= 1"),
        ("cdg-prune{criterion=l3}", "must be one of cdg, l1, l2, random"),
    ],
)
def test_bad_prune_options(spec, message):
    with pytest.raises(PipelineSpecError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        Pipeline.parse(spec)


def test_pruning_needs_example_inputs():
    with pytest.raises(PreconditionError, match="needs example inputs"):
        qcd_fx.transform(Chain(), "cdg-prune")


def test_gates_and_masks_prune_with_their_layers():
    model = Chain(w=32).eval()
    x = torch.randn(2, 3, 8, 8)
    result = qcd_fx.transform(model, "qci{rank=4},csc{target=activations},cdg-prune{criterion=l1}", example_inputs=x)
    gates = [m for m in result.graph_module.modules() if isinstance(m, qcd_fx.nn.InterfaceGate)]
    assert gates and all(g.width == 16 and g.projector_u.shape == (16, 4) for g in gates)
    assert result.graph_module(x).shape == (2, 10)


def test_cdg_freeze_is_the_seed_rule():
    torch.manual_seed(0)
    model = digits_mlp()
    x = torch.randn(16, 64)
    out = model(x)
    nn.functional.cross_entropy(out, torch.randint(0, 10, (16,))).backward()
    frozen = cdg_freeze(model, out)
    expected_out = qcd_fx.measures.efficiency(out.detach(), dim=-1)
    for name, p in model.named_parameters():
        low = bool(qcd_fx.measures.efficiency(p.detach(), dim=0) < expected_out)
        assert (name in frozen) == low and (p.grad is None) == low


# --- property-based: random graphs prune to valid, smaller models -----------------------------


class RandomNet(nn.Module):
    def __init__(self, widths, residual, concat, linear_head):
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1, groups=1) for a, b in zip(widths, widths[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm2d(b) for b in widths[1:])
        self.residual = [residual and a == b for a, b in zip(widths, widths[1:])]
        self.concat = concat
        last = widths[-1] * (2 if concat else 1)
        self.head = nn.Linear(last * 4, 5) if linear_head else nn.Conv2d(last, 5, 1)
        self.linear_head = linear_head

    def forward(self, x):
        x = self.stem(x)
        for conv, norm, res in zip(self.convs, self.norms, self.residual):
            y = torch.relu(norm(conv(x)))
            x = x + y if res else y
        if self.concat:
            x = torch.cat([x, torch.relu(x)], 1)
        if self.linear_head:
            return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 2), 1))
        return self.head(x).mean((2, 3))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.integers(2, 24), min_size=1, max_size=5),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.floats(0.1, 0.9),
    st.sampled_from(["l1", "cdg", "random"]),
)
def test_random_graphs_prune_to_smaller_valid_models(widths, residual, concat, linear_head, ratio, criterion):
    torch.manual_seed(0)
    model = RandomNet(widths, residual, concat, linear_head).eval()
    x = torch.randn(2, 3, 6, 6)
    result = qcd_fx.transform(model, f"cdg-prune{{ratio={ratio:.3f},criterion={criterion}}}", example_inputs=x)
    gm = result.graph_module
    gm.graph.lint()
    assert gm(x).shape == model(x).shape == (2, 5)
    assert result.report.final.params <= result.report.baseline.params
    if max(widths) * ratio >= 1:  # some group loses at least one channel
        assert result.report.final.params < result.report.baseline.params


# --- pruning + fine-tuning on the digits data set recovers accuracy ----------------------------


def _train(model, split, epochs, lr, seed=0):
    from qcd_fx.data import tensor_loader

    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loader = tensor_loader(split.x_train, split.y_train, batch_size=64, shuffle=True, seed=seed)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(loader))
    for _ in range(epochs):
        model.train()
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        return float((model(split.x_test).argmax(1) == split.y_test).float().mean())


def test_pruned_and_fine_tuned_cnn_recovers_accuracy():
    from qcd_fx.data import load_digits_split
    from qcd_fx.examples import digits_cnn

    split = load_digits_split()
    torch.manual_seed(0)
    model = digits_cnn()
    full = _train(model, split, epochs=12, lr=3e-3)
    calibration = [split.x_train[i : i + 128] for i in range(0, 512, 128)]
    result = qcd_fx.transform(model.eval(), "cdg-prune{ratio=0.5}", example_inputs=split.x_train[:8], calibration=calibration)
    pruned = result.graph_module
    assert result.report.final.macs < 0.3 * result.report.baseline.macs
    tuned = _train(pruned, split, epochs=10, lr=3e-3, seed=1)
    assert full > 0.95
    assert tuned >= full - 0.01, (full, tuned)


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 7), min_size=1, max_size=4), data=st.data(), p=st.sampled_from([1, 2]), chunk=st.sampled_from([1, 5, 1 << 20]))
def test_slice_norms_match_the_naive_reduction(shape, data, p, chunk):
    from qcd_fx.passes.prune import _slice_norms

    dim = data.draw(st.integers(0, len(shape) - 1))
    t = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape) * 7 + dim))
    naive = t.movedim(dim, 0).reshape(t.shape[dim], -1).abs().pow(p).sum(1)
    assert torch.allclose(_slice_norms(t, dim, p, chunk_elems=chunk), naive, rtol=1e-5, atol=1e-6)
