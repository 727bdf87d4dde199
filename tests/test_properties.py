"""Property-based tests: random MLPs and CNNs under random pipelines stay valid graphs."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import qcd_fx
from qcd_fx.passes import CSC, QCI, Pipeline

ACTS = [nn.ReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Tanh]


class RandomCNN(nn.Module):
    def __init__(self, widths, acts, residual, concat, convdim):
        super().__init__()
        Conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[convdim]
        BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[convdim]
        self.stem = Conv(3, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for w_in, w_out, act in zip(widths, widths[1:], acts):
            self.blocks.append(nn.Sequential(Conv(w_in, w_out, 3, padding=1), BN(w_out), act()))
        self.residual = [residual and w_in == w_out for w_in, w_out in zip(widths, widths[1:])]
        self.concat = concat
        out_w = widths[-1] * (2 if concat else 1)
        self.head = nn.Linear(out_w, 7)

    def forward(self, x):
        x = self.stem(x)
        for block, residual in zip(self.blocks, self.residual):
            y = block(x)
            x = x + y if residual else y
        if self.concat:
            x = torch.cat([x, torch.relu(x)], dim=1)
        return self.head(x.flatten(2).mean(-1))


def mlp(widths, acts):
    layers = []
    for w_in, w_out, act in zip(widths, widths[1:], acts):
        layers += [nn.Linear(w_in, w_out), act()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], 5))


widths = st.lists(st.integers(1, 40), min_size=2, max_size=5)
acts = st.lists(st.sampled_from(ACTS), min_size=4, max_size=4)
passes = st.lists(
    st.one_of(
        st.builds(QCI, min_width=st.integers(0, 30), init=st.sampled_from(["identity", "seed"]), rank=st.one_of(st.none(), st.integers(1, 6))),
        st.builds(
            CSC,
            alpha=st.floats(0, 3),
            target=st.sampled_from(["output", "activations", ("blocks*",), ("*relu*", "head")]),
            hard=st.booleans(),
        ),
    ),
    min_size=1,
    max_size=3,
)


def check(model, x, pipeline):
    model.eval()
    with torch.no_grad():
        expected = model(x)
    result = pipeline.run(model, (x,))
    gm = result.graph_module
    gm.graph.lint()
    with torch.no_grad():
        out = gm(x)
    assert out.shape == expected.shape and torch.isfinite(out).all()
    if all(p.preserves_function for p in pipeline):
        assert torch.equal(out, expected)
    # the result re-traces with qcd-fx and still computes the same thing
    with torch.no_grad():
        assert torch.equal(qcd_fx.trace(gm)(x), out)
    assert len(result.report.passes) == len(pipeline)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(widths, acts, passes, st.integers(1, 4))
def test_random_mlps(ws, activations, ps, batch):
    torch.manual_seed(0)
    check(mlp(ws, activations), torch.randn(batch, ws[0]), Pipeline(ps))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(widths, acts, st.booleans(), st.booleans(), st.sampled_from([1, 2, 3]), passes)
def test_random_cnns(ws, activations, residual, concat, convdim, ps):
    torch.manual_seed(0)
    model = RandomCNN(ws, activations, residual, concat, convdim)
    x = torch.randn((2, 3) + (5,) * convdim)
    check(model, x, Pipeline(ps))
