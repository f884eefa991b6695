"""``vocoslicer pretrain tokenizer``: train the PUMIT visual tokenizer on folders of volumes / 2D images.

What ``pretrain mim`` shares with it beyond the common options (the ``D,HW`` crop, the PUMIT data) lives here too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from vocoslicer.commands.pretrain import common
from vocoslicer.errors import UserError
from vocoslicer.train.recipes import TOKENIZER, PretrainDefaults


def add_pumit_options(p: argparse.ArgumentParser, d: PretrainDefaults, crop: str) -> None:
    """The common options plus what both PUMIT methods take: the ``D,HW`` crop, the old ``--cache`` spelling."""
    common.add_common_options(p, d, formats="NIfTI/NRRD/MHA volumes, DICOM series, PNG/JPEG", batch_unit="crops")
    p.add_argument("--crop", default=crop, metavar="D,HW",
                   help=f"crop of isotropic data in voxels, D,HW or one size N (default {crop}); thick-slice and 2D "
                        "data get the same token grid with fewer slices")
    common.add_deprecated_alias(p, "--cache", dest="cache_dir", type=Path)  # before --cache-dir had one name everywhere


def parse_crop(text: str, stride: int) -> tuple[int, int]:
    """``D,HW`` (or one size ``N`` = N,N) voxels -> (tokens_z, tokens_xy); multiples of the network stride."""
    try:
        sizes = [int(v) for v in str(text).split(",")]
        d, hw = (sizes[0], sizes[0]) if len(sizes) == 1 else sizes
    except ValueError:
        raise UserError(f"--crop {text}: expected D,HW or one size N (e.g. 64,128 or 96)") from None
    if d <= 0 or hw <= 0 or d % stride or hw % stride:
        raise UserError(f"--crop {text}: both sizes must be positive multiples of the network stride {stride}")
    return d // stride, hw // stride


def validate_pumit(args: argparse.Namespace) -> None:
    """Checks both PUMIT methods make before any run folder exists."""
    common.validate_common(args)
    if args.steps < 1 or args.batch < 1:
        raise UserError("--steps and --batch must be >= 1")


def list_or_relaunch_pumit(args: argparse.Namespace) -> int | None:
    """:func:`~vocoslicer.commands.pretrain.common.list_or_relaunch` with the PUMIT input finder (2D images too)."""
    from vocoslicer.data.anisotropy import find_inputs

    return common.list_or_relaunch(args, find_inputs)


def load_items(args: argparse.Namespace, events: Any, run_dir: Path | None = None) -> list:
    """The training volumes of ``--data``, preprocessed into ``--cache-dir`` (default: the home's pumit cache)."""
    from vocoslicer.data.anisotropy import prepare_volumes
    from vocoslicer.paths import cache_dir

    return prepare_volumes(args.data, args.cache_dir or cache_dir() / "pumit", events, run_dir)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``pretrain tokenizer``."""
    p = sub.add_parser("tokenizer", help="PUMIT visual tokenizer (soft tokens, SAC, any spacing, 2D and 3D)",
                       description="Trains the PUMIT tokenizer (encoder, K-entry codebook read out as soft tokens, "
                                   "decoder; L1 + perceptual + gated patch-GAN loss) and exports it as a bundle "
                                   "in RUNDIR/tokenizer for `pretrain mim --tokenizer`.")
    d = TOKENIZER
    add_pumit_options(p, d, d.crop)
    p.add_argument("--size", choices=("paper", "small", "tiny"), default=d.size,
                   help="channel widths: paper (128,256,512), small (64,128,256), tiny (tests)")
    p.add_argument("--codebook-size", type=int, default=None, help="K (paper 1024)")
    p.add_argument("--embed-dim", type=int, default=None, help="codebook vector size (paper 512)")
    p.add_argument("--d-lr", type=float, default=d.d_lr, help=f"discriminator learning rate (default {d.d_lr:g})")
    p.add_argument("--quant-weight", type=float, default=d.quant_weight,
                   help=f"λ_q, codebook diversity (default {d.quant_weight:g})")
    p.add_argument("--entropy-weight", type=float, default=d.entropy_weight,
                   help=f"λ_e, token sharpness (default {d.entropy_weight:g})")
    p.add_argument("--perceptual-weight", type=float, default=d.perceptual_weight,
                   help=f"weight of the perceptual loss (default {d.perceptual_weight:g})")
    p.add_argument("--perceptual", default=d.perceptual,
                   help="random[:C1,C2,..] (frozen seeded random features, default) or lpips:VGG16.pth,LIN.pth "
                        "(LPIPS-VGG16 from local weight files)")
    common.set_handlers(p, run, validate)


def validate(args: argparse.Namespace) -> None:
    """``pretrain tokenizer`` argument checks (the crop against the tokenizer's stride included)."""
    from vocoslicer.models.pumit.tokenizer import TOKENIZER_SIZES, TokenizerConfig

    validate_pumit(args)
    for name in ("codebook_size", "embed_dim"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    parse_crop(args.crop, TokenizerConfig(**TOKENIZER_SIZES[args.size]).stride)


def run(args: argparse.Namespace) -> int:
    """Handler."""
    code = list_or_relaunch_pumit(args)
    if code is not None:
        return code
    from vocoslicer.commands._jobsetup import job_setup
    from vocoslicer.models.pumit.tokenizer import TOKENIZER_SIZES, TokenizerConfig
    from vocoslicer.train.pretrain_pumit import TokenizerRecipe, train_tokenizer

    run_dir, events, should_stop = job_setup(args)
    size = dict(TOKENIZER_SIZES[args.size])
    if args.codebook_size:
        size["codebook_size"] = args.codebook_size
    if args.embed_dim:
        size["embed_dim"] = args.embed_dim
    tok_cfg = TokenizerConfig(**size)
    tz, txy = parse_crop(args.crop, tok_cfg.stride)
    cfg = common.train_config(args, TOKENIZER, grad_clip=None, amsgrad=False)
    tiny = {"d_channels": tuple(tok_cfg.channels)} if args.size == "tiny" else {}  # else the paper's discriminator
    recipe = TokenizerRecipe(quant_weight=args.quant_weight, entropy_weight=args.entropy_weight,
                             perceptual_weight=args.perceptual_weight, perceptual=args.perceptual, d_lr=args.d_lr,
                             **tiny)
    items = load_items(args, events, run_dir)
    result = train_tokenizer(items, run_dir, tok_cfg, cfg, recipe, args.batch, tz, txy, args.resume, events,
                             args.workers, should_stop)
    if result.get("bundle"):
        print(f"tokenizer bundle: {result['bundle']} (step {result['step']})", file=sys.stderr)
    return 0
