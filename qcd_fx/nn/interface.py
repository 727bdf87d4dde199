"""The interface gate (QCI, the seed's ``QuantumClassicalInterface``).

Seed formulas, for an input ``x`` with features along ``dim``::

    x_info = P x + b                          # "information projector", P is d x d
    s      = sigmoid(w . x + c)               # "entropy estimator", one value per position
    eff    = mean_d |x_info| / (s + 1e-8)
    g      = sigmoid(beta * eff)
    out    = g * x_info + (1 - g) * x

qcd-fx writes the projector as ``P = I + D`` and computes ``delta = D x + b = x_info - x`` directly,
so ``out = x + g * delta``: the same function, and *exactly* ``x`` when ``D = 0, b = 0`` (the
``identity`` initialisation), which lets a gate be inserted into a trained model without changing
its output by a single bit. ``D`` is a full ``d x d`` matrix (the seed's cost: ``d^2`` parameters
per gate) or, with ``rank=r``, the low-rank product ``U V^T`` (``2 r d`` parameters; ``V = 0`` at
identity initialisation, as in LoRA).

Two layouts: ``channel_dim=-1`` for Linear outputs (features last) and ``channel_dim=1`` for
convolution outputs ``(N, C, *spatial)``, where projector and estimator act as 1x1 convolutions
(the seed's ``Linear(dim, dim)`` applied to a feature map mixes its last spatial axis instead —
seed defect 3).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Init = Literal["identity", "seed"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class InterfaceGate(nn.Module):  # QCI
    """Learnable interface gate over ``width`` features (the seed's QCI module).

    Args:
        width: number of features (Linear ``out_features`` / Conv ``out_channels``).
        channel_dim: ``-1`` (features last) or ``1`` (channels first, feature maps).
        spatial_dims: number of spatial axes after the channel axis when ``channel_dim=1``
            (1, 2 or 3 for Conv1d/2d/3d outputs).
        init: ``"identity"`` (default; the gate is exactly the identity until trained) or
            ``"seed"`` (the seed's random ``nn.Linear`` initialisation of the projector).
        rank: ``None`` for a full projector, or ``r >= 1`` for ``I + U V^T``.
        beta: initial value of the learnable gate temperature (seed: 1.0).
        generator: random source for the initialisation (reproducible gates).
    """

    def __init__(
        self,
        width: int,
        channel_dim: int = -1,
        spatial_dims: int = 0,
        init: Init = "identity",
        rank: int | None = None,
        beta: float = 1.0,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if channel_dim not in (-1, 1):
            raise ValueError(f"channel_dim must be -1 or 1, got {channel_dim}")
        if channel_dim == 1 and spatial_dims not in (0, 1, 2, 3):
            raise ValueError(f"spatial_dims must be 0..3 for channels-first gates, got {spatial_dims}")
        if init not in ("identity", "seed"):
            raise ValueError(f"init must be 'identity' or 'seed', got {init!r}")
        if rank is not None and rank < 1:
            raise ValueError(f"rank must be >= 1 or None (full), got {rank}")
        self.width = width
        self.channel_dim = channel_dim
        self.spatial_dims = spatial_dims if channel_dim == 1 else 0
        self.init = init
        self.rank = None if rank is None or rank >= width else rank
        kw = {"device": device, "dtype": dtype}
        d = width
        if self.rank is None:
            self.projector_delta = nn.Parameter(torch.zeros(d, d, **kw))
        else:
            self.projector_u = nn.Parameter(torch.zeros(d, self.rank, **kw))
            self.projector_v = nn.Parameter(torch.zeros(d, self.rank, **kw))
        self.projector_bias = nn.Parameter(torch.zeros(d, **kw))
        self.estimator_weight = nn.Parameter(torch.zeros(1, d, **kw))
        self.estimator_bias = nn.Parameter(torch.zeros(1, **kw))
        self.beta = nn.Parameter(torch.tensor(float(beta), **kw))
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """(Re)initialise: the estimator always as ``nn.Linear(d, 1)``; the projector per ``init``."""
        d = self.width
        bound = 1.0 / math.sqrt(d)  # nn.Linear's default init for fan_in = d

        def uniform_(p: Tensor, b: float) -> None:
            p.uniform_(-b, b, generator=generator)

        uniform_(self.estimator_weight, bound)
        uniform_(self.estimator_bias, bound)
        if self.init == "identity":
            self.projector_bias.zero_()
            if self.rank is None:
                self.projector_delta.zero_()
            else:
                uniform_(self.projector_u, bound)
                self.projector_v.zero_()
        else:  # the seed: projector = nn.Linear(d, d) with its default init
            uniform_(self.projector_bias, bound)
            if self.rank is None:
                uniform_(self.projector_delta, bound)
                self.projector_delta.sub_(torch.eye(d, dtype=self.projector_delta.dtype, device=self.projector_delta.device))
            else:
                uniform_(self.projector_u, bound)
                uniform_(self.projector_v, bound)

    def projector(self) -> Tensor:
        """The projector matrix ``P = I + D`` (for inspection; forward never forms it)."""
        d = self.width
        eye = torch.eye(d, dtype=self.projector_bias.dtype, device=self.projector_bias.device)
        if self.rank is None:
            return eye + self.projector_delta
        return eye + self.projector_u @ self.projector_v.T

    def _project(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """Apply a (out, in) matrix along the feature axis: linear or 1x1 convolution."""
        if self.channel_dim == -1 or self.spatial_dims == 0:
            return F.linear(x, weight, bias)
        k = self.spatial_dims
        return _CONV[k](x, weight.reshape(weight.shape + (1,) * k), bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.rank is None:
            delta = self._project(x, self.projector_delta, self.projector_bias)
        else:
            delta = self._project(self._project(x, self.projector_v.T, None), self.projector_u, self.projector_bias)
        entropy = torch.sigmoid(self._project(x, self.estimator_weight, self.estimator_bias))
        info = (x + delta).abs().mean(self.channel_dim, keepdim=True)
        gate = torch.sigmoid(self.beta * (info / (entropy + 1e-8)))
        return x + gate * delta

    def extra_repr(self) -> str:
        rank = "full" if self.rank is None else self.rank
        return f"width={self.width}, channel_dim={self.channel_dim}, spatial_dims={self.spatial_dims}, init={self.init}, rank={rank}"

