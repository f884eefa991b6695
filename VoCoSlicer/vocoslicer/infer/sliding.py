"""Fast sliding-window inference: batched windows, gaussian blending, autocast, streaming argmax on the device.

Plain MONAI ``sliding_window_inference`` keeps a full-resolution float accumulator plus a count map and moves the
result to the output device at the end. Here the windows are visited slab by slab along the last axis; as soon as
no remaining window can touch a slab, the slab is finalised on the device: either arg-maxed into uint8 labels
(``sliding_window_labels``: the network's scores never leave the device) or normalised and copied to the output
as half floats (``sliding_window_scores``). The accumulator therefore only spans about one window depth, the
count map is not needed for labels (dividing by a positive per-voxel weight does not change an argmax) and no
float64 full-resolution array ever exists. Window positions and the gaussian map follow MONAI exactly, so the
results match MONAI up to floating-point rounding.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vocoslicer.errors import Cancelled, UserError
from vocoslicer.jobs.events import NULL_SINK, EventSink

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]
AMP_CHOICES = ("auto", "bf16", "fp16", "off")


@dataclass(frozen=True)
class Window:
    """Start corner (in the padded volume) of one window."""

    x: int
    y: int
    z: int


def window_starts(length: int, roi: int, overlap: float) -> list[int]:
    """Start indices along one axis, with MONAI's rule (uniform steps, last window flush with the end)."""
    if length <= roi:
        return [0]
    step = max(int(roi * (1.0 - overlap)), 1)
    count = next(d for d in range(length) if d * step + roi >= length) + 1
    return [min(i * step, length - roi) for i in range(count)]


def window_grid(shape: Sequence[int], roi: Sequence[int], overlap: float) -> list[Window]:
    """All windows of a (X, Y, Z) volume, ordered by z first so that slabs complete early."""
    xs, ys, zs = (window_starts(int(s), int(r), overlap) for s, r in zip(shape, roi, strict=True))
    return [Window(x, y, z) for z in zs for x in xs for y in ys]


def autocast_context(device: torch.device, amp: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 (or fp16 where bf16 is unsupported) autocast on CUDA; off on CPU unless asked (it is slower there)."""
    if amp not in AMP_CHOICES:
        raise UserError(f"unknown precision {amp!r} (choose one of {', '.join(AMP_CHOICES)})")
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    if amp == "auto":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def enable_fast_attention(model: torch.nn.Module) -> int:
    """Switch MONAI window attention to ``scaled_dot_product_attention`` (same weights, used under no-grad only)."""
    n = 0
    for m in model.modules():
        if hasattr(m, "use_flash_attention") and hasattr(m, "relative_position_bias_table"):
            m.use_flash_attention = True
            n += 1
    return n


def importance_map(roi: Sequence[int], mode: str, sigma_scale: float, device: torch.device) -> torch.Tensor:
    """MONAI's blending weights for one window (constant = ones, gaussian = clamped normalised gaussian)."""
    from monai.data.utils import compute_importance_map

    if mode not in ("gaussian", "constant"):
        raise UserError(f"unknown blending mode {mode!r} (gaussian or constant)")
    return compute_importance_map(tuple(int(r) for r in roi), mode=mode, sigma_scale=sigma_scale, device=device,
                                  dtype=torch.float32)


def _pad_amounts(shape: Sequence[int], roi: Sequence[int]) -> list[tuple[int, int]]:
    # MONAI pads symmetrically with zeros when the volume is smaller than a window
    diffs = [max(int(r) - int(s), 0) for s, r in zip(shape, roi, strict=True)]
    return [(d // 2, d - d // 2) for d in diffs]


def _pad_to_roi(image: torch.Tensor, roi: Sequence[int]) -> torch.Tensor:
    pads = _pad_amounts(image.shape[-3:], roi)
    if any(a or b for a, b in pads):
        flat = [v for a, b in reversed(pads) for v in (a, b)]
        image = F.pad(image, flat, mode="constant", value=0.0)
    return image


def _chunks(items: list[Window], n: int) -> Iterator[tuple[int, list[Window]]]:
    for i in range(0, len(items), n):
        yield i + len(items[i:i + n]), items[i:i + n]


def _run(model: torch.nn.Module, image: torch.Tensor, roi: Sequence[int], overlap: float, mode: str,
         sw_batch_size: int, device: torch.device, amp: str, sigma_scale: float,
         finalize: Callable[[torch.Tensor, torch.Tensor | None, int, int], None], need_weight: bool,
         progress: ProgressFn | None, cancel: CancelFn | None) -> tuple[int, int, int]:
    """Shared engine; calls ``finalize(acc_slab, weight_slab, z0, z1)`` for padded z ranges as they complete."""
    if image.dim() == 5:
        if image.shape[0] != 1:
            raise UserError(f"sliding-window inference takes one volume at a time, got a batch of {image.shape[0]}")
        image = image[0]
    if image.dim() != 4:
        raise UserError(f"expected a (C, X, Y, Z) volume, got shape {tuple(image.shape)}")
    if min(image.shape[-3:]) < 2:
        raise UserError(f"the volume is too small for inference: {tuple(image.shape[-3:])} voxels")
    if not torch.isfinite(image).all():
        raise UserError("the input volume contains NaN or infinite values")
    if not 0.0 <= overlap < 1.0:
        raise UserError(f"overlap must be in [0, 1), got {overlap}")
    roi = tuple(int(r) for r in roi)
    img = image.to(device=device, dtype=torch.float32)
    img = _pad_to_roi(img, roi)
    _, nx, ny, nz = img.shape
    windows = window_grid((nx, ny, nz), roi, overlap)
    weight = importance_map(roi, mode, sigma_scale, device)
    rx, ry, rz = roi
    acc: torch.Tensor | None = None
    wsum: torch.Tensor | None = None
    base = 0  # first padded z index still held by the accumulator
    model.eval()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed window shape: let cuDNN pick the fastest conv kernels
    with torch.inference_mode(), autocast_context(device, amp):
        for done, batch in _chunks(windows, max(1, int(sw_batch_size))):
            if cancel is not None and cancel():
                raise Cancelled("inference cancelled")
            x = torch.stack([img[:, w.x:w.x + rx, w.y:w.y + ry, w.z:w.z + rz] for w in batch])
            pred = model(x)
            if isinstance(pred, (tuple, list)):
                pred = pred[0]
            top = max(w.z for w in batch) + rz
            if acc is None:
                acc = torch.zeros((pred.shape[1], nx, ny, top - base), dtype=torch.float32, device=device)
                wsum = torch.zeros((nx, ny, top - base), dtype=torch.float32, device=device) if need_weight else None
            elif base + acc.shape[-1] < top:  # grow along z (old storage is released)
                extra = top - base - acc.shape[-1]
                acc = torch.cat([acc, acc.new_zeros((*acc.shape[:-1], extra))], dim=-1)
                if wsum is not None:
                    wsum = torch.cat([wsum, wsum.new_zeros((*wsum.shape[:-1], extra))], dim=-1)
            for i, w in enumerate(batch):
                z0 = w.z - base
                acc[:, w.x:w.x + rx, w.y:w.y + ry, z0:z0 + rz].add_(pred[i].float() * weight)
                if wsum is not None:
                    wsum[w.x:w.x + rx, w.y:w.y + ry, z0:z0 + rz].add_(weight)
            del pred, x
            ready = windows[done].z if done < len(windows) else nz
            if ready > base:
                k = ready - base
                finalize(acc[..., :k], None if wsum is None else wsum[..., :k], base, ready)
                acc = acc[..., k:]
                wsum = None if wsum is None else wsum[..., k:]
                base = ready
            if progress is not None:
                progress(done, len(windows))
    return nx, ny, nz


def _crop_slices(pads: list[tuple[int, int]], shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(a, int(s) - b) for (a, b), s in zip(pads, shape, strict=True))


def sliding_window_labels(model: torch.nn.Module, image: torch.Tensor, roi_size: Sequence[int],
                          overlap: float = 0.5, mode: str = "gaussian", sw_batch_size: int = 4,
                          device: torch.device | str = "cpu", amp: str = "auto",
                          channel_values: Sequence[int] | None = None, sigma_scale: float = 0.125,
                          progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> torch.Tensor:
    """Label map (X, Y, Z) on the CPU (uint8, or int16 for values > 255); argmax happens on ``device``.

    ``image`` is (C, X, Y, Z) or (1, C, X, Y, Z); ``channel_values`` maps output channel i to its label value
    (default: the channel index).
    """
    device = torch.device(device)
    roi = tuple(int(r) for r in roi_size)
    out_dtype = torch.uint8 if max(channel_values or [255]) <= 255 else torch.int16
    lut = None if channel_values is None else torch.as_tensor(list(channel_values), device=device).to(out_dtype)
    shape = image.shape[-3:]
    padded = [max(int(s), int(r)) for s, r in zip(shape, roi, strict=True)]
    out = torch.zeros(padded, dtype=out_dtype, device=device)

    def finalize(acc: torch.Tensor, _w: torch.Tensor | None, z0: int, z1: int) -> None:
        idx = acc.argmax(dim=0)
        out[..., z0:z1] = lut[idx] if lut is not None else idx.to(out_dtype)

    _run(model, image, roi, overlap, mode, sw_batch_size, device, amp, sigma_scale, finalize, False, progress,
         cancel)
    return out[_crop_slices(_pad_amounts(shape, roi), padded)].cpu()


def sliding_window_scores(model: torch.nn.Module, image: torch.Tensor, roi_size: Sequence[int],
                          overlap: float = 0.5, mode: str = "gaussian", sw_batch_size: int = 4,
                          device: torch.device | str = "cpu", amp: str = "auto",
                          out_dtype: torch.dtype = torch.float16, sigma_scale: float = 0.125,
                          progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                          out_device: torch.device | str = "cpu") -> torch.Tensor:
    """Blended class scores (C, X, Y, Z) in ``out_dtype`` on ``out_device`` (what MONAI returns, half the memory).

    Use this when the scores themselves are needed (resampling scores back to the input grid, probabilities);
    :func:`sliding_window_labels` is cheaper when only labels are wanted. ``out_device=device`` keeps the scores
    on the GPU for :func:`vocoslicer.infer.resample.scores_to_reference_torch`.
    """
    device = torch.device(device)
    out_dev = torch.device(out_device)
    pinned = device.type == "cuda" and out_dev.type == "cpu"
    roi = tuple(int(r) for r in roi_size)
    shape = image.shape[-3:]
    padded = [max(int(s), int(r)) for s, r in zip(shape, roi, strict=True)]
    holder: dict[str, torch.Tensor] = {}

    def finalize(acc: torch.Tensor, wsum: torch.Tensor | None, z0: int, z1: int) -> None:
        if "out" not in holder:
            holder["out"] = torch.empty((acc.shape[0], *padded), dtype=out_dtype, device=out_dev, pin_memory=pinned)
        assert wsum is not None
        holder["out"][..., z0:z1].copy_((acc / wsum).to(out_dtype), non_blocking=pinned)

    _run(model, image, roi, overlap, mode, sw_batch_size, device, amp, sigma_scale, finalize, True, progress,
         cancel)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return holder["out"][(slice(None), *_crop_slices(_pad_amounts(shape, roi), padded))]


def count_windows(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """Number of windows a volume needs (after padding to the window size)."""
    padded = [max(int(s), int(r)) for s, r in zip(shape, roi, strict=True)]
    return math.prod(len(window_starts(s, int(r), overlap)) for s, r in zip(padded, roi, strict=True))


def _progress_events(events: EventSink, stage: str) -> ProgressFn:
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - last[0] >= 0.25:
            last[0] = now
            events.progress(done, total, stage=stage)

    return report


WHOLE_VOLUME_MAX_VOXELS = 160**3


def whole_volume_roi(shape: Sequence[int], roi: Sequence[int], overlap: float,
                     max_voxels: int = WHOLE_VOLUME_MAX_VOXELS) -> tuple[int, ...]:
    """One window covering the volume (each side rounded up to a multiple of 32, as SwinUNETR requires) when it is
    at most ``max_voxels`` and less work than the tiling; else ``roi`` unchanged.

    Swin attention is local (7³ token windows), so a larger input is the same computation with more context: at
    3 mm a 512×512×300 CT becomes ~120×120×100 voxels, i.e. one 128³ window instead of eight 96³ ones (3.4× less
    work).
    """
    cover = [max(32, -(-int(s) // 32) * 32) for s in shape]
    if max(cover) == 32:  # all sides 32: the deepest SwinUNETR stage would be 1×1×1 and instance norm fails
        cover[int(np.argmax(shape))] = 64
    cover = tuple(cover)
    tiled = count_windows(shape, roi, overlap) * math.prod(int(r) for r in roi)
    if math.prod(cover) <= max_voxels and math.prod(cover) < tiled:
        return cover
    return tuple(int(r) for r in roi)


def segment_prepared(model: torch.nn.Module, tensor: torch.Tensor, grid: Any, reference: Any,
                     channel_values: Sequence[int], roi: Sequence[int], overlap: float, mode: str,
                     sw_batch_size: int, device: torch.device, events: EventSink = NULL_SINK,
                     smooth: bool | None = None, cancel: CancelFn | None = None, whole_volume: bool = False,
                     runtime: str = "eager", model_key: str | None = None) -> Any:
    """Model-grid input (from ``infer.preprocess.prepare``) → label image on ``reference``'s exact grid.

    ``smooth`` (default: on CUDA) keeps the blended scores on the device and resamples them trilinearly onto the
    input grid before the argmax (:func:`~vocoslicer.infer.resample.scores_to_reference_torch`); otherwise
    the argmax happens on the model grid and the uint8 labels are resampled nearest-neighbour (the official
    ``Invertd(nearest_interp=True)`` behaviour, and the cheap choice on a CPU). CUDA out-of-memory retries with
    fewer windows, then on the CPU; GPU memory is released afterwards. On the CPU one window per batch is used:
    batching brings no speed there, only memory. ``whole_volume`` (meant for ``--fast``) runs one window covering
    the whole (small) volume when that is less work than the tiling: see :func:`whole_volume_roi`. ``runtime``
    (``auto``/``eager``/a name of :mod:`vocoslicer.infer.runtime`) runs the CPU windows through a compiled graph
    cached per ``model_key`` (the bundle's weights sha256) and window shape, falling back to eager on failure.
    """
    from vocoslicer.infer.oom import device_job, run_with_oom_fallback
    from vocoslicer.infer.resample import labels_to_reference, scores_to_reference_torch
    from vocoslicer.infer.runtime import MAX_WINDOW_VOXELS, runtime_model, will_compile

    use_smooth = device.type == "cuda" if smooth is None else bool(smooth)
    enable_fast_attention(model)
    if whole_volume:
        compiled = will_compile(model, device, runtime)  # a compiled runtime wants smaller windows
        roi = whole_volume_roi(tensor.shape[-3:], roi, overlap,
                               MAX_WINDOW_VOXELS if compiled else WHOLE_VOLUME_MAX_VOXELS)
    report = _progress_events(events, "sliding-window inference")

    def fn(dev: torch.device, bs: int) -> Any:
        net = runtime_model(model.to(dev), dev, runtime, model_key, events=events)
        if dev.type != "cuda":
            bs = 1
        if use_smooth:
            scores = sliding_window_scores(net, tensor, roi, overlap=overlap, mode=mode, sw_batch_size=bs,
                                           device=dev, progress=report, cancel=cancel, out_device=dev)
            events.progress(1, 1, stage="resampling to the input grid")
            return scores_to_reference_torch(scores, grid, reference, list(channel_values),
                                             slab=64 if dev.type == "cuda" else 8)
        labels = sliding_window_labels(net, tensor, roi, overlap=overlap, mode=mode, sw_batch_size=bs, device=dev,
                                       channel_values=channel_values, progress=report, cancel=cancel)
        events.progress(1, 1, stage="resampling to the input grid")
        return labels_to_reference(labels.numpy(), grid, reference)

    with device_job(device):
        label, _, _ = run_with_oom_fallback(fn, device, sw_batch_size, events)
    return label
