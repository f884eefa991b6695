"""Reference implementations the inference tests compare the engine's fast paths against.

None of these runs in the product: the engine resamples scores with
:func:`vocoslicer.infer.resample.scores_to_reference_torch` and segments through
:func:`vocoslicer.infer.sliding.segment_prepared`. They stay here as slow, obviously-correct references and as
thin compositions of the engine's sliding window, OOM fallback and progress events.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from vocoslicer.errors import UserError
from vocoslicer.infer.oom import device_job, run_with_oom_fallback
from vocoslicer.infer.sliding import (
    CancelFn,
    _progress_events,
    enable_fast_attention,
    sliding_window_labels,
    sliding_window_scores,
)
from vocoslicer.jobs.events import NULL_SINK, EventSink


def scores_to_reference(scores: torch.Tensor, grid: sitk.Image, reference: sitk.Image,
                        channel_values: Sequence[int], slab: int = 32) -> sitk.Image:
    """Resample class scores (C, X, Y, Z) from the model grid onto ``reference``'s grid and take the argmax.

    Works slab by slab along the reference's last axis so that only ``C × slab`` planes of scores exist at the
    input resolution at any time. Returns a label image with exactly the reference's geometry.
    """
    c = scores.shape[0]
    if c != len(channel_values):
        raise UserError(f"the model produced {c} channels but its bundle lists {len(channel_values)} channel values")
    arr = scores.float().permute(3, 2, 1, 0).contiguous().cpu().numpy()  # (Z, Y, X, C)
    vec = sitk.GetImageFromArray(arr, isVector=True)
    vec.CopyInformation(grid)
    lut = np.asarray(channel_values, dtype=np.uint16 if max(channel_values) > 255 else np.uint8)
    nx, ny, nz = reference.GetSize()
    out = np.zeros((nz, ny, nx), dtype=lut.dtype)
    # voxels outside the model grid get "background" (score 0 everywhere except channel 0)
    default = 0.0
    for z0 in range(0, nz, slab):
        z1 = min(nz, z0 + slab)
        origin = reference.TransformIndexToPhysicalPoint((0, 0, z0))
        part = sitk.Resample(vec, [nx, ny, z1 - z0], sitk.Transform(), sitk.sitkLinear, origin,
                             reference.GetSpacing(), reference.GetDirection(), default, vec.GetPixelID())
        pa = sitk.GetArrayViewFromImage(part)  # (z, y, x, C)
        out[z0:z1] = lut[np.argmax(pa, axis=-1)]
    lab = sitk.GetImageFromArray(out)
    lab.CopyInformation(reference)
    return lab


def predict_scores_fast(model: torch.nn.Module, x: torch.Tensor, roi: Sequence[int], overlap: float, mode: str,
                        sw_batch_size: int, device: torch.device, events: EventSink = NULL_SINK,
                        cancel: CancelFn | None = None) -> torch.Tensor:
    """The engine's sliding window as one call: (C, X, Y, Z) float16 scores on the CPU.

    Fast engine (autocast, SDPA attention, batched windows), CUDA OOM fallback (fewer windows, then CPU, with a
    warning event) and GPU memory released afterwards.
    """
    enable_fast_attention(model)
    report = _progress_events(events, "sliding-window inference")

    def fn(dev: torch.device, bs: int) -> torch.Tensor:
        return sliding_window_scores(model.to(dev), x, roi, overlap=overlap, mode=mode, sw_batch_size=bs,
                                     device=dev, progress=report, cancel=cancel)

    with device_job(device):
        scores, _, _ = run_with_oom_fallback(fn, device, sw_batch_size, events)
    return scores


def predict_labels_fast(model: torch.nn.Module, x: torch.Tensor, roi: Sequence[int], overlap: float, mode: str,
                        sw_batch_size: int, device: torch.device, channel_values: Sequence[int] | None = None,
                        events: EventSink = NULL_SINK, cancel: CancelFn | None = None) -> torch.Tensor:
    """Like :func:`predict_scores_fast` but returns uint8 labels (X, Y, Z): argmax on the device, no scores."""
    enable_fast_attention(model)
    report = _progress_events(events, "sliding-window inference")

    def fn(dev: torch.device, bs: int) -> torch.Tensor:
        return sliding_window_labels(model.to(dev), x, roi, overlap=overlap, mode=mode, sw_batch_size=bs,
                                     device=dev, channel_values=channel_values, progress=report, cancel=cancel)

    with device_job(device):
        labels, _, _ = run_with_oom_fallback(fn, device, sw_batch_size, events)
    return labels
