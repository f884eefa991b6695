"""``vocoslicer finetune --task classification``: the options only a classifier has, and its handler.

The shared ``finetune`` options keep their names (``--steps``, ``--lr``, ``--batch``, ``--warmup``, ``--amp``, ...)
but the classification recipe has other defaults (official CC-CCII: AdamW 3e-4, batch 4, 5 % warm-up, no AMP).
Their parser defaults are therefore marked (:class:`_Float` and friends behave exactly like the plain value for the
segmentation path); a marked value means "not given", and the classification recipe's own default applies.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


class _Float(float):
    """A float parser default (the user did not give the option)."""


class _Int(int):
    """An int parser default."""


class _Str(str):
    """A str parser default."""


def _size(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or X,Y,Z, got {text!r}") from None
    vals = vals * 3 if len(vals) == 1 else vals
    if len(vals) != 3:
        raise argparse.ArgumentTypeError(f"expected N or X,Y,Z, got {text!r}")
    return vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``--task`` and the classification options to the ``finetune`` parser (after its own options)."""
    p.add_argument("--task", choices=("segmentation", "classification"), default="segmentation",
                   help="segmentation (label maps, default) or classification (the cohort's case classes)")
    g = p.add_argument_group("classification (--task classification)",
                             "the shared --lr/--batch/--warmup/--amp default to the official CC-CCII recipe here: "
                             "3e-4, 4, 5 % of the steps, off; the best validation accuracy (multi-label: mean AUC) "
                             "becomes a classification bundle version")
    g.add_argument("--arch", choices=("voco_classifier", "pumit_vit_cls"), default=None,
                   help="classifier: the official VoCo one (SwinUNETR-v2 encoder+decoder, average pool, linear; "
                        "default) or the PUMIT ViT [CLS] one (default: follows --init)")
    g.add_argument("--input-size", type=_size, default=None,
                   help="whole-volume network input N or X,Y,Z, multiples of 32 (default 96 VoCo, 128 PUMIT)")
    g.add_argument("--multi-label", action=argparse.BooleanOptionalAction, default=None,
                   help="independent findings (BCE, per-class AUC) instead of one class per case (CE, accuracy); "
                        "default: multi-label when some case carries several classes")
    g.add_argument("--balanced", action=argparse.BooleanOptionalAction, default=True,
                   help="class-balanced case sampling (default on)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="official flip/brightness/contrast augmentation (default on)")
    g.add_argument("--pool", choices=("decoder", "voco", "deepest"), default="decoder",
                   help="voco_classifier features: decoder output (official), VoCo multi-scale, deepest stage")
    g.add_argument("--vit-size", choices=("B", "L", "S", "tiny"), default=None, help="pumit_vit_cls size for scratch")
    g.add_argument("--patch", type=int, choices=(4, 8, 16), default=None,
                   help="pumit_vit_cls patch edge in voxels (default 16; 8 for small inputs)")
    p.set_defaults(lr=_Float(p.get_default("lr")), batch=_Int(p.get_default("batch")),
                   warmup=_Int(p.get_default("warmup")), amp=_Str(p.get_default("amp")))


def options(args: argparse.Namespace):  # noqa: ANN201 - ClsOptions (imported lazily: torch)
    """Build :class:`ClsOptions` from the parsed arguments (unmarked = given by the user)."""
    from vocoslicer.commands.finetune import _json_arg
    from vocoslicer.errors import UserError
    from vocoslicer.train.finetune_cls import ClsOptions

    if args.roi is not None:
        raise UserError("finetune --task classification: the classifier sees whole volumes; use --input-size, "
                        "not --roi")
    return ClsOptions(
        cohort=args.cohort, init=args.init, out=args.out, arch=args.arch, steps=args.steps,
        lr=3e-4 if isinstance(args.lr, _Float) else args.lr, batch=4 if isinstance(args.batch, _Int) else args.batch,
        warmup_steps=None if isinstance(args.warmup, _Int) else args.warmup,
        amp="off" if isinstance(args.amp, _Str) else args.amp, input_size=args.input_size,
        multi_label=args.multi_label, balanced=args.balanced, augment=args.augment, pool=args.pool,
        feature_size=args.feature_size, vit_size=args.vit_size, patch=args.patch,
        preprocessing=_json_arg(args.preprocessing),
        eval_every=args.eval_every, patience=args.patience, device=args.device, grad_accum=args.grad_accum,
        compile=args.compile, seed=args.seed, model_id=args.model_id, install=not args.no_install,
        resume=args.resume)


def run(args: argparse.Namespace) -> int:
    """Handler of ``finetune --task classification``: check (nothing written on bad input), train, summarise."""
    from vocoslicer.jobs.context import current_job
    from vocoslicer.jobs.events import NULL_SINK, EventSink
    from vocoslicer.train.finetune_cls import check_inputs, run_classification_finetune

    opts = options(args)
    check_inputs(opts)
    job = current_job()
    own_sink = None
    if int(os.environ.get("RANK", "0") or 0) != 0:  # under torchrun only rank 0 reports (and writes events.jsonl)
        events = NULL_SINK
    elif job.run_dir is not None:
        events = job.events
    else:
        own_sink = events = EventSink(Path(args.out).expanduser() / "events.jsonl",
                                      stdout=getattr(args, "job_events", "none") == "stdout")
    try:
        summary = run_classification_finetune(opts, events=events, should_stop=job.should_stop)
    finally:
        if own_sink is not None:
            own_sink.close()
    out = sys.stderr if getattr(args, "job_events", "none") == "stdout" else sys.stdout
    print(json.dumps({k: v for k, v in summary.items() if k != "metrics"}), file=out)
    return 0
