"""Running under `torchrun`: process group, device per rank, DDP or FSDP2 wrapping, reductions.

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op on one process,
so the loop has a single code path. The backend is NCCL on CUDA and gloo elsewhere (CPU runs
and tests). Only rank 0 writes logs, metrics and the shared parts of checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lmstack.errors import InputError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA device is available; use --device cpu")
    return torch.device(name)


def setup(device_name: str) -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), pick_device(device_name)
    d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not d.main:
        os.environ["LMSTACK_NO_PROGRESS"] = "1"  # one progress bar per job, rank 0's
    device = pick_device(device_name, d.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return d, device


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: nn.Module, d: Dist, parallel: str, device: torch.device) -> nn.Module:
    """DDP replicates the module and averages gradients; FSDP2 shards parameters, gradients and
    optimizer state, each entry of every ModuleList (the blocks) as one unit, then the rest."""
    if not d.enabled:
        return module
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for sub in list(module.modules()):
        if isinstance(sub, nn.ModuleList):
            for block in sub:
                fully_shard(block)
    fully_shard(module)
    return module


def mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """The mean of a scalar tensor over ranks."""
    if d.enabled:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= d.world
    return value


def sum_(value: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        value = value.detach().clone()
        dist.all_reduce(value)
    return value


def any_(flag: bool, d: Dist) -> bool:
    """True on every rank if it is True on any (e.g. a stop signal that reached one rank)."""
    if not d.enabled:
        return flag
    t = torch.tensor([float(flag)], device=_reduce_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def _reduce_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
