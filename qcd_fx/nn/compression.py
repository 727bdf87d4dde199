"""State compression masking (CSC, the seed's ``cosmic_state_compression``).

Seed formula, element-wise, with the softmax taken along ``dim``::

    s    = -softmax(T) * log_softmax(T)          # the seed's element-wise entropy term
    mask = sigmoid(|T| / (s + eps) - alpha)
    out  = T * mask

As the seed notes (defect 10), with ``alpha = 0.5`` the soft mask lies in ``[sigmoid(-0.5), 1]``
= ``[0.378, 1]``: it rescales but never zeroes anything. ``hard=True`` is the inference mode that
makes the compression real: entries whose soft mask would fall below 0.5 become 0 and the rest
pass unchanged (``out = T`` where ``mask >= 0.5``, else ``0``). Measure the sparsity it produces
with :func:`qcd_fx.analysis.measure_sparsity`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..measures import EPS, entropy_terms


def compression_mask(t: Tensor, alpha: float = 0.5, dim: int = -1, eps: float = EPS) -> Tensor:
    """The soft mask ``sigmoid(|T| / (s(T) + eps) - alpha)``, same shape and dtype as ``t``."""
    s = entropy_terms(t, dim)
    return torch.sigmoid(t.abs() / (s + eps) - alpha).to(t.dtype)


class StateCompression(nn.Module):  # CSC
    """Mask a tensor by its information-to-entropy ratio (the seed's CSC).

    Args:
        alpha: the seed's entropy threshold (0.5).
        dim: softmax dimension of the entropy term: ``-1`` for features last (Linear outputs,
            logits), ``1`` for channels of a feature map.
        hard: zero the entries the soft mask would scale below 0.5, keep the others unchanged.
        eps: the seed's epsilon (1e-8).
    """

    def __init__(self, alpha: float = 0.5, dim: int = -1, hard: bool = False, eps: float = EPS):
        super().__init__()
        self.alpha = float(alpha)
        self.dim = int(dim)
        self.hard = bool(hard)
        self.eps = float(eps)

    def forward(self, x: Tensor) -> Tensor:
        mask = compression_mask(x, self.alpha, self.dim, self.eps)
        if self.hard:
            return torch.where(mask >= 0.5, x, torch.zeros((), dtype=x.dtype, device=x.device))
        return x * mask

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, dim={self.dim}, hard={self.hard}"
