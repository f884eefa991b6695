"""Run directory and event sink of a pretraining command, shared by ``pretrain voco|tokenizer|mim``."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from vocoslicer.errors import UserError
from vocoslicer.jobs.events import EventSink


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
        events = EventSink(path=run_dir / "events.jsonl", stdout=getattr(args, "job_events", "none") == "stdout",
                           rank=int(os.environ.get("RANK", "0") or 0))
    return run_dir, events, job.should_stop
