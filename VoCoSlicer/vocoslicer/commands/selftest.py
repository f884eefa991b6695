"""``vocoslicer selftest job``: a tiny, real job that exercises the job runtime end to end.

It counts steps, sleeping between them, and behaves like a training loop should: it reports progress and
metrics, checkpoints its step counter after every step, stops cleanly on a stop request, continues from the
checkpoint with ``--resume``, can hold a GPU lock and can fail on purpose. Clients (the Slicer job client, the
tests, an installation check) use it to see that launching, cancelling and resuming work on this machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from vocoslicer.errors import UserError

STATE = "selftest_state.json"


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``selftest`` and its ``job`` action."""
    p = sub.add_parser("selftest", help="self-tests of this installation (job runtime)")
    actions = p.add_subparsers(dest="action", metavar="<action>", parser_class=type(p))
    j = actions.add_parser("job", help="a tiny counting job: progress, checkpoints, cancel, resume, GPU lock")
    j.add_argument("--steps", type=int, default=10, help="number of steps (default 10)")
    j.add_argument("--sleep", type=float, default=0.05, help="seconds per step (default 0.05)")
    j.add_argument("--fail-at", type=int, metavar="K", help="raise a user error at step K (exit code 2)")
    j.add_argument("--crash-at", type=int, metavar="K", help="raise an unexpected error at step K (exit code 1)")
    j.add_argument("--spawn-child", action="store_true",
                   help="start a long-sleeping child process first (to check that cancel ends the whole tree)")
    j.add_argument("--gpu-lock", metavar="DEVICE", help="hold the lock of this GPU (e.g. 0) while counting")
    j.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the run dir")
    j.set_defaults(func=run_job)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def run_job(args: argparse.Namespace) -> int:
    """Count ``--steps`` steps; see the module docstring."""
    from vocoslicer.jobs import current_job

    if args.steps < 0 or args.sleep < 0:
        raise UserError("selftest job: --steps and --sleep must not be negative")
    job = current_job()
    ev = job.events
    start = 0
    if args.resume:
        if job.run_dir is None:
            raise UserError("selftest job: --resume needs --run-dir (the checkpoint lives in the run directory)")
        state = job.load_state(STATE)
        if state is None:
            ev.warning("no checkpoint to resume from: starting at step 0")
        else:
            start = int(state["step"])
            ev.log(f"resuming after step {start}")
    child = None
    if args.spawn_child:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        if job.run_dir is not None:
            (job.run_dir / "child.pid").write_text(str(child.pid))
        ev.log(f"spawned child process {child.pid}")
    lock_device = args.gpu_lock if args.gpu_lock is not None else "cpu"
    try:
        with job.gpu_lock(lock_device):
            t0 = time.monotonic()
            for step in range(start + 1, args.steps + 1):
                job.check_stop(save=None)  # the checkpoint of the previous step is already on disk
                time.sleep(args.sleep)
                if args.fail_at == step:
                    raise UserError(f"selftest job: failing at step {step} as asked (--fail-at)")
                if args.crash_at == step:
                    raise RuntimeError(f"selftest crash at step {step} as asked (--crash-at)")
                job.save_state({"step": step, "steps": args.steps}, STATE)
                done = step - start
                eta = (time.monotonic() - t0) / done * (args.steps - step)
                ev.progress(step, args.steps, stage="counting", eta_s=round(eta, 3))
                ev.metric(step, value=float(step))
    finally:
        if child is not None and child.poll() is None:
            child.terminate()
            child.wait(5)
    if job.checkpoint_dir is not None:
        ev.artifact(job.checkpoint_dir / STATE, type="checkpoint", step=args.steps)
    return 0
