"""Run directory, event sink and argument checks of the training commands (``pretrain voco|tokenizer|mim``,
``finetune``). The checks run from the CLI's ``validate`` hook, before any run folder or file exists."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from pathlib import Path

from vocoslicer.contracts.torchrun import env_rank
from vocoslicer.errors import UserError
from vocoslicer.jobs.events import EventSink
from vocoslicer.jobs.runner import job_event_sink


def job_setup(args: argparse.Namespace, what: str = "the exported model"
              ) -> tuple[Path, EventSink, Callable[[], bool]]:
    """(run_dir, events, should_stop) from ``--out`` and the job context.

    ``--out`` may differ from the job's ``--run-dir``; the run's events must then land in ``--out`` (where resume
    and the GUI look for them), on every torchrun rank with that rank's number.
    """
    from vocoslicer.jobs.context import current_job

    job = current_job()
    run_dir = args.out or job.run_dir
    if run_dir is None:
        raise UserError(f"give --out RUNDIR (or the global --run-dir) for checkpoints and {what}")
    run_dir = Path(run_dir).expanduser().resolve()
    events = job.events
    if job.run_dir is None or run_dir != Path(job.run_dir).resolve():
        events = job_event_sink(run_dir / "events.jsonl", getattr(args, "job_events", "none") == "stdout",
                                rank=env_rank())
    return run_dir, events, job.should_stop


def check_device(text: str, option: str = "--device") -> None:
    """``auto``, ``cpu``, ``mps``, ``cuda`` or ``cuda:N`` of a GPU that exists; anything else is a one-line error
    (torch would fail deep inside the run, after the run folder was made)."""
    t = str(text).strip().lower()
    if t in ("auto", "cpu", "mps"):
        return
    m = re.fullmatch(r"cuda(?::(\d+))?", t)
    if not m:
        raise UserError(f"{option} {text}: unknown device (use auto, cpu, cuda or cuda:N)")
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"{option} {text}: no CUDA GPU is available (use {option} cpu or auto)")
    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        raise UserError(f"{option} {text}: there are only {torch.cuda.device_count()} CUDA GPUs (0.."
                        f"{torch.cuda.device_count() - 1})")


def check_number(value: float | None, option: str, minimum: float = 0.0, inclusive: bool = False) -> None:
    """A finite number above ``minimum`` (NaN and inf pass ``> 0`` tests on their own, or poison the run)."""
    if value is None:
        return
    ok = math.isfinite(value) and (value >= minimum if inclusive else value > minimum)
    if not ok:
        raise UserError(f"{option} {value}: expected a finite number {'>=' if inclusive else '>'} {minimum:g}")


def check_training_args(args: argparse.Namespace) -> None:
    """What every training command accepts: a real device, finite positive rates, positive counts (steps and
    batch are checked by each command: ``pretrain voco --steps 0`` only exports)."""
    check_device(getattr(args, "device", "auto"))
    for name in ("lr", "d_lr"):
        if hasattr(args, name):
            check_number(getattr(args, name), "--" + name.replace("_", "-"))
    if hasattr(args, "weight_decay"):
        check_number(args.weight_decay, "--weight-decay", inclusive=True)
    for name in ("grad_accum", "ckpt_every", "log_every"):
        if getattr(args, name, 1) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if getattr(args, "workers", 0) < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
