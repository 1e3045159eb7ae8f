"""Running on many processes with torch.distributed (launched by `torchrun`), and on one without it.

vlens does not invent a launcher: `torchrun --nproc-per-node N -m vlens harvest ...`
starts N processes with RANK / WORLD_SIZE / LOCAL_RANK set, `init()` joins
them into a process group (NCCL on GPUs, gloo on CPUs), and every other
function here is a no-op on a single process. Harvest splits the data by
`shard`, SAE training wraps the model in DistributedDataParallel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: `rank` of `world_size`, `local_rank` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Several processes, or a process group joined (torchrun with one process takes the same paths)."""
        return self.world_size > 1 or (dist.is_available() and dist.is_initialized())


def info() -> DistInfo:
    """This process's rank and world size (from the process group, else torchrun's environment, else 0 of 1).

    Example:
        >>> info().world_size >= 1
        True
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo(
        int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    )


def init(backend: str | None = None) -> DistInfo:
    """Join the process group torchrun set up; on a single process, do nothing.

    Under torchrun (WORLD_SIZE and MASTER_ADDR set) the group is joined even
    with one process, so `torchrun --nproc-per-node 1` runs the distributed
    paths (sub-stores, DistributedDataParallel) on one device.
    The backend defaults to NCCL when CUDA is available and gloo otherwise;
    on CUDA each process takes the GPU of its LOCAL_RANK.

    Example:
        >>> init().rank  # single process: nothing to join
        0
    """
    env = info()
    launched = "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
    if (env.world_size > 1 or launched) and not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group(backend=backend)
    return info()


def shard(n: int, rank: int | None = None, world_size: int | None = None) -> range:
    """The indices of `n` items this rank handles: every `world_size`-th, from `rank`.

    Disjoint across ranks, together covering all items, balanced to within one.

    Example:
        >>> list(shard(7, rank=1, world_size=3))
        [1, 4]
    """
    env = info()
    rank = env.rank if rank is None else rank
    world_size = env.world_size if world_size is None else world_size
    return range(rank, n, world_size)


def barrier() -> None:
    """Wait for every rank (no-op on one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place and return it (identity on one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s copy of a picklable object, on every rank."""
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def cleanup() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
