"""Data parallelism with torch.distributed (torchrun): each process holds the pairs whose index
is its rank modulo the world size; every global batch is split that way, each process sums its
pairs' losses divided by the GLOBAL batch size, and the gradient of v is all-reduced (summed):
the same gradient as one process computing the whole batch. gloo on CPU, nccl on GPU."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env(device: torch.device | str = "cpu") -> tuple[int, int]:
    """(rank, world_size); joins the process group torchrun describes if not joined yet."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def local_share(indices: list[int], rank: int, world: int) -> list[int]:
    return [i for i in indices if i % world == rank]


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
