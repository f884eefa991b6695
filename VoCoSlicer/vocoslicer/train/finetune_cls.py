"""Classifier finetuning on a cohort's case classes: the official VoCo CC-CCII recipe (voco_spec §6.2).

Whole volumes go through :func:`vocoslicer.infer.classify.classifier_input` (the exact preprocessing ``classify``
applies at inference) once, then batches of them are drawn class-balanced: rare findings are what a small cohort
has least of, and a network that sees "normal" four times as often learns to always say normal. The official
augmentation follows (flip of the slice axis p=0.5, brightness ±0.07, contrast ±5 %, clip to 0..1).

Single-label cohorts (one class per case) train with cross-entropy and are selected on validation accuracy;
multi-label cohorts (several findings per case, CT-RATE style) with BCE-with-logits and are selected on the mean
per-class ROC AUC (MONAI's ``compute_roc_auc``); ties are broken by the validation loss. AdamW 3e-4 (amsgrad, as in
the official code), linear warm-up then cosine per step, through the shared :class:`vocoslicer.train.loop.Trainer`
(resume, torchrun/DDP, AMP, events). The best validation weights become a classification bundle version (classes,
parent, cohort version, metrics), installed so ``classify`` and the Slicer panel use it at once.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vocoslicer.data.cohort import Cohort
from vocoslicer.data.cohort_classes import ClassCase, classes_of, labelled_cases
from vocoslicer.errors import UserError
from vocoslicer.io.atomic import atomic_write_json
from vocoslicer.jobs.events import NULL_SINK, EventSink
from vocoslicer.models.bundle import ModelBundle, new_bundle_meta
from vocoslicer.train.finetune_cls_init import ARCHS, ClsInit, resolve_cls_init

STATE_FILE = "finetune_cls.json"


@dataclass
class ClsOptions:
    """Everything ``vocoslicer finetune --task classification`` accepts."""

    cohort: str | Path
    init: str
    out: str | Path
    arch: str | None = None  # None: from --init (SwinUNETR → voco_classifier, PUMIT → pumit_vit_cls)
    steps: int = 200
    lr: float = 3e-4  # official CC-CCII
    batch: int = 4  # official CC-CCII
    warmup_steps: int | None = None  # None: 5 % of the steps (official: 5 of 100 epochs)
    weight_decay: float = 0.01  # PyTorch's AdamW default, which the official code keeps
    input_size: Sequence[int] | None = None
    multi_label: bool | None = None  # None: multi-label when any case carries several classes
    balanced: bool = True
    augment: bool = True
    pool: str = "decoder"
    feature_size: int | None = None
    vit_size: str | None = None
    patch: int | None = None  # pumit_vit_cls patch edge (default 16, the official downstream patch)
    preprocessing: dict[str, Any] | None = None
    eval_every: int = 0
    patience: int = 0
    device: str = "auto"
    amp: str = "off"  # the official recipe trains without AMP
    grad_accum: int = 1
    compile: bool = False
    seed: int = 0
    model_id: str | None = None
    install: bool = True
    resume: bool = False

    def validate(self) -> None:
        """One-line errors for impossible values."""
        if self.steps < 1 or self.batch < 1 or not self.lr > 0:
            raise UserError("finetune: --steps and --batch must be >= 1 and --lr > 0")
        if self.arch is not None and self.arch not in ARCHS:
            raise UserError(f"finetune: --arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.input_size is not None and (len(self.input_size) != 3 or any(int(s) < 32 or int(s) % 32
                                                                             for s in self.input_size)):
            raise UserError(f"finetune: --input-size must be three multiples of 32, got {list(self.input_size)}")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps < self.steps:
            raise UserError(f"finetune: --warmup must be in [0, steps), got {self.warmup_steps}")


@dataclass
class Prepared:
    """One case as the network sees it: input (1, X, Y, Z), target, and its class indices."""

    id: str
    x: torch.Tensor
    target: torch.Tensor
    indices: tuple[int, ...]


def cohort_classes(cases: list[ClassCase], listed: list[str], multi_label: bool | None, source: str,
                   events: EventSink = NULL_SINK) -> tuple[list[str], bool]:
    """The classes the model learns (listed order, only those some case carries) and single/multi-label."""
    if not cases:
        raise UserError(f"{source}: no case has a class; label cases with 'vocoslicer cohort add --class' or "
                        "'vocoslicer cohort set-class'")
    used = {n for c in cases for n in c.classes}
    classes = [n for n in listed if n in used]
    if len(classes) < 2:
        raise UserError(f"{source}: every labelled case is {classes[0] if classes else '?'!r}; a classifier needs "
                        "cases of at least two classes")
    unused = [n for n in listed if n not in used]
    if unused:
        events.warning(f"no case carries {', '.join(unused)}: the model will not have these classes")
    several = any(len(c.classes) > 1 for c in cases)
    if multi_label is None:
        multi_label = several
    if several and not multi_label:
        raise UserError(f"{source}: some cases carry several classes; train them multi-label (--multi-label)")
    return classes, bool(multi_label)


def _prepare(cases: Sequence[ClassCase], classes: list[str], multi: bool, init: ClsInit, events: EventSink
             ) -> list[Prepared]:
    from vocoslicer.infer.classify import classifier_input
    from vocoslicer.io import read_image

    out = []
    for c in cases:
        x, warnings = classifier_input(read_image(c.image), init.preprocessing, init.input_size)
        for w in warnings[:1]:
            events.warning(f"{c.id}: {w}")
        idx = tuple(classes.index(n) for n in c.classes if n in classes)
        target = torch.zeros(len(classes)) if multi else torch.tensor(idx[0])
        if multi:
            target[list(idx)] = 1.0
        out.append(Prepared(c.id, x[0].contiguous(), target, idx))
    events.log(f"prepared {len(out)} cases at input size {init.input_size}")
    return out


def sample_weights(cases: Sequence[Prepared], n_classes: int) -> torch.Tensor:
    """Class-balanced case weights: each class is drawn equally often (multi-label: mean over a case's classes)."""
    counts = torch.zeros(n_classes)
    for c in cases:
        counts[list(c.indices)] += 1
    return torch.tensor([float((1.0 / counts[list(c.indices)]).mean()) if c.indices else 1.0 for c in cases])


class ClassBatches:
    """Iterable of (x, target) batches, one pass = ceil(cases / batch) batches; draws use torch's global RNG,
    which the training loop seeds per rank and restores on resume (so a resumed run draws the same batches)."""

    def __init__(self, cases: Sequence[Prepared], batch: int, balanced: bool, augment: bool, n_classes: int) -> None:
        self.cases, self.batch, self.augment = list(cases), int(batch), augment
        self.weights = sample_weights(self.cases, n_classes) if balanced else torch.ones(len(self.cases))

    def __iter__(self):  # noqa: ANN204 - a generator of (x, target)
        for _ in range(math.ceil(len(self.cases) / self.batch)):
            idx = torch.multinomial(self.weights, self.batch, replacement=True)
            x = torch.stack([self.cases[int(i)].x for i in idx])
            y = torch.stack([self.cases[int(i)].target for i in idx])
            yield (augment(x) if self.augment else x), y


def augment(x: torch.Tensor) -> torch.Tensor:
    """Official CC-CCII train augmentation per sample: flip the slice axis (p 0.5; their ``np.flipud`` on depth-first
    stacks), brightness ±0.07, contrast ±5 %, clip to 0..1."""
    out = x.clone()
    n = x.shape[0]
    flip = torch.rand(n) < 0.5
    if flip.any():
        out[flip] = out[flip].flip(-1)  # the slice axis (the official stacks are depth-first)
    shape = (n,) + (1,) * (x.dim() - 1)
    out = out + (torch.rand(shape) * 0.14 - 0.07)
    mean = out.mean(dim=tuple(range(1, x.dim())), keepdim=True)
    out = (out - mean) * (0.95 + torch.rand(shape) * 0.1) + mean
    return out.clamp_(0.0, 1.0)


def make_step(multi: bool) -> Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, Any]]]:
    """CE (single-label) or BCE-with-logits (multi-label) on a batch; the batch accuracy as a live part."""

    def step(model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        x, y = batch
        logits = model(x).float()
        if multi:
            loss = F.binary_cross_entropy_with_logits(logits, y.float())
            acc = ((logits > 0) == (y > 0.5)).float().mean()
        else:
            loss = F.cross_entropy(logits, y.long())
            acc = (logits.argmax(1) == y).float().mean()
        return loss, {"acc": acc.detach()}

    return step


def evaluate(model: torch.nn.Module, cases: Sequence[Prepared], classes: list[str], multi: bool,
             device: torch.device) -> dict[str, float]:
    """val_loss, val_acc (multi-label: per-label accuracy at 0.5), per-class ROC AUC and their mean val_auc."""
    from monai.metrics import compute_roc_auc

    from vocoslicer.infer.classify import probabilities

    logits = torch.cat([model(c.x[None].to(device)).float().cpu() for c in cases])
    y = torch.stack([c.target for c in cases])
    probs = probabilities(logits, multi)
    if multi:
        loss = F.binary_cross_entropy_with_logits(logits, y.float())
        acc = ((probs >= 0.5) == (y > 0.5)).float().mean()
        onehot = y
    else:
        loss = F.cross_entropy(logits, y.long())
        acc = (probs.argmax(1) == y).float().mean()
        onehot = F.one_hot(y.long(), len(classes)).float()
    out = {"val_loss": float(loss), "val_acc": float(acc)}
    aucs = []
    for i, name in enumerate(classes):
        pos = onehot[:, i]
        if 0 < float(pos.sum()) < len(cases):  # AUC needs both positives and negatives
            auc = float(compute_roc_auc(probs[:, i], pos))
            out[f"val_auc_{name}"] = auc
            aucs.append(auc)
    out["val_auc"] = float(sum(aucs) / len(aucs)) if aucs else float("nan")
    # model selection: accuracy (multi-label: mean AUC), ties broken by the lower loss; a handful of validation
    # cases ties often, and the earliest tie is usually an under-trained model
    main = out["val_auc"] if multi else out["val_acc"]
    out["val_score"] = (main if math.isfinite(main) else 0.0) - 1e-3 * min(out["val_loss"], 100.0)
    return out


def _split(cases: list[ClassCase], source: str, events: EventSink) -> tuple[list[ClassCase], list[ClassCase]]:
    train = [c for c in cases if c.split != "val"]
    val = [c for c in cases if c.split == "val"]
    if not train:
        raise UserError(f"{source}: every class-labelled case is in validation; put some in training with "
                        "'vocoslicer cohort split --train CASE'")
    if not val:
        events.warning("the cohort has no validation case: validating on the training cases (optimistic accuracy)")
        val = train
    return train, val


def _check_resume(saved: dict[str, Any], classes: list[str], multi: bool, out: Path) -> None:
    if saved and (saved.get("classes") != classes or bool(saved.get("multi_label")) != multi):
        raise UserError(f"{out}: this run was started with classes {saved.get('classes')} "
                        f"({'multi' if saved.get('multi_label') else 'single'}-label); the cohort now gives "
                        f"{classes} ({'multi' if multi else 'single'}-label); start a new run (--out)")


def check_inputs(opts: ClsOptions, events: EventSink = NULL_SINK
                 ) -> tuple[Cohort, list[ClassCase], list[str], bool, dict[str, Any]]:
    """Every check that needs no training: options, run folder, cohort classes, resume consistency.

    The command runs it before it creates anything in ``--out`` (a bad input writes nothing).
    """
    opts.validate()
    out = Path(opts.out).expanduser().resolve()
    state_path = out / STATE_FILE
    saved: dict[str, Any] = {}
    if state_path.is_file():
        if not opts.resume:
            raise UserError(f"{out}: holds a finetune run already; pass --resume to continue it or choose a new --out")
        try:
            saved = json.loads(state_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{state_path}: unreadable ({type(exc).__name__})") from None
    elif (out / "finetune.json").is_file():
        raise UserError(f"{out}: holds a segmentation finetune; choose a new --out")
    cohort = Cohort(opts.cohort)
    if cohort.warning:
        events.warning(cohort.warning)
    cases = labelled_cases(cohort)
    classes, multi = cohort_classes(cases, [c.name for c in classes_of(cohort)], opts.multi_label,
                                    str(cohort.root), events)
    _check_resume(saved, classes, multi, out)
    return cohort, cases, classes, multi, saved


def run_classification_finetune(opts: ClsOptions, events: EventSink = NULL_SINK,
                                should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Finetune, write ``<out>/best_bundle`` (a classification bundle) and install it; returns a summary."""
    from vocoslicer.models import installed as registry
    from vocoslicer.train.finetune import _new_version
    from vocoslicer.train.loop import TrainConfig, Trainer

    cohort, cases, classes, multi, saved = check_inputs(opts, events)
    out = Path(opts.out).expanduser().resolve()
    state_path = out / STATE_FILE
    cohort_version = cohort.version
    train_c, val_c = _split(cases, str(cohort.root), events)
    init = resolve_cls_init(opts.init, len(classes), opts.arch, opts.feature_size, opts.vit_size, opts.pool,
                            opts.patch, opts.preprocessing, opts.input_size, events)
    if init.classes is not None and (init.classes != classes or bool(init.multi_label) != multi):
        raise UserError(f"--init {opts.init}: its classes {init.classes} are not the cohort's {classes}; finetune "
                        "from its backbone instead (--init with the VoCo checkpoint) or relabel the cohort")
    if saved and (saved.get("arch") != init.arch[0] or saved.get("arch_args", init.arch[1]) != init.arch[1]
                  or saved.get("input_size", init.input_size) != init.input_size):
        raise UserError(f"{out}: this run was started with {saved.get('arch')} {saved.get('arch_args')} at input "
                        f"{saved.get('input_size')}; resume it with the same --init/--arch/--input-size options")
    if saved and saved.get("cohort_version") != cohort_version:
        events.warning(f"the cohort changed since this run started (version {saved.get('cohort_version')} → "
                       f"{cohort_version}); continuing on its current cases")
    torch.manual_seed(opts.seed)
    model = init.build()
    train_p = _prepare(train_c, classes, multi, init, events)
    val_p = train_p if val_c is train_c else _prepare(val_c, classes, multi, init, events)
    model_id = saved.get("model_id") or opts.model_id or init.default_id(cohort.root.name)
    version = saved.get("version") or _new_version(model_id, init.parent)
    eval_every = opts.eval_every or max(1, opts.steps // 10)
    select = "val_score"  # val_acc (multi-label: val_auc), ties broken by val_loss (see evaluate)
    counts = {n: sum(n in c.classes for c in train_c) for n in classes}
    training = {"task": "classification", "cohort": str(cohort.root), "cohort_version": cohort_version,
                "init": opts.init, "n_train": len(train_p), "n_val": len(val_c), "train_counts": counts,
                "val_cases": sorted(c.id for c in val_c), "steps": opts.steps, "lr": opts.lr, "batch": opts.batch,
                "loss": "bce" if multi else "ce", "balanced": opts.balanced, "select": select, "seed": opts.seed}
    name, args = init.arch
    meta = new_bundle_meta(model_id, version, "classification", name, args, classes=classes, multi_label=multi,
                           name=f"{model_id} (classifier finetuned on cohort {cohort.root.name})",
                           preprocessing=init.preprocessing, inference={"input_size": list(init.input_size)},
                           parent=init.parent, training=training)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(state_path, {"model_id": model_id, "version": version, "cohort_version": cohort_version,
                                   "classes": classes, "multi_label": multi, "arch": name, "arch_args": args,
                                   "input_size": list(init.input_size),
                                   "options": json.loads(json.dumps(asdict(opts), default=str))})
    best_dir = out / "best_bundle"

    def on_best(module: torch.nn.Module, step: int, metrics: dict[str, float]) -> None:
        m = dict(meta, metrics={"step": step, **{k: round(float(v), 4) for k, v in metrics.items()}})
        ModelBundle(meta=m).save(best_dir, module.state_dict(), overwrite=True)

    warmup = opts.warmup_steps if opts.warmup_steps is not None else int(round(0.05 * opts.steps))
    cfg = TrainConfig(steps=opts.steps, lr=opts.lr, weight_decay=opts.weight_decay, warmup_steps=warmup,
                      amp=opts.amp, grad_accum=opts.grad_accum, compile=opts.compile, ckpt_every=eval_every,
                      eval_every=eval_every, log_every=max(1, min(10, eval_every)), seed=opts.seed,
                      device=opts.device, early_stop_patience=opts.patience, select_metric=select,
                      find_unused_parameters=name == "voco_classifier" and args.get("pool") == "deepest")
    data = ClassBatches(train_p, opts.batch, opts.balanced, opts.augment, len(classes))
    holder: dict[str, torch.device] = {}

    def eval_fn(module: torch.nn.Module, step: int) -> dict[str, float]:
        return evaluate(module, val_p, classes, multi, holder["device"])

    trainer = Trainer(model, cfg, out, make_step(multi), data, eval_fn=eval_fn, events=events, on_best=on_best,
                      should_stop=should_stop)
    holder["device"] = trainer.device
    events.log(f"classifier {name} from {init.describe}: {len(classes)} classes "
               f"({'multi' if multi else 'single'}-label), {len(train_p)} training / {len(val_c)} validation cases")
    result = trainer.fit(resume=opts.resume and bool(saved))
    if int(os.environ.get("RANK", "0") or 0) != 0:  # under torchrun only rank 0 writes and installs the bundle
        return {"id": model_id, "version": version, "steps": result["step"], "rank": int(os.environ["RANK"])}
    if not (best_dir / "model.json").is_file():  # no evaluation ran: keep the final weights
        on_best(trainer.model, result["step"], {select: float("nan")})
    best = ModelBundle.load(best_dir)
    summary: dict[str, Any] = {"bundle": str(best_dir), "id": model_id, "version": version, "classes": classes,
                               "multi_label": multi, f"best_{select}": result["best"], "best_step": result["best_step"],
                               "stopped": result["stopped"], "steps": result["step"],
                               "cohort_version": cohort_version, "metrics": best.meta.get("metrics", {})}
    if opts.install:
        installed = registry.install(best_dir, overwrite=bool(saved))
        summary["installed"] = str(installed.path)
        events.artifact(installed.path, "model", id=model_id, version=version, task="classification")
    else:
        events.artifact(best_dir, "model", id=model_id, version=version, task="classification")
    atomic_write_json(out / "summary.json", summary)
    return summary
