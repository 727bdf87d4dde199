"""Beyond one process, with ``torch.distributed`` (gloo on CPU, NCCL on GPUs; ``torchrun`` or
``qcd-fx train --nproc N`` starts the processes).

:func:`~qcd_fx.train.fit` is data-parallel when a process group is initialised with more than
one rank: the model is wrapped in ``DistributedDataParallel`` (gradients averaged across ranks by
its all-reduce, so an optimizer such as ``CCE`` computes its per-tensor statistics on the full,
identical gradient on every rank), each rank trains on its slice of every global batch
(:class:`ShardedBatches`: the same seeded permutation on every rank, batch ``k`` of size ``B``
split ``rank::world``), the epoch's loss and accuracy sums are all-reduced, and only rank 0 prints
and writes files. With the same seed and global batch, N ranks follow the single-process
trajectory up to the float order of the gradient all-reduce.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor


def active() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over the ranks (float64; the values themselves off a group)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def init_from_env(backend: str = "gloo") -> bool:
    """Join the process group a launcher describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``…);
    False when the environment describes none."""
    if dist.is_initialized():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    dist.init_process_group(backend=backend)
    return True


class ShardedBatches:
    """Batches of indices into ``n`` samples: every epoch a new permutation from one generator
    seeded ``seed`` (as ``RandomSampler`` draws it), cut into global batches of ``batch_size``,
    of which this rank takes ``[rank::world]``. The union over the ranks of each step's batches is
    the one-process batch, so the trajectory does not depend on the number of ranks."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank_: int | None = None, world_: int | None = None, shuffle: bool = True):
        self.n, self.batch_size, self.shuffle = n, batch_size, shuffle
        self.rank = rank() if rank_ is None else rank_
        self.world = world() if world_ is None else world_
        if batch_size % self.world:
            raise ValueError(f"the global batch size {batch_size} must be a multiple of the {self.world} ranks")
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=self.generator).tolist() if self.shuffle else list(range(self.n))
        for k in range(0, self.n, self.batch_size):
            batch = order[k : k + self.batch_size]
            mine = batch[self.rank :: self.world]
            if mine:
                yield mine


def sharded_tensor_loader(x: Tensor, y: Tensor, batch_size: int, seed: int = 0) -> torch.utils.data.DataLoader:
    """A loader over ``(x, y)`` with :class:`ShardedBatches` (this process's rank and world)."""
    from torch.utils.data import DataLoader, TensorDataset

    dataset = TensorDataset(x, y)
    return DataLoader(dataset, sampler=ShardedBatches(len(dataset), batch_size, seed), batch_size=None)


__all__ = ["ShardedBatches", "active", "all_reduce_sum", "init_from_env", "is_main", "rank", "sharded_tensor_loader", "world"]
