"""``vocoslicer pretrain mim``: masked image modelling of a PUMIT ViT against a trained tokenizer's soft tokens."""

from __future__ import annotations

import argparse
import sys

from vocoslicer.commands.pretrain import common
from vocoslicer.commands.pretrain.tokenizer import (
    add_pumit_options,
    list_or_relaunch_pumit,
    load_items,
    parse_crop,
    validate_pumit,
)
from vocoslicer.errors import UserError
from vocoslicer.train.recipes import MIM


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``pretrain mim``."""
    p = sub.add_parser("mim", help="PUMIT masked image modelling of a universal ViT (needs a tokenizer)",
                       description="Pre-trains a ViT with SAC patch embedding and 3D RoPE by predicting the "
                                   f"tokenizer's soft tokens of {MIM.mask_ratio * 100:g}% masked patches; exports "
                                   "the backbone as a bundle in RUNDIR/backbone (usable by finetune/classify as "
                                   "pumit_vit_cls / pumit_vit_seg).")
    p.add_argument("--tokenizer", metavar="RUNDIR|BUNDLE",
                   help="a `pretrain tokenizer` run directory or a tokenizer bundle (required to train)")
    add_pumit_options(p, MIM, MIM.crop)
    p.add_argument("--size", choices=("tiny", "S", "B", "L"), default=MIM.size, help="ViT size (paper: B)")
    p.add_argument("--mask-ratio", type=float, default=MIM.mask_ratio,
                   help=f"fraction of the patches masked (default {MIM.mask_ratio:g})")
    p.add_argument("--mask-layer-start", type=int, default=None,
                   help="first block that sees mask tokens (default: 0 for B, 18 for L as in the paper)")
    p.add_argument("--grad-clip", type=float, default=MIM.grad_clip,
                   help=f"gradient norm clipping, 0: off (default {MIM.grad_clip:g})")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing of the ViT blocks")
    p.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="start from ViT weights: EVA-02 checkpoint (the paper starts from eva02_B_pt_in21k_p14.pt), "
                        "a PUMIT MIM checkpoint or a backbone bundle")
    common.set_handlers(p, run, validate)


def validate(args: argparse.Namespace) -> None:
    """``pretrain mim`` argument checks, before any run folder exists."""
    validate_pumit(args)
    if not 0 < args.mask_ratio < 1:
        raise UserError(f"--mask-ratio must be in (0, 1), got {args.mask_ratio}")


def run(args: argparse.Namespace) -> int:
    """Handler."""
    code = list_or_relaunch_pumit(args)
    if code is not None:
        return code
    if not args.tokenizer:
        raise UserError("--tokenizer is required (a `pretrain tokenizer` run directory or a tokenizer bundle)")
    from vocoslicer.commands._jobsetup import job_setup
    from vocoslicer.train.pretrain_pumit import load_tokenizer, train_mim

    run_dir, events, should_stop = job_setup(args)
    tokenizer = load_tokenizer(args.tokenizer)
    tz, txy = parse_crop(args.crop, tokenizer.stride)
    cfg = common.train_config(args, MIM, grad_clip=args.grad_clip or None, amsgrad=False)
    items = load_items(args, events, run_dir)
    result = train_mim(items, run_dir, tokenizer, cfg, args.size, args.batch, tz, txy, args.mask_ratio,
                       args.mask_layer_start, args.resume, events, args.workers, should_stop,
                       vit_overrides={"grad_ckpt": True} if args.grad_ckpt else None, init=args.init)
    if result.get("bundle"):
        print(f"ViT backbone bundle: {result['bundle']} (step {result['step']})", file=sys.stderr)
    return 0
