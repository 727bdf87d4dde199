import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcd_fx
from qcd_fx.data import digits_loaders
from qcd_fx.nn.fractal import FractalLayer, first_primes


def test_primes():
    assert first_primes(10) == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]
    assert first_primes(0) == []


def test_shapes_and_levels():
    layer = FractalLayer(12, 7, levels=4, scales=2)
    assert layer(torch.randn(5, 12)).shape == (5, 7)
    assert layer(torch.randn(2, 3, 12)).shape == (2, 3, 7)
    z = layer.level_weights()
    assert z.shape == (4, 7, 12)
    assert torch.equal(z[0], layer.weight)  # Z_0 is the base weight
    assert bool((z[1:].abs() < 1).all())  # later levels are bounded
    nonzero = layer.weight != 0
    assert bool((torch.sign(z[1:]) == torch.sign(layer.weight))[:, nonzero].all())  # the sign is carried
    # c_n = 1/p_n + sum_k omega_k / p_{n+k} with omega_k = 1/K at initialisation
    c = layer.prime_offsets()
    expected = [1 / 2 + 0.5 * (1 / 3 + 1 / 5), 1 / 3 + 0.5 * (1 / 5 + 1 / 7), 1 / 5 + 0.5 * (1 / 7 + 1 / 11)]
    torch.testing.assert_close(c, torch.tensor(expected))
    torch.testing.assert_close(z[1], torch.sign(layer.weight) * torch.tanh(layer.weight.square() + c[0]))


def test_forward_is_the_documented_formula():
    torch.manual_seed(0)
    layer = FractalLayer(6, 4, levels=3, activation="sigmoid").double()
    with torch.no_grad():
        layer.attention_weight.normal_()
        layer.bias.normal_()
    x = torch.randn(5, 6, dtype=torch.float64)
    z = layer.level_weights()
    h = torch.softmax(x @ layer.attention_weight + layer.attention_bias, -1)
    pre = sum(h[:, i : i + 1] * (x @ z[i].T / math.sqrt(6) + 1 / [2, 3, 5][i]) for i in range(3)) + layer.bias
    torch.testing.assert_close(layer(x), torch.sigmoid(pre))


def test_fixed_scale_weights_are_a_buffer():
    layer = FractalLayer(4, 4, learn_scales=False)
    assert "omega" not in dict(layer.named_parameters()) and "omega" in dict(layer.named_buffers())
    assert layer(torch.randn(2, 4)).shape == (2, 4)


def test_attention_starts_uniform():
    layer = FractalLayer(8, 8, levels=5)
    h = layer.attention_weights(torch.randn(3, 8))
    torch.testing.assert_close(h, torch.full((3, 5), 0.2))
    static = FractalLayer(8, 8, levels=5, attention="static")
    assert static.attention_weight is None
    torch.testing.assert_close(static.attention_weights(torch.randn(3, 8)), torch.full((5,), 0.2))


def test_the_literal_seed_iteration_diverges_ours_stays_finite():
    z = torch.tensor([0.1, 0.5, -1.0])
    c = 1 / 2 + (1 / 3 + 1 / 5 + 1 / 7) / 3
    literal = z.clone()
    for _ in range(12):
        literal = literal.square() + c
    assert not bool(torch.isfinite(literal).all())  # z -> z^2 + c with c > 1/4 escapes
    layer = FractalLayer(3, 1, levels=200)
    with torch.no_grad():
        layer.weight.copy_(z.unsqueeze(0))
    levels = layer.level_weights()
    assert bool(torch.isfinite(levels).all()) and bool((levels[1:].abs() < 1).all())
    # a contraction: the deep levels have settled on a fixed point
    torch.testing.assert_close(levels[-1], levels[-2])


def test_long_chains_stay_finite_forward_and_backward():
    torch.manual_seed(0)
    chain = nn.Sequential(*[FractalLayer(16, 16, levels=20) for _ in range(60)])
    x = (1e4 * torch.randn(8, 16)).requires_grad_(True)
    y = chain(x)
    assert bool(torch.isfinite(y).all()) and bool((y.abs() <= 1).all())
    y.square().sum().backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in chain.parameters())
    assert bool(torch.isfinite(x.grad).all())


def test_traceable_by_torch_fx():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), FractalLayer(64, 32), nn.Linear(32, 10))
    gm = qcd_fx.trace(model)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(gm(x), model(x))


def test_trains_on_digits():
    torch.manual_seed(0)
    train, test, _ = digits_loaders(64, seed=0)
    model = nn.Sequential(nn.Flatten(), FractalLayer(64, 64), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    epoch_losses = []
    omega0 = model[1].omega.detach().clone()
    for _ in range(3):
        total, n = 0.0, 0
        for x, y in train:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(y)
            n += len(y)
        epoch_losses.append(total / n)
    assert epoch_losses[-1] < 0.25 * epoch_losses[0]
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in test)
    assert correct / 360 > 0.9
    assert not torch.equal(model[1].omega.detach(), omega0)  # the scale weights learn too
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_bad_arguments():
    with pytest.raises(ValueError, match="in_features must be a positive integer"):
        FractalLayer(0, 3)
    with pytest.raises(ValueError, match="levels must be a positive integer"):
        FractalLayer(3, 3, levels=0)
    with pytest.raises(ValueError, match="activation must be one of"):
        FractalLayer(3, 3, activation="swish")
    with pytest.raises(ValueError, match="attention must be one of input, static"):
        FractalLayer(3, 3, attention="global")
    with pytest.raises(RuntimeError):
        FractalLayer(3, 3)(torch.randn(2, 4))  # wrong feature size: einsum refuses it
