import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcd_fx import measures


def seed_efficiency(t, dim, eps=1e-8):
    """Literal copy of the seed's per-parameter efficiency (cosmic seed, CDG/CCE code)."""
    entropy = -(t.softmax(dim=dim) * t.log_softmax(dim=dim)).mean()
    info = t.abs().mean()
    return (info - entropy) / (info + entropy + eps)


@pytest.mark.parametrize("shape,dim", [((7,), 0), ((5, 3), 0), ((4, 6, 2), -1), ((2, 3, 4, 5), 1)])
def test_efficiency_is_the_seed_formula(shape, dim):
    t = torch.randn(shape)
    assert torch.equal(measures.efficiency(t, dim), seed_efficiency(t, dim))


def test_information_and_entropy_definitions():
    t = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    assert measures.information(t).item() == pytest.approx(t.abs().mean().item())
    p = t.softmax(-1)
    shannon = -(p * p.log()).sum(-1)
    assert measures.entropy(t, -1, "sum").item() == pytest.approx(shannon.mean().item(), rel=1e-6)
    # the seed's S is the mean of the element-wise term: Shannon entropy / slice length
    assert measures.entropy(t, -1).item() == pytest.approx(shannon.mean().item() / 3, rel=1e-6)
    assert measures.entropy(t, -1, "none").shape == t.shape


def test_scalar_tensor_and_bad_reduction():
    s = torch.tensor(2.0)
    assert measures.entropy(s, 0).item() == 0.0
    assert measures.efficiency(s, 0).item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        measures.entropy(torch.randn(3), reduction="max")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_finite_and_close(dtype):
    t = torch.randn(64, 32) * 20
    ref = measures.efficiency(t, 0)
    low = measures.efficiency(t.to(dtype), 0)
    assert torch.isfinite(low) and low.dtype == torch.float32
    assert low.item() == pytest.approx(ref.item(), abs=2e-2)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=40))
def test_efficiency_range_and_entropy_bounds(values):
    t = torch.tensor(values, dtype=torch.float64)
    e = measures.efficiency(t, 0).item()
    assert -1.0 <= e < 1.0
    terms = measures.entropy_terms(t, 0)
    assert (terms >= 0).all() and (terms <= 1 / math.e + 1e-12).all()
