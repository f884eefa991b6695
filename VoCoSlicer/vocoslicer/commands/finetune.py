"""``vocoslicer finetune --cohort DIR --init BUNDLE|CHECKPOINT|scratch --out RUNDIR``: learn from a cohort."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from vocoslicer import config
from vocoslicer.commands import _finetune_cls
from vocoslicer.contracts.torchrun import env_rank
from vocoslicer.errors import UserError
from vocoslicer.train.finetune.options import FinetuneOptions, default_of, from_args, unset
from vocoslicer.train.recipes import AMP_CHOICES

T = TypeVar("T")


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
    """Add the ``finetune`` command (its defaults are :class:`FinetuneOptions`'s; see :func:`_add_options`)."""
    p = sub.add_parser(
        "finetune", help="finetune a segmentation model on a cohort (supervised + confident pseudo-labels)",
        description="Supervised Dice+CE on the cohort's labelled training cases; from --semi-start of the steps a "
                    "frozen copy of the model labels the unlabelled cases and only voxels with max probability >= "
                    "--confidence are learnt from. The best validation-Dice weights become a new model bundle "
                    "version (recording parent, cohort version and Dice), installed so that 'vocoslicer segment "
                    "--model ID' uses it at once.")
    _add_options(p)
    _finetune_cls.add_arguments(p)
    config.add_config_option(p)
    p.set_defaults(func=run, validate=validate)


def _add_options(p: argparse.ArgumentParser) -> None:
    """The segmentation options; the ones classification shares with other defaults (--lr, --batch, --warmup,
    --amp, --weight-decay) get :func:`unset` defaults so that each task's dataclass default applies."""
    D = partial(default_of, FinetuneOptions)  # noqa: N806 - reads as "the default of"
    p.add_argument("--cohort", required=True, help="cohort folder (vocoslicer cohort init/add)")
    p.add_argument("--init", required=True,
                   help="model bundle (path, installed ID or ID@VERSION), a VoCo/SwinUNETR checkpoint (.pt/.pth/"
                        ".safetensors) or 'scratch'")
    p.add_argument("--out", required=True, help="run folder (checkpoints, best_bundle/, events.jsonl, summary.json)")
    p.add_argument("--steps", type=int, default=D("steps"), help="optimizer steps (default 200)")
    p.add_argument("--lr", type=float, default=unset(D("lr")), help="AdamW learning rate (default 1e-4)")
    p.add_argument("--weight-decay", type=float, default=unset(D("weight_decay")),
                   help="AdamW weight decay (default 1e-5; classification: 0.01, the official recipe)")
    p.add_argument("--warmup", type=int, default=unset(D("warmup_steps")),
                   help="linear warmup steps before the cosine decay")
    p.add_argument("--batch", type=int, default=unset(D("batch")),
                   help="labelled crops per step (as many unlabelled ones)")
    p.add_argument("--roi", type=_triplet, default=D("roi"), help="crop size N or X,Y,Z (default: the model's ROI)")
    p.add_argument("--semi", action=argparse.BooleanOptionalAction, default=D("semi"),
                   help="semi-supervised stage on unlabelled cases (default on)")
    p.add_argument("--semi-start", type=float, default=D("semi_start"),
                   help="fraction of the steps before the teacher is frozen and pseudo-labels start (default 0.5)")
    p.add_argument("--confidence", type=float, default=D("confidence"),
                   help="min teacher probability of a pseudo-labelled voxel (default 0.9)")
    p.add_argument("--semi-weight", type=float, default=D("semi_weight"),
                   help="weight of the pseudo-label loss (default 1)")
    p.add_argument("--ssl-weight", type=float, default=D("ssl_weight"),
                   help="add the VoCo loss on crops of the unlabelled cases with this weight (SwinUNETR models; "
                        "the omni-supervised recipe; default 0: off)")
    p.add_argument("--ssl-grid", type=int, default=D("ssl_grid"),
                   help="VoCo base-crop grid n (n² base crops, default 2)")
    p.add_argument("--ssl-sw", type=int, default=D("ssl_sw"), help="VoCo random crops per volume (default 2)")
    p.add_argument("--sampler", choices=("classes", "posneg"), default=D("sampler"),
                   help="labelled crop centres: each label equally often (default; small corrected structures get "
                        "as many crops as the liver) or foreground/background 1:1 (the official BTCV recipe)")
    p.add_argument("--eval-every", type=int, default=D("eval_every"),
                   help="validate every N steps (default: steps/10)")
    p.add_argument("--patience", type=int, default=D("patience"),
                   help="stop after N validations without improvement (0: off)")
    p.add_argument("--device", default=D("device"), help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", default=unset(D("amp")), choices=AMP_CHOICES, help="mixed precision")
    p.add_argument("--grad-accum", type=int, default=D("grad_accum"), help="batches per optimizer step")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=D("seed"))
    p.add_argument("--model-id", help="id of the new bundle (default: the parent's id, or finetuned-<cohort>)")
    p.add_argument("--feature-size", type=int, help="SwinUNETR feature size for --init scratch (default 48)")
    p.add_argument("--preprocessing", help="JSON (inline or file) for scratch/checkpoint inits: orientation, "
                                           "spacing, intensity window (default: VoCo CT, 1.5 mm, -175..250 HU)")
    p.add_argument("--no-install", action="store_true", help="keep the bundle in the run folder only")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")


def options_from(cls: type[T], args: argparse.Namespace) -> T:
    """``FinetuneOptions`` or ``ClsOptions`` from the parsed arguments: fields by name, the few options whose
    name or form differs converted here (``--warmup``, ``--no-install``, ``--preprocessing`` JSON)."""
    return from_args(cls, args, renames={"warmup_steps": "warmup"}, install=not args.no_install,
                     preprocessing=_json_arg(args.preprocessing))


def validate(args: argparse.Namespace) -> None:
    """Everything checkable without training, before the run folder (events.jsonl, finetune.json) is touched:
    the options, the device, and the state of a run being resumed."""
    from vocoslicer.commands._jobsetup import check_device
    from vocoslicer.train.finetune import read_resume_state

    if args.task == "classification":
        from vocoslicer.train.finetune.cls import check_inputs

        cls_opts = _finetune_cls.options(args)
        check_device(cls_opts.device)
        check_inputs(cls_opts)
        return
    opts = options_from(FinetuneOptions, args)
    opts.validate()
    check_device(opts.device)
    if args.model_id:
        from vocoslicer.ids import check_id

        check_id(args.model_id, "model id")  # installs under models/<id>/: no run folder for a traversal id
    if not Path(args.cohort).expanduser().is_dir():
        raise UserError(f"--cohort {args.cohort}: no such cohort folder (create one with 'vocoslicer cohort init')")
    read_resume_state(opts)
    if opts.init != "scratch":
        from vocoslicer.train.finetune.init import CHECKPOINT_SUFFIXES

        path = Path(opts.init).expanduser()
        if path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES:
            import zipfile

            if zipfile.is_zipfile(path) or path.suffix.lower() == ".safetensors":
                from vocoslicer.models.checkpoints import read_checkpoint

                read_checkpoint(path)  # memory-mapped: cheap; a refused pickle is refused before any file exists
        else:
            from vocoslicer.models import installed as installed_models

            installed_models.resolve(opts.init)  # a missing or broken bundle is a one-line error now, not after setup


def run(args: argparse.Namespace) -> int:
    """Handler: build the options, run the task's finetune, print the summary."""
    if args.task == "classification":
        return run_reporting(args, _finetune_cls.training(args))
    from vocoslicer.train.finetune import run_finetune

    opts = options_from(FinetuneOptions, args)
    opts.validate()
    return run_reporting(args, partial(run_finetune, opts))


def run_reporting(args: argparse.Namespace, train: Callable[..., dict[str, Any]]) -> int:
    """Run ``train(events=..., should_stop=...)`` with the run's event sink and print its summary as one JSON line
    (on stderr when the events go to stdout); both tasks report this way.

    The sink is the job's (``--run-dir``) or else ``<out>/events.jsonl``, since the finetune run folder is the run
    directory; under torchrun only rank 0 writes it.
    """
    from vocoslicer.jobs.context import current_job
    from vocoslicer.jobs.runner import job_event_sink

    job = current_job()
    to_stdout = getattr(args, "job_events", "none") == "stdout"
    own_sink = None
    if job.run_dir is not None:
        events = job.events
    else:
        own_sink = events = job_event_sink(Path(args.out).expanduser() / "events.jsonl", to_stdout,
                                           rank=env_rank())
    try:
        summary = train(events=events, should_stop=job.should_stop)
    finally:
        if own_sink is not None:
            own_sink.close()
    line = json.dumps({k: v for k, v in summary.items() if k != "metrics"})
    print(line, file=sys.stderr if to_stdout else sys.stdout)
    return 0
