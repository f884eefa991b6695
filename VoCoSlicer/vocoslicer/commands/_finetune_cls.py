"""``vocoslicer finetune --task classification``: the options only a classifier has, and its handler.

The shared ``finetune`` options keep their names (``--steps``, ``--lr``, ``--batch``, ``--warmup``, ``--amp``,
``--weight-decay``, ...) but the classification recipe has other defaults (official CC-CCII: AdamW 3e-4, batch 4,
5 % warm-up, no AMP, weight decay 0.01). Their parser defaults are therefore marked
(:func:`vocoslicer.train.finetune.options.unset`: they behave exactly like the plain value for the segmentation
path); a marked value means "not given", and :class:`ClsOptions`'s own default applies.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
from typing import Any

from vocoslicer.train.finetune.options import ClsOptions, default_of


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``--task`` and the classification options to the ``finetune`` parser (after its own options)."""
    from vocoslicer.commands.finetune import _triplet  # the caller, loaded by now

    D = partial(default_of, ClsOptions)  # noqa: N806 - reads as "the default of"
    p.add_argument("--task", choices=("segmentation", "classification"), default="segmentation",
                   help="segmentation (label maps, default) or classification (the cohort's case classes)")
    g = p.add_argument_group("classification (--task classification)",
                             "the shared --lr/--batch/--warmup/--amp default to the official CC-CCII recipe here: "
                             "3e-4, 4, 5 % of the steps, off; the best validation accuracy (multi-label: mean AUC) "
                             "becomes a classification bundle version")
    g.add_argument("--arch", choices=("voco_classifier", "pumit_vit_cls"), default=D("arch"),
                   help="classifier: the official VoCo one (SwinUNETR-v2 encoder+decoder, average pool, linear; "
                        "default) or the PUMIT ViT [CLS] one (default: follows --init)")
    g.add_argument("--input-size", type=_triplet, default=D("input_size"),
                   help="whole-volume network input N or X,Y,Z, multiples of 32 (default 96 VoCo, 128 PUMIT)")
    g.add_argument("--multi-label", action=argparse.BooleanOptionalAction, default=D("multi_label"),
                   help="independent findings (BCE, per-class AUC) instead of one class per case (CE, accuracy); "
                        "default: multi-label when some case carries several classes")
    g.add_argument("--balanced", action=argparse.BooleanOptionalAction, default=D("balanced"),
                   help="class-balanced case sampling (default on)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=D("augment"),
                   help="official flip/brightness/contrast augmentation (default on)")
    g.add_argument("--pool", choices=("decoder", "voco", "deepest"), default=D("pool"),
                   help="voco_classifier features: decoder output (official), VoCo multi-scale, deepest stage")
    g.add_argument("--vit-size", choices=("B", "L", "S", "tiny"), default=D("vit_size"),
                   help="pumit_vit_cls size for scratch")
    g.add_argument("--patch", type=int, choices=(4, 8, 16), default=D("patch"),
                   help="pumit_vit_cls patch edge in voxels (default 16; 8 for small inputs)")


def options(args: argparse.Namespace) -> ClsOptions:
    """Build :class:`ClsOptions` from the parsed arguments (unmarked = given by the user)."""
    from vocoslicer.commands.finetune import options_from
    from vocoslicer.errors import UserError

    if args.roi is not None:
        raise UserError("finetune --task classification: the classifier sees whole volumes; use --input-size, "
                        "not --roi")
    return options_from(ClsOptions, args)


def training(args: argparse.Namespace) -> Callable[..., dict[str, Any]]:
    """The classifier's run for :func:`vocoslicer.commands.finetune.run_reporting`, after every check (nothing
    is written on bad input)."""
    from vocoslicer.train.finetune.cls import check_inputs, run_classification_finetune

    opts = options(args)
    check_inputs(opts)
    return partial(run_classification_finetune, opts)
