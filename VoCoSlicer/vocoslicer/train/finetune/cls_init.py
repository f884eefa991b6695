"""Where a classifier finetune starts: ``--init voco-b-ssl | BUNDLE | checkpoint | scratch`` → architecture + weights.

Two architectures: ``voco_classifier`` (the official VoCo downstream classifier, voco_spec §6.2: SwinUNETR-v2
encoder+decoder, global average pool, linear head) and ``pumit_vit_cls`` (PUMIT's ViT with a [CLS] linear head).
The pre-trained part is loaded with each family's own rule: VoCo/SwinUNETR checkpoints and backbone/segmentation
bundles by name+shape (:func:`load_official_weights`, which reports what stayed random), PUMIT backbones with
:func:`load_backbone` (patch-kernel depth and input channels converted). A classification bundle continues as a
new version of itself, which only makes sense when its classes are the cohort's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vocoslicer.errors import UserError
from vocoslicer.jobs.events import NULL_SINK, EventSink
from vocoslicer.models.bundle import DEFAULT_PREPROCESSING, ModelBundle
from vocoslicer.train.finetune.init import (
    CHECKPOINT_SUFFIXES,
    build_with,
    bundle_parent,
    checkpoint_parent,
    id_safe,
    read_swin_checkpoint,
    swin_loader,
    swin_width,
)
from vocoslicer.train.finetune.options import ARCHS

_MISFIT = "does not fit this classifier's encoder"
PUMIT_WINDOW = {"b_min": -1.0, "b_max": 1.0}
"""A fresh PUMIT ViT sees ``2x - 1`` of the window (PUMIT's BTCV downstream input, pumit_spec "downstream input
normalisations"); measured on splenomegaly phantoms: with [0, 1] inputs the ViT stayed at chance (24 cases, 400
steps), with 2x - 1 it reached 0.95 held-out accuracy. A PUMIT backbone bundle brings its own window."""
IMAGENET_MEAN, IMAGENET_STD = 0.449, 0.226  # mean of the three ImageNet channel means / stds (1-channel CT)


def pumit_window(backbone_pre: dict[str, Any]) -> dict[str, float]:
    """Output range of the intensity window for a PUMIT backbone: its MIM pretraining saw ImageNet-normalised
    [0, 1] crops (pumit_spec: ViT input), so the window maps to ``(x - mean) / std`` of that; else ``2x - 1``."""
    if backbone_pre.get("normalization") == "imagenet":
        return {"b_min": -IMAGENET_MEAN / IMAGENET_STD, "b_max": (1 - IMAGENET_MEAN) / IMAGENET_STD}
    return dict(PUMIT_WINDOW)


DEFAULT_INPUT = {"voco_classifier": [96, 96, 96], "pumit_vit_cls": [128, 128, 128]}


@dataclass
class ClsInit:
    """Architecture, its starting weights, preprocessing, input size and the parent it records."""

    kind: str  # scratch | checkpoint | backbone | segmentation | classification
    arch: tuple[str, dict[str, Any]]
    preprocessing: dict[str, Any]
    input_size: list[int]
    parent: dict[str, Any] | None
    describe: str
    load: Callable[[torch.nn.Module], None] | None = None
    classes: list[str] | None = None  # a classification bundle's classes (must match the cohort's)
    multi_label: bool | None = None

    def build(self) -> torch.nn.Module:
        """The network with its starting weights."""
        return build_with(self.arch, self.load)

    def default_id(self, cohort_name: str) -> str:
        """A classification bundle keeps its id (a new version); otherwise ``classifier-<cohort>``."""
        if self.kind == "classification" and self.parent:
            return str(self.parent["id"])
        return f"classifier-{id_safe(cohort_name)}"  # ASCII, like every model id


def arch_args(arch: str, n_classes: int, feature_size: int | None = None, vit_size: str | None = None,
              vit_args: dict[str, Any] | None = None, pool: str = "decoder", patch: int | None = None
              ) -> dict[str, Any]:
    """JSON architecture arguments of a fresh classifier."""
    if arch == "voco_classifier":
        return {"size": None, "feature_size": int(feature_size or 48), "in_channels": 1, "num_classes": n_classes,
                "patch_merging": "legacy", "pool": pool}
    if arch == "pumit_vit_cls":
        if patch is not None and patch not in (4, 8, 16):
            raise UserError(f"finetune: --patch must be 4, 8 or 16, got {patch}")
        va = dict(vit_args or {})
        if patch and "patch_size" not in va:  # a backbone fixes the in-plane patch; --patch then sets the depth
            va["patch_size"] = int(patch)
        return {"num_classes": n_classes, "in_channels": 1, "size": vit_size or "B", "patch_depth": int(patch or 16),
                **({"vit_args": va} if va else {})}
    raise UserError(f"finetune: --arch must be one of {', '.join(ARCHS)}, got {arch!r}")


def _pumit_loader(state: dict[str, torch.Tensor], source: str, events: EventSink) -> Callable[[torch.nn.Module], None]:
    def load(model: torch.nn.Module) -> None:
        from vocoslicer.models.pumit import load_backbone

        try:
            missing, unexpected = load_backbone(model, state)
        except ValueError as exc:
            raise UserError(f"{source}: does not fit this ViT ({exc})") from None
        if missing:
            raise UserError(f"{source}: does not fit this ViT ({len(missing)} tensors missing, e.g. {missing[:2]})")
        events.log(f"{source}: PUMIT backbone loaded ({len(unexpected)} backbone tensors unused)")

    return load


@dataclass
class _Wanted:
    """What :func:`resolve_cls_init` was asked for, handed to the branch that builds the start."""

    n_classes: int
    arch: str | None
    feature_size: int | None
    vit_size: str | None
    pool: str
    patch: int | None
    preprocessing: dict[str, Any] | None
    input_size: Sequence[int] | None
    events: EventSink

    def size_for(self, name: str, bundle_size: Sequence[int] | None = None) -> list[int]:
        """``--input-size``, else the bundle's, else the architecture's default."""
        return [int(s) for s in (self.input_size or bundle_size or DEFAULT_INPUT[name])]

    def preprocessing_over(self, base: dict[str, Any]) -> dict[str, Any]:
        """``--preprocessing`` over ``base``."""
        return {**base, **(self.preprocessing or {})}

    @property
    def own_window(self) -> bool:
        """True when ``--preprocessing`` sets the intensity window (then no family window replaces it)."""
        return "intensity" in (self.preprocessing or {})


def resolve_cls_init(spec: str, n_classes: int, arch: str | None = None, feature_size: int | None = None,
                     vit_size: str | None = None, pool: str = "decoder", patch: int | None = None,
                     preprocessing: dict[str, Any] | None = None,
                     input_size: Sequence[int] | None = None, events: EventSink = NULL_SINK) -> ClsInit:
    """Resolve ``--init`` for ``n_classes`` outputs (see the module docstring)."""
    from vocoslicer.models import installed as installed_models

    want = _Wanted(n_classes, arch, feature_size, vit_size, pool, patch, preprocessing, input_size, events)
    if spec == "scratch":
        return _scratch(want)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES:
        return _from_checkpoint(path, want)
    try:
        bundle = installed_models.resolve(spec)
    except UserError as exc:
        hint = (" (download the official VoCo weights first: 'vocoslicer models download voco-b-ssl')"
                if spec.startswith("voco-") else "")
        raise UserError(f"--init {spec}: {exc}{hint}") from None
    if bundle.task == "classification":
        return _continued(spec, bundle, want)
    if bundle.task not in ("backbone", "segmentation"):
        raise UserError(f"--init {spec}: {bundle.describe()} is a {bundle.task} model")
    name = bundle.architecture[0]
    if name.startswith("pumit_vit"):
        return _from_pumit(spec, bundle, want)
    if name != "swinunetr":
        raise UserError(f"--init {spec}: cannot initialise a classifier from a {name} model")
    return _from_swin(spec, bundle, want)


def _scratch(want: _Wanted) -> ClsInit:
    name = want.arch or "voco_classifier"
    pre = want.preprocessing_over(DEFAULT_PREPROCESSING)
    if name == "pumit_vit_cls":
        pre.setdefault("depth_first", True)  # as PUMIT's own backbones (slices first)
        if not want.own_window:
            pre["intensity"] = {**pre["intensity"], **PUMIT_WINDOW}
    args = arch_args(name, want.n_classes, want.feature_size, want.vit_size, pool=want.pool, patch=want.patch)
    return ClsInit("scratch", (name, args), pre, want.size_for(name), None, "random initialisation")


def _from_checkpoint(path: Path, want: _Wanted) -> ClsInit:
    if want.arch not in (None, "voco_classifier"):
        raise UserError(f"--init {path.name}: a checkpoint file initialises voco_classifier only; for "
                        f"{want.arch} give a backbone bundle")
    state = read_swin_checkpoint(path)
    fs, _ = swin_width(state, str(path))
    args = arch_args("voco_classifier", want.n_classes, fs, pool=want.pool)
    return ClsInit("checkpoint", ("voco_classifier", args), want.preprocessing_over(DEFAULT_PREPROCESSING),
                   want.size_for("voco_classifier"), checkpoint_parent(path),
                   f"checkpoint {path.name} (feature size {fs})",
                   swin_loader(state, str(path), want.events, _MISFIT))


def _continued(spec: str, bundle: ModelBundle, want: _Wanted) -> ClsInit:
    """A classification bundle continues as a new version of itself (all weights, its classes)."""
    from vocoslicer.infer.classify import input_size as bundle_input

    name, args = bundle.architecture
    if want.arch not in (None, name):
        raise UserError(f"--init {spec}: {bundle.describe()} is a {name}; --arch {want.arch} cannot continue it")

    def load_all(model: torch.nn.Module) -> None:
        model.load_state_dict(bundle.state_dict())

    return ClsInit("classification", (name, args), want.preprocessing_over(bundle.preprocessing),
                   want.size_for(name, bundle_input(bundle)), bundle_parent(bundle), bundle.describe(), load_all,
                   classes=bundle.classes, multi_label=bool(bundle.meta.get("multi_label", False)))


def _from_pumit(spec: str, bundle: ModelBundle, want: _Wanted) -> ClsInit:
    from vocoslicer.models.pumit import backbone_vit_args

    name, args = bundle.architecture
    if want.arch not in (None, "pumit_vit_cls"):
        raise UserError(f"--init {spec}: a PUMIT backbone initialises pumit_vit_cls, not {want.arch}")
    vit_args = backbone_vit_args(args) if name == "pumit_vit" else args.get("vit_args")
    pre = want.preprocessing_over(bundle.preprocessing)
    if not want.own_window:
        pre["intensity"] = {**pre["intensity"], **pumit_window(bundle.meta.get("preprocessing") or {})}
    new = arch_args("pumit_vit_cls", want.n_classes, vit_size=want.vit_size, vit_args=vit_args, patch=want.patch)
    return ClsInit(bundle.task, ("pumit_vit_cls", new), pre, want.size_for("pumit_vit_cls"), bundle_parent(bundle),
                   bundle.describe(), _pumit_loader(bundle.state_dict(), str(bundle.path), want.events))


def _from_swin(spec: str, bundle: ModelBundle, want: _Wanted) -> ClsInit:
    if want.arch not in (None, "voco_classifier"):
        raise UserError(f"--init {spec}: a SwinUNETR model initialises voco_classifier, not {want.arch}")
    state = bundle.state_dict()
    src = str(bundle.path)
    fs, _ = swin_width(state, src)
    new = arch_args("voco_classifier", want.n_classes, fs, pool=want.pool)
    return ClsInit(bundle.task, ("voco_classifier", new), want.preprocessing_over(bundle.preprocessing),
                   want.size_for("voco_classifier"), bundle_parent(bundle), bundle.describe(),
                   swin_loader(state, src, want.events, _MISFIT))
