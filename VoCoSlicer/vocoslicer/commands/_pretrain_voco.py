"""``vocoslicer pretrain voco``: VoCo v2 self-supervised pretraining of a SwinUNETR encoder (B/L/H)."""

from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

from vocoslicer import config
from vocoslicer.errors import UserError


def _triplet(text: str, name: str) -> tuple[float, float, float] | None:
    if text.lower() in ("none", "keep", "native"):
        return None
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{name} {text}: expected one or three numbers (e.g. 1.5 or 1.5,1.5,2)") from None
    vals = vals * 3 if len(vals) == 1 else vals
    if len(vals) != 3 or not all(math.isfinite(v) and v > 0 for v in vals):
        raise UserError(f"{name} {text}: expected one or three positive numbers")
    return vals  # type: ignore[return-value]


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``pretrain voco``."""
    p = sub.add_parser(
        "voco", help="VoCo v2 contrastive pretraining of a SwinUNETR encoder (B/L/H)",
        description="Pretrains a SwinUNETR-v2 encoder with VoCo v2 (volume contrast: position labels of random "
                    "crops against a grid of base crops, student/teacher heads). Volumes are preprocessed once into "
                    "a memory-mapped cache. Exports RUNDIR/backbone, a model bundle that finetune/segment load like "
                    "an official VoCo_*_SSL_head.pt.")
    p.add_argument("--data", nargs="+", metavar="DIR", help="folders (recursive) or files: NIfTI/NRRD/MHA, DICOM")
    p.add_argument("--out", type=Path, default=None, metavar="RUNDIR", help="run directory (default: job --run-dir)")
    p.add_argument("--size", choices=("B", "L", "H"), default="B", help="VoCo size: B=48, L=96, H=192 features")
    p.add_argument("--feature-size", type=int, default=None, help="override the feature size (multiple of 12)")
    p.add_argument("--steps", type=int, default=100_000, help="optimizer steps (official: 2,000,000 on 8 GPUs)")
    p.add_argument("--batch", type=int, default=2, help="volumes per step and GPU (official 2)")
    p.add_argument("--sw", type=int, default=2, help="random crops per volume (official 2)")
    p.add_argument("--crop", type=int, default=64, help="crop size r in voxels (official 64)")
    p.add_argument("--grid", type=int, default=3, help="n×n base crops (official 3: 192×192×64 regions)")
    p.add_argument("--depth", type=int, default=None, help="crop depth (default: --crop)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default min(5000, steps/10))")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="mixed precision (auto: bf16 if the GPU supports it, else fp16 + GradScaler; off on CPU)")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in the Swin blocks (less memory)")
    p.add_argument("--compile", action="store_true", help="torch.compile (falls back to eager on failure)")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--spacing", default="1.5", help="resampling spacing in mm: one or three numbers, or 'keep'")
    p.add_argument("--window", default="-175,250", help="HU window a_min,a_max (chest CT officially -1000,500)")
    p.add_argument("--cache-dir", type=Path, default=None, help="preprocessing cache (default: VoCoSlicer home)")
    p.add_argument("--cache-limit-gb", type=float, default=None, help="cache size limit; LRU eviction, then streaming")
    p.add_argument("--cache-dtype", choices=("int16", "uint8"), default="int16")
    p.add_argument("--init", default=None, metavar="CKPT", help="start from a checkpoint (official VoCo files too)")
    p.add_argument("--resume", action="store_true", help="continue RUNDIR/checkpoints/last.pt exactly")
    p.add_argument("--export-only", action="store_true", help="only export RUNDIR/backbone from the last checkpoint")
    p.add_argument("--workers", type=int, default=4, help="data loader processes per GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-every", type=int, default=1000)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--gpus", type=int, default=1, help="GPUs on this node; > 1 relaunches under torchrun")
    p.add_argument("--print-torchrun", action="store_true", help="print the torchrun command and exit")
    p.add_argument("--list-inputs", action="store_true",
                   help="print the volumes this run would train on (label maps skipped), one per line, and exit")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, default=29500)
    config.add_config_option(p)
    p.set_defaults(func=run, validate=validate)


_LAUNCH_OPTS = {"--gpus", "--print-torchrun", "--nnodes", "--node-rank", "--master-addr", "--master-port"}


def _child_argv(argv: list[str]) -> list[str]:
    """This command line without the launcher options (what every torchrun rank runs)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in _LAUNCH_OPTS:
            skip = "=" not in a and name != "--print-torchrun"
            continue
        out.append(a)
    return out


# SwinUNETR halves every axis five times: below 32 voxels the deepest stage has a single voxel and its norm fails
_MIN_CROP = 32


def validate(args: argparse.Namespace) -> None:
    """Argument checks that need no data, run by the CLI before the run folder exists."""
    if getattr(args, "list_inputs", False):
        return  # --list-inputs needs only --data: it imports nothing heavy and builds no model
    from vocoslicer.commands._jobsetup import check_training_args

    check_training_args(args)
    if args.export_only:
        return
    if not args.data:
        raise UserError("--data is required (folders or files of CT volumes)")
    if args.steps < 0 or args.batch < 1 or args.sw < 1 or args.grid < 1 or args.crop < 2 or args.accum < 1:
        raise UserError("--steps >= 0, --batch/--sw/--grid/--accum >= 1 and --crop >= 2 are required")
    for name, value in (("--crop", args.crop), ("--depth", args.depth)):
        if value is not None and (value < _MIN_CROP or value % 2):
            raise UserError(f"{name} {value}: too small for the network (SwinUNETR needs an even size of at least "
                            f"{_MIN_CROP} voxels: it halves each axis five times)")
    if args.feature_size is not None and (args.feature_size < 12 or args.feature_size % 12):
        raise UserError(f"--feature-size {args.feature_size}: must be a positive multiple of 12 (SwinUNETR)")
    if args.warmup is not None and args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    _window(args.window)
    _triplet(args.spacing, "--spacing")


def _window(text: str) -> tuple[float, float]:
    try:
        a_min, a_max = (float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--window {text}: expected two numbers a_min,a_max (e.g. -175,250)") from None
    if not (a_min < a_max and all(map(math.isfinite, (a_min, a_max)))):
        raise UserError(f"--window {text}: expected finite a_min < a_max")
    return a_min, a_max


def run(args: argparse.Namespace) -> int:
    """Handler."""
    if args.list_inputs:  # before torchrun, the run folder and the model: it only reads the folder listing
        from vocoslicer.data.sources import print_inputs

        return print_inputs(args.data)
    from vocoslicer.contracts.torchrun import torchrun_command

    under_torchrun = "WORLD_SIZE" in os.environ
    if args.print_torchrun or ((args.gpus > 1 or args.nnodes > 1) and not under_torchrun):
        cmd = torchrun_command(["vocoslicer", *_child_argv(sys.argv[1:])], max(1, args.gpus), args.nnodes,
                               args.node_rank, args.master_addr, args.master_port)
        if args.print_torchrun:
            print(shlex.join(cmd))
            if args.nnodes > 1:
                print(f"# run on every node, with --node_rank=0..{args.nnodes - 1}; node 0 is {args.master_addr}")
            return 0
        return subprocess.call(cmd)

    from vocoslicer.commands._jobsetup import job_setup

    run_dir, events, should_stop = job_setup(args, "the exported backbone")

    from vocoslicer.train.pretrain_voco import export_from_run

    if args.export_only:
        out = export_from_run(run_dir, events)
        print(f"VoCo backbone bundle: {out}", file=sys.stderr)
        return 0
    if not args.data:
        raise UserError("--data is required (folders or files of CT volumes)")
    if args.steps < 0 or args.batch < 1 or args.sw < 1 or args.grid < 1 or args.crop < 2 or args.accum < 1:
        raise UserError("--steps >= 0, --batch/--sw/--grid/--accum >= 1 and --crop >= 2 are required")

    from vocoslicer.data.cache import PreprocessConfig
    from vocoslicer.train.loop import TrainConfig
    from vocoslicer.train.pretrain_voco import VoCoRecipe, pretrain_voco

    a_min, a_max = _window(args.window)
    pp = PreprocessConfig(spacing=_triplet(args.spacing, "--spacing"), a_min=a_min, a_max=a_max,
                          dtype=args.cache_dtype)
    recipe = VoCoRecipe(size=None if args.feature_size else args.size, feature_size=args.feature_size,
                        roi=args.crop, grid=args.grid, sw=args.sw, depth=args.depth, batch=args.batch,
                        grad_ckpt=args.grad_ckpt, init=args.init, workers=args.workers,
                        cache_dir=str(args.cache_dir) if args.cache_dir else None,
                        cache_limit_gb=args.cache_limit_gb, preprocess=pp)
    warmup = args.warmup if args.warmup is not None else min(5000, args.steps // 10)
    train = TrainConfig(steps=args.steps, lr=args.lr, weight_decay=args.weight_decay, warmup_steps=warmup,
                        amp=args.amp, grad_accum=args.accum, compile=args.compile, ckpt_every=args.ckpt_every,
                        log_every=args.log_every, seed=args.seed, device=args.device)
    result = pretrain_voco(args.data, run_dir, recipe, train, resume=args.resume, events=events,
                           should_stop=should_stop)
    if result.get("bundle"):
        print(f"VoCo backbone bundle: {result['bundle']} (step {result['step']})", file=sys.stderr)
    return 0
