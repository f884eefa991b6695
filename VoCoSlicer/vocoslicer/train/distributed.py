"""torchrun / DDP plumbing for the shared training loop.

We never spawn processes ourselves for training: multi-GPU and multi-node runs are started by ``torchrun``, which
sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``. This module reads that environment, initialises the process group
(NCCL on CUDA, gloo on CPU, so the same code is tested on CPU), picks the device of this rank, and offers the few
collectives the loop needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from vocoslicer.contracts.torchrun import env_world_size
from vocoslicer.device import pick_device


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def is_main(self) -> bool:
        """Only the main rank writes files and events."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def setup(device: str = "auto", timeout_s: float | None = None) -> tuple[DistContext, torch.device]:
    """Initialise the process group when started under torchrun with WORLD_SIZE>1 and choose this rank's device."""
    world = env_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if world > 1 and (device or "").lower().startswith("cuda"):
        device = "cuda"  # one GPU per rank: torchrun's LOCAL_RANK decides which
    dev = pick_device(device, local_rank=local_rank)  # the one device picker (vocoslicer.device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistContext(), dev
    initialised_here = False
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": "nccl" if dev.type == "cuda" else "gloo", "init_method": "env://"}
        if timeout_s is not None:
            import datetime

            kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
        initialised_here = True
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, initialised_here), dev


def teardown(ctx: DistContext, sync: bool = False) -> None:
    """Destroy the process group if :func:`setup` created it.

    ``sync``: first wait for every rank (a barrier). After a normal end rank 0 may still be writing the last
    checkpoint while the others leave; a rank that tears its gloo connections down then was seen to abort
    (SIGABRT, once in ~15 runs on a loaded 2-core box). Not after an error: the other ranks may be gone.
    """
    if ctx.initialised_here and dist.is_initialized():
        if sync:
            dist.barrier()
        dist.destroy_process_group()


def _flag_device(device: torch.device) -> torch.device:
    # NCCL only reduces CUDA tensors, gloo only CPU ones
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def any_rank(flag: bool, ctx: DistContext, device: torch.device) -> bool:
    """True if ``flag`` is true on any rank (every rank must call this at the same point)."""
    if not ctx.distributed:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=_flag_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_over_ranks(values: list[float], ctx: DistContext, device: torch.device) -> list[float]:
    """Average a short list of floats over ranks (for logging the global loss)."""
    if not ctx.distributed or not values:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_flag_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / ctx.world_size).tolist()


def gather_to_main(obj: Any, ctx: DistContext) -> list[Any]:
    """Collect one picklable object per rank (all ranks get the list; only the main rank uses it)."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    """Wait for every rank."""
    if ctx.distributed:
        dist.barrier()
