import json
import re
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import symbolic_trace
from torch.nn.modules.conv import _ConvNd

import qcd_fx
from qcd_fx import zoo
from qcd_fx.errors import InputShapeError, PostconditionError, TraceError
from qcd_fx.nn import InterfaceGate, StateCompression
from qcd_fx.passes import CSC, QCI, Pass, PassOutcome, Pipeline
from qcd_fx.passes.compression import ACTIVATION_MODULES


def wide_call_sites(model: nn.Module, min_width: int = 10) -> int:
    """Independent count of Linear/Conv call sites wider than min_width, from plain fx."""
    gm = symbolic_trace(model)
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            width = m.out_features if isinstance(m, nn.Linear) else m.out_channels if isinstance(m, _ConvNd) else 0
            count += width > min_width
    return count


def gates_of(gm):
    return [m for m in gm.modules() if isinstance(m, InterfaceGate)]


def check_identity_qci(name: str):
    model, shape = zoo.build(name, small=True)
    x = torch.randn((2, *shape[1:]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = qcd_fx.transform(model, "qci", example_inputs=(x,))
    gm = result.graph_module
    with torch.no_grad():
        assert torch.equal(gm(x), model(x)), f"{name}: identity gates changed the output"
    gates = gates_of(gm)
    assert len(gates) == wide_call_sites(model) == result.report.passes[0].stats["gates"]
    # the caller's model is untouched, and the gated model holds the same original weights
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, InterfaceGate) for m in model.modules())
    gm_state = gm.state_dict()
    assert all(torch.equal(gm_state[k], before[k]) for k in before if k in gm_state)
    # it trains: a backward pass reaches every gate parameter
    gm.train()
    out = gm(x)
    out = out if isinstance(out, torch.Tensor) else out[0]
    out.square().mean().backward()
    for gate in gates:
        for pname, p in gate.named_parameters():
            assert p.grad is not None, f"{name}: no gradient for {pname}"
    assert any(g.projector_delta.grad.abs().sum() > 0 for g in gates)


@pytest.mark.parametrize("name", zoo.CI_SUBSET)
def test_identity_qci_on_ci_subset(name):
    check_identity_qci(name)


@pytest.mark.zoo
@pytest.mark.parametrize("name", zoo.classification_models())
def test_identity_qci_on_every_torchvision_model(name):
    model, shape = zoo.build(name, small=True)
    x = torch.randn((2, *shape[1:]))
    with torch.no_grad():
        assert torch.equal(symbolic_trace(model)(x), model(x)), f"{name}: fx trace differs from eager"
    check_identity_qci(name)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "swin_t", "vit_b_16"])
def test_csc_on_activations_keeps_shapes(name):
    model, shape = zoo.build(name, small=True)
    x = torch.randn((2, *shape[1:]))
    result = qcd_fx.transform(model, "qci,csc{target=activations}", example_inputs=(x,))
    gm = result.graph_module
    activations = sum(
        1
        for n in symbolic_trace(model).graph.nodes
        if (n.op == "call_module" and isinstance(model.get_submodule(n.target), ACTIVATION_MODULES))
        or (n.op == "call_function" and getattr(n.target, "__name__", "") in ("relu", "gelu", "silu", "hardswish"))
    )
    masks = [m for m in gm.modules() if isinstance(m, StateCompression)]
    assert len(masks) == activations == result.report.passes[1].stats["masks"]
    with torch.no_grad():
        assert gm(x).shape == model(x).shape
    assert result.report.passes[1].drift_abs > 0  # CSC changes the function by design


class TwiceAndFunctional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.w = nn.Parameter(torch.randn(32, 16) / 4)
        self.narrow = nn.Linear(16, 4)

    def forward(self, x):
        y = torch.relu(self.fc(x))
        y = self.fc(y)  # the same module, called twice
        z = F.linear(y, self.w)  # a functional call
        return self.narrow(z[:, :16]), z


def test_modules_called_twice_and_functional_calls():
    model = TwiceAndFunctional().eval()
    x = torch.randn(3, 16)
    result = qcd_fx.transform(model, "qci", example_inputs=(x,))
    gm = result.graph_module
    assert result.report.passes[0].stats == {"gates": 3, "narrow_sites_skipped": 1}
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), InterfaceGate)]
    assert targets == ["fc_qci", "fc_qci_1", "qci_linear"]
    with torch.no_grad():
        for a, b in zip(gm(x), model(x)):
            assert torch.equal(a, b)
    # without example inputs the functional call's width is unknown: skipped, and said so
    bare = qcd_fx.transform(model, "qci")
    assert bare.report.passes[0].stats["gates"] == 2
    assert any("functional call 'linear'" in note for note in bare.report.notes())
    assert bare.report.passes[0].drift_abs is None and bare.report.final.macs is None


def test_leaf_modules_with_hidden_projections_are_reported():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.fc = nn.Linear(32, 32)

        def forward(self, x):
            return self.fc(self.attn(x, x, x)[0])

    result = qcd_fx.transform(Attn().eval(), "qci", example_inputs=(torch.randn(2, 5, 32),))
    assert result.report.passes[0].stats["gates"] == 1
    assert any("MultiheadAttention" in n and "in_proj" in n for n in result.report.notes())


def test_min_width_rank_and_seed_init(digits_cnn):
    x = torch.randn(2, 1, 8, 8)
    wide = qcd_fx.transform(digits_cnn, "qci{min_width=32}", example_inputs=x)
    assert wide.report.passes[0].stats == {"gates": 2, "narrow_sites_skipped": 2}
    full = qcd_fx.transform(digits_cnn, "qci", example_inputs=x).report
    low = qcd_fx.transform(digits_cnn, "qci{rank=4}", example_inputs=x).report
    base = full.baseline.params
    assert full.final.params - base == sum(d * d + 2 * d + 2 for d in (32, 64, 64))
    assert low.final.params - base == sum(2 * 4 * d + 2 * d + 2 for d in (32, 64, 64))
    assert full.final.macs > low.final.macs > full.baseline.macs
    seeded = qcd_fx.transform(digits_cnn, "qci{init=seed}", example_inputs=x)
    assert seeded.report.passes[0].drift_abs > 0
    again = qcd_fx.transform(digits_cnn, "qci{init=seed}", example_inputs=x)
    assert all(torch.equal(a, b) for a, b in zip(seeded.graph_module.state_dict().values(), again.graph_module.state_dict().values()))


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.fc = nn.Linear(16, 12)

    def forward(self, x):
        f = self.conv(x)
        return {"logits": self.fc(f.mean((2, 3))), "features": f, "pair": (f.mean(), f.shape[0])}


def test_csc_on_dict_and_tuple_outputs():
    model = DictOut().eval()
    x = torch.randn(2, 3, 6, 6)
    result = qcd_fx.transform(model, "csc", example_inputs=(x,))
    gm = result.graph_module
    masks = {n.target: gm.get_submodule(n.target).dim for n in gm.graph.nodes if n.op == "call_module" and "csc" in n.target}
    assert sorted(masks.values()) == [-1, -1, 1]  # logits: last dim, feature map: channels, scalar mean
    out = gm(x)
    ref = model(x)
    assert set(out) == {"logits", "features", "pair"} and out["pair"][1] == 2
    expected = StateCompression(0.5, dim=1)(ref["features"])
    assert torch.equal(out["features"], expected)


def test_csc_glob_targets_and_hard_sparsity(digits_cnn):
    x = torch.randn(4, 1, 8, 8)
    result = qcd_fx.transform(digits_cnn, "csc{target=[features.2,features.5],alpha=4,hard=true}", example_inputs=x)
    row = result.report.passes[0]
    assert row.stats["masks"] == 2 and row.stats["dims"] == [1]
    sparsity = row.stats["csc_sparsity"]
    assert len(sparsity) == 2 and all(0 < s < 1 for s in sparsity.values())
    nothing = qcd_fx.transform(digits_cnn, "csc{target=[nomatch*]}", example_inputs=x)
    assert nothing.report.passes[0].modified is False
    assert any("no node matched" in n for n in nothing.report.notes())


def test_report_rows_and_json(digits_cnn):
    result = qcd_fx.transform(digits_cnn, "qci,csc", example_inputs=torch.randn(1, 1, 8, 8))
    d = json.loads(result.report.to_json())
    assert [r["name"] for r in d["passes"]] == ["qci", "csc"]
    q = d["passes"][0]
    assert q["nodes_added"] == 3 and q["nodes_removed"] == 0 and q["drift_abs"] == 0.0
    assert d["final"]["params"] > d["baseline"]["params"] and d["final"]["macs"] > d["baseline"]["macs"]
    assert result.report.to_dict()["pipeline"] == "qci,csc"
    assert result.pipeline == Pipeline([QCI(), CSC()])


def test_bad_example_inputs_name_the_node(digits_cnn):
    with pytest.raises(InputShapeError, match=r"example inputs \(1x3x8x8\) do not fit DigitsCNN \(at node 'features_0'\)"):
        qcd_fx.transform(digits_cnn, "qci", example_inputs=torch.randn(1, 3, 8, 8))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Branchy()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.block(x))


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


def test_untraceable_model_names_construct_and_suggests_leaf():
    with pytest.raises(TraceError) as info:
        qcd_fx.trace(Untraceable())
    msg = str(info.value)
    assert "control flow" in msg and "'block' (Branchy)" in msg and "--leaf block" in msg
    gm = qcd_fx.trace(Untraceable(), leaf_modules=["Branchy"])
    assert any(n.op == "call_module" and n.target == "block" for n in gm.graph.nodes)
    result = qcd_fx.transform(Untraceable(), "qci{min_width=4}", example_inputs=torch.randn(2, 8), leaf_modules=["block"])
    assert result.report.passes[0].stats["gates"] == 1


# --- verification catches broken passes -------------------------------------------------------


@dataclass(frozen=True)
class ScaleNode(Pass):
    """Multiplies one node's value by 2 and (wrongly) claims to preserve the function."""

    name = "test-scale"
    node: str = "features_3"

    @property
    def preserves_function(self):
        return True

    def call(self, gm):
        node = next(n for n in gm.graph.nodes if n.name == self.node)
        with gm.graph.inserting_after(node):
            doubled = gm.graph.call_function(torch.mul, (node, 2.0))
        node.replace_all_uses_with(doubled, delete_user_cb=lambda u: u is not doubled)
        return PassOutcome(gm, True)


@dataclass(frozen=True)
class FlattenOutput(Pass):
    name = "test-flatten"

    def call(self, gm):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            flat = gm.graph.call_function(torch.flatten, (out.args[0],))
        out.args = (flat,)
        return PassOutcome(gm, True)


@dataclass(frozen=True)
class LogNegative(Pass):
    name = "test-nan"

    def call(self, gm):
        node = next(n for n in gm.graph.nodes if n.name == "features_1")
        with gm.graph.inserting_after(node):
            bad = gm.graph.call_function(torch.log, (node,))
        node.replace_all_uses_with(bad, delete_user_cb=lambda u: u is not bad)
        return PassOutcome(gm, True)


@dataclass(frozen=True)
class Misordered(Pass):
    name = "test-order"

    def call(self, gm):
        first = next(n for n in gm.graph.nodes if n.op == "call_module")
        later = list(first.users)[0]
        with gm.graph.inserting_before(first):
            gm.graph.call_function(torch.relu, (later,))
        return PassOutcome(gm, True)


def test_drift_in_a_function_preserving_pass_names_pass_and_node(digits_cnn):
    with pytest.raises(
        PostconditionError,
        match=r"pass 'test-scale' at node 'mul': declared function-preserving but outputs drifted by .*; it changes the value of 'features_4'",
    ):
        Pipeline([ScaleNode()]).run(digits_cnn, torch.randn(2, 1, 8, 8))


def test_output_shape_change_is_caught(digits_cnn):
    with pytest.raises(PostconditionError, match=r"pass 'test-flatten' at node 'output': output 0 changed shape \(2, 10\) -> \(20,\)"):
        Pipeline([FlattenOutput()]).run(digits_cnn, torch.randn(2, 1, 8, 8))


def test_non_finite_outputs_are_traced_to_their_node(digits_cnn):
    with pytest.raises(PostconditionError, match=r"pass 'test-nan' at node 'log': outputs became non-finite"):
        Pipeline([LogNegative()]).run(digits_cnn, torch.randn(2, 1, 8, 8))


def test_lint_failure_is_a_postcondition_error(digits_cnn):
    with pytest.raises(PostconditionError, match=r"pass 'test-order': graph.lint\(\) failed"):
        Pipeline([Misordered()]).run(digits_cnn, torch.randn(2, 1, 8, 8))


class RandomMasking(nn.Module):
    """Keeps a random half of the tokens in every forward (as ViT-MAE does), then a wide Linear."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.head = nn.Linear(32, 32)

    def forward(self, x):
        h = self.embed(x)
        keep = torch.rand_like(h[..., 0]).argsort(dim=1)[:, :3]
        h = torch.gather(h, 1, keep.unsqueeze(-1).expand(-1, -1, h.shape[2]))
        return self.head(h.relu())


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_checks_of_models_that_draw_random_numbers_use_the_same_draws(capture):
    model, x = RandomMasking(), torch.randn(2, 6, 8)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    result = qcd_fx.transform(model, "qci", example_inputs=(x,), capture=capture)
    assert result.report.passes[0].drift_abs == 0  # both runs masked the same tokens
    assert torch.equal(torch.rand(3), expected_next)  # the checks did not move the caller's random stream
    assert len(gates_of(result.graph_module)) == 2


def test_transform_accepts_graph_modules_and_pass_lists(digits_cnn):
    gm = qcd_fx.trace(digits_cnn)
    result = qcd_fx.transform(gm, [QCI(min_width=40)], example_inputs=torch.randn(1, 1, 8, 8))
    assert len(gates_of(result.graph_module)) == 2
    assert not gates_of(gm)  # copied, not modified in place
    again = qcd_fx.transform(result.graph_module, Pipeline.parse("csc"), example_inputs=torch.randn(1, 1, 8, 8))
    assert len(gates_of(again.graph_module)) == 2  # gates stay opaque leaves when re-traced


def test_generated_forward_reaches_submodules_through_dicts(tmp_path):
    """fx's getattr chains cost ~7 % of a batch-1 forward on small nets; qcd-fx GraphModules
    index ``_modules`` instead. Names, state_dict keys and results are unchanged, and the code
    generator survives recompile, deepcopy and save/load."""
    import copy

    from qcd_fx import zoo

    model, shape = zoo.build("mobilenet_v3_small", small=True)
    x = torch.randn(shape)
    gm = qcd_fx.trace(model)
    assert "getattr(" not in gm.code and "self._modules['features']._modules['0']._modules['0'](" in gm.code
    assert list(gm.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    out = qcd_fx.transform(model, "qci{rank=4},csc", (x,)).graph_module
    for again in (out, copy.deepcopy(out)):
        again.recompile()
        assert "getattr(" not in again.code
    qcd_fx.save(out, tmp_path / "m.pt")
    loaded = qcd_fx.load(tmp_path / "m.pt")
    assert "getattr(" not in loaded.code
    with torch.no_grad():
        assert torch.equal(loaded(x), out(x))


@dataclass(frozen=True)
class SeesContext(Pass):
    """Records the context the pipeline hands it (and changes nothing)."""

    name = "test-sees-context"
    seen: list = None  # type: ignore[assignment]

    def call(self, gm, context):
        self.seen.append(context)
        return PassOutcome(gm, False)


def test_passes_get_example_inputs_and_calibration_as_an_explicit_context(digits_cnn):
    x = torch.randn(2, 1, 8, 8)
    batches = [torch.randn(4, 1, 8, 8), torch.randn(3, 1, 8, 8)]
    seen = []
    result = Pipeline([SeesContext(seen=seen)]).run(digits_cnn, x, calibration=batches, tolerance=1e-3)
    (ctx,) = seen
    assert ctx.example_inputs[0] is x and ctx.tolerance == 1e-3
    assert [b[0] for b in ctx.calibration] == batches  # the same tensor objects, in order
    assert not any("calib" in str(k) for k in result.graph_module.meta)  # no side channel in gm.meta
    seen.clear()
    Pipeline([SeesContext(seen=seen)]).run(digits_cnn, x)
    assert seen[0].calibration == ((x,),)  # default: the example inputs
    seen.clear()
    SeesContext(seen=seen)(qcd_fx.trace(digits_cnn))  # called on its own: an empty context
    assert seen[0].example_inputs is None and seen[0].calibration == ()


def test_qci_refuses_gates_that_cannot_fit_before_allocating_them():
    """A full-rank gate after a 200,000-wide layer would need 160 GB: one clear error naming the
    layer and the two ways out, raised before anything is allocated; both ways out work."""
    from qcd_fx.errors import PreconditionError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 200_000)).eval()
    x = torch.randn(2, 8)
    with pytest.raises(PreconditionError, match=r"after '2' with 200,000 features, 160\.0 GB.*qci\{rank=16\}.*qci\{max_width=N\}"):
        qcd_fx.transform(model, "qci", example_inputs=(x,))
    low = qcd_fx.transform(model, "qci{rank=16}", example_inputs=(x,))
    assert torch.equal(low.graph_module(x), model(x)) and low.report.passes[0].stats["gates"] == 2
    capped = qcd_fx.transform(model, "qci{max_width=1000}", example_inputs=(x,))
    assert capped.report.passes[0].stats == {"gates": 1, "narrow_sites_skipped": 0, "wide_sites_skipped": 1}
    assert any("wider than max_width=1000" in n for n in capped.report.passes[0].notes)
    with pytest.raises(ValueError, match="max_width must be > min_width"):
        QCI(max_width=5)


def test_qci_counts_the_process_memory_limit_not_only_the_machine():
    """Under a data limit (``ulimit -d``, as a job scheduler or a container sets) the machine's
    free memory is not what the process can take: gates that fit the machine but not the
    limit are refused before allocation, with the same message."""
    import subprocess
    import sys

    code = """
import resource, torch, qcd_fx
from torch import nn
from qcd_fx.errors import PreconditionError
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
used = int(status["VmData"].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_DATA, (used + (400 << 20), resource.RLIM_INFINITY))
model = nn.Sequential(nn.Linear(8, 8192)).eval()
try:
    qcd_fx.transform(model, "qci", example_inputs=(torch.randn(2, 8),))
    print("accepted")
except PreconditionError as e:
    print("refused:", e)
low = qcd_fx.transform(model, "qci{rank=16}", example_inputs=(torch.randn(2, 8),))
print("low rank gates:", low.report.passes[0].stats["gates"])
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # 0.27 GB of gates against at most 0.4 GB under the limit (the machine may have far more)
    assert re.search(r"refused: .*1 full-rank gates need 0\.3 GB.*more than half of the 0\.[1-4] GB of memory available.*qci\{rank=16\}", done.stdout), (
        done.stdout
    )
    assert "low rank gates: 1" in done.stdout
