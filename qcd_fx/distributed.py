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
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def is_sharded(p: Tensor) -> bool:
    """A parameter sharded by FSDP: ``fully_shard``'s ``DTensor`` or FSDP1's flat parameter."""
    return type(p).__name__ == "DTensor" or bool(getattr(p, "_is_flat_param", False))


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


def finish() -> None:
    """Leave the process group together, at the end of a worker's run: a barrier — so no rank
    exits (closing its sockets) while another still writes its outputs or is in a collective,
    which gloo reports as a reset connection or an abort — then ``destroy_process_group``, the
    shutdown PyTorch documents. Nothing off a group."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


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


# ── collectives for population optimizers (QIMAD, QuantumDynamics): agents split over the ranks ──


def split_counts(n: int, world_: int | None = None) -> list[int]:
    """Sizes of ``world`` contiguous blocks of ``n`` items, as equal as possible (the first
    ``n % world`` blocks one larger): rank ``r`` owns items ``sum(counts[:r]) .. sum(counts[:r+1])``."""
    w = world() if world_ is None else world_
    return [n // w + (1 if r < n % w else 0) for r in range(w)]


def my_block(n: int) -> tuple[int, int]:
    """``(start, stop)`` of this rank's contiguous block of ``n`` items (:func:`split_counts`)."""
    counts = split_counts(n)
    start = sum(counts[: rank()])
    return start, start + counts[rank()]


def all_gather_rows(local: Tensor, counts: list[int]) -> Tensor:
    """The ranks' row blocks laid end to end: rank ``r`` passes its ``(counts[r], ...)`` block and
    every rank gets the ``(sum(counts), ...)`` concatenation in rank order (``local`` itself off a
    group). Blocks are padded to the largest for the collective (gloo's ``all_gather`` takes equal
    sizes), so the bytes sent are ``world × max(counts) × row size``."""
    if not active():
        return local
    if local.shape[0] != counts[rank()]:
        raise ValueError(f"rank {rank()} holds {local.shape[0]} rows, the split says {counts[rank()]}")
    rows = max(counts)
    if rows == 0:
        return local
    send = local.new_zeros((rows, *local.shape[1:]))
    send[: local.shape[0]] = local
    parts = [torch.empty_like(send) for _ in counts]
    dist.all_gather(parts, send)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def broadcast_(tensor: Tensor, src: int = 0) -> Tensor:
    """``tensor`` overwritten in place with rank ``src``'s (unchanged off a group); returns it."""
    if active():
        dist.broadcast(tensor, src)
    return tensor


def broadcast_int(value: int, src: int = 0) -> int:
    """Rank ``src``'s ``value`` on every rank (``value`` off a group)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.broadcast(t, src)
    return int(t.item())


def whole_batches(loader: Any) -> Any:
    """``loader`` with every global batch whole on every rank: a ``DataLoader`` over
    :class:`ShardedBatches` is rebuilt with the same sampler as rank 0 of 1 (same seed, same
    generator state, so the same batches as one process); any other loader is returned as it is.
    Population optimizers split the agents over the ranks, not the data."""
    from torch.utils.data import DataLoader

    sampler = getattr(loader, "sampler", None)
    if not isinstance(loader, DataLoader) or not isinstance(sampler, ShardedBatches) or sampler.world == 1:
        return loader
    whole = ShardedBatches(sampler.n, sampler.batch_size, rank_=0, world_=1, shuffle=sampler.shuffle)
    whole.generator = sampler.generator  # shared: the caller's loader goes on with the same stream
    return DataLoader(loader.dataset, sampler=whole, batch_size=None)


__all__ = [
    "ShardedBatches", "active", "all_gather_rows", "all_reduce_sum", "broadcast_", "broadcast_int", "finish", "init_from_env", "is_main", "is_sharded",
    "my_block", "rank", "sharded_tensor_loader", "split_counts", "whole_batches", "world",
]  # fmt: skip
