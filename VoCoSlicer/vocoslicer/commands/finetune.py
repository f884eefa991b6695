"""``vocoslicer finetune --cohort DIR --init BUNDLE|CHECKPOINT|scratch --out RUNDIR``: learn from a cohort."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vocoslicer import config
from vocoslicer.commands import _finetune_cls
from vocoslicer.errors import UserError


def _triplet(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or X,Y,Z, got {text!r}") from None
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise argparse.ArgumentTypeError(f"expected N or X,Y,Z, got {text!r}")
    return vals


def _json_arg(text: str | None) -> dict | None:
    if not text:
        return None
    p = Path(text)
    try:
        data = json.loads(p.read_text(encoding="utf-8") if p.is_file() else text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise UserError(f"--preprocessing: not JSON (inline or a UTF-8 file): {exc}") from None
    if not isinstance(data, dict):
        raise UserError("--preprocessing: expected a JSON object")
    return data


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``finetune`` command."""
    p = sub.add_parser(
        "finetune", help="finetune a segmentation model on a cohort (supervised + confident pseudo-labels)",
        description="Supervised Dice+CE on the cohort's labelled training cases; from --semi-start of the steps a "
                    "frozen copy of the model labels the unlabelled cases and only voxels with max probability >= "
                    "--confidence are learnt from. The best validation-Dice weights become a new model bundle "
                    "version (recording parent, cohort version and Dice), installed so that 'vocoslicer segment "
                    "--model ID' uses it at once.")
    p.add_argument("--cohort", required=True, help="cohort folder (vocoslicer cohort init/add)")
    p.add_argument("--init", required=True,
                   help="model bundle (path, installed ID or ID@VERSION), a VoCo/SwinUNETR checkpoint (.pt/.pth/"
                        ".safetensors) or 'scratch'")
    p.add_argument("--out", required=True, help="run folder (checkpoints, best_bundle/, events.jsonl, summary.json)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--warmup", type=int, default=0, help="linear warmup steps before the cosine decay")
    p.add_argument("--batch", type=int, default=2, help="labelled crops per step (as many unlabelled ones)")
    p.add_argument("--roi", type=_triplet, default=None, help="crop size N or X,Y,Z (default: the model's ROI)")
    p.add_argument("--semi", action=argparse.BooleanOptionalAction, default=True,
                   help="semi-supervised stage on unlabelled cases (default on)")
    p.add_argument("--semi-start", type=float, default=0.5, help="fraction of the steps before the teacher is "
                                                                  "frozen and pseudo-labels start (default 0.5)")
    p.add_argument("--confidence", type=float, default=0.9, help="min teacher probability of a pseudo-labelled "
                                                                  "voxel (default 0.9)")
    p.add_argument("--semi-weight", type=float, default=1.0, help="weight of the pseudo-label loss (default 1)")
    p.add_argument("--ssl-weight", type=float, default=0.0,
                   help="add the VoCo loss on crops of the unlabelled cases with this weight (SwinUNETR models; "
                        "the omni-supervised recipe; default 0: off)")
    p.add_argument("--ssl-grid", type=int, default=2, help="VoCo base-crop grid n (n² base crops, default 2)")
    p.add_argument("--ssl-sw", type=int, default=2, help="VoCo random crops per volume (default 2)")
    p.add_argument("--sampler", choices=("classes", "posneg"), default="classes",
                   help="labelled crop centres: each label equally often (default; small corrected structures get "
                        "as many crops as the liver) or foreground/background 1:1 (the official BTCV recipe)")
    p.add_argument("--eval-every", type=int, default=0, help="validate every N steps (default: steps/10)")
    p.add_argument("--patience", type=int, default=0, help="stop after N validations without improvement (0: off)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"), help="mixed precision")
    p.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-id", help="id of the new bundle (default: the parent's id, or finetuned-<cohort>)")
    p.add_argument("--feature-size", type=int, help="SwinUNETR feature size for --init scratch (default 48)")
    p.add_argument("--preprocessing", help="JSON (inline or file) for scratch/checkpoint inits: orientation, "
                                           "spacing, intensity window (default: VoCo CT, 1.5 mm, -175..250 HU)")
    p.add_argument("--no-install", action="store_true", help="keep the bundle in the run folder only")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    _finetune_cls.add_arguments(p)
    config.add_config_option(p)
    p.set_defaults(func=run, validate=validate)


def _options(args: argparse.Namespace):  # noqa: ANN202 - FinetuneOptions is imported lazily (torch)
    from vocoslicer.train.finetune import FinetuneOptions

    return FinetuneOptions(
        cohort=args.cohort, init=args.init, out=args.out, steps=args.steps, lr=args.lr, batch=args.batch,
        roi=args.roi, semi=args.semi, semi_start=args.semi_start, confidence=args.confidence,
        semi_weight=args.semi_weight, sampler=args.sampler, ssl_weight=args.ssl_weight,
        ssl_grid=args.ssl_grid, ssl_sw=args.ssl_sw, eval_every=args.eval_every, patience=args.patience,
        device=args.device,
        amp=args.amp, seed=args.seed, warmup_steps=args.warmup, grad_accum=args.grad_accum, compile=args.compile,
        model_id=args.model_id, feature_size=args.feature_size, preprocessing=_json_arg(args.preprocessing),
        install=not args.no_install, resume=args.resume)


def validate(args: argparse.Namespace) -> None:
    """Everything checkable without training, before the run folder (events.jsonl, finetune.json) is touched:
    the options, the device, and the state of a run being resumed."""
    from vocoslicer.commands._jobsetup import check_device
    from vocoslicer.train.finetune import read_resume_state

    if args.task == "classification":
        from vocoslicer.train.finetune_cls import check_inputs

        cls_opts = _finetune_cls.options(args)
        check_device(cls_opts.device)
        check_inputs(cls_opts)
        return
    opts = _options(args)
    opts.validate()
    check_device(opts.device)
    if args.model_id:
        from vocoslicer.ids import check_id

        check_id(args.model_id, "model id")  # installs under models/<id>/: no run folder for a traversal id
    if not Path(args.cohort).expanduser().is_dir():
        raise UserError(f"--cohort {args.cohort}: no such cohort folder (create one with 'vocoslicer cohort init')")
    read_resume_state(opts)
    if opts.init != "scratch":
        from vocoslicer.train.finetune_init import CHECKPOINT_SUFFIXES

        path = Path(opts.init).expanduser()
        if path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES:
            import zipfile

            if zipfile.is_zipfile(path) or path.suffix.lower() == ".safetensors":
                from vocoslicer.models.checkpoints import read_checkpoint

                read_checkpoint(path)  # memory-mapped: cheap; a refused pickle is refused before any file exists
        else:
            from vocoslicer.models import installed as registry

            registry.resolve(opts.init)  # a missing or broken bundle is a one-line error now, not after setup


def run(args: argparse.Namespace) -> int:
    """Handler: build the options, run, print the summary."""
    if args.task == "classification":
        return _finetune_cls.run(args)
    from vocoslicer.jobs.context import current_job
    from vocoslicer.jobs.runner import job_event_sink
    from vocoslicer.train.finetune import run_finetune

    opts = _options(args)
    opts.validate()
    job = current_job()
    own_sink = None
    if job.run_dir is not None:
        events = job.events
    else:  # the finetune run folder is the run directory
        own_sink = events = job_event_sink(Path(args.out).expanduser() / "events.jsonl",
                                           getattr(args, "job_events", "none") == "stdout")
    try:
        summary = run_finetune(opts, events=events, should_stop=job.should_stop)
    finally:
        if own_sink is not None:
            own_sink.close()
    out = sys.stderr if getattr(args, "job_events", "none") == "stdout" else sys.stdout
    print(json.dumps({k: v for k, v in summary.items() if k != "metrics"}), file=out)
    return 0
