"""cdg-prune on timm architectures (random weights, small inputs, no downloads), each chosen for
a construct fx records differently from torchvision: functional norms, channel slices and
splits, grouped convolutions with channel multipliers, `.norm`/`addcmul`, `unbind` and
`scaled_dot_product_attention`, `reshape_as`, parameters viewed with literal sizes, sizes
computed from `x.shape`. Each pruned model must be valid (outputs and widths kept, forward and
backward, re-trace, ONNX parity) and reach the MACs reduction the ratio promises."""

import pytest
import torch

import qcd_fx

timm = pytest.importorskip("timm")

# name, constructor keywords (small inputs), input side, least MACs reduction at ratio 0.5
MODELS = [
    ("cspresnet50", {}, 64, 3.5),  # F.batch_norm inside BatchNormAct2d, x.split(n, 1)
    ("ghostnet_100", {}, 64, 3.0),  # out[:, :out_chs] of a concatenation
    ("poolformer_s12", {}, 64, 3.5),  # F.group_norm, scale.view(C, 1, 1)
    ("convnextv2_atto", {}, 64, 3.5),  # GRN: x.norm(p=2, dim=(1, 2)), addcmul
    ("vit_tiny_patch16_224", {"img_size": 64}, 64, 3.5),  # qkv.unbind(0), F.scaled_dot_product_attention
    ("levit_128s", {"img_size": 64}, 64, 3.0),  # reshape_as, attention-bias caches
    ("fastvit_t8", {}, 64, 3.0),  # grouped convolutions with a channel multiplier
    ("coat_lite_tiny", {"img_size": 64}, 64, 2.8),  # reshape(B, N, 3, heads, C // heads), C from x.shape: -1 there once pruned
    ("mixer_s16_224", {"img_size": 64}, 64, 3.0),  # a Linear over the token axis (channels pass through)
    ("cspnext_tiny", {}, 64, 3.0),  # one ranking over cat(main, short) -> SE: no layer may lose every channel
]


def _build(name, kwargs, side):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    return model, torch.randn(2, 3, side, side)


@pytest.mark.parametrize("name, kwargs, side, least", MODELS, ids=[m[0] for m in MODELS])
def test_timm_prunes_validly(name, kwargs, side, least, tmp_path):
    model, x = _build(name, kwargs, side)
    with torch.no_grad():
        ref = model(x)
    result = qcd_fx.transform(model, "cdg-prune{ratio=0.5,criterion=l1}", example_inputs=x)
    gm, row, base = result.graph_module, result.report.passes[0], result.report.baseline
    with torch.no_grad():
        out = gm(x)
        torch.testing.assert_close(model(x), ref)  # the caller's model is unchanged
    assert out.shape == ref.shape
    assert base.macs / row.after.macs >= least, (base.macs / row.after.macs, row.notes)
    with torch.no_grad():
        assert torch.equal(qcd_fx.trace(gm)(x), out)  # an ordinary GraphModule: re-traces to the same function
    gm.train()
    gm(x).square().mean().backward()
    assert all(p.grad is not None for p in gm.parameters() if p.requires_grad)
    gm.eval()
    report = qcd_fx.export_onnx(gm, (x,), str(tmp_path / f"{name}.onnx"))
    assert report.ok and report.max_abs is not None


class _ResidualFeatures(torch.nn.Module):
    """Every conv adds into a residual stream that is the model's output: its width never changes."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.Conv2d(32, 32, 3, padding=1)

    def forward(self, x):
        y = self.c1(x)
        y = y + self.c2(torch.relu(y))
        return y + self.c3(torch.relu(y))


def test_requested_and_achieved_are_reported():
    """A model whose channels are mostly left alone says so: the achieved MACs reduction is far
    below what the ratio asks, and the frozen channels are counted per reason."""
    torch.manual_seed(0)
    result = qcd_fx.transform(_ResidualFeatures().eval(), "cdg-prune{ratio=0.5,criterion=l1}", example_inputs=torch.randn(2, 3, 8, 8))
    stats = result.report.passes[0].stats
    assert stats["requested_ratio"] == 0.5 and stats["channels"] > 0
    assert stats["frozen_channels"] == {"model output (its width never changes)": 96}, stats["frozen_channels"]
    warnings = result.report.warnings()
    assert len(warnings) == 1 and "ratio 0.5 asks for about 75%" in warnings[0] and "left alone: 96 for model output" in warnings[0], warnings
    model, x = _build("cspresnet50", {}, 64)
    assert qcd_fx.transform(model, "cdg-prune{ratio=0.5,criterion=l1}", example_inputs=x).report.warnings() == []


def test_timm_models_by_name_in_the_cli(tmp_path, monkeypatch):
    from helpers import one_line_error, run

    monkeypatch.chdir(tmp_path)
    one_line_error(run("transform", "timm:resnet1"), 1, "timm has no model 'resnet1'", "did you mean 'resnet18'")
    res = run("transform", "timm:resnet10t", "-s", "1,3,32,32", "-p", "cdg-prune{criterion=l1}")
    assert res.exit_code == 0 and "groups pruned" in res.stdout, res.stderr
