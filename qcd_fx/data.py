"""The scikit-learn digits data set as tensors: the bundled data of the tests, benchmarks and CLI.

``sklearn.datasets.load_digits`` ships with scikit-learn (1797 grey 8x8 images, 10 classes, pixel
values 0..16), so nothing is downloaded. The split is deterministic and stratified:

* ``test_fraction`` (default 20 %) of every class goes to the test set
  (``sklearn.model_selection.train_test_split(..., stratify=y, random_state=split_seed)``);
* optionally ``val_fraction`` of the remaining training images is held out again (stratified) as a
  validation set, for choosing hyper-parameters without looking at the test set;
* every pixel is standardised with the mean and standard deviation of the *training* images
  (constant pixels, e.g. the always-blank corners, get a standard deviation of 1).

Images are ``float32`` tensors of shape ``(N, 1, 8, 8)`` (the input of
:func:`qcd_fx.examples.digits_cnn`; :func:`qcd_fx.examples.digits_mlp` flattens it), labels are
``int64`` of shape ``(N,)``.

The loaders index the tensors a whole batch at a time (a :class:`~torch.utils.data.BatchSampler`
over a :class:`~torch.utils.data.TensorDataset`), which is several times faster than collating
single samples for a data set this small, and shuffle with their own seeded
:class:`torch.Generator`, so two loaders built with the same seed yield the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)


@dataclass(frozen=True)
class DigitsSplit:
    """Standardised digits tensors. ``x_val``/``y_val`` are empty when no validation split was asked for."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    mean: Tensor  # per-pixel training mean, shape (1, 8, 8), subtracted
    std: Tensor  # per-pixel training std (1 where a pixel is constant), shape (1, 8, 8), divided by

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}


def _check_fraction(name: str, value: float, allow_zero: bool) -> None:
    low_ok = value >= 0 if allow_zero else value > 0
    if not (isinstance(value, (int, float)) and low_ok and value < 1):
        bound = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"{name} must be in {bound}, got {value!r}")


def load_digits_split(
    test_fraction: float = 0.2,
    val_fraction: float = 0.0,
    split_seed: int = 0,
    standardize: bool = True,
    dtype: torch.dtype = torch.float32,
) -> DigitsSplit:
    """Load digits and split it deterministically (stratified) into train / validation / test.

    ``val_fraction`` is a fraction of the training part (after the test images are removed).
    The same arguments always give the same tensors.
    """
    _check_fraction("test_fraction", test_fraction, allow_zero=False)
    _check_fraction("val_fraction", val_fraction, allow_zero=True)
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data set needs scikit-learn: pip install 'qcd-fx[data]'") from e

    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float64).unsqueeze(1)  # (1797, 1, 8, 8)
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    index = torch.arange(len(y)).numpy()
    train_idx, test_idx = train_test_split(index, test_size=test_fraction, stratify=y.numpy(), random_state=split_seed)
    val_idx = index[:0]
    if val_fraction > 0:
        train_idx, val_idx = train_test_split(
            train_idx, test_size=val_fraction, stratify=y.numpy()[train_idx], random_state=split_seed
        )
    train_idx, val_idx, test_idx = (torch.as_tensor(i, dtype=torch.int64) for i in (train_idx, val_idx, test_idx))

    x_train = x[train_idx]
    if standardize:
        mean = x_train.mean(0)
        std = x_train.std(0)
        std = torch.where(std > 0, std, torch.ones_like(std))
    else:
        mean = torch.zeros(IMAGE_SHAPE, dtype=torch.float64)
        std = torch.ones(IMAGE_SHAPE, dtype=torch.float64)

    def prep(idx: Tensor) -> Tensor:
        return ((x[idx] - mean) / std).to(dtype).contiguous()

    return DigitsSplit(
        x_train=prep(train_idx), y_train=y[train_idx].clone(),
        x_val=prep(val_idx), y_val=y[val_idx].clone(),
        x_test=prep(test_idx), y_test=y[test_idx].clone(),
        mean=mean.to(dtype), std=std.to(dtype),
    )  # fmt: skip


def tensor_loader(
    x: Tensor,
    y: Tensor,
    batch_size: int = 64,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader over ``(x, y)`` that fetches whole batches by index (no per-sample collate).

    With ``shuffle`` the order comes from a ``torch.Generator`` seeded with ``seed``: the n-th
    epoch of two loaders built alike is the same. ``drop_last`` drops a final short batch.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    dataset = TensorDataset(x, y)
    if shuffle:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = SequentialSampler(dataset)
    batches = BatchSampler(sampler, batch_size=batch_size, drop_last=drop_last)
    # batch_size=None: the sampler yields index lists and TensorDataset indexes with them directly.
    return DataLoader(dataset, sampler=batches, batch_size=None)


def digits_loaders(
    batch_size: int = 64,
    seed: int = 0,
    *,
    eval_batch_size: int = 512,
    test_fraction: float = 0.2,
    val_fraction: float = 0.0,
    split_seed: int = 0,
    drop_last: bool = False,
) -> tuple[DataLoader, DataLoader, DataLoader | None]:
    """``(train_loader, test_loader, val_loader)`` for digits; ``val_loader`` is None without a val split.

    The training loader shuffles with ``seed``; the evaluation loaders keep the data order.
    """
    split = load_digits_split(test_fraction=test_fraction, val_fraction=val_fraction, split_seed=split_seed)
    train = tensor_loader(split.x_train, split.y_train, batch_size, shuffle=True, seed=seed, drop_last=drop_last)
    test = tensor_loader(split.x_test, split.y_test, eval_batch_size)
    val = tensor_loader(split.x_val, split.y_val, eval_batch_size) if len(split.y_val) else None
    return train, test, val


__all__ = ["NUM_CLASSES", "IMAGE_SHAPE", "DigitsSplit", "load_digits_split", "tensor_loader", "digits_loaders"]
