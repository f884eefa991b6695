"""Degree of anisotropy (DA) and a batch sampler that keeps one DA per batch (PUMIT, spec §1.2, §6.2).

All spacings here are **depth first** ``(s_z, s_y, s_x)``, like the (D, H, W) arrays. A SAC network's token grid
depends on the DA, so crops of different DA have different voxel shapes but the same token grid; grouping crops by
DA makes every batch stackable and lets mixed-spacing data (2D photos, thick-slice MR, isotropic CT) train together.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vocoslicer.data.sources import IMAGE_2D_EXTENSIONS, Source, find_sources

__all__ = ["IMAGE_2D_EXTENSIONS", "DACropDataset", "NativePreprocess", "SameDABatchSampler", "VolumeItem",
           "collate_same_da", "crop_shape", "degree_of_anisotropy", "depth_first", "find_inputs", "load_volume_array",
           "prepare_volumes", "token_grid"]

TWO_D_DEPTH_SPACING = 1e8  # a 2D image is one slice "with sufficiently large thickness"


def degree_of_anisotropy(spacing_zyx: Sequence[float], zoom_z: float = 1.0, zoom_x: float = 1.0,
                         stride: int | None = 16) -> int:
    """DA = floor(log2 r), r = clip(s_z*zoom_z / (min(s_y, s_x)*zoom_x), 1, 2*stride).

    ``stride=None`` drops the upper clip (the official validation path). Floor, not round: 5 mm slices with
    0.8 mm pixels (r = 6.25) give DA 2.
    """
    s_z, s_y, s_x = (float(v) for v in spacing_zyx)
    if min(s_z, s_y, s_x) <= 0 or not all(math.isfinite(v) for v in (s_z, s_y, s_x)):
        raise ValueError(f"spacing must be positive and finite, got {tuple(spacing_zyx)}")
    r = s_z * zoom_z / (min(s_y, s_x) * zoom_x)
    r = max(r, 1.0) if stride is None else min(max(r, 1.0), 2.0 * stride)
    return int(r).bit_length() - 1


def crop_shape(da: int, tokens_z: int, tokens_xy: int, stride: int = 16) -> tuple[int, int, int]:
    """Voxel crop (D, H, W) that a SAC network of total in-plane stride ``stride`` maps to (tz, txy, txy) tokens.

    Depth per token is ``max(stride >> DA, 1)``; when 2^DA > stride (2D images) the crop is one slice.
    """
    dz = max(stride >> da, 1)
    tz = 1 if (1 << da) > stride else tokens_z
    return tz * dz, tokens_xy * stride, tokens_xy * stride


def token_grid(crop: Sequence[int], da: int, stride: int = 16) -> tuple[int, int, int]:
    """Token grid of a crop under the SAC rules (inverse of :func:`crop_shape`)."""
    dz = max(stride >> da, 1)
    return crop[0] // dz, crop[1] // stride, crop[2] // stride


def depth_first(array: np.ndarray, spacing_zyx: Sequence[float]) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Move the coarsest axis first when it is strictly coarser than the two others (thick slices = depth)."""
    sp = [float(v) for v in spacing_zyx]
    axis = int(np.argmax(sp))
    others = [sp[i] for i in range(3) if i != axis]
    if axis == 0 or sp[axis] <= max(others):
        return array, (sp[0], sp[1], sp[2])
    order = [axis] + [i for i in range(3) if i != axis]
    lead = array.ndim - 3
    arr = np.transpose(array, list(range(lead)) + [lead + i for i in order])
    return arr, (sp[order[0]], sp[order[1]], sp[order[2]])


@dataclass(frozen=True)
class CropRequest:
    """One sampled crop: which item, its DA, the augmentation zooms and the voxel crop size."""

    index: int
    da: int
    zoom_z: float
    zoom_x: float
    shape: tuple[int, int, int]


class SameDABatchSampler:
    """Yields batches (lists of :class:`CropRequest`) whose crops all share one DA.

    Items are drawn by weight, each gets random zooms (σ_x ~ U(0.75, min(min(H,W)/(stride*tx), 2)) w.p. ``p_zoom_x``;
    σ_z ~ U(0.8, 1.25) w.p. ``p_zoom_z`` only for near-isotropic items), its DA and crop size, and goes into a
    bucket keyed by DA; a full bucket becomes a batch. All ranks draw the same stream and take batches
    round-robin, so distributed runs need no communication; ``start_batch`` skips already-consumed batches on resume.
    """

    def __init__(self, shapes: Sequence[Sequence[int]], spacings: Sequence[Sequence[float]], batch_size: int,
                 tokens_z: int, tokens_xy: int, stride: int = 16, weights: Sequence[float] | None = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1, zoom: bool = True,
                 p_zoom_x: float = 0.5, p_zoom_z: float = 0.3, isotropic_th: float = 1.5) -> None:
        if len(shapes) != len(spacings) or not shapes:
            raise ValueError("need one shape and one spacing per item, and at least one item")
        self.shapes = [tuple(int(v) for v in s[-3:]) for s in shapes]
        self.spacings = [tuple(float(v) for v in s) for s in spacings]
        self.batch_size = int(batch_size)
        self.tokens_z, self.tokens_xy, self.stride = tokens_z, tokens_xy, stride
        w = np.ones(len(shapes)) if weights is None else np.asarray(weights, dtype=np.float64)
        self.p = w / w.sum()
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.zoom, self.p_zoom_x, self.p_zoom_z, self.isotropic_th = zoom, p_zoom_x, p_zoom_z, isotropic_th
        self.start_batch = 0

    def _request(self, rng: np.random.Generator, index: int) -> CropRequest:
        d, h, w = self.shapes[index]
        s_z, s_y, s_x = self.spacings[index]
        zoom_x = zoom_z = 1.0
        if self.zoom:
            hi = min(min(h, w) / (self.stride * self.tokens_xy), 2.0)
            if hi > 0.75 and rng.random() < self.p_zoom_x:
                zoom_x = float(rng.uniform(0.75, hi))
            if s_z <= self.isotropic_th * min(s_y, s_x) and rng.random() < self.p_zoom_z:
                zoom_z = float(rng.uniform(0.8, 1.25))
        da = degree_of_anisotropy((s_z, s_y, s_x), zoom_z, zoom_x, self.stride)
        return CropRequest(index, da, zoom_z, zoom_x, crop_shape(da, self.tokens_z, self.tokens_xy, self.stride))

    def batches(self) -> Iterator[list[CropRequest]]:
        """Endless stream of this rank's same-DA batches (deterministic in ``seed``)."""
        rng = np.random.default_rng(self.seed)
        buckets: dict[int, list[CropRequest]] = {}
        produced = 0
        while True:
            for index in rng.choice(len(self.p), size=1024, p=self.p):
                req = self._request(rng, int(index))
                bucket = buckets.setdefault(req.da, [])
                bucket.append(req)
                if len(bucket) < self.batch_size:
                    continue
                buckets[req.da] = []
                if produced >= self.start_batch * self.world_size and produced % self.world_size == self.rank:
                    yield bucket
                produced += 1

    def __iter__(self) -> Iterator[list[CropRequest]]:
        return self.batches()


# ---------------------------------------------------------------------------------------------------------------
# Volumes on disk -> cached depth-first float16 arrays -> same-DA crops

@dataclass(frozen=True)
class VolumeItem:
    """One training image: its cached array (C, D, H, W) float16 in [0, 1] at ``array_path`` (None when the cache
    limit streams it: preprocessed from ``src`` whenever sampled), depth-first spacing, source name."""

    array_path: str | None
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    source: str
    src: Source | None = None


def _to_unit_range(arr: np.ndarray, is_8bit: bool) -> np.ndarray:
    """8-bit images /255; others clip-scale to [p0.5, p99.5] of the voxels above the minimum (official rule)."""
    arr = arr.astype(np.float32)
    if is_8bit:
        return arr / 255.0
    above = arr[arr > arr.min()]
    if above.size == 0:
        return np.zeros_like(arr)
    lo, hi = np.percentile(above, (0.5, 99.5))
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0)


def load_volume_array(path: str | Path, series_uid: str | None = None) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read a volume, DICOM folder or 2D image as (C, D, H, W) float32 in [0, 1] and depth-first spacing.

    2D images become one slice with depth spacing 1e8 (so their DA is the maximum); colour channels are kept.
    """
    import SimpleITK as sitk

    from vocoslicer.errors import UserError
    from vocoslicer.io.volume import read_image

    p = Path(path)
    img = read_image(p, series_uid=series_uid, validate=False)
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
    arr = sitk.GetArrayFromImage(img)  # (z, y, x[, c]) or (y, x[, c])
    comps = img.GetNumberOfComponentsPerPixel()
    if comps == 1:
        arr = arr[..., None]
    if img.GetDimension() == 2:
        arr = arr[None]
        sx, sy = img.GetSpacing()
        spacing = (TWO_D_DEPTH_SPACING, float(sy), float(sx))
    elif img.GetDimension() == 3:
        sx, sy, sz = img.GetSpacing()
        spacing = (float(sz), float(sy), float(sx))
    else:
        raise UserError(f"{p}: expected a 2D or 3D image, got {img.GetDimension()}D")
    if comps == 4:  # RGBA -> RGB
        arr = arr[..., :3]
    is_8bit = img.GetPixelID() in (sitk.sitkUInt8, sitk.sitkVectorUInt8)
    chw = np.moveaxis(_to_unit_range(arr, is_8bit), -1, 0)  # (C, D, H, W)
    if chw.shape[1] > 1:
        chw, spacing = depth_first(chw, spacing)
    return np.ascontiguousarray(chw), spacing


@dataclass(frozen=True)
class NativePreprocess:
    """PUMIT's preprocessor for the shared cache (:mod:`vocoslicer.data.cache`): native spacing, depth first.

    No resampling and no HU window, unlike VoCo: SAC networks take any spacing (a crop's DA comes from the stored
    spacing) and PUMIT mixes CT, MR and photos. Arrays are (C, D, H, W) float16 in [0, 1]; ``layout`` is part of
    the cache key, so entries never mix with another recipe's arrays in a shared cache folder.
    """

    layout: str = "CDHW-depth-first-float16"

    def __call__(self, source: Source) -> tuple[np.ndarray, dict]:
        """(array, {"spacing": depth-first spacing}) of ``source``."""
        arr, spacing = load_volume_array(source.path, source.series_uid)
        return arr.astype(np.float16), {"spacing": list(spacing)}


def find_inputs(paths: Sequence[str | Path | Source]) -> list[Source]:
    """PUMIT's inputs: the shared finder (label maps skipped) with 2D images added to the volume types."""
    from vocoslicer.io.volume import VOLUME_EXTENSIONS

    out: list[Source] = []
    for p in paths:
        out.extend([p] if isinstance(p, Source) else find_sources([p], VOLUME_EXTENSIONS + IMAGE_2D_EXTENSIONS))
    return list(dict.fromkeys(out))  # overlapping folders: each image once


def prepare_volumes(paths: Sequence[str | Path | Source], cache_dir: str | Path, events: Any = None,
                    run_dir: str | Path | None = None, limit_bytes: int | None = None) -> list[VolumeItem]:
    """Cache every input once in the shared pretraining cache at ``cache_dir`` (lock, bad-volume memory, LRU limit
    then streaming) and list the usable ones; ``paths`` are folders/files (see :func:`find_inputs`) or sources."""
    from vocoslicer.data.cache import VolumeCache, prepare_entries
    from vocoslicer.errors import UserError

    sources = find_inputs(paths)
    if not sources:
        raise UserError(f"{', '.join(str(f) for f in paths)}: no images found (.nii.gz, .nrrd, .mha, DICOM, .png)")
    cache = VolumeCache(cache_dir, NativePreprocess(), limit_bytes)
    entries = prepare_entries(sources, cache, events, run_dir)
    if not entries:
        raise UserError(f"none of the {len(sources)} images can be read (see the warnings)")
    return [VolumeItem(str(cache.root / e.file) if e.file else None, (e.shape[1], e.shape[2], e.shape[3]),
                       (float(e.meta["spacing"][0]), float(e.meta["spacing"][1]), float(e.meta["spacing"][2])),
                       e.source.label(), e.source) for e in entries]


class DACropDataset:
    """Map-style dataset indexed by :class:`CropRequest`: a crop of the requested shape, zoom and light augmentation.

    Returns ``{"image": (channels, D, H, W) float32 in [0, 1], "aniso_d": DA}``; grey images are replicated to
    ``channels``.
    """

    def __init__(self, items: Sequence[VolumeItem], channels: int = 3, augment: bool = True) -> None:
        from vocoslicer.data.cache import MappedArrays

        self.items, self.channels, self.augment = list(items), channels, augment
        self._maps = MappedArrays()  # per process (workers open their own memory maps)

    def __len__(self) -> int:
        return len(self.items)

    def _array(self, i: int) -> np.ndarray:
        item = self.items[i]
        if item.array_path is None:  # streamed (cache limit): preprocessed now, not kept
            if item.src is None:
                raise ValueError(f"{item.source}: neither a cached array nor a source to preprocess")
            return NativePreprocess()(item.src)[0]
        return self._maps.get(item.array_path)

    def __getitem__(self, req: CropRequest) -> dict:
        import torch
        import torch.nn.functional as F

        arr = self._array(req.index)
        full = arr.shape[1:]
        region = [max(1, round(s * z)) for s, z in zip(req.shape, (req.zoom_z, req.zoom_x, req.zoom_x), strict=True)]
        starts = [int(torch.randint(0, max(n - r, 0) + 1, ()).item()) for n, r in zip(full, region, strict=True)]
        sl = tuple(slice(s, s + r) for s, r in zip(starts, region, strict=True))
        x = torch.from_numpy(np.asarray(arr[(slice(None), *sl)], dtype=np.float32))
        pad = [r - n for n, r in zip(x.shape[1:], region, strict=True)]
        if any(pad):
            x = F.pad(x, [v for p in reversed(pad) for v in (p // 2, p - p // 2)])
        if tuple(x.shape[1:]) != tuple(req.shape):
            x = F.interpolate(x[None], size=req.shape, mode="trilinear", align_corners=False)[0]
        if self.augment:
            x = _augment(x)
        if x.shape[0] == 1 and self.channels > 1:
            x = x.expand(self.channels, -1, -1, -1)
        elif x.shape[0] != self.channels:
            x = x.mean(0, keepdim=True).expand(self.channels, -1, -1, -1)
        return {"image": x.contiguous(), "aniso_d": req.da}


def _augment(x):  # noqa: ANN001, ANN202 - torch tensor in, tensor out (torch imported lazily)
    """Flips (p 0.5 per axis), intensity scale ±25 % (p 0.15), contrast (p 0.15), (inverted) gamma (p 0.3)."""
    import torch

    for axis in (1, 2, 3):
        if x.shape[axis] > 1 and torch.rand(()) < 0.5:
            x = x.flip(axis)
    if torch.rand(()) < 0.15:
        x = x * float(torch.empty(()).uniform_(0.75, 1.25))
    x = x.clamp(0, 1)
    if torch.rand(()) < 0.15:
        mean = x.mean()
        x = ((x - mean) * float(torch.empty(()).uniform_(0.75, 1.25)) + mean).clamp(0, 1)
    if torch.rand(()) < 0.3:
        gamma = float(torch.empty(()).uniform_(0.7, 1.5))
        x = 1 - (1 - x).pow(gamma) if torch.rand(()) < 0.5 else x.pow(gamma)
    return x


def collate_same_da(samples: Sequence[dict]) -> dict:
    """Stack a same-DA batch; ``aniso_d`` travels as a plain int."""
    import torch

    if len({s["aniso_d"] for s in samples}) != 1:
        raise ValueError("a batch mixes degrees of anisotropy")
    return {"image": torch.stack([s["image"] for s in samples]), "aniso_d": samples[0]["aniso_d"]}
