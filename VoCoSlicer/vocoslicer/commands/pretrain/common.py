"""What ``pretrain voco``, ``pretrain tokenizer`` and ``pretrain mim`` share: the data/run/schedule/launcher
options, their checks, ``--list-inputs`` and the one torchrun relauncher.

Written once so that the three methods take the same flags with the same meaning (``--grad-accum``,
``--cache-dir``, ``--amp``, ``--gpus``/``--nnodes``/...), and so that a fix to the relaunch reaches all of them.
Defaults come from :mod:`vocoslicer.train.recipes` (torch-free: building the parser never imports torch).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vocoslicer import config
from vocoslicer.contracts.torchrun import torchrun_command, under_torchrun
from vocoslicer.errors import UserError
from vocoslicer.train.recipes import AMP_CHOICES, PretrainDefaults

# options of the launching process only: every torchrun rank runs the command line without them
LAUNCH_OPTIONS = ("--gpus", "--print-torchrun", "--nnodes", "--node-rank", "--master-addr", "--master-port")
_FLAGS = ("--print-torchrun",)  # launch options without a value


def add_common_options(p: argparse.ArgumentParser, d: PretrainDefaults, *, formats: str, batch_unit: str,
                       data_required: bool = True, steps_note: str = "") -> None:
    """The options every pretraining method takes, with the method's defaults ``d``.

    ``formats`` (what ``--data`` reads) and ``batch_unit`` (what one batch element is) complete the help texts.
    """
    p.add_argument("--data", nargs="+", required=data_required, metavar="DIR",
                   help=f"folders (searched recursively) or files: {formats}")
    p.add_argument("--out", type=Path, default=None, metavar="RUNDIR",
                   help="run directory (checkpoints, events, exported bundle); default: the job --run-dir")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps:,}{steps_note})")
    p.add_argument("--batch", type=int, default=d.batch, help=f"{batch_unit} per step and GPU (default {d.batch})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help=f"AdamW weight decay (default {d.weight_decay:g})")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"warmup steps (default {d.warmup_help()})".replace("%", "%%"))
    p.add_argument("--amp", choices=AMP_CHOICES, default=d.amp,
                   help="mixed precision (auto: bf16 if the GPU supports it, else fp16 + GradScaler; off on CPU)")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum,
                   help=f"batches per optimizer step (default {d.grad_accum})")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (falls back to eager on error)")
    p.add_argument("--cache-dir", type=Path, default=None, help="preprocessing cache (default: VoCoSlicer home)")
    p.add_argument("--resume", action="store_true", help="continue RUNDIR/checkpoints/last.pt exactly")
    p.add_argument("--workers", type=int, default=d.workers,
                   help=f"data loader processes per GPU (default {d.workers})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every,
                   help=f"checkpoint every N steps (default {d.ckpt_every})")
    p.add_argument("--log-every", type=int, default=d.log_every, help=f"log every N steps (default {d.log_every})")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--list-inputs", action="store_true",
                   help="print the images this run would train on (label maps skipped), one per line, and exit")
    add_launch_options(p)
    config.add_config_option(p)


def add_launch_options(p: argparse.ArgumentParser) -> None:
    """``--gpus`` and the multi-node rendezvous: the options :func:`relaunch_under_torchrun` reads."""
    p.add_argument("--gpus", type=int, default=1, help="GPUs on this node; > 1 relaunches under torchrun")
    p.add_argument("--print-torchrun", action="store_true", help="print the torchrun command and exit")
    p.add_argument("--nnodes", type=int, default=1, help="nodes of a multi-node run (> 1 relaunches under torchrun)")
    p.add_argument("--node-rank", type=int, default=0, help="this node's rank in a multi-node run")
    p.add_argument("--master-addr", default="127.0.0.1", help="address of node 0 in a multi-node run")
    p.add_argument("--master-port", type=int, default=29500, help="rendezvous port on node 0")


def add_deprecated_alias(p: argparse.ArgumentParser, old: str, dest: str, **kwargs: Any) -> None:
    """``old`` as a hidden spelling of the option stored in ``dest`` (not in --help, --print-config or files)."""
    p.add_argument(old, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)


def set_handlers(p: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int],
                 validate: Callable[[argparse.Namespace], None]) -> None:
    """``run`` and ``validate`` as the method's CLI handlers; ``--list-inputs`` skips ``validate``: it needs only
    ``--data``, imports nothing heavy and builds no model (users check a folder before a week-long run)."""

    def checks(args: argparse.Namespace) -> None:
        if not getattr(args, "list_inputs", False):
            validate(args)

    p.set_defaults(func=run, validate=checks)


def validate_common(args: argparse.Namespace) -> None:
    """Checks of the options in :func:`add_common_options`, before any run folder exists (steps and batch are the
    method's: ``pretrain voco --steps 0`` only exports)."""
    from vocoslicer.commands._jobsetup import check_training_args

    check_training_args(args)
    if args.warmup is not None and args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")


def child_argv(argv: Sequence[str]) -> list[str]:
    """This command line without the launcher options (what every torchrun rank runs)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in LAUNCH_OPTIONS:
            skip = "=" not in a and name not in _FLAGS
            continue
        out.append(a)
    return out


def relaunch_under_torchrun(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int | None:
    """``--print-torchrun``: print the torchrun command (0); ``--gpus N > 1`` or ``--nnodes N > 1`` outside
    torchrun: run this command line under torchrun and return its exit code; None to train in this process.

    ``argv`` defaults to ``sys.argv[1:]`` (global options included: every rank runs the same job).
    """
    if not (args.print_torchrun or ((args.gpus > 1 or args.nnodes > 1) and not under_torchrun())):
        return None

    cmd = torchrun_command(["vocoslicer", *child_argv(sys.argv[1:] if argv is None else argv)], max(1, args.gpus),
                           args.nnodes, args.node_rank, args.master_addr, args.master_port)
    if not args.print_torchrun:
        return subprocess.call(cmd)
    print(shlex.join(cmd))
    if args.nnodes > 1:
        print(f"# run on every node, with --node_rank=0..{args.nnodes - 1}; node 0 is {args.master_addr}")
    return 0


def list_or_relaunch(args: argparse.Namespace, finder: Callable[..., list] | None = None) -> int | None:
    """The exit code when this process is done before training: ``--list-inputs`` printed what the run would train
    on (no run folder, no model; ``finder`` is the method's input finder), or the command ran under torchrun;
    None to train here."""
    if args.list_inputs:
        from vocoslicer.data.sources import find_sources, print_inputs

        return print_inputs(args.data, finder or find_sources)
    return relaunch_under_torchrun(args)


def train_config(args: argparse.Namespace, d: PretrainDefaults, **extra: Any) -> Any:
    """The loop's :class:`~vocoslicer.train.loop.TrainConfig` from the common options (``extra``: the method's
    own fields, e.g. ``grad_clip``); ``--warmup`` unset means the recipe's warmup for ``--steps``."""
    from vocoslicer.train.loop import TrainConfig

    warmup = args.warmup if args.warmup is not None else d.warmup_steps(args.steps)
    return TrainConfig(steps=args.steps, lr=args.lr, weight_decay=args.weight_decay, warmup_steps=warmup,
                       amp=args.amp, grad_accum=args.grad_accum, compile=args.compile, ckpt_every=args.ckpt_every,
                       log_every=args.log_every, seed=args.seed, device=args.device, **extra)
