"""Background job runtime (engine side): run directories, events, cancel/resume, GPU lock.

A long command uses it like this (see :mod:`vocoslicer.jobs.context`)::

    job = current_job()
    state = job.load_state() if job.resume else None          # or torch.load(job.checkpoint_path("last.pt"))
    with job.gpu_lock(device):                                 # queues behind another job on the same GPU
        for step in range(first, total):
            if job.should_stop():                              # SIGTERM / cancel from the GUI
                save_checkpoint(job.checkpoint_path("last.pt"))
                raise Cancelled("stopped; checkpoint saved")
            ...
            job.events.progress(step, total, stage="train", eta_s=eta)
"""

from vocoslicer.jobs.context import JobContext, current_job, set_current_job
from vocoslicer.jobs.events import EVENT_KINDS, NULL_SINK, EventSink
from vocoslicer.jobs.gpulock import gpu_lock, physical_gpu_key
from vocoslicer.jobs.rundir import list_runs, read_run

__all__ = [
    "EVENT_KINDS",
    "NULL_SINK",
    "EventSink",
    "JobContext",
    "current_job",
    "gpu_lock",
    "list_runs",
    "physical_gpu_key",
    "read_run",
    "set_current_job",
]
