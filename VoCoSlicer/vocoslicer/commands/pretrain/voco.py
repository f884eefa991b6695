"""``vocoslicer pretrain voco``: VoCo v2 self-supervised pretraining of a SwinUNETR encoder (B/L/H)."""

from __future__ import annotations

import argparse
import math
import sys

from vocoslicer.commands.pretrain import common
from vocoslicer.errors import UserError
from vocoslicer.train.recipes import VOCO

# SwinUNETR halves every axis five times: below 32 voxels the deepest stage has a single voxel and its norm fails
_MIN_CROP = 32


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``pretrain voco``."""
    p = sub.add_parser(
        "voco", help="VoCo v2 contrastive pretraining of a SwinUNETR encoder (B/L/H)",
        description="Pretrains a SwinUNETR-v2 encoder with VoCo v2 (volume contrast: position labels of random "
                    "crops against a grid of base crops, student/teacher heads). Volumes are preprocessed once into "
                    "a memory-mapped cache. Exports RUNDIR/backbone, a model bundle that finetune/segment load like "
                    "an official VoCo_*_SSL_head.pt.")
    common.add_common_options(p, VOCO, formats="NIfTI/NRRD/MHA, DICOM", batch_unit="volumes", data_required=False,
                       steps_note="; official: 2,000,000 on 8 GPUs")
    common.add_deprecated_alias(p, "--accum", dest="grad_accum", type=int)  # voco's name before --grad-accum
    p.add_argument("--size", choices=("B", "L", "H"), default=VOCO.size, help="VoCo size: B=48, L=96, H=192 features")
    p.add_argument("--feature-size", type=int, default=None, help="override the feature size (multiple of 12)")
    p.add_argument("--sw", type=int, default=VOCO.sw, help=f"random crops per volume (official {VOCO.sw})")
    p.add_argument("--crop", type=int, default=VOCO.crop, help=f"crop size r in voxels (official {VOCO.crop})")
    p.add_argument("--grid", type=int, default=VOCO.grid,
                   help=f"n×n base crops (official {VOCO.grid}: {VOCO.grid * VOCO.crop}×{VOCO.grid * VOCO.crop}×"
                        f"{VOCO.crop} regions)")
    p.add_argument("--depth", type=int, default=None, help="crop depth (default: --crop)")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in the Swin blocks (less memory)")
    p.add_argument("--spacing", default=f"{VOCO.spacing:g}",
                   help="resampling spacing in mm: one or three numbers, or 'keep'")
    p.add_argument("--window", default=f"{VOCO.a_min:g},{VOCO.a_max:g}",
                   help="HU window a_min,a_max (chest CT officially -1000,500)")
    p.add_argument("--cache-limit-gb", type=float, default=None, help="cache size limit; LRU eviction, then streaming")
    p.add_argument("--cache-dtype", choices=("int16", "uint8"), default=VOCO.cache_dtype)
    p.add_argument("--init", default=None, metavar="CKPT", help="start from a checkpoint (official VoCo files too)")
    p.add_argument("--export-only", action="store_true", help="only export RUNDIR/backbone from the last checkpoint")
    common.set_handlers(p, run, validate)


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


def _window(text: str) -> tuple[float, float]:
    try:
        a_min, a_max = (float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--window {text}: expected two numbers a_min,a_max (e.g. -175,250)") from None
    if not (a_min < a_max and all(map(math.isfinite, (a_min, a_max)))):
        raise UserError(f"--window {text}: expected finite a_min < a_max")
    return a_min, a_max


def validate(args: argparse.Namespace) -> None:
    """Argument checks that need no data, run by the CLI before the run folder exists."""
    common.validate_common(args)
    if args.export_only:
        return
    if not args.data:
        raise UserError("--data is required (folders or files of CT volumes)")
    if args.steps < 0 or args.batch < 1 or args.sw < 1 or args.grid < 1 or args.crop < 2:
        raise UserError("--steps >= 0, --batch/--sw/--grid >= 1 and --crop >= 2 are required")
    for name, value in (("--crop", args.crop), ("--depth", args.depth)):
        if value is not None and (value < _MIN_CROP or value % 2):
            raise UserError(f"{name} {value}: too small for the network (SwinUNETR needs an even size of at least "
                            f"{_MIN_CROP} voxels: it halves each axis five times)")
    if args.feature_size is not None and (args.feature_size < 12 or args.feature_size % 12):
        raise UserError(f"--feature-size {args.feature_size}: must be a positive multiple of 12 (SwinUNETR)")
    _window(args.window)
    _triplet(args.spacing, "--spacing")


def run(args: argparse.Namespace) -> int:
    """Handler."""
    code = common.list_or_relaunch(args)  # before the run folder and the model: listing reads only the folder
    if code is not None:
        return code
    from vocoslicer.commands._jobsetup import job_setup

    run_dir, events, should_stop = job_setup(args, "the exported backbone")

    from vocoslicer.train.pretrain_voco import export_from_run

    if args.export_only:
        out = export_from_run(run_dir, events)
        print(f"VoCo backbone bundle: {out}", file=sys.stderr)
        return 0

    from vocoslicer.data.cache import PreprocessConfig
    from vocoslicer.train.pretrain_voco import VoCoRecipe, pretrain_voco

    a_min, a_max = _window(args.window)
    pp = PreprocessConfig(spacing=_triplet(args.spacing, "--spacing"), a_min=a_min, a_max=a_max,
                          dtype=args.cache_dtype)
    recipe = VoCoRecipe(size=None if args.feature_size else args.size, feature_size=args.feature_size,
                        roi=args.crop, grid=args.grid, sw=args.sw, depth=args.depth, batch=args.batch,
                        grad_ckpt=args.grad_ckpt, init=args.init, workers=args.workers,
                        cache_dir=str(args.cache_dir) if args.cache_dir else None,
                        cache_limit_gb=args.cache_limit_gb, preprocess=pp)
    result = pretrain_voco(args.data, run_dir, recipe, common.train_config(args, VOCO), resume=args.resume,
                           events=events, should_stop=should_stop)
    if result.get("bundle"):
        print(f"VoCo backbone bundle: {result['bundle']} (step {result['step']})", file=sys.stderr)
    return 0
