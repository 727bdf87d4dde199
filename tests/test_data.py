"""The bundled digits data: deterministic, stratified, standardised on the training split."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits

from qcd_fx.data import digits_loaders, load_digits_split, tensor_loader


def test_split_sizes_shapes_and_determinism():
    a = load_digits_split()
    b = load_digits_split()
    assert a.sizes() == {"train": 1437, "val": 0, "test": 360}
    assert a.x_train.shape == (1437, 1, 8, 8) and a.x_train.dtype == torch.float32
    assert a.y_test.dtype == torch.int64
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, name), getattr(b, name))


def test_split_is_stratified_and_disjoint():
    s = load_digits_split(val_fraction=0.2)
    counts = {k: torch.bincount(getattr(s, f"y_{k}"), minlength=10).float() for k in ("train", "val", "test")}
    total = sum(counts.values())
    for k, c in counts.items():
        share = c / total  # every class is split in (almost) the same proportion
        assert float(share.max() - share.min()) < 0.02, k
    assert s.sizes() == {"train": 1149, "val": 288, "test": 360}
    # the three parts together are exactly the data set, each image once (compare as multisets)
    raw = load_digits_split(val_fraction=0.2, standardize=False, dtype=torch.float64)
    parts = torch.cat([raw.x_train, raw.x_val, raw.x_test]).flatten(1)
    full = torch.as_tensor(load_digits().images, dtype=torch.float64).flatten(1)
    u1, c1 = torch.unique(parts, dim=0, return_counts=True)
    u2, c2 = torch.unique(full, dim=0, return_counts=True)
    assert torch.equal(u1, u2) and torch.equal(c1, c2)


def test_standardised_with_training_statistics():
    s = load_digits_split()
    flat = s.x_train.flatten(1)
    std = s.std.flatten()
    varying = std != 1  # constant pixels keep std 1 and stay 0
    assert torch.allclose(flat.mean(0), torch.zeros(64), atol=1e-5)
    assert torch.allclose(flat[:, varying].std(0), torch.ones(int(varying.sum())), atol=1e-4)
    raw = load_digits_split(standardize=False)
    assert float(raw.x_train.max()) == 16.0 and float(raw.x_train.min()) == 0.0


def test_loaders_shuffle_reproducibly_and_cover_every_sample():
    train1, test1, val1 = digits_loaders(batch_size=100, seed=3)
    train2, _, _ = digits_loaders(batch_size=100, seed=3)
    train3, _, _ = digits_loaders(batch_size=100, seed=4)
    assert val1 is None
    b1 = [y for _, y in train1]
    b2 = [y for _, y in train2]
    b3 = [y for _, y in train3]
    assert all(torch.equal(u, v) for u, v in zip(b1, b2))
    assert not all(torch.equal(u, v) for u, v in zip(b1, b3))
    assert sum(len(y) for y in b1) == 1437 and len(b1) == 15
    xs, ys = zip(*test1)
    assert torch.equal(torch.cat(ys), load_digits_split().y_test)  # evaluation keeps the order
    epoch2 = [y for _, y in train1]  # a new epoch is a new permutation
    assert not all(torch.equal(u, v) for u, v in zip(b1, epoch2))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"test_fraction": 1.5}, "test_fraction"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"dtype": torch.int64}, "dtype"),
    ],
)
def test_bad_split_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_digits_split(**kwargs)


def test_bad_loader_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        tensor_loader(torch.zeros(3, 2), torch.zeros(3), batch_size=0)
    with pytest.raises(ValueError, match="same length"):
        tensor_loader(torch.zeros(3, 2), torch.zeros(4))
