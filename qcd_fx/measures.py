"""The seed quantities, defined once: information ``I``, entropy ``S`` and efficiency ``E``.

Source: ``cosmic-isomorphism-pytorch-optimization.md`` (the "cosmic" seed). Every pass and
optimizer in qcd-fx computes these through this module, so there is one definition to read.

For a tensor ``T`` and a dimension ``d``:

* information  ``I(T) = mean |T|``                                   (seed: ``T.abs().mean()``)
* entropy term ``s(T) = -softmax(T, d) * log_softmax(T, d)``          (element-wise, as in the
  seed's ``cosmic_state_compression``)
* entropy      ``S(T) = mean s(T)``                                   (seed: ``.mean()`` of the term)
* efficiency   ``E = (I - S) / (I + S + eps)``, ``eps = 1e-8``         (seed's CCE / CDG)

Note on the seed's ``S``: it averages the element-wise term over *all* elements, so it equals
the Shannon entropy of each softmax slice divided by the slice length ``n = T.shape[d]``,
averaged over slices. ``entropy(..., reduction="sum")`` gives the Shannon entropy itself
(summed along ``d``, averaged over the other dims) for users who want the textbook quantity;
the passes and optimizers use the seed's ``"mean"`` unless documented otherwise.

Half-precision inputs are computed in float32 (softmax of fp16 underflows), and results are
returned in float32 for them; float32/float64 inputs keep their dtype.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

EPS = 1e-8

Reduction = Literal["mean", "sum", "none"]


def _as_float(t: Tensor) -> Tensor:
    if t.dtype in (torch.float32, torch.float64):
        return t
    return t.float()


def information(t: Tensor, dim: int | tuple[int, ...] | None = None, keepdim: bool = False) -> Tensor:
    """``I = mean |T|`` over all elements, or over ``dim`` when given."""
    t = _as_float(t)
    if dim is None:
        return t.abs().mean()
    return t.abs().mean(dim=dim, keepdim=keepdim)


def entropy_terms(t: Tensor, dim: int = -1) -> Tensor:
    """The seed's element-wise entropy term ``-softmax(T) * log_softmax(T)`` along ``dim``.

    Same shape as ``t``; every entry lies in ``[0, 1/e]``.
    """
    t = _as_float(t)
    if t.dim() == 0:
        return torch.zeros_like(t)  # softmax of one value is 1: the term is -1*log(1) = 0
    return -(t.softmax(dim) * t.log_softmax(dim))


def entropy(t: Tensor, dim: int = -1, reduction: Reduction = "mean") -> Tensor:
    """Softmax entropy of ``t`` along ``dim``.

    ``reduction="mean"`` is the seed's ``S`` (mean of the element-wise term over all elements);
    ``"sum"`` is the Shannon entropy of each slice, averaged over the other dimensions;
    ``"none"`` returns the element-wise term (as :func:`entropy_terms`).
    """
    terms = entropy_terms(t, dim)
    if reduction == "none":
        return terms
    if reduction == "mean":
        return terms.mean()
    if reduction == "sum":
        if terms.dim() == 0:
            return terms
        return terms.sum(dim).mean()
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', not {reduction!r}")


def efficiency_from(info: Tensor | float, ent: Tensor | float, eps: float = EPS) -> Tensor | float:
    """``E = (I - S) / (I + S + eps)`` from precomputed ``I`` and ``S`` (tensors or floats)."""
    return (info - ent) / (info + ent + eps)


def efficiency(t: Tensor, dim: int = -1, eps: float = EPS) -> Tensor:
    """The seed's efficiency of a whole tensor: ``E(T) = (I - S) / (I + S + eps)``.

    ``I`` and ``S`` as in the module docstring (softmax along ``dim``; the seed uses ``dim=0``
    for parameters and ``dim=-1`` for model outputs). ``E`` lies in ``(-1, 1)``.
    """
    return efficiency_from(information(t), entropy(t, dim), eps)


__all__ = [
    "EPS",
    "information",
    "entropy_terms",
    "entropy",
    "efficiency",
    "efficiency_from",
]
