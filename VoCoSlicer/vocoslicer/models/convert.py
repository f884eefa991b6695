"""Turning an official checkpoint file into a model bundle (the other half of :mod:`~vocoslicer.models.checkpoints`).

An official ``.pt`` is never used as is: it is read without executing code, renamed and matched against the
architecture (:mod:`vocoslicer.models.checkpoints`), and saved as a bundle (``model.json`` +
``weights.safetensors`` + ``labels.csv``). The target layout comes from building the architecture with its
parameters on the ``meta`` device, so converting a 4.6 GB model needs no second copy of it in memory. The
nnU-Net model has its own converter (:func:`vocoslicer.models.nnunet.checkpoint_to_bundle`), chosen here.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from vocoslicer.errors import UserError
from vocoslicer.labels import LabelTable
from vocoslicer.models.catalog import CatalogEntry, label_table
from vocoslicer.models.checkpoints import LoadReport, prepare_official, read_checkpoint


def infer_swin_args(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Guess SwinUNETR arguments from a (renamed) state dict: feature size, input and output channels."""
    from vocoslicer.models.swin import VOCO_SIZES

    w = sd.get("swinViT.patch_embed.proj.weight")
    if w is None or w.dim() != 5:
        raise UserError("the checkpoint has no swinViT.patch_embed.proj.weight: not a VoCo/SwinUNETR checkpoint")
    fs, in_ch = int(w.shape[0]), int(w.shape[1])
    by_fs = {v: k for k, v in VOCO_SIZES.items()}
    args: dict[str, Any] = {"size": by_fs[fs]} if fs in by_fs else {"size": None, "feature_size": fs}
    args.update(in_channels=in_ch, patch_merging="legacy")
    out = sd.get("out.conv.conv.weight")
    if out is not None:
        args["out_channels"] = int(out.shape[0])
    return args


_META_LOCK = threading.Lock()


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Register every new parameter on the ``meta`` device while the block runs (shapes without memory)."""
    # Parameters are moved to the meta device as they are registered: shapes without memory (an H model would
    # need 4.6 GB). ``with torch.device("meta")`` is not enough because MONAI calls .item() while building.
    original = torch.nn.Module.register_parameter

    def register(self: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    with _META_LOCK:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]
        try:
            yield
        finally:
            torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


def target_state(arch_name: str, args: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict layout (names, shapes, dtypes; parameters on ``meta``) of an architecture."""
    from vocoslicer.models.factory import build_model

    with parameters_on_meta():
        return build_model(arch_name, args).state_dict()


def checkpoint_to_bundle(checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                         entry: CatalogEntry | None = None, model_id: str | None = None,
                         version: str | None = None, labels: LabelTable | None = None,
                         source_sha256: str | None = None, sha256_verified: bool = False,
                         overwrite: bool = False) -> tuple[Any, LoadReport]:
    """Convert an official checkpoint into a bundle folder; returns (ModelBundle, LoadReport).

    With a catalog ``entry`` its architecture, labels and preprocessing are used; without, they are inferred
    from the tensors (14 outputs → BTCV labels, 21 → VoComni labels, no ``out`` layer → backbone). A
    segmentation bundle must receive every tensor; a backbone bundle keeps the encoder subset the checkpoint has.
    """
    from vocoslicer.models.bundle import ModelBundle, new_bundle_meta

    src = Path(checkpoint)
    raw = read_checkpoint(src)
    from vocoslicer.models import nnunet
    from vocoslicer.models.checkpoints import official_state_dict

    if (entry.architecture.get("name") == nnunet.NNUNET_ARCH if entry is not None
            else nnunet.looks_like_nnunet(official_state_dict(raw, str(src))[0])):  # the nnU-Net VoComni model
        return nnunet.checkpoint_to_bundle(raw, src, out_dir, entry, model_id, version, labels, source_sha256,
                                           sha256_verified, overwrite)
    if entry is not None:
        arch_name, args = entry.architecture["name"], dict(entry.architecture.get("args", {}))
        task = entry.task
    else:
        sd_guess, _, _ = official_state_dict(raw, str(src))
        arch_name, args = "swinunetr", infer_swin_args(sd_guess)
        task = "segmentation" if "out_channels" in args else "backbone"
    if task == "backbone":
        args.setdefault("out_channels", 14)  # decoder/out stay random until finetuned; any count works
    target = target_state(arch_name, args)
    matched, report = prepare_official(raw, target, str(src))
    del raw
    if not report.loaded:
        raise UserError(f"{src}: no tensor matches a {arch_name} with {args} ({report.summary()})")
    if report.missing_backbone:
        raise UserError(f"{src}: encoder tensors missing or of the wrong shape: {report.summary()}")
    if task == "segmentation" and (report.missing or report.mismatched):
        raise UserError(f"{src}: incomplete segmentation checkpoint: {report.summary()}")
    if task == "segmentation":
        n_out = int(args.get("out_channels", 0))
        if labels is None:
            name = entry.labels if entry is not None and entry.labels else {14: "btcv", 21: "vocomni"}.get(n_out)
            if name is None:
                raise UserError(f"{src}: {n_out} output channels; give a labels CSV (--labels) with {n_out - 1} "
                                "labels")
            labels = label_table(name)
        if len(labels) + 1 != n_out:
            raise UserError(f"{src}: the network has {n_out} output channels but the label table has "
                            f"{len(labels)} labels (+ background)")
    mid = model_id or (entry.id if entry is not None else src.name.split(".")[0].lower().replace("_", "-"))
    meta = new_bundle_meta(mid, version or (entry.version if entry is not None else "1.0.0"), task, arch_name,
                           args)
    if entry is not None:
        meta.update(title=entry.title, description=entry.description, licence=entry.licence,
                    licence_url=entry.licence_url, citation=entry.citation)
        if entry.preprocessing:
            meta["preprocessing"] = entry.preprocessing
        if entry.inference:
            meta["inference"] = entry.inference
    if task == "segmentation":
        meta["channel_values"] = list(range(int(args["out_channels"])))
    meta["source"] = {"file": src.name, "url": entry.url if entry is not None else None,
                      "sha256": source_sha256, "sha256_verified": bool(sha256_verified),
                      "load_report": report.to_dict()}
    if task == "backbone":
        meta["weights_subset"] = "encoder"  # build with load_weights=False, then load these tensors non-strictly
    bundle = ModelBundle(meta=meta, labels=labels if labels is not None else LabelTable())
    bundle.save(out_dir, matched, overwrite=overwrite)
    return bundle, report
