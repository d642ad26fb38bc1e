"""Communication between the processes of a torchrun job (torch.distributed), and the tie
rules that make a selection over several processes exact and deterministic.

`World` is this process's (rank, size); one process is `SINGLE`, for which every collective
is never called. `COMM` counts the bytes handed to each kind of collective, for
benchmarks/comm.py and docs/distributed.md.
"""

import os
from collections import Counter
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from choicesae.errors import ConfigError
from choicesae.step.kernels import Pairs

COMM: Counter = Counter()  # bytes each rank put into collectives, by purpose


class World(NamedTuple):
    rank: int
    size: int

    @property
    def main(self) -> bool:  # the one rank that writes logs, checkpoints and the SAE
        return self.rank == 0


SINGLE = World(0, 1)


def init_from_env(device: str) -> World:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, ...): gloo on CPU, nccl on CUDA, where each rank makes GPU LOCAL_RANK its
    "cuda" device. One process (no WORLD_SIZE) needs no group."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and not dist.is_initialized():
        return SINGLE
    if device.startswith("cuda:"):
        raise ConfigError(
            f"device {device!r}: under torchrun give --device cuda, each rank "
            f"takes the GPU of its LOCAL_RANK"
        )
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def shard(x: Tensor, world: World) -> Tensor:
    """This rank's rows [B/W, d] of a global batch x [B, d]."""
    n = x.shape[0] // world.size
    return x[world.rank * n : (world.rank + 1) * n]


def check_batch(batch_size: int, world: World) -> None:
    if batch_size % world.size:
        raise ConfigError(
            f"batch_size {batch_size} must be a multiple of the {world.size} processes, "
            f"each taking an equal slice of the global batch"
        )


def all_gather(t: Tensor, purpose: str) -> Tensor:
    """[W, *t.shape]: every rank's t, in rank order."""
    COMM[purpose] += t.numel() * t.element_size()
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.stack(out)


def all_reduce(t: Tensor, purpose: str) -> Tensor:
    """The sum over ranks of t, in place."""
    COMM[purpose] += t.numel() * t.element_size()
    dist.all_reduce(t)
    return t


def gather_to_main(t: Tensor, dim: int, world: World, purpose: str) -> Tensor | None:
    """On rank 0, the whole tensor on the CPU from every rank's equal shard t, concatenated
    along dim; None on the other ranks. Rank 0 receives one shard at a time, so no device
    holds more than its shard and one buffer."""
    t = t.detach().contiguous()
    if not world.main:
        COMM[purpose] += t.numel() * t.element_size()
        dist.send(t, 0)
        return None
    n = t.shape[dim]
    shape = (*t.shape[:dim], n * world.size, *t.shape[dim + 1 :])
    whole = torch.empty(shape, dtype=t.dtype)
    whole.narrow(dim, 0, n).copy_(t)
    buffer = torch.empty_like(t)
    for rank in range(1, world.size):
        dist.recv(buffer, rank)
        whole.narrow(dim, rank * n, n).copy_(buffer)
    return whole


def any_rank(flag: bool, world: World) -> bool:
    """True on every rank when `flag` is true on one (a stop signal must stop them all)."""
    if world.size == 1:
        return flag
    return bool(all_reduce(torch.tensor([int(flag)]), "control").item())


# ---- exact selection over processes: the tie rules -------------------------------------------


def ties_taken(ties: Tensor, need: Tensor, rank: int) -> Tensor:
    """How many of its entries tied at the threshold rank `rank` keeps: the ties go in rank
    order until `need` are taken. ties [W, ...] per-rank counts, need [...]."""
    before = ties.cumsum(0) - ties  # [W, ...] ties held by the earlier ranks
    return (need - before[rank]).clamp(min=0).minimum(ties[rank])


def first_true(mask: Tensor, count: Tensor, dim: int | None) -> Tensor:
    """mask with only its first `count` true entries kept: in row-major order (dim None,
    count []) or along dim 0 per column (count [F])."""
    if dim is None:
        return mask & (mask.flatten().cumsum(0) <= count).view_as(mask)
    return mask & (mask.cumsum(0) <= count)


def pairs_of(keep: Tensor) -> Pairs:
    token, feature = keep.nonzero().t()  # row-major: CSR order
    return Pairs(token.contiguous(), feature.contiguous(), tuple(keep.shape))


def global_threshold(z: Tensor, M: int) -> tuple[Tensor, Tensor]:
    """The M-th largest value of z over all ranks, found from each rank's own top M (which
    holds every one of its winners); returns it and the gathered candidates [W, M]."""
    candidates = z.new_full((M,), float("-inf"))
    n = min(M, z.numel())
    candidates[:n] = z.flatten().topk(n, sorted=False).values
    every = all_gather(candidates, "selection")  # [W, M]
    return every.flatten().topk(M, sorted=False).values.min(), every
