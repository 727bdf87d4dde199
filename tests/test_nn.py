import pytest
import torch
from torch import nn

from qcd_fx.nn import InterfaceGate, StateCompression, compression_mask


class SeedInterface(nn.Module):
    """The seed's QuantumClassicalInterface, literally (features on the last dim)."""

    def __init__(self, dim, beta=1.0):
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(beta))
        self.info_projector = nn.Linear(dim, dim)
        self.entropy_estimator = nn.Linear(dim, 1)

    def forward(self, x):
        x_info = self.info_projector(x)
        entropy = self.entropy_estimator(x).sigmoid()
        efficiency = x_info.abs().mean(-1, keepdim=True) / (entropy + 1e-8)
        interface_gate = torch.sigmoid(self.beta * efficiency)
        return interface_gate * x_info + (1 - interface_gate) * x


def seed_compression(tensor, alpha=0.5, epsilon=1e-8):
    """The seed's cosmic_state_compression, literally."""
    info = tensor.abs()
    entropy = -(tensor.softmax(dim=-1) * tensor.log_softmax(dim=-1))
    mask = torch.sigmoid((info / (entropy + epsilon)) - alpha)
    return tensor * mask


def copy_into_seed(gate: InterfaceGate) -> SeedInterface:
    seed = SeedInterface(gate.width, float(gate.beta.detach())).double()
    with torch.no_grad():
        seed.info_projector.weight.copy_(gate.projector())
        seed.info_projector.bias.copy_(gate.projector_bias)
        seed.entropy_estimator.weight.copy_(gate.estimator_weight)
        seed.entropy_estimator.bias.copy_(gate.estimator_bias)
    return seed


@pytest.mark.parametrize("rank", [None, 3])
def test_gate_computes_the_seed_formula(rank):
    gate = InterfaceGate(16, init="seed", rank=rank, generator=torch.Generator().manual_seed(1)).double()
    x = torch.randn(4, 5, 16, dtype=torch.float64)
    assert torch.allclose(gate(x), copy_into_seed(gate)(x), atol=1e-12)


def test_seed_init_matches_nn_linear_distribution():
    gate = InterfaceGate(64, init="seed")
    w = gate.projector()
    bound = 1 / 64**0.5
    assert w.abs().max() <= bound + 1e-6 and w.std() > bound / 3  # random, not the identity


@pytest.mark.parametrize("rank", [None, 1, 4])
@pytest.mark.parametrize("shape,channel_dim,spatial", [((3, 7, 24), -1, 0), ((2, 24, 5, 5), 1, 2), ((2, 24, 9), 1, 1), ((2, 24, 3, 3, 3), 1, 3)])
def test_identity_gate_is_exactly_the_identity(rank, shape, channel_dim, spatial):
    gate = InterfaceGate(24, channel_dim, spatial, init="identity", rank=rank)
    x = torch.randn(shape) * 100
    y = gate(x)
    assert torch.equal(y, x) and y is not x
    assert torch.equal(gate.projector(), torch.eye(24))


@pytest.mark.parametrize("spatial,shape", [(1, (2, 12, 7)), (2, (2, 12, 5, 6)), (3, (2, 12, 3, 4, 2))])
def test_channel_gate_equals_feature_gate_on_channels_last(spatial, shape):
    """A channels-first gate is the features-last gate applied at every position (1x1 conv)."""
    g = torch.Generator().manual_seed(3)
    conv = InterfaceGate(12, 1, spatial, init="seed", rank=None, generator=g).double()
    lin = InterfaceGate(12, -1, init="seed").double()
    lin.load_state_dict(conv.state_dict())
    x = torch.randn(shape, dtype=torch.float64)
    expected = lin(x.movedim(1, -1)).movedim(-1, 1)
    assert torch.allclose(conv(x), expected, atol=1e-12)


def test_low_rank_parameter_cost():
    d, r = 256, 8
    full = InterfaceGate(d)
    low = InterfaceGate(d, rank=r)
    extra = d + d + 1 + 1  # projector bias, estimator weight + bias, beta
    assert sum(p.numel() for p in full.parameters()) == d * d + extra
    assert sum(p.numel() for p in low.parameters()) == 2 * r * d + extra
    assert InterfaceGate(8, rank=8).rank is None  # rank >= width is the full projector


def test_identity_gate_trains_like_lora():
    """At identity init the delta path is zero; one step later every parameter gets gradient."""
    torch.manual_seed(0)
    gate = InterfaceGate(10, rank=2)
    x = torch.randn(32, 10)
    target = torch.randn(32, 10)
    opt = torch.optim.SGD(gate.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.mse_loss(gate(x), target).backward()
        opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gate.parameters())


@pytest.mark.parametrize("bad", [dict(width=0), dict(width=4, channel_dim=2), dict(width=4, init="random"), dict(width=4, rank=0)])
def test_gate_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        InterfaceGate(**bad)


def test_compression_equals_the_seed_formula():
    x = torch.randn(6, 11) * 3
    assert torch.equal(StateCompression(0.5)(x), seed_compression(x, 0.5))
    assert torch.equal(StateCompression(1.5)(x), seed_compression(x, 1.5))


def test_compression_along_channels():
    x = torch.randn(2, 8, 4, 4)
    expected = seed_compression(x.movedim(1, -1), 0.7).movedim(-1, 1)
    assert torch.allclose(StateCompression(0.7, dim=1)(x), expected, atol=1e-7)


@pytest.mark.parametrize("alpha", [0.5, 2.0, 8.0])
def test_hard_mode_zeroes_what_soft_scales_below_half(alpha):
    x = torch.randn(64, 10) * 0.3
    mask = compression_mask(x, alpha)
    hard = StateCompression(alpha, hard=True)(x)
    below = mask < 0.5
    assert torch.equal(hard[below], torch.zeros_like(hard[below]))
    assert torch.equal(hard[~below], x[~below])


def test_soft_mask_never_zeroes_at_seed_alpha():
    """Seed defect 10: with alpha=0.5 the soft mask is in [sigmoid(-0.5), 1]: nothing is zeroed;
    only hard mode produces zeros."""
    x = torch.randn(1000, 10)
    m = compression_mask(x, 0.5)
    assert m.min() >= torch.sigmoid(torch.tensor(-0.5)) - 1e-6
    assert (StateCompression(0.5)(x) == 0).sum() == 0
    assert (StateCompression(0.5, hard=True)(x) == 0).sum() > 0


def test_compression_keeps_half_precision_dtype():
    x = torch.randn(4, 16).half()
    y = StateCompression(1.0, hard=True)(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
