"""``vocoslicer pretrain tokenizer``: train the PUMIT visual tokenizer on folders of volumes / 2D images.

The options shared with ``pretrain mim`` (data, run directory, schedule, AMP, torchrun) live here too.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from vocoslicer import config
from vocoslicer.commands._jobsetup import job_setup
from vocoslicer.errors import UserError


def add_common(p: argparse.ArgumentParser, steps: int, batch: int, lr: float, crop: str, seed: int) -> None:
    """Options every PUMIT pretraining command takes."""
    p.add_argument("--data", nargs="+", required=True, metavar="DIR",
                   help="folders (searched recursively) or files: NIfTI/NRRD/MHA volumes, DICOM series, PNG/JPEG")
    p.add_argument("--out", type=Path, default=None, metavar="RUNDIR",
                   help="run directory (checkpoints, events, exported bundle); default: the job --run-dir")
    p.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    p.add_argument("--batch", type=int, default=batch, help=f"crops per batch and GPU (default {batch})")
    p.add_argument("--crop", default=crop, metavar="D,HW",
                   help=f"crop of isotropic data in voxels, D,HW or one size N (default {crop}); thick-slice and 2D "
                        "data get the same token grid with fewer slices")
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr:g})")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 5%% of --steps)")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="mixed precision (auto: bf16 on GPUs that support it, off on CPU)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--workers", type=int, default=2, help="data loader processes (default 2)")
    p.add_argument("--seed", type=int, default=seed)
    p.add_argument("--ckpt-every", type=int, default=1000)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (falls back to eager on error)")
    p.add_argument("--cache", type=Path, default=None, help="preprocessing cache folder (default: VoCoSlicer home)")
    p.add_argument("--resume", action="store_true", help="continue from RUNDIR/checkpoints/last.pt")
    p.add_argument("--gpus", type=int, default=1, help="GPUs on this machine; > 1 relaunches under torchrun")
    p.add_argument("--list-inputs", action="store_true",
                   help="print the images this run would train on (label maps skipped), one per line, and exit")
    config.add_config_option(p)


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


def relaunch_with_torchrun(args: argparse.Namespace) -> int | None:
    """With ``--gpus N > 1`` outside torchrun: run the same command under torchrun and return its exit code."""
    if args.gpus <= 1 or "WORLD_SIZE" in os.environ:
        return None
    from vocoslicer.contracts.torchrun import torchrun_command

    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a == "--gpus":
            skip = True
            continue
        if not a.startswith("--gpus="):
            argv.append(a)
    return subprocess.call(torchrun_command(["vocoslicer", *argv], args.gpus))


def train_config(args: argparse.Namespace, grad_clip: float | None, warmup_fraction: float) -> Any:
    from vocoslicer.train.loop import TrainConfig

    if args.steps < 1 or args.batch < 1:
        raise UserError("--steps and --batch must be >= 1")
    warmup = args.warmup if args.warmup is not None else round(warmup_fraction * args.steps)
    return TrainConfig(steps=args.steps, lr=args.lr, weight_decay=args.weight_decay, warmup_steps=warmup,
                       amp=args.amp, grad_accum=args.grad_accum, grad_clip=grad_clip, compile=args.compile,
                       ckpt_every=args.ckpt_every, log_every=args.log_every, seed=args.seed, device=args.device,
                       amsgrad=False)


def load_items(args: argparse.Namespace, events: Any, run_dir: Path | None = None) -> list:
    from vocoslicer.data.anisotropy import prepare_volumes
    from vocoslicer.paths import cache_dir

    return prepare_volumes(args.data, args.cache or cache_dir() / "pumit", events, run_dir)


def list_or_relaunch(args: argparse.Namespace) -> int | None:
    """The exit code when this process is done before training: ``--list-inputs`` printed what the run would train
    on (no run folder, no model), or ``--gpus N`` ran the command under torchrun; None to train here."""
    if args.list_inputs:
        from vocoslicer.data.anisotropy import find_inputs
        from vocoslicer.data.sources import print_inputs

        return print_inputs(args.data, find_inputs)
    return relaunch_with_torchrun(args)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``pretrain tokenizer``."""
    p = sub.add_parser("tokenizer", help="PUMIT visual tokenizer (soft tokens, SAC, any spacing, 2D and 3D)",
                       description="Trains the PUMIT tokenizer (encoder, K-entry codebook read out as soft tokens, "
                                   "decoder; L1 + perceptual + gated patch-GAN loss) and exports it as a bundle "
                                   "in RUNDIR/tokenizer for `pretrain mim --tokenizer`.")
    add_common(p, steps=500_000, batch=8, lr=1e-4, crop="64,128", seed=2333)
    p.add_argument("--size", choices=("paper", "small", "tiny"), default="paper",
                   help="channel widths: paper (128,256,512), small (64,128,256), tiny (tests)")
    p.add_argument("--codebook-size", type=int, default=None, help="K (paper 1024)")
    p.add_argument("--embed-dim", type=int, default=None, help="codebook vector size (paper 512)")
    p.add_argument("--d-lr", type=float, default=1e-3, help="discriminator learning rate (default 1e-3)")
    p.add_argument("--quant-weight", type=float, default=0.03, help="λ_q, codebook diversity (default 0.03)")
    p.add_argument("--entropy-weight", type=float, default=1.0, help="λ_e, token sharpness (default 1)")
    p.add_argument("--perceptual-weight", type=float, default=1.0)
    p.add_argument("--perceptual", default="random",
                   help="random[:C1,C2,..] (frozen seeded random features, default) or lpips:VGG16.pth,LIN.pth "
                        "(LPIPS-VGG16 from local weight files)")
    p.set_defaults(func=run, validate=validate)


def validate_common(args: argparse.Namespace) -> None:
    """Checks of the options in :func:`add_common`, before any run folder exists."""
    from vocoslicer.commands._jobsetup import check_training_args

    check_training_args(args)
    if args.steps < 1 or args.batch < 1:
        raise UserError("--steps and --batch must be >= 1")
    if args.warmup is not None and args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")


def validate(args: argparse.Namespace) -> None:
    """``pretrain tokenizer`` argument checks (the crop against the tokenizer's stride included)."""
    if getattr(args, "list_inputs", False):
        return  # --list-inputs needs only --data: it imports nothing heavy and builds no model
    from vocoslicer.models.pumit.tokenizer import TOKENIZER_SIZES, TokenizerConfig

    validate_common(args)
    for name in ("codebook_size", "embed_dim"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    parse_crop(args.crop, TokenizerConfig(**TOKENIZER_SIZES[args.size]).stride)


def run(args: argparse.Namespace) -> int:
    """Handler."""
    code = list_or_relaunch(args)
    if code is not None:
        return code
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
    cfg = train_config(args, grad_clip=None, warmup_fraction=0.05)
    d_channels = tuple(tok_cfg.channels) if args.size == "tiny" else (128, 256, 512)
    recipe = TokenizerRecipe(quant_weight=args.quant_weight, entropy_weight=args.entropy_weight,
                             perceptual_weight=args.perceptual_weight, perceptual=args.perceptual, d_lr=args.d_lr,
                             d_channels=d_channels)
    items = load_items(args, events, run_dir)
    result = train_tokenizer(items, run_dir, tok_cfg, cfg, recipe, args.batch, tz, txy, args.resume, events,
                             args.workers, should_stop)
    if result.get("bundle"):
        print(f"tokenizer bundle: {result['bundle']} (step {result['step']})", file=sys.stderr)
    return 0
