"""Surviving CUDA out-of-memory: retry with fewer windows per batch, then on the CPU, and say so.

A workstation GPU is shared with Slicer's own rendering and sometimes with a training run, so the memory
available at inference time is unknown in advance. Instead of failing, a job halves its windows per batch until
one window fits, and then finishes on the CPU; each step is reported as a ``warning`` event so the user knows
why it is slow. GPU memory is handed back to the driver after every job so that a warm worker does not starve
the rest of the machine.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

from vocoslicer.errors import UserError
from vocoslicer.jobs.events import NULL_SINK, EventSink

T = TypeVar("T")


def is_oom(exc: BaseException) -> bool:
    """True for CUDA (and CPU allocator) out-of-memory errors, whatever class the torch version raises."""
    oom_cls = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_cls is not None and isinstance(exc, oom_cls):
        return True
    if isinstance(exc, MemoryError):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg
                                              or "cudnn_status_alloc_failed" in msg)


def release_device_memory(device: torch.device | str | None = None) -> None:
    """Drop Python references' garbage and return cached CUDA blocks to the driver."""
    gc.collect()
    dev = torch.device(device) if device is not None else None
    if (dev is None or dev.type == "cuda") and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()


@contextlib.contextmanager
def device_job(device: torch.device | str) -> Iterator[None]:
    """Run one job and release the device's cached memory afterwards, even on error."""
    try:
        yield
    finally:
        release_device_memory(device)


def batch_sizes(start: int) -> list[int]:
    """Windows-per-batch to try after an OOM: start, start/2, ..., 1."""
    sizes = []
    n = max(1, int(start))
    while n > 1:
        sizes.append(n)
        n //= 2
    return sizes + [1]


def run_with_oom_fallback(fn: Callable[[torch.device, int], T], device: torch.device | str, sw_batch_size: int,
                          events: EventSink = NULL_SINK, cpu_fallback: bool = True
                          ) -> tuple[T, torch.device, int]:
    """Call ``fn(device, windows_per_batch)``; on OOM retry smaller, then on the CPU.

    Returns ``(result, device_used, windows_per_batch_used)``. ``fn`` must move whatever it needs (model,
    tensors) to the device it is given. A CPU out-of-memory at one window per batch is a user error (the volume
    or the model is too large for this machine).
    """
    dev = torch.device(device)
    sizes = batch_sizes(sw_batch_size)
    for i, bs in enumerate(sizes):
        ok, result = _attempt(fn, dev, bs)
        if ok:
            return result, dev, bs  # type: ignore[return-value]
        release_device_memory(dev)  # after the except block: the traceback no longer pins the tensors
        if i + 1 < len(sizes):
            events.warning(f"{dev.type.upper()} out of memory with {bs} windows per batch; "
                           f"retrying with {sizes[i + 1]}")
    if dev.type == "cuda" and cpu_fallback:
        cpu = torch.device("cpu")
        events.warning("CUDA out of memory even with 1 window per batch; continuing on the CPU (much slower)")
        for bs in batch_sizes(sw_batch_size):
            ok, result = _attempt(fn, cpu, bs)
            if ok:
                return result, cpu, bs  # type: ignore[return-value]
            gc.collect()
    raise UserError(f"not enough memory on {dev.type} to run this model even with one window per batch "
                    "(try --fast, a smaller model or another device)")


def _attempt(fn: Callable[[torch.device, int], T], dev: torch.device, bs: int) -> tuple[bool, T | None]:
    try:
        return True, fn(dev, bs)
    except Exception as exc:  # noqa: BLE001 - only OOMs are handled, everything else is re-raised
        if not is_oom(exc):
            raise
    return False, None
