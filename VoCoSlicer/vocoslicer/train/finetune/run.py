"""Finetuning on a cohort: supervised Dice+CE on corrected cases, then confident pseudo-labels on unlabelled ones.

The recipe is the official "simple semi-supervised baseline" (voco_spec.md §7.1) with one deliberate change:
at ``semi_start`` of the steps the current model is frozen as a teacher, and from then on every step adds a
Dice+CE term on unlabelled crops against the teacher's argmax, but only on voxels where the teacher's top
probability reaches ``confidence`` (see :mod:`vocoslicer.train.pseudo`). Labelled and unlabelled crops go through
the student in one forward pass (DDP needs exactly one forward per backward).

Validation Dice per label on the cohort's fixed validation cases selects the best step; the best weights become a
new bundle version that records its parent, the cohort version and the Dice, installed into the models folder so
``vocoslicer segment --model <id>`` finds it at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vocoslicer.data.cohort import Cohort
from vocoslicer.errors import UserError
from vocoslicer.io.atomic import atomic_write_json
from vocoslicer.jobs.events import NULL_SINK, EventSink
from vocoslicer.models.bundle import ModelBundle
from vocoslicer.train.finetune.common import new_version, open_cohort, publish, split_train_val, train_config
from vocoslicer.train.finetune.init import InitModel, resolve_init
from vocoslicer.train.finetune.options import FinetuneOptions
from vocoslicer.train.finetune.step import FinetuneStream, Teacher, seg_network, semi_step
from vocoslicer.train.segmentation import (
    CropStream,
    PreparedCase,
    SegCase,
    best_bundle_writer,
    make_eval_fn,
    prepare_case,
)

__all__ = ["STATE_FILE", "read_resume_state", "run_finetune"]

STATE_FILE = "finetune.json"


def read_resume_state(opts: FinetuneOptions) -> dict[str, Any]:
    """The saved state of the run in ``--out`` ({} for a new run), refused before anything is written when it is
    corrupt or when ``--resume`` asks for another ``--init`` or another ``--ssl-weight`` mode than it was started
    with (the checkpoints would not fit)."""
    out = Path(opts.out).expanduser().resolve()
    state_path = out / STATE_FILE
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, not a run folder")
    if not state_path.is_file():
        return {}
    if not opts.resume:
        raise UserError(f"{out}: holds a finetune run already; pass --resume to continue it or choose a new --out")
    try:
        saved = json.loads(state_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise UserError(f"{state_path}: unreadable run state ({exc}); this run cannot be resumed, start a new one "
                        "with another --out") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("options", {}), dict):
        raise UserError(f"{state_path}: not a finetune run state (expected a JSON object); start a new run with "
                        "another --out")
    before = saved.get("init")
    if before is not None and str(before) != str(opts.init) and not _same_path(str(before), str(opts.init)):
        raise UserError(f"{out}: this run was started with --init {before}; resume it with the same --init (or "
                        "choose a new --out for another starting point)")
    was_ssl = float((saved.get("options") or {}).get("ssl_weight", 0.0) or 0.0) > 0
    if was_ssl != (opts.ssl_weight > 0):
        heads = "the VoCo heads" if was_ssl else "no VoCo heads"
        raise UserError(f"{out}: this run was started {'with' if was_ssl else 'without'} --ssl-weight; resume it "
                        f"the same way (its checkpoints hold {heads})")
    return saved


def _same_path(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()



@dataclass
class _Cases:
    """The cohort's cases as one run uses them: the records (for the bundle's metadata) and the prepared volumes."""

    train: list[Any]
    val: list[Any]  # is ``train`` when the cohort has no validation case
    train_p: list[PreparedCase]
    val_p: list[PreparedCase]  # is ``train_p`` then
    unl_all: list[PreparedCase]  # unlabelled cases, prepared when the semi stage or the VoCo loss uses them
    unl_p: list[PreparedCase]  # those the semi-supervised stage learns from ([] with --no-semi)


@dataclass
class _Setup:
    """What the training call and the bundle need, decided before the first step."""

    opts: FinetuneOptions
    out: Path
    cohort: Cohort
    cohort_version: int  # read once at the start: the cohort may change while the run trains
    init: InitModel
    cases: _Cases
    roi: list[int]
    model_id: str
    version: str
    saved: dict[str, Any]
    semi_at: int | None = None  # the step at which the teacher is frozen (None: no semi-supervised stage)
    ssl_geometry: Any = None  # VoCoGeometry with --ssl-weight > 0


def _prepare(cases: Sequence[Any], init: InitModel, with_labels: bool, events: EventSink) -> list[PreparedCase]:
    out = []
    for c in cases:
        seg = SegCase(c.id, c.image, c.label if with_labels else None)
        out.append(prepare_case(seg, init.preprocessing, init.channel_values))
    events.log(f"prepared {len(out)} {'labelled' if with_labels else 'unlabelled'} cases")
    return out


def _split_cases(cohort: Cohort, events: EventSink) -> tuple[list[Any], list[Any], list[Any]]:
    cases = cohort.cases()
    if not cases:
        raise UserError(f"{cohort.root}: the cohort is empty; add cases with 'vocoslicer cohort add'")
    labelled = [c for c in cases if c.labelled]
    if not labelled:
        raise UserError(f"{cohort.root}: the cohort has only unlabelled cases ({len(cases)}); add at least one "
                        "corrected label map")
    train, val = split_train_val(labelled, str(cohort.root), events)
    return train, val, [c for c in cases if not c.labelled]


def _prepare_cases(opts: FinetuneOptions, split: tuple[list[Any], list[Any], list[Any]], init: InitModel,
                   events: EventSink) -> _Cases:
    """Bring the cases of the cohort's split (train, val, unlabelled) into the model's space, once."""
    train_c, val_c, unl_c = split
    train_p = _prepare(train_c, init, True, events)
    val_p = train_p if val_c is train_c else _prepare(val_c, init, True, events)
    unl_all = _prepare(unl_c, init, False, events) if (opts.semi or opts.ssl_weight > 0) and unl_c else []
    unl_p = unl_all if opts.semi else []
    if opts.semi and not unl_p:
        events.warning("semi-supervised stage skipped: the cohort has no unlabelled cases")
    return _Cases(train_c, val_c, train_p, val_p, unl_all, unl_p)


def _with_voco_loss(model: torch.nn.Module, opts: FinetuneOptions, init: InitModel, cases: _Cases,
                    events: EventSink) -> tuple[torch.nn.Module, Any]:
    """``--ssl-weight`` > 0: the model wrapped with the VoCo heads and the VoCo crop geometry; else unchanged."""
    if opts.ssl_weight <= 0:
        return model, None
    from vocoslicer.models.voco_head import VoCoSegModel
    from vocoslicer.ssl.voco import VoCoGeometry

    if init.arch[0] != "swinunetr":
        raise UserError(f"--ssl-weight needs a SwinUNETR model (VoCo's backbone); {init.describe} is a "
                        f"{init.arch[0]}")
    roi = [int(r) for r in (opts.roi or init.roi)]
    if roi[0] != roi[1]:
        raise UserError(f"--ssl-weight: VoCo crops are square in-plane; the ROI {roi} is not")
    geometry = VoCoGeometry(roi=roi[0], n=opts.ssl_grid, sw=opts.ssl_sw, depth=roi[2])
    if not cases.unl_all:
        events.warning("VoCo loss on the labelled training images: the cohort has no unlabelled cases")
    return VoCoSegModel(model), geometry


def _start_metrics(model: torch.nn.Module, eval_fn: Callable[..., dict[str, float]], saved: dict[str, Any],
                   events: EventSink) -> dict[str, float]:
    """Validation metrics of the starting point (measured once; a resumed run reads them from its state)."""
    if "start_val_dice" in saved:
        return saved["start_metrics"]
    model.eval()
    with torch.no_grad():
        start = eval_fn(model, 0)
    model.train()
    events.metric(0, split="val", **start)
    return start


def _training_meta(s: _Setup, start: dict[str, float]) -> dict[str, Any]:
    """The ``training`` record of the bundle: where it came from and how it was trained."""
    opts, cases, use_ssl = s.opts, s.cases, s.opts.ssl_weight > 0
    return {
        "cohort": str(s.cohort.root), "cohort_version": s.cohort_version, "init": opts.init,
        "n_train": len(cases.train_p), "n_val": len(cases.val), "n_unlabelled": len(cases.unl_p),
        "val_cases": sorted(c.id for c in cases.val), "steps": opts.steps, "lr": opts.lr, "batch": opts.batch,
        "roi": s.roi, "semi": bool(cases.unl_p), "semi_start_step": s.semi_at, "confidence": opts.confidence,
        "semi_weight": opts.semi_weight, "sampler": opts.sampler,
        "ssl_weight": opts.ssl_weight, **({"ssl_grid": opts.ssl_grid, "ssl_sw": opts.ssl_sw} if use_ssl else {}),
        "seed": opts.seed, "start_val_dice": round(float(start["val_dice"]), 4)}


def _save_state(s: _Setup, start: dict[str, float]) -> None:
    """``finetune.json``: what a ``--resume`` must find again (id, version, start, options)."""
    atomic_write_json(s.out / STATE_FILE, {
        "model_id": s.model_id, "version": s.version, "cohort_version": s.cohort_version, "init": s.opts.init,
        "start_val_dice": start["val_dice"], "start_metrics": start,
        "options": json.loads(json.dumps(asdict(s.opts), default=str))})


def _data(s: _Setup) -> FinetuneStream:
    """Labelled crop batches plus unlabelled (and VoCo) crops."""
    opts, cases = s.opts, s.cases
    # class-balanced crops by default: corrected cases are often corrections of a small structure, which 1:1
    # foreground/background crops would rarely centre (measured on the demo model: stomach Dice 0 after 800
    # pos/neg steps, 0.61 after 100 more class-balanced ones)
    ratios = [1.0] * len(s.init.channel_values) if opts.sampler == "classes" else None
    labelled_stream = CropStream(cases.train_p, s.roi, opts.batch, seed=opts.seed, class_ratios=ratios)
    return FinetuneStream(labelled_stream, cases.unl_p, s.roi, opts.batch, seed=opts.seed,
                          ssl_geometry=s.ssl_geometry,
                          ssl_cases=(cases.unl_all or cases.train_p) if opts.ssl_weight > 0 else ())


def _train(s: _Setup, model: torch.nn.Module, eval_fn: Callable[..., dict[str, float]],
           write_best: Callable[..., None], events: EventSink, should_stop: Callable[[], bool] | None
           ) -> tuple[Any, dict[str, Any]]:
    """Run the shared loop with the semi-supervised step; returns the trainer and its result."""
    from vocoslicer.train.loop import Trainer

    opts, teacher = s.opts, Teacher()

    def on_best(module: torch.nn.Module, step: int, metrics: dict[str, float]) -> None:
        write_best(seg_network(module), step, metrics)

    def after_step(module: torch.nn.Module, step: int) -> None:
        if s.semi_at is not None and step == s.semi_at and not teacher.active:
            teacher.freeze_copy_of(seg_network(module), step)
            events.log(f"step {step}: teacher frozen, semi-supervised stage starts "
                       f"(confidence ≥ {opts.confidence})")

    trainer = Trainer(model, train_config(opts, opts.warmup_steps, "val_dice"), s.out,
                      semi_step(teacher, opts.confidence, opts.semi_weight, opts.ssl_weight), _data(s),
                      eval_fn=eval_fn, events=events, extra_state={"teacher": teacher},
                      on_best=on_best, after_step=after_step, should_stop=should_stop)
    teacher.student = seg_network(trainer.model)
    if s.semi_at == 0:
        teacher.freeze_copy_of(seg_network(trainer.model), 0)
    return trainer, trainer.fit(resume=opts.resume and bool(s.saved))


def _finish(s: _Setup, model: torch.nn.Module, result: dict[str, Any], write_best: Callable[..., None],
            start: dict[str, float], events: EventSink) -> dict[str, Any]:
    """Rank 0 after training: the best bundle (the final weights if no validation improved), the cohort's
    fixed-validation curve point, installation and ``summary.json``."""
    from vocoslicer.data.cohort_curve import record_fixed_validation  # the cohort's Dice-per-labelled-case curve

    best_dir = s.out / "best_bundle"
    if not (best_dir / "model.json").is_file():  # no validation improved on nothing: keep the final weights
        write_best(seg_network(model), result["step"], {"val_dice": float("nan")})
    cases = s.cases
    record_fixed_validation(best_dir, s.cohort, [c.id for c in cases.train], {} if cases.val_p is cases.train_p else
                            {c.id: p for c, p in zip(cases.val, cases.val_p, strict=True)}, s.init, s.roi, events)
    best = ModelBundle.load(best_dir)
    summary: dict[str, Any] = {"bundle": str(best_dir), "id": s.model_id, "version": s.version,
                               "best_val_dice": result["best"], "best_step": result["best_step"],
                               "start_val_dice": start["val_dice"], "stopped": result["stopped"],
                               "steps": result["step"], "cohort_version": s.cohort_version,
                               "metrics": best.meta.get("metrics", {})}
    return publish(best_dir, summary, s.opts.install, bool(s.saved), events, val_dice=result["best"])


def run_finetune(opts: FinetuneOptions, events: EventSink = NULL_SINK,
                 should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Finetune, write the best bundle into ``<out>/best_bundle`` and install it; returns a summary."""
    opts.validate()
    out = Path(opts.out).expanduser().resolve()
    saved = read_resume_state(opts)
    if opts.resume and not saved:
        events.warning(f"nothing to resume in {out}; starting a new finetune")
    cohort, cohort_version = open_cohort(opts.cohort, events, saved)
    split = _split_cases(cohort, events)  # an unusable cohort is refused before the starting point is resolved
    init = resolve_init(opts.init, cohort.labels, opts.feature_size, opts.preprocessing, opts.roi, events)
    torch.manual_seed(opts.seed)
    model = init.build()
    cases = _prepare_cases(opts, split, init, events)
    model, ssl_geometry = _with_voco_loss(model, opts, init, cases, events)
    model_id = saved.get("model_id") or opts.model_id or init.default_id(cohort.root.name)
    s = _Setup(opts, out, cohort, cohort_version, init, cases, [int(r) for r in (opts.roi or init.roi)], model_id,
               saved.get("version") or new_version(model_id, init.parent), saved, ssl_geometry=ssl_geometry)
    eval_fn = make_eval_fn(cases.val_p, init.labels, init.channel_values, s.roi)
    start = _start_metrics(model, eval_fn, saved, events)
    events.log(f"starting point ({init.describe}): val_dice {start['val_dice']:.4f}")
    s.semi_at = int(round(opts.semi_start * opts.steps)) if cases.unl_p else None
    _save_state(s, start)
    write_best = best_bundle_writer(ModelBundle(meta=init.bundle_meta(model_id, s.version, s.roi,
                                                                      _training_meta(s, start)),
                                                labels=init.labels), out / "best_bundle")
    trainer, result = _train(s, model, eval_fn, write_best, events, should_stop)
    if not trainer.ctx.is_main:  # under torchrun only rank 0 writes and installs the bundle
        return {"id": model_id, "version": s.version, "steps": result["step"], "rank": trainer.ctx.rank}
    return _finish(s, trainer.model, result, write_best, start, events)
