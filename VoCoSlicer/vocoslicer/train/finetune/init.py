"""Where a finetune starts: ``--init`` (a bundle, a VoCo/SwinUNETR checkpoint, a backbone bundle or ``scratch``)
resolved into an architecture, label outputs, preprocessing and a weight loader, checked against the cohort's labels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vocoslicer.errors import UserError
from vocoslicer.jobs.events import NULL_SINK, EventSink
from vocoslicer.labels import LabelTable
from vocoslicer.models.bundle import (
    DEFAULT_INFERENCE,
    DEFAULT_PREPROCESSING,
    ModelBundle,
    new_bundle_meta,
    sha256_file,
)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")


def build_with(arch: tuple[str, dict[str, Any]], load: Callable[[torch.nn.Module], None] | None) -> torch.nn.Module:
    """Build ``arch`` (factory name, arguments) and apply the starting weights ``load``; shared by both finetunes."""
    from vocoslicer.models.factory import build_model

    model = build_model(*arch)
    if load is not None:
        load(model)
    return model


def id_safe(name: str) -> str:
    """``name`` (a cohort folder name) made into a valid model-id part: ids are ASCII only (vocoslicer.ids)."""
    return "".join(ch if (ch.isascii() and ch.isalnum()) or ch in "-_" else "-" for ch in name) or "cohort"


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
        return build_with(self.arch, self.load)

    def default_id(self, cohort_name: str) -> str:
        """A finetuned bundle keeps its parent's id (a new version); otherwise it is named after the cohort."""
        if self.kind == "bundle" and self.parent:
            return str(self.parent["id"])
        return f"finetuned-{id_safe(cohort_name)}"

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


def swin_loader(state: dict[str, torch.Tensor], source: str, events: EventSink,
                misfit: str = "the checkpoint does not fit this backbone") -> Callable[[torch.nn.Module], None]:
    """A loader of VoCo/SwinUNETR weights by name and shape (:func:`load_official_weights`), shared by both
    finetunes: a decoder or head may stay random (the report says what), a missing encoder tensor is an error
    (``<source>: <misfit> (...)``), since then the pretraining would silently not be used."""
    def load(model: torch.nn.Module) -> None:
        from vocoslicer.models.checkpoints import load_official_weights

        report = load_official_weights(model, state, source)
        if report.missing_backbone:
            raise UserError(f"{source}: {misfit} ({len(report.missing_backbone)} encoder tensors missing or of "
                            f"another shape, e.g. {report.missing_backbone[:2]})")
        events.log(report.summary())

    return load


SWIN_PATCH_KEY = "swinViT.patch_embed.proj.weight"


def swin_width(state: dict[str, torch.Tensor], source: str) -> tuple[int, int]:
    """Feature size and input channels of a VoCo/SwinUNETR state dict (a one-line error for anything else)."""
    if SWIN_PATCH_KEY not in state:
        raise UserError(f"{source}: not a VoCo / SwinUNETR checkpoint (no {SWIN_PATCH_KEY})")
    weight = state[SWIN_PATCH_KEY]
    return int(weight.shape[0]), int(weight.shape[1])


def read_swin_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The official-layout state dict of a checkpoint file: an official VoCo one or the model of a vocoslicer
    training checkpoint (``run_dir/checkpoints/last.pt``); both finetunes start from either."""
    from vocoslicer.models.checkpoints import official_state_dict, read_checkpoint

    obj = read_checkpoint(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "state_dict" not in obj:
        obj = obj["model"]  # a vocoslicer training checkpoint (run_dir/checkpoints/last.pt)
    state, _, _ = official_state_dict(obj, str(path))
    return state


def checkpoint_parent(path: Path) -> dict[str, Any]:
    """The ``parent`` record of a bundle finetuned from a checkpoint file."""
    return {"checkpoint": str(path.resolve()), "sha256": sha256_file(path)}


def bundle_parent(bundle: ModelBundle) -> dict[str, Any]:
    """The ``parent`` record of a bundle finetuned from another bundle."""
    return {"id": bundle.id, "version": bundle.version,
            "sha256": (bundle.meta.get("weights") or {}).get("sha256", "")}


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
    from vocoslicer.models import installed as installed_models

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
        state = read_swin_checkpoint(path)
        fs, in_ch = swin_width(state, str(path))
        return InitModel("checkpoint", _scratch_arch(cohort_labels, fs, in_ch), cohort_labels, cv, pre, inf,
                         checkpoint_parent(path), f"checkpoint {path.name} (feature size {fs})",
                         swin_loader(state, str(path), events))
    bundle = installed_models.resolve(spec)
    parent = bundle_parent(bundle)
    name, args = bundle.architecture
    if bundle.task == "backbone":
        args = {**args, "out_channels": len(cv)}
        return InitModel("backbone", (name, args), cohort_labels, cv, {**bundle.preprocessing, **(preprocessing or {})},
                         {**bundle.inference, **({"roi_size": list(roi)} if roi else {})}, parent,
                         bundle.describe(), swin_loader(bundle.state_dict(), str(bundle.path), events))
    if bundle.task != "segmentation":
        raise UserError(f"--init {spec}: {bundle.describe()} is a {bundle.task} model; finetuning needs a "
                        "segmentation model, a backbone, a VoCo checkpoint or 'scratch'")
    _check_labels(cohort_labels, bundle, events)

    def load(model: torch.nn.Module) -> None:
        model.load_state_dict(bundle.state_dict())

    return InitModel("bundle", (name, args), bundle.labels, bundle.channel_values, bundle.preprocessing,
                     {**bundle.inference, **({"roi_size": list(roi)} if roi else {})}, parent, bundle.describe(), load)
