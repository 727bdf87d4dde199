"""The user's data, named by a spec string: what ``qcd-fx train --data`` and ``transform --data``
read.

* ``digits`` — scikit-learn's digits (1797 standardised 8x8 images, 10 classes; 80/20 stratified
  train/test split, :mod:`qcd_fx.data`);
* ``imagefolder:DIR`` — torchvision's ``ImageFolder`` (one sub-directory per class), resized to
  ``image_size`` (shorter side), centre-cropped square, scaled to [0, 1] and normalised with the
  usual ImageNet mean and standard deviation;
* ``tensors:FILE`` — a ``.pt`` file read with ``torch.load(weights_only=True)`` or a ``.npz``
  file, holding inputs and integer labels: a dict with keys ``x``/``inputs``/``data`` and
  ``y``/``labels``/``targets`` (optionally ``x_val``/``y_val``), or an ``(inputs, labels)`` pair;
* ``module:factory`` (``package.module:function``, importable from the current directory) — a
  function returning a ``Dataset`` of ``(input, label)`` pairs or a ``(train, val)`` pair of
  ``Dataset``s or ``DataLoader``s.

Data without its own validation part is split (``val_split``, default 0.2, seeded). Bad data
gets one :class:`~qcd_fx.errors.UsageError` line: a missing or empty folder, inputs and labels
of different counts, non-integer or negative labels, non-finite inputs, inputs the model cannot
take (:func:`check_fits`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .errors import UsageError, first_line, require

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KINDS = ("digits", "imagefolder:DIR", "tensors:FILE", "module:factory")


@dataclass
class Data:
    """A training part and a validation part (``Dataset`` or ``DataLoader`` each)."""

    spec: str
    train: Dataset | DataLoader
    val: Dataset | DataLoader | None
    val_name: str = "val"  # "test" for digits (its held-out split)
    num_classes: int | None = None

    def loaders(self, batch_size: int, seed: int = 0, eval_batch_size: int = 256) -> tuple[Iterable, Iterable | None]:
        """``(train, val)`` loaders: the training one shuffled with a generator seeded ``seed``."""
        return _loader(self.train, batch_size, True, seed), (_loader(self.val, eval_batch_size, False, seed) if self.val is not None else None)

    def example(self, n: int = 2) -> Tensor:
        """The first ``n`` training inputs as one batch."""
        return _first_inputs(self.train, n)

    def batches(self, count: int, batch_size: int) -> list[tuple[Tensor, ...]]:
        """Up to ``count`` consecutive training batches of inputs (no labels): calibration data."""
        out = []
        for x, _y in _loader(self.train, batch_size, False, 0):
            out.append((x,))
            if len(out) == count:
                break
        return out


def _loader(data: Dataset | DataLoader, batch_size: int, shuffle: bool, seed: int) -> Iterable:
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        from . import distributed
        from .data import tensor_loader

        if shuffle:  # one permutation per epoch; under torch.distributed this rank's slice of every global batch
            return distributed.sharded_tensor_loader(data.tensors[0], data.tensors[1], batch_size, seed)
        return tensor_loader(data.tensors[0], data.tensors[1], batch_size, shuffle=shuffle, seed=seed)
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=gen)


def _first_inputs(data: Dataset | DataLoader, n: int) -> Tensor:
    if isinstance(data, DataLoader):
        x, _ = next(iter(data))
        return x[:n]
    if isinstance(data, TensorDataset):
        return data.tensors[0][:n]
    return torch.stack([data[i][0] for i in range(min(n, len(data)))])


def load_data(spec: str, *, image_size: int | None = None, val_split: float = 0.2, seed: int = 0) -> Data:
    """The :class:`Data` a spec names (see the module docstring)."""
    if not isinstance(spec, str) or not spec:
        raise UsageError(f"--data {spec!r} is not a data spec; use {', '.join(KINDS)}")
    if not 0 < val_split < 1:
        raise UsageError(f"--val-split {val_split} must be in (0, 1)")
    if spec == "digits":
        from .data import NUM_CLASSES, load_digits_split

        split = load_digits_split()
        return Data(spec, TensorDataset(split.x_train, split.y_train), TensorDataset(split.x_test, split.y_test), "test", NUM_CLASSES)
    kind, _, rest = spec.partition(":")
    if kind == "imagefolder" and rest:
        return _imagefolder(spec, rest, image_size or 224, val_split, seed)
    if kind == "tensors" and rest:
        return _tensors(spec, rest, val_split, seed)
    if rest and not os.path.exists(spec):
        return _factory(spec, val_split, seed)
    raise UsageError(f"--data {spec!r} is not a data spec; use {', '.join(KINDS)}")


def _split(spec: str, data: Dataset, val_split: float, seed: int) -> tuple[Dataset, Dataset]:
    n = len(data)
    n_val = max(1, round(n * val_split))
    if n - n_val < 1:
        raise UsageError(f"--data {spec!r} has {n} sample(s): too few to hold out a validation part")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(data, order[n_val:]), Subset(data, order[:n_val])


def _imagefolder(spec: str, directory: str, image_size: int, val_split: float, seed: int) -> Data:
    require("torchvision", "vision", "--data imagefolder:DIR")
    from torchvision import datasets, transforms

    if not os.path.isdir(directory):
        raise UsageError(f"--data {spec!r}: {directory!r} is not a directory")
    if image_size < 1:
        raise UsageError(f"--image-size {image_size} must be a positive integer")
    tf = transforms.Compose(
        [transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )
    try:
        folder = datasets.ImageFolder(directory, transform=tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise UsageError(f"--data {spec!r}: {first_line(e)} (one sub-directory of images per class)") from None
    if len(folder.classes) < 2:
        raise UsageError(f"--data {spec!r}: {len(folder.classes)} class folder(s); classification needs at least 2")
    train, val = _split(spec, folder, val_split, seed)
    return Data(spec, train, val, "val", len(folder.classes))


_X_KEYS = ("x", "inputs", "data", "images", "features")
_Y_KEYS = ("y", "labels", "targets", "target")


def _read_tensors(spec: str, path: str) -> dict[str, Any] | tuple:
    if not os.path.isfile(path):
        raise UsageError(f"--data {spec!r}: no file {path!r}")
    if path.endswith(".npz"):
        import numpy as np

        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: torch.from_numpy(z[k]) for k in z.files}
        except Exception as e:
            raise UsageError(f"--data {spec!r}: not a readable .npz file ({first_line(e)})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"--data {spec!r}: not a tensor file readable with weights_only=True ({first_line(e)})") from None


def _pick(d: dict, keys: tuple[str, ...], suffix: str = "") -> Any:
    for k in keys:
        if k + suffix in d:
            return d[k + suffix]
    return None


def _checked_pair(spec: str, x: Any, y: Any, part: str) -> TensorDataset:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise UsageError(f"--data {spec!r}: the {part} inputs and labels must be tensors (or arrays)")
    if x.dim() < 1 or len(x) == 0:
        raise UsageError(f"--data {spec!r}: no {part} samples")
    if y.dim() != 1:
        raise UsageError(f"--data {spec!r}: {part} labels must be one integer per sample, got shape {tuple(y.shape)}")
    if len(x) != len(y):
        raise UsageError(f"--data {spec!r}: {len(x)} {part} inputs but {len(y)} labels")
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
        if y.dtype.is_floating_point and torch.equal(y, y.round()):
            y = y.long()
        else:
            raise UsageError(f"--data {spec!r}: {part} labels must be integers (class indices), got {y.dtype}")
    y = y.long()
    if int(y.min()) < 0:
        raise UsageError(f"--data {spec!r}: {part} labels must be >= 0, found {int(y.min())}")
    if not x.is_floating_point():
        x = x.float()
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).flatten(1).any(1).sum()) if x.dim() > 1 else int((~torch.isfinite(x)).sum())
        raise UsageError(f"--data {spec!r}: {bad} {part} input(s) hold NaN or infinite values")
    return TensorDataset(x.contiguous(), y)


def _tensors(spec: str, path: str, val_split: float, seed: int) -> Data:
    obj = _read_tensors(spec, path)
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        x, y, xv, yv = obj[0], obj[1], None, None
    elif isinstance(obj, dict):
        x, y = _pick(obj, _X_KEYS), _pick(obj, _Y_KEYS)
        xv, yv = _pick(obj, _X_KEYS, "_val"), _pick(obj, _Y_KEYS, "_val")
        if x is None or y is None:
            raise UsageError(f"--data {spec!r}: expected keys x and y (or inputs/labels), found {', '.join(map(str, obj)) or 'none'}")
    else:
        raise UsageError(f"--data {spec!r}: expected a dict with x and y or an (inputs, labels) pair, got {type(obj).__name__}")
    train = _checked_pair(spec, x, y, "training")
    if xv is not None and yv is not None:
        val = _checked_pair(spec, xv, yv, "validation")
        if val.tensors[0].shape[1:] != train.tensors[0].shape[1:]:
            raise UsageError(
                f"--data {spec!r}: validation inputs {tuple(val.tensors[0].shape[1:])} differ from training inputs {tuple(train.tensors[0].shape[1:])}"
            )
    else:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        n_val = max(1, round(len(train) * val_split))
        if len(train) - n_val < 1:
            raise UsageError(f"--data {spec!r} has {len(train)} sample(s): too few to hold out a validation part")
        xs, ys = train.tensors
        val = TensorDataset(xs[order[:n_val]], ys[order[:n_val]])
        train = TensorDataset(xs[order[n_val:]], ys[order[n_val:]])
    classes = int(max(train.tensors[1].max(), val.tensors[1].max())) + 1
    return Data(spec, train, val, "val", classes)


def _factory(spec: str, val_split: float, seed: int) -> Data:
    from .io import cwd_importable

    module_name, _, fn_name = spec.partition(":")
    import importlib

    try:
        with cwd_importable(first=False):
            fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"--data {spec!r}: cannot import {fn_name!r} from {module_name!r} ({first_line(e)})") from None
    if not callable(fn):
        raise UsageError(f"--data {spec!r}: {fn_name!r} is not a function")
    try:
        got = fn()
    except Exception as e:
        raise UsageError(f"--data {spec!r}: the factory failed: {type(e).__name__}: {first_line(e)}") from None
    if isinstance(got, (tuple, list)) and len(got) == 2 and all(isinstance(g, (Dataset, DataLoader)) for g in got):
        return Data(spec, got[0], got[1], "val", None)
    if isinstance(got, Dataset):
        try:
            len(got)  # type: ignore[arg-type]
        except TypeError:
            raise UsageError(f"--data {spec!r}: the dataset has no length; return a (train, val) pair of DataLoaders") from None
        if len(got) == 0:  # type: ignore[arg-type]
            raise UsageError(f"--data {spec!r}: the dataset is empty")
        train, val = _split(spec, got, val_split, seed)
        return Data(spec, train, val, "val", None)
    raise UsageError(f"--data {spec!r}: the factory returned a {type(got).__name__}; expected a Dataset or a (train, val) pair of Datasets/DataLoaders")


def check_fits(model: nn.Module, data: Data) -> Callable[[Tensor], Tensor]:
    """How ``model`` takes the data's inputs (as they are, or flattened for an MLP), checked on
    two samples: the output must be one score per class (more scores than the largest label).
    A one-line UsageError otherwise."""
    try:
        x = data.example(2)
    except Exception as e:
        raise UsageError(f"--data {data.spec!r}: cannot read a sample ({type(e).__name__}: {first_line(e)})") from None
    errors = []
    for name, fn in (("as they are", lambda t: t), ("flattened", lambda t: t.flatten(1))):
        if name == "flattened" and x.dim() <= 2:
            continue
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(fn(x))
        except Exception as e:  # noqa: BLE001 - the model rejects this layout; try the next one
            errors.append(f"{name}: {first_line(e)}")
            continue
        finally:
            model.train(was)
        logits = out if isinstance(out, Tensor) else getattr(out, "logits", None) if not isinstance(out, dict) else out.get("logits")
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != len(x):
            errors.append(f"{name}: output {tuple(logits.shape) if isinstance(logits, Tensor) else type(out).__name__}, expected ({len(x)}, classes)")
            continue
        if data.num_classes is not None and logits.shape[1] < data.num_classes:
            errors.append(f"{name}: {logits.shape[1]} class scores for {data.num_classes} classes")
            continue
        return fn
    shape = "x".join(map(str, x.shape[1:]))
    raise UsageError(
        f"the model does not fit --data {data.spec!r} (inputs {shape}{f', {data.num_classes} classes' if data.num_classes else ''}): {'; '.join(errors)}"
    )


__all__ = ["KINDS", "Data", "check_fits", "load_data"]
