"""An exported file must compute what the model computes on inputs other than the example:
value-dependent control flow is refused (never traced along one branch), parity is checked on
inputs of other signs and scales, and a float32 mismatch is judged against a float64 run."""

import numpy as np
import pytest
import torch
from helpers import leftovers, one_line_error, run
from torch import nn

import qcd_fx
from qcd_fx.errors import ExportError
from qcd_fx.export import export_onnx
from qcd_fx.export.verify import Float64Reference

BRANCHY = """
import torch
from torch import nn


class Branchy2(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        return self.lin(x) if x.mean() > 0 else -self.lin(x)


def branchy2():
    torch.manual_seed(0)
    return nn.Sequential(Branchy2(), nn.Linear(16, 10))
"""


@pytest.fixture
def branchy_dir(tmp_path, monkeypatch):
    (tmp_path / "faithful_models.py").write_text(BRANCHY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_value_branch_in_a_leaf_is_refused_in_one_line(branchy_dir):
    """The issue's case: dynamo fails on the data-dependent branch; no TorchScript trace of one branch is written."""
    res = run("export", "faithful_models:branchy2", "-s", "1,16", "--leaf", "Branchy2", "br2.onnx")
    one_line_error(res, 1, "depends on a tensor's value", "faithful_models.py:12", "x.mean() > 0", "graph node '_0' (Branchy2 '0')")
    assert "def forward" not in res.stderr + res.stdout  # torch's graph dumps stay out of the terminal
    assert not (branchy_dir / "br2.onnx").exists() and leftovers(branchy_dir) == []


class NumpyThenBranch(nn.Module):
    """``torch.export`` fails on the NumPy call (not on the branch), so the TorchScript fallback
    runs and meets the branch: its trace converts a tensor to a Python bool."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        y = self.proj(x) * float(np.asarray(x.detach()).std())
        if y.mean() > 1.0:
            return y
        return -y


class BakedScale(nn.Module):
    """cdist again, and a tensor value turned into a Python float: the TorchScript trace bakes
    the example's value in as a constant, which the sign/scale variants expose."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        scale = float(x.abs().max())
        return torch.cdist(self.proj(x), x) / scale


def test_torchscript_trace_through_a_branch_is_refused(tmp_path):
    gm = qcd_fx.trace(nn.Sequential(NumpyThenBranch()).eval(), leaf_modules=["NumpyThenBranch"])
    path = tmp_path / "branch.onnx"
    with pytest.raises(
        ExportError, match=r"branches on a tensor's value at .*test_export_faithful.py:\d+ \(`if y.mean\(\) > 1.0:`\).*dynamo exporter failed: .*numpy"
    ):
        export_onnx(gm, (torch.randn(2, 8),), str(path))
    assert not path.exists() and leftovers(tmp_path) == []


def test_a_baked_value_is_caught_by_the_scale_variant(tmp_path):
    gm = qcd_fx.trace(nn.Sequential(BakedScale()).eval(), leaf_modules=["BakedScale"])
    path = tmp_path / "baked.onnx"
    with pytest.raises(ExportError, match=r"differs from PyTorch by .* on inputs 10x \(batch 2\)"):
        export_onnx(gm, (torch.randn(2, 5, 8),), str(path), check_batch=2)  # the second batch is not the catch here
    assert not path.exists() and leftovers(tmp_path) == []


def test_variants_change_only_floating_inputs():
    from qcd_fx.export.signature import _value_variants

    x, ids, zeros = torch.randn(2, 3), torch.tensor([[1, 2], [3, 4]]), torch.zeros(2, 3)
    variants = dict(_value_variants((x, ids, zeros)))
    assert list(variants) == ["|x|", "-|x|", "10x"]
    assert bool((variants["|x|"][0] >= 0).all()) and bool((variants["-|x|"][0] <= 0).all())
    assert torch.equal(variants["10x"][0], x * 10)
    assert all(v[1] is ids for v in variants.values())  # indices keep their valid values
    assert bool((variants["|x|"][2] > 0).any())  # an all-zero input gets values of some sign first
    assert _value_variants((ids,)) == []


def test_float64_reference_measures_both_errors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).eval()
    x = torch.randn(4, 6)
    with torch.no_grad():
        f32 = model(x)
        f64 = model.double()(x.double())
    model.float()
    judge = Float64Reference(model)
    torch_err, onnx_err = judge.errors((x,), [f32.numpy()], [f32])  # a runtime that matches PyTorch exactly
    assert torch_err == onnx_err == float((f32.double() - f64).abs().max())
    torch_err, onnx_err = judge.errors((x,), [(f64 + 0.5).float().numpy()], [f32])
    assert onnx_err == pytest.approx(0.5, abs=1e-6) and torch_err < 1e-6
    assert next(model.parameters()).dtype == torch.float32  # the caller's module is not converted


class _CastNorm(nn.Module):
    """RMSNorm as transformers writes it: the statistics in an explicit float32."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        h = self.lin(x).to(torch.float32)
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_float64_reference_of_an_export_graph_runs_in_float64():
    """A torch.export graph spells the dtypes it traced (casts, dtype assertions): the float64
    copy promotes them, so the judgement runs (it failed on the assertions) and in float64
    throughout (a cast back to float32 would hide PyTorch's own float32 error)."""
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    gm = qcd_fx.trace(_CastNorm().eval(), (x,), capture="export")
    assert any(n.args[1:] == (torch.float32,) or n.kwargs.get("dtype") is torch.float32 for n in gm.graph.nodes if n.op == "call_function")
    with torch.no_grad():
        f32 = gm(x)
        h = torch.nn.functional.linear(x.double(), gm.lin.weight.double(), gm.lin.bias.double())
        exact = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)  # the module's own forward would cast to float32
    torch_err, onnx_err = Float64Reference(gm).errors((x,), [f32.numpy()], [f32])
    assert torch_err == onnx_err == float((f32.double() - exact).abs().max()) > 0
    assert all(p.dtype == torch.float32 for p in gm.parameters())  # the caller's graph is not converted


def test_float64_judgement_in_the_report(tmp_path):
    """With zero tolerance every float32 rounding difference fails the plain check; each input
    set is then judged against float64, and the report carries both errors."""
    torch.manual_seed(0)
    gm = qcd_fx.trace(nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(32, 32), nn.Tanh())]).eval())
    x = torch.randn(3, 32)
    try:
        report = export_onnx(gm, (x,), None, atol=0.0, rtol=0.0, float64_factor=1e6)
    except ExportError as e:  # no rounding difference at all is possible, but then nothing was judged
        pytest.fail(str(e))
    judged = [p for p in report.parity if p.float64_onnx is not None]
    for p in judged:
        assert p.ok and p.float64_onnx <= 1e6 * max(p.float64_torch, 0.0) + 0.0 and p.max_abs > 0
    assert all(p.max_abs == 0 for p in report.parity if p.float64_onnx is None)
    if judged:
        assert "against a float64 run onnxruntime's error is" in report.summary()
    with pytest.raises(Exception, match="float64_factor must be"):
        export_onnx(gm, (x,), None, float64_factor=-1)
