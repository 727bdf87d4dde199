"""Pruning the models users bring: every output leaf keeps its width (dicts, nested containers),
functional norms (what fx records inside timm's norm-act modules) prune with their channels,
split sizes follow the channels, and tracing or transforming never changes the caller's model."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcd_fx
from qcd_fx.analysis import count_macs


class DictHead(nn.Module):
    """Returns ``{"logits": ..., "features": ...}``, like timm's forward_head(pre_logits) users and HF ModelOutput."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        f = self.body(x).mean((2, 3))
        return {"logits": self.head(f), "features": f, "nested": [self.head(f) * 2]}


def test_every_output_leaf_keeps_its_width():
    torch.manual_seed(0)
    model = DictHead().eval()
    x = torch.randn(3, 3, 8, 8)
    result = qcd_fx.transform(model, "cdg-prune{criterion=l1}", example_inputs=x)
    out = result.graph_module(x)
    assert out["logits"].shape == (3, 5) and out["features"].shape == (3, 32) and out["nested"][0].shape == (3, 5)
    assert result.graph_module.get_submodule("body.0").out_channels == 8  # the inner layer was pruned; the outputs were not


class NormActFunctional(nn.Module):
    """A conv followed by norms in their functional spelling, as fx records timm's BatchNormAct2d."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.gn1 = nn.GroupNorm(16, 16)  # one channel per group: num_groups follows the channels
        self.conv4 = nn.Conv2d(16, 32, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(32, affine=True)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        x = F.batch_norm(self.conv1(x), self.bn.running_mean, self.bn.running_var, weight=self.bn.weight, bias=self.bn.bias, training=False, eps=1e-5)
        x = F.group_norm(torch.relu(self.conv2(x)), self.gn.num_groups, self.gn.weight, self.gn.bias, 1e-5)
        x = F.group_norm(torch.relu(self.conv3(x)), self.gn1.num_groups, self.gn1.weight, self.gn1.bias, 1e-5)
        x = F.instance_norm(self.conv4(x), weight=self.inorm.weight, bias=self.inorm.bias)
        return self.fc(x.mean((2, 3)))


def test_functional_norms_prune_with_their_channels():
    torch.manual_seed(0)
    model = NormActFunctional().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    result = qcd_fx.transform(model, "cdg-prune{criterion=l1}", example_inputs=x)
    gm = result.graph_module
    assert [gm.conv1.out_channels, gm.conv2.out_channels, gm.conv3.out_channels, gm.conv4.out_channels] == [8, 8, 8, 16]
    assert gm.bn.running_mean.shape == gm.bn.running_var.shape == gm.bn.weight.shape == (8,) and gm.gn.weight.shape == (8,)
    assert gm.inorm.weight.shape == (16,)
    assert any(n.target is F.group_norm and n.args[1] == 8 for n in gm.graph.nodes)  # one channel per group still
    assert gm(x).shape == (2, 4)
    before, after = count_macs(qcd_fx.trace(NormActFunctional().eval()), (x,)), count_macs(gm, (x,))
    assert after < 0.35 * before  # half of every width: ~1/4 of the MACs
    assert not any("no pruning rule" in n for n in result.report.notes())


class SplitByInt(nn.Module):
    """``x.split(128, dim=1)`` (timm's CSP stages): the piece size must shrink with the channels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 1)
        self.a = nn.Conv2d(16, 8, 1)
        self.b = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        left, right = self.conv(x).split(16, dim=1)
        return torch.cat([self.a(left), self.b(right)], 1)


def test_split_size_follows_the_channels():
    x = torch.randn(2, 3, 4, 4)
    result = qcd_fx.transform(SplitByInt().eval(), "cdg-prune{criterion=l1}", example_inputs=x)
    gm = result.graph_module
    assert gm.conv.out_channels == 16 and gm(x).shape == (2, 16, 4, 4)
    assert any(n.op == "call_method" and n.target == "split" and n.args[1] == 8 for n in gm.graph.nodes)


class Cached(nn.Module):
    """Caches a value computed from a parameter in a dict, like timm's LeViT attention biases."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.bias_table = nn.Parameter(torch.randn(8))
        self.cache = {}

    def bias(self):
        if "cpu" not in self.cache:
            self.cache["cpu"] = self.bias_table * 2
        return self.cache["cpu"]

    def forward(self, x):
        return self.lin(x) + self.bias()


def test_tracing_leaves_the_callers_model_as_it_was():
    model = nn.Sequential(Cached(), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(2, 8)
    gm = qcd_fx.trace(model)
    assert model[0].cache == {} and not any(k.startswith("_tensor_constant") for k in model.__dict__)
    torch.testing.assert_close(gm(x), model(x))  # the model still runs (no Proxy in its cache)
    # run once with gradients on (the usual order): the cache holds a non-leaf tensor
    model2 = nn.Sequential(Cached(), nn.ReLU(), nn.Linear(8, 3)).eval()
    model2(x)
    assert not model2[0].cache["cpu"].is_leaf
    result = qcd_fx.transform(model2, "qci{min_width=4}", example_inputs=x)  # copies the model first
    assert result.graph_module(x).shape == (2, 3) and model2[0].cache["cpu"].grad_fn is not None


def test_a_failing_first_run_that_is_not_about_shapes_is_not_called_a_shape_error():
    class Fails(nn.Module):
        def forward(self, x):
            raise ValueError("the model's own failure")

    with pytest.raises(qcd_fx.errors.QcdFxError) as info:
        qcd_fx.transform(nn.Sequential(nn.Linear(4, 4), nn.Sequential(Fails())), "qci", example_inputs=torch.randn(1, 4), leaf_modules=["Fails"])
    assert not isinstance(info.value, qcd_fx.errors.InputShapeError) and "the model's own failure" in str(info.value)


class _Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 8)
        self.c = nn.Linear(8, 32)
        self.d = nn.Linear(32, 4)

    def forward(self, x):
        y = self.b(torch.relu(self.a(x)).view(x.shape[0], 4, 4).flatten(1))
        return self.d(torch.relu(self.c(y)))


def test_a_pruned_graph_that_fails_is_undone_group_by_group():
    """If the analysis misses a size (here: the view's literal 4 is dropped from its rewrites),
    the pruned graph fails; the pass undoes it, leaves the groups that meet the failing node
    alone and prunes the rest, and says so."""
    import numpy as np

    from qcd_fx.passes.dependency import analyze
    from qcd_fx.passes.prune import _apply_checked, _select
    from qcd_fx.passes.runtime import Runner

    torch.manual_seed(0)
    gm = qcd_fx.trace(_Heads().eval())
    x = torch.randn(3, 8)
    Runner(gm).run(x)  # shapes
    deps = analyze(gm)
    view = next(n for n in gm.graph.nodes if n.op == "call_method" and n.target == "view")
    deps.arg_rewrites = [rw for rw in deps.arg_rewrites if rw.node != view.name]  # the analysis "misses" it
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    removed = _select(deps, np.random.default_rng(0).random(deps.num_atoms), 1, ratio=0.5)
    notes: list[str] = []
    widths, kept_removed = _apply_checked(gm, deps, removed, (x,), notes)
    assert any("left alone: pruned, the graph fails at node" in n for n in notes), notes
    assert gm(x).shape == (3, 4)  # it runs
    assert gm.a.weight.shape == before["a.weight"].shape  # the group through the view is untouched
    assert gm.c.weight.shape[0] == 16  # the other group is pruned
    assert 0 < len(kept_removed) < len(removed)


def test_a_failing_group_is_found_by_bisection_when_the_failing_node_names_no_channel():
    """When the failing node's channels are not tracked either (here: the analysis locates no
    channel anywhere), the pass bisects the pruned groups for one that fails on its own, leaves
    it alone and prunes the rest — rather than pruning nothing."""
    import numpy as np

    from qcd_fx.passes.dependency import analyze
    from qcd_fx.passes.prune import _apply_checked, _select
    from qcd_fx.passes.runtime import Runner

    torch.manual_seed(0)
    gm = qcd_fx.trace(_Heads().eval())
    x = torch.randn(3, 8)
    Runner(gm).run(x)
    deps = analyze(gm)
    view = next(n for n in gm.graph.nodes if n.op == "call_method" and n.target == "view")
    deps.arg_rewrites = [rw for rw in deps.arg_rewrites if rw.node != view.name]
    deps.units_at = lambda node: np.zeros(0, np.int64)  # the failing node names no channel
    removed = _select(deps, np.random.default_rng(0).random(deps.num_atoms), 1, ratio=0.5)
    notes: list[str] = []
    widths, kept_removed = _apply_checked(gm, deps, removed, (x,), notes)
    assert notes == [f"1 group(s) left alone: pruned, the graph fails at node '{view.name}' (RuntimeError: " + notes[0].split("(RuntimeError: ", 1)[1]]
    assert gm(x).shape == (3, 4)
    assert gm.a.weight.shape == (16, 8) and gm.c.weight.shape[0] == 16
    assert 0 < len(kept_removed) < len(removed)


class TwoStageConcat(nn.Module):
    """Inception-ResNet's shape: stage 2's input concatenates new channels with stage 1's
    residual stream, so both stages' streams are one group whose units span different layers
    (stage 1's in more of them). Stage 1's weights are small. Ranked as one, the units of one
    stage go and the other stage stays whole."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.s1 = nn.ModuleList(nn.Conv2d(16, 16, 3, padding=1) for _ in range(3))
        self.grow = nn.Conv2d(16, 16, 3, padding=1)
        self.s2 = nn.ModuleList(nn.Conv2d(32, 32, 3, padding=1) for _ in range(2))
        self.head = nn.Linear(32, 5)
        with torch.no_grad():
            for conv in [self.stem, *self.s1]:
                conv.weight.mul_(0.01)

    def forward(self, x):
        x = self.stem(x)
        for conv in self.s1:
            x = x + torch.relu(conv(x))
        x = torch.cat([self.grow(x), x], 1)
        for conv in self.s2:
            x = x + torch.relu(conv(x))
        return self.head(x.mean((2, 3)))


def test_a_group_spanning_stages_is_cut_in_every_layer():
    torch.manual_seed(0)
    model, x = TwoStageConcat().eval(), torch.randn(2, 3, 8, 8)
    result = qcd_fx.transform(model, "cdg-prune{ratio=0.5,criterion=l1}", example_inputs=x, capture="fx")
    gm = result.graph_module
    widths = {n: m.weight.shape[0] for n, m in gm.named_modules() if isinstance(m, nn.Conv2d)}
    assert widths == {"stem": 8, "s1.0": 8, "s1.1": 8, "s1.2": 8, "grow": 8, "s2.0": 16, "s2.1": 16}, widths
    assert count_macs(model, (x,)) / count_macs(gm, (x,)) > 3.5
    assert gm(x).shape == (2, 5)
