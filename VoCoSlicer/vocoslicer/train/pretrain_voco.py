"""VoCo v2 pretraining recipe: cache → crop dataset → VoCoHead → shared Trainer → backbone bundle.

Runs the same on one GPU, on CPU (tests) and under torchrun (rank 0 prepares the cache, the others receive the
entry list). A finished run, or ``export_from_run`` on an interrupted one, writes ``RUNDIR/backbone``: a model
bundle (task ``backbone``, architecture ``swinunetr``) whose weights carry SwinUNETR key names, so finetune and
segment load it like an official ``VoCo_*_SSL_head.pt``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vocoslicer.data.cache import PreprocessConfig, VolumeCache, find_sources, prepare_entries
from vocoslicer.data.ssl_dataset import VoCoCropDataset, voco_loader, voco_step
from vocoslicer.errors import UserError
from vocoslicer.io.atomic import atomic_write_json
from vocoslicer.jobs.events import NULL_SINK, EventSink
from vocoslicer.models.voco_head import SwinEncoder, VoCoHead
from vocoslicer.ssl.voco import VoCoGeometry
from vocoslicer.train import distributed as D
from vocoslicer.train.loop import TrainConfig, Trainer
from vocoslicer.train.recipes import VOCO

RECIPE_FILE = "voco_recipe.json"


@dataclass
class VoCoRecipe:
    """Everything VoCo-specific about a run (the optimiser/schedule/AMP part is the loop's TrainConfig)."""

    size: str | None = VOCO.size
    feature_size: int | None = None
    roi: int = VOCO.crop
    grid: int = VOCO.grid
    sw: int = VOCO.sw
    depth: int | None = None
    batch: int = VOCO.batch  # volumes per step and rank; each gives sw random + grid² base crops
    grad_ckpt: bool = False
    patch_merging: str = "legacy"
    hidden_dim: int = 1024
    out_dim: int = 1024
    init: str | None = None
    workers: int = VOCO.workers
    augment: bool = True
    cache_dir: str | None = None
    cache_limit_gb: float | None = None
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    @property
    def geometry(self) -> VoCoGeometry:
        """Crop geometry of this recipe."""
        return VoCoGeometry(roi=self.roi, n=self.grid, sw=self.sw, depth=self.depth)

    def to_dict(self) -> dict[str, Any]:
        """JSON form stored in the run directory (used by :func:`export_from_run`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VoCoRecipe:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        pp = d.pop("preprocess", {}) or {}
        if pp.get("spacing") is not None:
            pp["spacing"] = tuple(pp["spacing"])
        return cls(**d, preprocess=PreprocessConfig(**pp))


def build_model(recipe: VoCoRecipe, backbone: nn.Module | None = None) -> VoCoHead:
    """The VoCoHead of ``recipe`` (``backbone`` overrides the SwinUNETR encoder, for CPU tests)."""
    return VoCoHead(recipe.size, recipe.feature_size, 1, recipe.grad_ckpt, recipe.patch_merging, recipe.hidden_dim,
                    recipe.out_dim, backbone=backbone)


def _prepare_data(data: list[str], recipe: VoCoRecipe, run_dir: Path, ctx: D.DistContext,
                  events: EventSink) -> tuple[VolumeCache, list]:
    from vocoslicer.paths import cache_dir

    root = Path(recipe.cache_dir) if recipe.cache_dir else cache_dir() / "voco"
    limit = int(recipe.cache_limit_gb * 1e9) if recipe.cache_limit_gb is not None else None
    cache = VolumeCache(root, recipe.preprocess, limit)
    payload: list[Any] = [None]
    if ctx.is_main:  # the other ranks wait: one process preprocesses, all train on the same entry list
        payload = [prepare_entries(find_sources(data), cache, events, run_dir)]
    if ctx.distributed:
        torch.distributed.broadcast_object_list(payload, src=0)
    entries = payload[0]
    if not entries:
        raise UserError(f"{', '.join(map(str, data))}: no usable volume (see bad_volumes.json in {run_dir})")
    return cache, entries


def pretrain_voco(data: list[str], run_dir: str | os.PathLike[str], recipe: VoCoRecipe, train: TrainConfig,
                  resume: bool = False, events: EventSink | None = None,
                  should_stop: Callable[[], bool] | None = None, backbone: nn.Module | None = None) -> dict[str, Any]:
    """Run (or resume) VoCo pretraining; returns the loop result plus ``model`` (the trained VoCoHead, every rank)
    and ``bundle`` (rank 0, the exported backbone bundle when the encoder is SwinUNETR's)."""
    run_dir = Path(run_dir)
    # long timeout: the other ranks wait in a collective while rank 0 preprocesses the whole data set once
    ctx, device = D.setup(train.device, timeout_s=6 * 3600)
    events = events if (events is not None and ctx.is_main) else NULL_SINK
    try:
        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run_dir / RECIPE_FILE, {"recipe": recipe.to_dict(), "train": dataclasses.asdict(train),
                                                      "data": [str(d) for d in data]})
        cache, entries = _prepare_data(data, recipe, run_dir, ctx, events)
        torch.manual_seed(train.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
        model = build_model(recipe, backbone)
        if recipe.init and not resume:
            report = model.load_pretrained(recipe.init)
            events.log(f"init from {recipe.init}: {report['loaded']} backbone tensors, {report['heads_loaded']} "
                       f"head tensors loaded")
            missing = [k for k in report["missing"] if not k.startswith(("decoder", "out."))]
            if missing:
                events.warning(f"{recipe.init}: {len(missing)} backbone tensors not in the checkpoint (random "
                               f"init), e.g. {missing[:3]}")
        length = max(len(entries), recipe.batch * ctx.world_size * 16)
        dataset = VoCoCropDataset(cache, entries, recipe.geometry, length=length, augment=recipe.augment)
        loader = voco_loader(dataset, recipe.batch, recipe.workers, ctx.world_size, ctx.rank, train.seed,
                             pin_memory=device.type == "cuda")
        trainer = Trainer(model, train, run_dir, voco_step, loader, events=events, should_stop=should_stop)
        result = trainer.fit(resume=resume)
        result["model"] = model
        if ctx.is_main and isinstance(model.backbone, SwinEncoder):
            result["bundle"] = str(export_backbone(model, run_dir, recipe, result["step"], len(entries), events))
        return result
    finally:
        D.teardown(ctx)


def export_backbone(model: VoCoHead, run_dir: Path, recipe: VoCoRecipe, step: int, n_volumes: int | None = None,
                    events: EventSink | None = None) -> Path:
    """Write ``run_dir/backbone`` (model bundle, task ``backbone``) from the model's encoder weights."""
    from vocoslicer.models.bundle import ModelBundle, new_bundle_meta

    pp = recipe.preprocess
    fs = model.backbone.feature_size
    meta = new_bundle_meta(
        f"voco-{(recipe.size or 'fs' + str(fs)).lower()}-ssl-{run_dir.name}", "0.1.0", "backbone", "swinunetr",
        {"feature_size": fs, "in_channels": 1, "patch_merging": recipe.patch_merging},
        name=f"VoCo {recipe.size or fs} SSL backbone ({run_dir.name})",
        description="SwinUNETR-v2 encoder (swinViT + encoder1-4,10) pretrained with VoCo v2; decoder not included",
        preprocessing={"orientation": pp.orientation, "spacing": list(pp.spacing) if pp.spacing else None,
                       "intensity": {"a_min": pp.a_min, "a_max": pp.a_max, "b_min": 0.0, "b_max": 1.0,
                                     "clip": True}},
        parent=recipe.init,
        training={"method": "voco-v2", "steps": int(step), "volumes": n_volumes, "roi": recipe.roi,
                  "grid": recipe.grid, "sw": recipe.sw, "batch": recipe.batch},
    )
    bundle = ModelBundle(meta=meta)
    out = bundle.save(run_dir / "backbone", model.backbone_state_dict(), overwrite=True)
    if events is not None:
        events.artifact(out, "model", task="backbone", step=int(step))
    return out


def export_from_run(run_dir: str | os.PathLike[str], events: EventSink | None = None) -> Path:
    """Export the backbone of an existing (finished or interrupted) run from its last checkpoint."""
    from vocoslicer.train.state import load_checkpoint

    run_dir = Path(run_dir)
    rf, ck = run_dir / RECIPE_FILE, run_dir / "checkpoints" / "last.pt"
    if not rf.is_file() or not ck.is_file():
        raise UserError(f"{run_dir}: not a VoCo run with a checkpoint (needs {RECIPE_FILE} and checkpoints/last.pt)")
    info = json.loads(rf.read_text(encoding="utf-8"))
    recipe = VoCoRecipe.from_dict(info["recipe"])
    recipe.grad_ckpt = False
    model = build_model(recipe)
    state = load_checkpoint(ck)
    model.load_state_dict(state["model"])
    return export_backbone(model, run_dir, recipe, int(state["step"]), None, events)
