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
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vocoslicer.data.cohort import Cohort
from vocoslicer.errors import UserError
from vocoslicer.io.atomic import atomic_write_json
from vocoslicer.jobs.events import NULL_SINK, EventSink
from vocoslicer.models.bundle import ModelBundle
from vocoslicer.train.finetune_init import InitModel, resolve_init
from vocoslicer.train.finetune_step import FinetuneStream, Teacher, seg_network, semi_step
from vocoslicer.train.segmentation import (
    CropStream,
    PreparedCase,
    SegCase,
    best_bundle_writer,
    make_eval_fn,
    prepare_case,
)

__all__ = ["FinetuneOptions", "InitModel", "resolve_init", "run_finetune"]

STATE_FILE = "finetune.json"


@dataclass
class FinetuneOptions:
    """Everything ``vocoslicer finetune`` accepts (see the command's help for each option)."""

    cohort: str | Path
    init: str
    out: str | Path
    steps: int = 200
    lr: float = 1e-4
    batch: int = 2
    roi: Sequence[int] | None = None
    semi: bool = True
    semi_start: float = 0.5
    confidence: float = 0.9
    semi_weight: float = 1.0
    sampler: str = "classes"  # crop centres: each label equally often | posneg (foreground/background 1:1)
    ssl_weight: float = 0.0  # > 0: add the VoCo v2 loss on unlabelled crops (omni-supervised, voco_spec §7.2)
    ssl_grid: int = 2  # VoCo base-crop grid n (n² base crops; official pretraining uses 3)
    ssl_sw: int = 2  # VoCo random crops per volume
    eval_every: int = 0  # 0: ten evaluations per run
    patience: int = 0
    device: str = "auto"
    amp: str = "auto"
    seed: int = 0
    warmup_steps: int = 0
    weight_decay: float = 1e-5
    grad_accum: int = 1
    compile: bool = False
    model_id: str | None = None
    feature_size: int | None = None  # scratch only
    preprocessing: dict[str, Any] | None = None  # scratch / checkpoint only (a bundle brings its own)
    install: bool = True
    resume: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """One-line errors for impossible values (NaN passes ``lr <= 0`` checks, hence the ``isfinite``)."""
        if self.steps < 1 or self.batch < 1 or not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"finetune: --steps and --batch must be >= 1 and --lr a finite number > 0 (got --lr "
                            f"{self.lr})")
        for name, value in (("--semi-weight", self.semi_weight), ("--ssl-weight", self.ssl_weight),
                            ("--weight-decay", self.weight_decay)):
            if not math.isfinite(value) or value < 0:
                raise UserError(f"finetune: {name} must be a finite number >= 0, got {value}")
        if self.warmup_steps < 0 or self.grad_accum < 1 or self.eval_every < 0 or self.patience < 0:
            raise UserError("finetune: --warmup, --eval-every and --patience must be >= 0, --grad-accum >= 1")
        if self.feature_size is not None and (self.feature_size < 12 or self.feature_size % 12):
            raise UserError(f"finetune: --feature-size {self.feature_size} must be a positive multiple of 12 "
                            "(SwinUNETR)")
        if self.preprocessing is not None:
            from vocoslicer.infer.preprocess import check_preprocessing

            check_preprocessing(self.preprocessing)
        if not 0.0 <= self.semi_start < 1.0:
            raise UserError(f"finetune: --semi-start must be in [0, 1), got {self.semi_start}")
        if not 0.0 < self.confidence <= 1.0:
            raise UserError(f"finetune: --confidence must be in (0, 1], got {self.confidence}")
        if self.ssl_weight < 0 or self.ssl_grid < 1 or self.ssl_sw < 1:
            raise UserError("finetune: --ssl-weight must be >= 0, --ssl-grid and --ssl-sw >= 1")
        if self.sampler not in ("classes", "posneg"):
            raise UserError(f"finetune: --sampler must be 'classes' or 'posneg', got {self.sampler!r}")
        if self.roi is not None and (len(self.roi) != 3 or min(self.roi) < 16 or any(r % 32 for r in self.roi)):
            raise UserError(f"finetune: --roi must be three multiples of 32 (SwinUNETR), got {list(self.roi)}")



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


def _new_version(model_id: str, parent: dict[str, Any] | None) -> str:
    """The next free version of ``model_id``, always above the parent's (which may not be installed)."""
    import re

    from vocoslicer.models import installed as registry

    candidate = registry.next_version(model_id)
    if parent and parent.get("id") == model_id:
        nums = [int(x) for x in re.findall(r"\d+", str(parent.get("version", "")))[:3]] + [0, 0, 0]
        bumped = (nums[0], nums[1], nums[2] + 1)
        have = tuple(([int(x) for x in re.findall(r"\d+", candidate)[:3]] + [0, 0, 0])[:3])
        if have < bumped:
            candidate = ".".join(map(str, bumped))
    return candidate


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
    train = [c for c in labelled if c.split != "val"]
    val = [c for c in labelled if c.split == "val"]
    unlabelled = [c for c in cases if not c.labelled]
    if not train:
        raise UserError(f"{cohort.root}: every labelled case is in validation; put some in training with "
                        "'vocoslicer cohort split --train CASE'")
    if not val:
        events.warning("the cohort has no validation case: validating on the training cases (optimistic Dice)")
        val = train
    return train, val, unlabelled


def run_finetune(opts: FinetuneOptions, events: EventSink = NULL_SINK,
                 should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Finetune, write the best bundle into ``<out>/best_bundle`` and install it; returns a summary."""
    from vocoslicer.models import installed as registry
    from vocoslicer.train.loop import TrainConfig, Trainer

    opts.validate()
    out = Path(opts.out).expanduser().resolve()
    state_path = out / STATE_FILE
    saved = read_resume_state(opts)
    if opts.resume and not saved:
        events.warning(f"nothing to resume in {out}; starting a new finetune")
    cohort = Cohort(opts.cohort)
    if cohort.warning:
        events.warning(cohort.warning)
    cohort_version = cohort.version
    if saved and saved.get("cohort_version") != cohort_version:
        events.warning(f"the cohort changed since this run started (version {saved.get('cohort_version')} → "
                       f"{cohort_version}); continuing on its current cases")
    train_c, val_c, unl_c = _split_cases(cohort, events)
    init = resolve_init(opts.init, cohort.labels, opts.feature_size, opts.preprocessing, opts.roi, events)
    torch.manual_seed(opts.seed)
    model = init.build()
    roi = [int(r) for r in (opts.roi or init.roi)]
    train_p = _prepare(train_c, init, True, events)
    val_p = train_p if val_c is train_c else _prepare(val_c, init, True, events)
    use_ssl = opts.ssl_weight > 0
    unl_all = _prepare(unl_c, init, False, events) if (opts.semi or use_ssl) and unl_c else []
    unl_p = unl_all if opts.semi else []
    if opts.semi and not unl_p:
        events.warning("semi-supervised stage skipped: the cohort has no unlabelled cases")
    ssl_geometry = None
    if use_ssl:
        from vocoslicer.models.voco_head import VoCoSegModel
        from vocoslicer.ssl.voco import VoCoGeometry

        if init.arch[0] != "swinunetr":
            raise UserError(f"--ssl-weight needs a SwinUNETR model (VoCo's backbone); {init.describe} is a "
                            f"{init.arch[0]}")
        roi_now = [int(r) for r in (opts.roi or init.roi)]
        if roi_now[0] != roi_now[1]:
            raise UserError(f"--ssl-weight: VoCo crops are square in-plane; the ROI {roi_now} is not")
        ssl_geometry = VoCoGeometry(roi=roi_now[0], n=opts.ssl_grid, sw=opts.ssl_sw, depth=roi_now[2])
        if not unl_all:
            events.warning("VoCo loss on the labelled training images: the cohort has no unlabelled cases")
        model = VoCoSegModel(model)
    model_id = saved.get("model_id") or opts.model_id or init.default_id(cohort.root.name)
    version = saved.get("version") or _new_version(model_id, init.parent)
    eval_every = opts.eval_every or max(1, opts.steps // 10)
    eval_fn = make_eval_fn(val_p, init.labels, init.channel_values, roi)
    if "start_val_dice" in saved:
        start = saved["start_metrics"]
    else:
        model.eval()
        with torch.no_grad():
            start = eval_fn(model, 0)
        model.train()
        events.metric(0, split="val", **start)
    events.log(f"starting point ({init.describe}): val_dice {start['val_dice']:.4f}")
    semi_at = int(round(opts.semi_start * opts.steps)) if unl_p else None
    training_meta = {
        "cohort": str(cohort.root), "cohort_version": cohort_version, "init": opts.init,
        "n_train": len(train_p), "n_val": len(val_c), "n_unlabelled": len(unl_p),
        "val_cases": sorted(c.id for c in val_c), "steps": opts.steps, "lr": opts.lr, "batch": opts.batch,
        "roi": roi, "semi": bool(unl_p), "semi_start_step": semi_at, "confidence": opts.confidence,
        "semi_weight": opts.semi_weight, "sampler": opts.sampler,
        "ssl_weight": opts.ssl_weight, **({"ssl_grid": opts.ssl_grid, "ssl_sw": opts.ssl_sw} if use_ssl else {}),
        "seed": opts.seed, "start_val_dice": round(float(start["val_dice"]), 4)}
    meta = init.bundle_meta(model_id, version, roi, training_meta)
    atomic_write_json(state_path, {"model_id": model_id, "version": version, "cohort_version": cohort_version,
                                   "init": opts.init, "start_val_dice": start["val_dice"], "start_metrics": start,
                                   "options": json.loads(json.dumps(asdict(opts), default=str))})
    template = ModelBundle(meta=meta, labels=init.labels)
    best_dir = out / "best_bundle"
    teacher = Teacher()
    # class-balanced crops by default: corrected cases are often corrections of a small structure, which 1:1
    # foreground/background crops would rarely centre (measured on the demo model: stomach Dice 0 after 800
    # pos/neg steps, 0.61 after 100 more class-balanced ones)
    ratios = [1.0] * len(init.channel_values) if opts.sampler == "classes" else None
    labelled_stream = CropStream(train_p, roi, opts.batch, seed=opts.seed, class_ratios=ratios)
    data = FinetuneStream(labelled_stream, unl_p, roi, opts.batch, seed=opts.seed, ssl_geometry=ssl_geometry,
                          ssl_cases=(unl_all or train_p) if use_ssl else ())
    write_best = best_bundle_writer(template, best_dir)

    def on_best(module: torch.nn.Module, step: int, metrics: dict[str, float]) -> None:
        write_best(seg_network(module), step, metrics)

    cfg = TrainConfig(steps=opts.steps, lr=opts.lr, weight_decay=opts.weight_decay, warmup_steps=opts.warmup_steps,
                      amp=opts.amp, grad_accum=opts.grad_accum, compile=opts.compile, ckpt_every=eval_every,
                      eval_every=eval_every, log_every=max(1, min(10, eval_every)), seed=opts.seed,
                      device=opts.device, early_stop_patience=opts.patience, select_metric="val_dice")

    def after_step(module: torch.nn.Module, step: int) -> None:
        if semi_at is not None and step == semi_at and not teacher.active:
            teacher.freeze_copy_of(seg_network(module), step)
            events.log(f"step {step}: teacher frozen, semi-supervised stage starts "
                       f"(confidence ≥ {opts.confidence})")

    trainer = Trainer(model, cfg, out, semi_step(teacher, opts.confidence, opts.semi_weight, opts.ssl_weight), data,
                      eval_fn=eval_fn, events=events, extra_state={"teacher": teacher},
                      on_best=on_best, after_step=after_step,
                      should_stop=should_stop)
    teacher.student = seg_network(trainer.model)
    if semi_at == 0:
        teacher.freeze_copy_of(seg_network(trainer.model), 0)
    result = trainer.fit(resume=opts.resume and bool(saved))
    if int(os.environ.get("RANK", "0") or 0) != 0:  # under torchrun only rank 0 writes and installs the bundle
        return {"id": model_id, "version": version, "steps": result["step"], "rank": int(os.environ["RANK"])}
    if not (best_dir / "model.json").is_file():  # no validation improved on nothing: keep the final weights
        write_best(seg_network(trainer.model), result["step"], {"val_dice": float("nan")})
    from vocoslicer.data.cohort_curve import record_fixed_validation  # the cohort's Dice-per-labelled-case curve

    record_fixed_validation(best_dir, cohort, [c.id for c in train_c], {} if val_p is train_p else
                            {c.id: p for c, p in zip(val_c, val_p, strict=True)}, init, roi, events)
    best = ModelBundle.load(best_dir)
    summary: dict[str, Any] = {"bundle": str(best_dir), "id": model_id, "version": version,
                               "best_val_dice": result["best"], "best_step": result["best_step"],
                               "start_val_dice": start["val_dice"], "stopped": result["stopped"],
                               "steps": result["step"], "cohort_version": cohort_version,
                               "metrics": best.meta.get("metrics", {})}
    if opts.install:
        installed = registry.install(best_dir, overwrite=bool(saved))
        summary["installed"] = str(installed.path)
        events.artifact(installed.path, "model", id=model_id, version=version, val_dice=result["best"])
    else:
        events.artifact(best_dir, "model", id=model_id, version=version, val_dice=result["best"])
    atomic_write_json(out / "summary.json", summary)
    return summary
