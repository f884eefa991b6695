"""Per-case uncertainty from the blended scores a segmentation already computes: which case to correct next.

The score is the mean normalised voxel entropy ``H(p) / log C`` of ``p = softmax(blended logits)`` (the
probabilities the official pipeline arg-maxes) inside the predicted foreground, overall and per structure. Inside
the foreground because a CT is mostly background the model is sure about: a whole-volume mean would rank cases by
their field of view, not by how doubtful the organs are. No second forward pass: the same sliding-window scores
give the labels and the entropy. With ``tta="flip"`` (only when asked: three more passes) the volume is also
segmented flipped along each axis; the score is then the entropy of the mean probabilities and
``tta_disagreement`` the share of foreground voxels where a flipped pass votes another label.

The label map written is the one ``segment`` writes without uncertainty (same scores, same resampling; on the
model-grid argmax path up to float16 rounding of exact near-ties), so asking for a score does not change the
segmentation. The map (``--uncertainty-map``) is the entropy resampled linearly
onto the input grid, in [0, 1]. Per-structure scores and voxel counts are taken on the model grid (where the
scores live), over the voxels the model's argmax gives each structure there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from vocoslicer.errors import UserError
from vocoslicer.jobs.events import NULL_SINK, EventSink

TTA_CHOICES = ("none", "flip")
SLAB = 16  # z slices per softmax block: keeps the float32 probabilities of a slab only


@dataclass
class UncertaintyRequest:
    """What the caller wants (``tta``, ``map_path`` or just ``want_map``); :func:`segment_prepared_uncertain`
    fills ``report`` and ``map_image``. Passed to ``segment_image(..., uncertainty=req)`` so its return value
    stays a label image. Bad choices fail here, before any inference (nothing is written)."""

    tta: str = "none"
    map_path: str | Path | None = None
    want_map: bool = False
    report: dict[str, Any] = field(default_factory=dict)
    map_image: sitk.Image | None = None

    def __post_init__(self) -> None:
        if self.tta not in TTA_CHOICES:
            raise UserError(f"unknown --tta {self.tta!r} (choose one of {', '.join(TTA_CHOICES)})")
        if self.map_path is not None:
            from vocoslicer.io.volume import _WRITE_EXTENSIONS, _ext

            p = Path(self.map_path)
            if p.is_dir() or _ext(p) not in _WRITE_EXTENSIONS:
                raise UserError(f"--uncertainty-map {p}: give a volume file name ending in "
                                f"{', '.join(_WRITE_EXTENSIONS)}")
            self.want_map = True


def _softmax_slabs(scores: torch.Tensor, fn: Callable[[torch.Tensor, int, int], None], slab: int = SLAB) -> None:
    for z0 in range(0, scores.shape[-1], slab):
        z1 = min(scores.shape[-1], z0 + slab)
        fn(torch.softmax(scores[..., z0:z1].float(), dim=0), z0, z1)


def normalised_entropy(prob: torch.Tensor) -> torch.Tensor:
    """``H(p) / log C`` over dim 0 of (C, ...) probabilities: 0 = certain, 1 = uniform."""
    c = prob.shape[0]
    h = -(prob * torch.log(prob.clamp_min(1e-12))).sum(0)
    return h / math.log(c) if c > 1 else torch.zeros_like(h)


def entropy_and_argmax(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blended logits (C, X, Y, Z) → (normalised entropy float32, argmax channel uint8), both (X, Y, Z) on the CPU."""
    ent = torch.empty(scores.shape[1:], dtype=torch.float32)
    idx = torch.empty(scores.shape[1:], dtype=torch.uint8)

    def put(p: torch.Tensor, z0: int, z1: int) -> None:
        ent[..., z0:z1] = normalised_entropy(p).cpu()
        idx[..., z0:z1] = p.argmax(0).to(torch.uint8).cpu()

    _softmax_slabs(scores, put)
    return ent, idx


def case_report(entropy: np.ndarray, channels: np.ndarray, channel_values: Sequence[int],
                names: dict[int, str] | None = None) -> dict[str, Any]:
    """Scores of one case from the model-grid entropy and argmax channels (both (X, Y, Z)).

    ``uncertainty`` is the mean entropy over the predicted foreground; a case with no foreground at all gets the
    whole-volume mean (and ``foreground_voxels`` 0), so an empty prediction is never ranked as certain by accident.
    """
    names = names or {}
    fg = channels > 0
    n_fg = int(fg.sum())
    overall = float(entropy[fg].mean()) if n_fg else float(entropy.mean())
    per: dict[str, dict[str, float | int]] = {}
    for ch, value in enumerate(channel_values):
        if ch == 0:
            continue
        m = channels == ch
        n = int(m.sum())
        name = names.get(int(value), str(value))
        per[name] = {"value": int(value), "voxels": n, "entropy": round(float(entropy[m].mean()), 5) if n else None}
    return {"uncertainty": round(overall, 5), "method": "mean normalised entropy in the predicted foreground",
            "foreground_voxels": n_fg, "volume_mean_entropy": round(float(entropy.mean()), 5), "structures": per}


def entropy_map_image(entropy: np.ndarray, grid: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Model-grid entropy (X, Y, Z) → float32 image on ``reference``'s exact grid (linear; 0 outside)."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(entropy.astype(np.float32).transpose(2, 1, 0)))
    img.CopyInformation(grid)
    out = sitk.Resample(img, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    out.CopyInformation(reference)
    return out


def _flip_tta(net: torch.nn.Module, tensor: torch.Tensor, run: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
              base_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mean probabilities over identity + 3 axis flips → (entropy, argmax, foreground disagreement share)."""
    total: torch.Tensor | None = None
    votes_differ = torch.zeros(base_idx.shape, dtype=torch.bool)
    for axis in (None, -3, -2, -1):
        x = tensor if axis is None else torch.flip(tensor, dims=(axis,))
        s = run(net, x)
        if axis is not None:
            s = torch.flip(s, dims=(axis,))
        prob = torch.empty(s.shape, dtype=torch.float32)

        def put(p: torch.Tensor, z0: int, z1: int, prob: torch.Tensor = prob) -> None:
            prob[..., z0:z1] = p.cpu()

        _softmax_slabs(s, put)
        del s
        votes_differ |= prob.argmax(0).to(torch.uint8) != base_idx
        total = prob if total is None else total.add_(prob)
    assert total is not None
    mean = total.div_(4.0)
    idx = mean.argmax(0).to(torch.uint8)
    fg = (base_idx > 0) | (idx > 0)
    share = float(votes_differ[fg].float().mean()) if bool(fg.any()) else 0.0
    return normalised_entropy(mean), idx, share


def segment_prepared_uncertain(model: torch.nn.Module, tensor: torch.Tensor, grid: sitk.Image,
                               reference: sitk.Image, channel_values: Sequence[int], roi: Sequence[int],
                               overlap: float, mode: str, sw_batch_size: int, device: torch.device,
                               request: UncertaintyRequest, events: EventSink = NULL_SINK,
                               smooth: bool | None = None, cancel: Callable[[], bool] | None = None,
                               whole_volume: bool = False, names: dict[int, str] | None = None) -> sitk.Image:
    """:func:`vocoslicer.infer.sliding.segment_prepared` plus the uncertainty of the same blended scores.

    Same labels as ``segment_prepared`` (the scores path when ``smooth``, model-grid argmax + nearest otherwise);
    fills ``request.report`` (and ``request.map_image`` when ``request.want_map``). CUDA OOM falls back like the
    plain path. The batch segmentation path calls this with the same arguments.
    """
    from vocoslicer.infer.oom import device_job, run_with_oom_fallback
    from vocoslicer.infer.resample import labels_to_reference, scores_to_reference_torch
    from vocoslicer.infer.sliding import (
        _progress_events,
        enable_fast_attention,
        sliding_window_scores,
        whole_volume_roi,
    )

    use_smooth = device.type == "cuda" if smooth is None else bool(smooth)
    if whole_volume:
        roi = whole_volume_roi(tensor.shape[-3:], roi, overlap)
    enable_fast_attention(model)
    report = _progress_events(events, "sliding-window inference")
    lut = np.asarray(list(channel_values))

    def fn(dev: torch.device, bs: int) -> tuple[sitk.Image, torch.Tensor, torch.Tensor, float | None]:
        net = model.to(dev)
        bs = bs if dev.type == "cuda" else 1

        def run(n: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
            return sliding_window_scores(n, x, roi, overlap=overlap, mode=mode, sw_batch_size=bs, device=dev,
                                         progress=report, cancel=cancel, out_device=dev)

        scores = run(net, tensor)
        ent, idx = entropy_and_argmax(scores)
        events.progress(1, 1, stage="resampling to the input grid")
        if use_smooth:
            label = scores_to_reference_torch(scores, grid, reference, list(channel_values),
                                              slab=64 if dev.type == "cuda" else 8)
        else:
            label = labels_to_reference(lut[idx.numpy()].astype(np.uint8 if lut.max() <= 255 else np.uint16),
                                        grid, reference)
        del scores
        share = None
        if request.tta == "flip":
            events.progress(0, 1, stage="flip test-time augmentation")
            ent, _, share = _flip_tta(net, tensor, run, idx)
        return label, ent, idx, share

    with device_job(device):
        (label, ent, idx, share), _, _ = run_with_oom_fallback(fn, device, sw_batch_size, events)
    ent_np = ent.numpy()
    rep = case_report(ent_np, idx.numpy(), channel_values, names)
    rep["tta"] = request.tta
    if share is not None:
        rep["tta_disagreement"] = round(share, 5)
    request.report = rep
    if request.want_map:
        request.map_image = entropy_map_image(ent_np, grid, reference)
    return label


def uncertainty_json_path(output: str | Path) -> Path:
    """``seg.nii.gz`` → ``seg.uncertainty.json`` (next to the label map, like its ``.labels.csv``)."""
    from vocoslicer.infer.segment import labels_csv_path

    p = labels_csv_path(output)
    return p.with_name(p.name[: -len(".labels.csv")] + ".uncertainty.json")


def write_uncertainty(request: UncertaintyRequest, output: str | Path, events: EventSink = NULL_SINK,
                      **context: Any) -> dict[str, Any]:
    """Write the JSON next to ``output`` (and the map to ``request.map_path``), emit a metric event; returns the
    fields for the caller's result/artifact (``uncertainty``, ``uncertainty_json``, ``uncertainty_map``).

    The batch path calls this per case after writing the label map, as ``segment`` and the worker do."""
    from vocoslicer.io import atomic_write_json, write_image

    rep = dict(request.report, **context)
    fields: dict[str, Any] = {"uncertainty": rep["uncertainty"]}
    if request.map_path is not None and request.map_image is not None:
        fields["uncertainty_map"] = rep["map"] = str(write_image(request.map_image, request.map_path))
    js = atomic_write_json(uncertainty_json_path(output), rep)
    fields["uncertainty_json"] = str(js)
    events.metric(0, split="inference", uncertainty=rep["uncertainty"],
                  **({"tta_disagreement": rep["tta_disagreement"]} if "tta_disagreement" in rep else {}),
                  structures={k: v["entropy"] for k, v in rep["structures"].items()})
    return fields
