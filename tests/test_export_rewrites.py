"""The onnxscript rewrite-rule adjustment: in force only during an export, loud when onnxscript moved."""

import pytest
import torch
from torch import nn

pytest.importorskip("onnxscript")
import onnxscript.rewriter as rewriter  # noqa: E402

from qcd_fx.errors import ExportError  # noqa: E402
from qcd_fx.export import export_onnx  # noqa: E402
from qcd_fx.export.rewrites import ONNXSCRIPT_RANGE, faithful_rules  # noqa: E402


class Eps(nn.Module):
    """``x / (s + 1e-8)``: onnxscript's default ``x + 0 -> x`` rule deletes the epsilon."""

    def forward(self, x):
        s = x.sum(1, keepdim=True) * 0.0
        return x / (s + 1e-8)


def test_the_default_rules_are_untouched_outside_an_export():
    before = rewriter._DEFAULT_REWRITE_RULES
    seen = []
    original_optimize = None

    import torch.onnx._internal.exporter._onnx_program as onnx_program

    original_optimize = onnx_program.ONNXProgram.optimize

    def spy(self):
        seen.append(rewriter._DEFAULT_REWRITE_RULES)
        return original_optimize(self)

    onnx_program.ONNXProgram.optimize = spy
    try:
        report = export_onnx(Eps(), torch.randn(2, 4), None)
    finally:
        onnx_program.ONNXProgram.optimize = original_optimize
    assert report.ok
    assert rewriter._DEFAULT_REWRITE_RULES is before
    assert len(seen) == 1 and seen[0] is not before and len(seen[0]) < len(before)
    assert set(map(id, seen[0])) <= set(map(id, before))


def test_the_epsilon_survives_export():
    x = torch.randn(3, 4)
    report = export_onnx(Eps(), x, None)
    assert report.ok and report.max_abs is not None


def test_a_moved_private_name_fails_loudly(monkeypatch):
    monkeypatch.delattr(rewriter, "_DEFAULT_REWRITE_RULES")
    with pytest.raises(ExportError, match=r"onnxscript .* has no onnxscript\.rewriter\._DEFAULT_REWRITE_RULES.*pip install") as info:
        export_onnx(Eps(), torch.randn(2, 4), None)  # no silent TorchScript fallback either
    assert ONNXSCRIPT_RANGE in str(info.value) and "\n" not in str(info.value)


def test_rules_without_the_approximate_no_ops_are_refused():
    from onnxscript.rewriter.rules.common import _no_op

    exact = {id(_no_op.dropout_zero_rule), id(_no_op.dropout_inference_rule)}
    without = tuple(r for r in rewriter._DEFAULT_REWRITE_RULES if id(r) in exact or r not in _no_op.rules.rules)
    with pytest.raises(ExportError, match="approximate no-op rules"):
        faithful_rules(without, slices=0)
