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

import copy
import json
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vocoslicer.data.cohort import Cohort
from vocoslicer.errors import UserError
from vocoslicer.io.atomic import atomic_write_json
from vocoslicer.jobs.events import NULL_SINK, EventSink
from vocoslicer.labels import LabelTable
from vocoslicer.models.bundle import (
    DEFAULT_INFERENCE,
    DEFAULT_PREPROCESSING,
    ModelBundle,
    new_bundle_meta,
    sha256_file,
)
from vocoslicer.train.pseudo import confident_pseudo_labels, masked_dice_ce
from vocoslicer.train.segmentation import (
    CropStream,
    PreparedCase,
    SegCase,
    best_bundle_writer,
    make_eval_fn,
    prepare_case,
)

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
        """One-line errors for impossible values."""
        if self.steps < 1 or self.batch < 1 or self.lr <= 0:
            raise UserError("finetune: --steps and --batch must be >= 1 and --lr > 0")
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


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")


@dataclass
class InitModel:
    """Where finetuning starts: architecture, label outputs, preprocessing and how to load the first weights."""

    kind: str  # bundle | backbone | checkpoint | scratch
    arch: tuple[str, dict[str, Any]]
    labels: LabelTable
    channel_values: list[int]
    preprocessing: dict[str, Any]
    inference: dict[str, Any]
    parent: dict[str, Any] | None
    describe: str
    load: Callable[[torch.nn.Module], None] | None = None

    @property
    def roi(self) -> list[int]:
        """Crop / sliding-window size."""
        return [int(r) for r in self.inference["roi_size"]]

    def build(self) -> torch.nn.Module:
        """The network with its starting weights."""
        from vocoslicer.models.factory import build_model

        model = build_model(*self.arch)
        if self.load is not None:
            self.load(model)
        return model

    def default_id(self, cohort_name: str) -> str:
        """A finetuned bundle keeps its parent's id (a new version); otherwise it is named after the cohort."""
        if self.kind == "bundle" and self.parent:
            return str(self.parent["id"])
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in cohort_name) or "cohort"
        return f"finetuned-{safe}"

    def bundle_meta(self, model_id: str, version: str, roi: Sequence[int], training: dict[str, Any]
                    ) -> dict[str, Any]:
        """model.json of the finetuned bundle."""
        name, args = self.arch
        return new_bundle_meta(model_id, version, "segmentation", name, args,
                               name=f"{model_id} (finetuned on cohort {Path(training['cohort']).name})",
                               preprocessing=self.preprocessing, inference={**self.inference, "roi_size": list(roi)},
                               channel_values=self.channel_values, parent=self.parent, training=training)


def _scratch_arch(labels: LabelTable, feature_size: int | None, in_channels: int = 1) -> tuple[str, dict[str, Any]]:
    return "swinunetr", {"size": None, "feature_size": int(feature_size or 48), "in_channels": in_channels,
                         "out_channels": len(labels) + 1, "patch_merging": "legacy"}


def _backbone_loader(state: dict[str, torch.Tensor], source: str, events: EventSink
                     ) -> Callable[[torch.nn.Module], None]:
    def load(model: torch.nn.Module) -> None:
        from vocoslicer.models.checkpoints import load_official_weights

        report = load_official_weights(model, state, source)
        if report.missing_backbone:
            raise UserError(f"{source}: the checkpoint does not fit this backbone ({len(report.missing_backbone)} "
                            f"encoder tensors missing or of another shape, e.g. {report.missing_backbone[:2]})")
        events.log(report.summary())

    return load


def _check_labels(cohort_labels: LabelTable, bundle: ModelBundle, events: EventSink) -> None:
    """The cohort's labels must be outputs of the bundle, under the same names."""
    outputs = set(bundle.channel_values[1:])
    for lb in cohort_labels:
        if lb.value not in outputs:
            raise UserError(f"cohort label {lb.value} ({lb.name}) is not an output of {bundle.describe()} "
                            f"(its labels: {', '.join(f'{x.value}={x.name}' for x in bundle.labels)})")
        theirs = bundle.labels.by_value(lb.value).name
        if theirs.lower() != lb.name.lower():
            raise UserError(f"cohort label {lb.value} is {lb.name!r} but {bundle.describe()} calls it {theirs!r}; "
                            "the cohort's labels do not match the model's label table")
    absent = [bundle.labels.by_value(v).name for v in sorted(outputs - set(cohort_labels.values))]
    if absent:
        events.warning(f"the cohort never labels {', '.join(absent)}: the model will learn them as background")


def resolve_init(spec: str, cohort_labels: LabelTable, feature_size: int | None = None,
                 preprocessing: dict[str, Any] | None = None, roi: Sequence[int] | None = None,
                 events: EventSink = NULL_SINK) -> InitModel:
    """``--init``: ``scratch``, a VoCo/SwinUNETR checkpoint file, or a bundle (path, installed id, id@version)."""
    from vocoslicer.models import registry

    if not len(cohort_labels):
        raise UserError("the cohort has no label table (add a labelled case with --labels first)")
    cv = [0, *cohort_labels.values]
    pre = {**DEFAULT_PREPROCESSING, **(preprocessing or {})}
    inf = {**DEFAULT_INFERENCE, **({"roi_size": [int(r) for r in roi]} if roi else {})}
    if spec == "scratch":
        return InitModel("scratch", _scratch_arch(cohort_labels, feature_size), cohort_labels, cv, pre, inf, None,
                         "random initialisation")
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES:
        from vocoslicer.models.checkpoints import official_state_dict, read_checkpoint

        obj = read_checkpoint(path)
        if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "state_dict" not in obj:
            obj = obj["model"]  # a vocoslicer training checkpoint (run_dir/checkpoints/last.pt)
        state, _, _ = official_state_dict(obj, str(path))
        key = "swinViT.patch_embed.proj.weight"
        if key not in state:
            raise UserError(f"{path}: not a VoCo / SwinUNETR checkpoint (no {key})")
        fs, in_ch = int(state[key].shape[0]), int(state[key].shape[1])
        arch = _scratch_arch(cohort_labels, fs, in_ch)
        parent = {"checkpoint": str(path.resolve()), "sha256": sha256_file(path)}
        return InitModel("checkpoint", arch, cohort_labels, cv, pre, inf, parent,
                         f"checkpoint {path.name} (feature size {fs})", _backbone_loader(state, str(path), events))
    bundle = registry.resolve(spec)
    parent = {"id": bundle.id, "version": bundle.version,
              "sha256": (bundle.meta.get("weights") or {}).get("sha256", "")}
    name, args = bundle.architecture
    if bundle.task == "backbone":
        args = {**args, "out_channels": len(cv)}
        return InitModel("backbone", (name, args), cohort_labels, cv, {**bundle.preprocessing, **(preprocessing or {})},
                         {**bundle.inference, **({"roi_size": list(roi)} if roi else {})}, parent,
                         bundle.describe(), _backbone_loader(bundle.state_dict(), str(bundle.path), events))
    if bundle.task != "segmentation":
        raise UserError(f"--init {spec}: {bundle.describe()} is a {bundle.task} model; finetuning needs a "
                        "segmentation model, a backbone, a VoCo checkpoint or 'scratch'")
    _check_labels(cohort_labels, bundle, events)

    def load(model: torch.nn.Module) -> None:
        model.load_state_dict(bundle.state_dict())

    return InitModel("bundle", (name, args), bundle.labels, bundle.channel_values, bundle.preprocessing,
                     {**bundle.inference, **({"roi_size": list(roi)} if roi else {})}, parent, bundle.describe(), load)


class Teacher:
    """The frozen teacher of the semi-supervised stage; saved in checkpoints so a resumed run keeps it."""

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None
        self.student: torch.nn.Module | None = None  # template for rebuilding the teacher on resume
        self.started_at: int = -1

    @property
    def active(self) -> bool:
        """True once the teacher has been frozen."""
        return self.model is not None

    def freeze_copy_of(self, student: torch.nn.Module, step: int) -> None:
        """Deep-copy ``student`` into an eval-mode, no-grad teacher (no EMA, as in the official code)."""
        teacher = copy.deepcopy(student).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.model, self.started_at = teacher, step

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint form: weights only when active."""
        return {"started_at": self.started_at,
                "weights": {k: v.detach().cpu() for k, v in self.model.state_dict().items()} if self.model else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rebuild the teacher from a checkpoint (needs :attr:`student` as the architecture template)."""
        if not state.get("weights"):
            self.model, self.started_at = None, -1
            return
        if self.student is None:
            raise RuntimeError("Teacher.student must be set before loading a teacher checkpoint")
        self.freeze_copy_of(self.student, int(state["started_at"]))
        assert self.model is not None
        self.model.load_state_dict(state["weights"])


class FinetuneStream(torch.utils.data.IterableDataset):
    """Labelled crop batches (``image``, ``label``) plus, when given, unlabelled crops (``u_image``) and VoCo
    crops of ``ssl_cases`` (``ssl_random``, ``ssl_base``, ``ssl_labels``: ``u_batch`` volumes, official layout)."""

    def __init__(self, labelled: CropStream, unlabelled: Sequence[PreparedCase], roi: Sequence[int],
                 u_batch: int, seed: int = 0, ssl_geometry: Any = None,
                 ssl_cases: Sequence[PreparedCase] = ()) -> None:
        super().__init__()
        self.labelled, self.unlabelled = labelled, list(unlabelled)
        self.roi, self.u_batch, self.seed = tuple(int(r) for r in roi), int(u_batch), seed
        self.ssl_geometry, self.ssl_cases = ssl_geometry, list(ssl_cases)

    def _voco_batch(self, rng: random.Random, nrng: Any) -> dict[str, torch.Tensor]:
        from vocoslicer.data.ssl_dataset import read_region, voco_sample

        g = self.ssl_geometry
        items = []
        for _ in range(self.u_batch):
            values, dst = read_region(rng.choice(self.ssl_cases).image[0].numpy(), g.region, nrng)
            items.append(voco_sample(values, dst, g, nrng))
        return {"ssl_random": torch.cat([it["random"] for it in items]),
                "ssl_base": torch.cat([it["base"] for it in items]),
                "ssl_labels": torch.stack([it["labels"] for it in items])}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        from monai.transforms import Compose, RandSpatialCrop, SpatialPad

        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        rng = random.Random(self.seed * 1000 + wid + 17)
        crop = Compose([SpatialPad(self.roi), RandSpatialCrop(self.roi, random_size=False)])
        crop.set_random_state(seed=self.seed * 1000 + wid + 17)
        import numpy as np

        nrng = np.random.default_rng(self.seed * 1000 + wid + 29)
        for batch in self.labelled:
            if self.unlabelled:
                batch["u_image"] = torch.stack([torch.as_tensor(crop(rng.choice(self.unlabelled).image)).float()
                                                for _ in range(self.u_batch)])
            if self.ssl_geometry is not None and self.ssl_cases:
                batch.update(self._voco_batch(rng, nrng))
            yield batch


def semi_step(teacher: Teacher, confidence: float, semi_weight: float, ssl_weight: float = 0.0
              ) -> Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, Any]]]:
    """Step function: DiceCE on labelled crops (+ masked pseudo-label DiceCE once the teacher exists, + the VoCo
    loss on the batch's VoCo crops when ``ssl_weight`` > 0 and the model is a :class:`VoCoSegModel`)."""
    from monai.losses import DiceCELoss

    sup_loss = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)

    def step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        x = batch["image"]
        use_semi = teacher.active and "u_image" in batch
        use_ssl = ssl_weight > 0 and "ssl_random" in batch
        xin = torch.cat([x, batch["u_image"]]) if use_semi else x
        parts: dict[str, Any] = {}
        if use_ssl:  # one forward for everything: DDP allows one forward per backward
            logits, ssl, ssl_parts = model(xin, batch["ssl_random"], batch["ssl_base"], batch["ssl_labels"])
            parts.update({"ssl": ssl.detach(), **{f"ssl_{k}": v.detach() for k, v in ssl_parts.items()}})
        else:
            logits = model(xin)
        sup = sup_loss(logits[: len(x)].float(), batch["label"])
        loss = sup + ssl_weight * ssl if use_ssl else sup
        parts["sup"] = sup.detach()
        if use_semi:
            assert teacher.model is not None
            with torch.no_grad():
                pseudo, mask = confident_pseudo_labels(teacher.model(batch["u_image"]), confidence)
            semi = masked_dice_ce(logits[len(x):], pseudo, mask)
            loss = loss + semi_weight * semi
            parts.update({"semi": semi.detach(), "confident": mask.float().mean().detach()})
        return loss, parts

    return step


def seg_network(model: torch.nn.Module) -> torch.nn.Module:
    """The network that becomes the bundle (a :class:`VoCoSegModel`'s ``net``; any other model itself)."""
    from vocoslicer.models.voco_head import VoCoSegModel

    return model.net if isinstance(model, VoCoSegModel) else model


def _new_version(model_id: str, parent: dict[str, Any] | None) -> str:
    """The next free version of ``model_id``, always above the parent's (which may not be installed)."""
    import re

    from vocoslicer.models import registry

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
    from vocoslicer.models import registry
    from vocoslicer.train.loop import TrainConfig, Trainer

    opts.validate()
    out = Path(opts.out).expanduser().resolve()
    state_path = out / STATE_FILE
    saved: dict[str, Any] = {}
    if state_path.is_file():
        if not opts.resume:
            raise UserError(f"{out}: holds a finetune run already; pass --resume to continue it or choose a new --out")
        saved = json.loads(state_path.read_text(encoding="utf-8"))
    elif opts.resume:
        events.warning(f"nothing to resume in {out}; starting a new finetune")
    was_ssl = float((saved.get("options") or {}).get("ssl_weight", 0.0) or 0.0) > 0
    if saved and was_ssl != (opts.ssl_weight > 0):
        heads = "the VoCo heads" if was_ssl else "no VoCo heads"
        raise UserError(f"{out}: this run was started {'with' if was_ssl else 'without'} --ssl-weight; resume it "
                        f"the same way (its checkpoints hold {heads})")
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
