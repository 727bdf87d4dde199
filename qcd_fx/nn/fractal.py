"""The fractal layer of the QDT seed (``quantum-duality-theory-ml.md``, sections 3 and 5.2).

Seed formulas: a multi-scale prime-modulated transformation of a weight matrix ``Z`` and a
hierarchical softmax attention over the levels it produces::

    Z_{n+1} = Z_n^2 + 1/p_n + sum_{k=1..K} omega_k / p_{n+k}            (3.1)
    F_out   = sigma( sum_{i=1..L} Z_i . F_in . H_i + 1/p_i )              (3.2)
    H_i     = exp(phi_i) / sum_j exp(phi_j),   phi = F_in . A             (3.2, 5.2)

(``p_1, p_2, ... = 2, 3, 5, ...`` the primes, ``omega_k`` learnable scale weights.) The seed's code
squares ``Z`` element-wise and calls helpers it never defines (``_generate_primes``,
``_initialize_scale_weights``, ``_initialize_attention``, ``_apply_attention``, the attribute
``attention_weights``); here each is defined, and the iteration is made well-defined:

* **Bounded.** Iterated literally, ``z -> z^2 + c`` with ``c = 1/2 + ... > 1/4`` escapes to
  infinity for every real start (the real Mandelbrot set ends at ``c = 1/4``): the seed's
  levels overflow after a handful of steps. Each level is squashed, ``Z_{n+1} = tanh(Z_n^2 + c_n)``
  in magnitude, so every level after the first lies in ``(-1, 1)`` whatever ``c_n``. The map
  ``m -> tanh(m^2 + c)`` is a contraction on ``[0, 1]`` for ``c >= 0.11`` (its slope
  ``2 m sech^2(m^2 + c)`` peaks at 1.11 for ``c = 0``, 0.64 for ``c = 0.48`` and 0.44 for
  ``c = 0.73``, the initial ``c_1, c_2``), so levels approach a fixed point and gradients through
  a long chain of levels shrink instead of exploding.
* **Sign.** ``Z^2`` forgets the sign of ``Z``, which would leave every level after the first
  with all-positive weights (a near rank-one, constant matrix); the sign of the base weights is
  carried through the levels: ``Z_{n+1} = sign(W) * tanh(Z_n^2 + c_n)``, ``Z_0 = W``. Deeper
  levels are progressively harder, sign-like versions of ``W``.
* **Scale.** Levels are applied as ``x Z_i^T / sqrt(in_features)`` with ``W`` initialised at unit
  variance (fan-in scaling, as in LeCun initialisation), so all levels act at the same scale.
* **Attention.** ``phi(x) = x A + a`` per sample (the seed's ``np.dot(x, attention_weights)``;
  ``attention="input"``) or a learned constant ``a`` (``attention="static"``). ``A = 0, a = 0`` at
  initialisation: all levels start equally weighted.
* The prime term ``1/p_i`` is weighted by the attention of its level, like the level's transform.

The activation ``sigma`` defaults to ``tanh`` (outputs in ``(-1, 1)``: a stack of any depth stays
finite); ``"sigmoid"``, ``"gelu"``, ``"relu"`` and ``"identity"`` are available. Parameters:
``W`` (``out x in``, like ``nn.Linear``), ``omega`` (``K``), ``A`` (``in x L``), ``a`` (``L``),
bias (``out``). A forward pass costs ``L`` linear maps plus ``O(L in out)`` for the levels.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
    "relu": F.relu,
    "identity": lambda x: x,
}
ATTENTIONS = ("input", "static")


def first_primes(n: int) -> list[int]:
    """The first ``n`` primes (the seed's undefined ``_generate_primes``)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    primes: list[int] = []
    candidate = 2
    while len(primes) < n:
        if all(candidate % p for p in primes if p * p <= candidate):
            primes.append(candidate)
        candidate += 1
    return primes


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class FractalLayer(nn.Module):  # QDT fractal layer
    """Prime-modulated multi-scale transform with hierarchical attention over levels (QDT seed).

    Args:
        in_features, out_features: sizes, as for ``nn.Linear`` (input ``(..., in_features)``).
        levels: ``L``, number of levels ``Z_0 .. Z_{L-1}`` (default 3).
        scales: ``K``, number of prime scales in each ``c_n`` (default 3, the seed's ``num_scales``).
        attention: ``"input"`` (default; ``phi = x A + a``) or ``"static"`` (``phi = a``).
        activation: ``"tanh"`` (default), ``"sigmoid"``, ``"gelu"``, ``"relu"`` or ``"identity"``.
        bias: learnable output bias (default True).
        learn_scales: make ``omega`` learnable (default True; initialised to ``1/K`` each).
        generator: random source for the initialisation of ``W``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        levels: int = 3,
        scales: int = 3,
        *,
        attention: str = "input",
        activation: str = "tanh",
        bias: bool = True,
        learn_scales: bool = True,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.in_features = _positive_int("in_features", in_features)
        self.out_features = _positive_int("out_features", out_features)
        self.levels = _positive_int("levels", levels)
        self.scales = _positive_int("scales", scales)
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        self.attention = attention
        self.activation = activation
        bound = math.sqrt(3.0)  # unit variance
        w = torch.empty(out_features, in_features).uniform_(-bound, bound, generator=generator)
        self.weight = nn.Parameter(w)  # Z_0
        omega = torch.full((scales,), 1.0 / scales)
        self.omega = nn.Parameter(omega) if learn_scales else nn.Buffer(omega)
        self.attention_bias = nn.Parameter(torch.zeros(levels))
        if attention == "input":
            self.attention_weight = nn.Parameter(torch.zeros(in_features, levels))
        else:
            self.register_parameter("attention_weight", None)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        primes = torch.tensor(first_primes(levels + scales), dtype=torch.float32)
        self.register_buffer("inv_primes", primes.reciprocal(), persistent=False)

    def prime_offsets(self) -> Tensor:
        """``c_n = 1/p_n + sum_k omega_k / p_{n+k}`` for ``n = 1 .. L-1`` (shape ``(L-1,)``)."""
        inv = self.inv_primes.to(self.omega.dtype)
        n = self.levels - 1
        if n == 0:
            return inv[:0]
        idx = torch.arange(n, device=inv.device).unsqueeze(1) + torch.arange(1, self.scales + 1, device=inv.device)
        return inv[:n] + (inv[idx] * self.omega).sum(1)

    def level_weights(self) -> Tensor:
        """``(L, out, in)``: ``Z_0 = W`` and ``Z_{n+1} = sign(W) * tanh(Z_n^2 + c_n)``."""
        w = self.weight
        sign = torch.sign(w)
        c = self.prime_offsets().to(w.dtype)
        zs = [w]
        z = w
        for n in range(self.levels - 1):
            z = sign * torch.tanh(z.square() + c[n])
            zs.append(z)
        return torch.stack(zs)

    def attention_weights(self, x: Tensor) -> Tensor:
        """``H``: softmax over levels, ``(..., L)`` (``"input"``) or ``(L,)`` (``"static"``)."""
        if self.attention_weight is None:
            return torch.softmax(self.attention_bias, -1)
        return torch.softmax(x @ self.attention_weight + self.attention_bias, -1)

    def forward(self, x: Tensor) -> Tensor:
        # No Python-level shape check: the forward stays traceable by torch.fx (einsum rejects a
        # wrong feature size itself).
        z = self.level_weights()  # (L, out, in)
        y = torch.einsum("...i,loi->...lo", x, z) / math.sqrt(self.in_features)  # (..., L, out)
        y = y + self.inv_primes[: self.levels].to(y.dtype).unsqueeze(-1)
        h = self.attention_weights(x).to(y.dtype)  # (..., L) or (L,)
        out = (h.unsqueeze(-1) * y).sum(-2)
        if self.bias is not None:
            out = out + self.bias
        return ACTIVATIONS[self.activation](out)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, levels={self.levels}, "
            f"scales={self.scales}, attention={self.attention!r}, activation={self.activation!r}, bias={self.bias is not None}"
        )


__all__ = ["FractalLayer", "first_primes", "ACTIVATIONS", "ATTENTIONS"]
