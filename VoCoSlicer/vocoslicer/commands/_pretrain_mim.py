"""``vocoslicer pretrain mim``: masked image modelling of a PUMIT ViT against a trained tokenizer's soft tokens."""

from __future__ import annotations

import argparse
import sys

from vocoslicer.commands._jobsetup import job_setup
from vocoslicer.commands._pretrain_tokenizer import (
    add_common,
    list_or_relaunch,
    load_items,
    parse_crop,
    train_config,
    validate_common,
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``pretrain mim``."""
    p = sub.add_parser("mim", help="PUMIT masked image modelling of a universal ViT (needs a tokenizer)",
                       description="Pre-trains a ViT with SAC patch embedding and 3D RoPE by predicting the "
                                   "tokenizer's soft tokens of 55%% masked patches; exports the backbone as a "
                                   "bundle in RUNDIR/backbone (usable by finetune/classify as pumit_vit_cls / "
                                   "pumit_vit_seg).")
    p.add_argument("--tokenizer", metavar="RUNDIR|BUNDLE",
                   help="a `pretrain tokenizer` run directory or a tokenizer bundle (required to train)")
    add_common(p, steps=300_000, batch=14, lr=2e-5, crop="80,160", seed=666)
    p.add_argument("--size", choices=("tiny", "S", "B", "L"), default="B", help="ViT size (paper: B)")
    p.add_argument("--mask-ratio", type=float, default=0.55)
    p.add_argument("--mask-layer-start", type=int, default=None,
                   help="first block that sees mask tokens (default: 0 for B, 18 for L as in the paper)")
    p.add_argument("--grad-clip", type=float, default=0.5)
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing of the ViT blocks")
    p.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="start from ViT weights: EVA-02 checkpoint (the paper starts from eva02_B_pt_in21k_p14.pt), "
                        "a PUMIT MIM checkpoint or a backbone bundle")
    p.set_defaults(func=run, validate=validate)


def validate(args: argparse.Namespace) -> None:
    """``pretrain mim`` argument checks, before any run folder exists."""
    if getattr(args, "list_inputs", False):
        return  # --list-inputs needs only --data: it imports nothing heavy and builds no model
    from vocoslicer.errors import UserError

    validate_common(args)
    if not 0 < args.mask_ratio < 1:
        raise UserError(f"--mask-ratio must be in (0, 1), got {args.mask_ratio}")


def run(args: argparse.Namespace) -> int:
    """Handler."""
    code = list_or_relaunch(args)
    if code is not None:
        return code
    from vocoslicer.errors import UserError
    from vocoslicer.train.pretrain_pumit import load_tokenizer, train_mim

    if not args.tokenizer:
        raise UserError("--tokenizer is required (a `pretrain tokenizer` run directory or a tokenizer bundle)")
    if not 0 < args.mask_ratio < 1:
        raise UserError(f"--mask-ratio must be in (0, 1), got {args.mask_ratio}")
    run_dir, events, should_stop = job_setup(args)
    tokenizer = load_tokenizer(args.tokenizer)
    tz, txy = parse_crop(args.crop, tokenizer.stride)
    cfg = train_config(args, grad_clip=args.grad_clip or None, warmup_fraction=10_000 / 300_000)
    items = load_items(args, events, run_dir)
    result = train_mim(items, run_dir, tokenizer, cfg, args.size, args.batch, tz, txy, args.mask_ratio,
                       args.mask_layer_start, args.resume, events, args.workers, should_stop,
                       vit_overrides={"grad_ckpt": True} if args.grad_ckpt else None, init=args.init)
    if result.get("bundle"):
        print(f"ViT backbone bundle: {result['bundle']} (step {result['step']})", file=sys.stderr)
    return 0
