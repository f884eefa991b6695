"""Bring any CT onto the grid a model was trained on, and bring predictions back onto the input's exact grid.

The network sees (X, Y, Z) arrays in RAS orientation at the bundle's spacing with its intensity window, which is
what MONAI's LoadImage → Orientation("RAS") → Spacing → ScaleIntensityRange produced for the official VoCo
weights. SimpleITK does the geometry; the way back resamples class scores (not labels) in slabs of the
input grid, so boundaries are smooth and memory stays bounded even for 512×512×N inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from vocoslicer.errors import UserError


@dataclass
class Prepared:
    """The network input and the model-space grid it lives on."""

    tensor: torch.Tensor  # (1, 1, X, Y, Z) float32, RAS, model spacing, intensity-normalised
    grid: sitk.Image  # an image carrying the model-space geometry (size/spacing/origin/direction)
    warnings: list[str]


def orient(img: sitk.Image, code: str = "RAS") -> sitk.Image:
    """Reorder/flip axes so array axis 0 points to code[0] (e.g. patient Right), without resampling."""
    return sitk.DICOMOrient(img, code)


def resample_to_spacing(img: sitk.Image, spacing: Sequence[float], interpolator: int = sitk.sitkLinear,
                        default: float = 0.0) -> sitk.Image:
    """Resample onto the same physical extent at a new spacing (origin kept, like MONAI's Spacing)."""
    old_sp = np.asarray(img.GetSpacing(), dtype=float)
    new_sp = np.asarray(spacing, dtype=float)
    size = np.maximum(np.round(np.asarray(img.GetSize()) * old_sp / new_sp), 1).astype(int)
    return sitk.Resample(img, [int(s) for s in size], sitk.Transform(), interpolator, img.GetOrigin(),
                         [float(s) for s in new_sp], img.GetDirection(), default, img.GetPixelID())


def intensity_window(arr: np.ndarray, cfg: dict[str, Any]) -> np.ndarray:
    """MONAI ScaleIntensityRange semantics: map [a_min, a_max] to [b_min, b_max], optionally clipped."""
    a_min, a_max = float(cfg["a_min"]), float(cfg["a_max"])
    b_min, b_max = float(cfg.get("b_min", 0.0)), float(cfg.get("b_max", 1.0))
    out = (arr.astype(np.float32) - a_min) / (a_max - a_min) * (b_max - b_min) + b_min
    if cfg.get("clip", True):
        np.clip(out, min(b_min, b_max), max(b_min, b_max), out=out)
    return out


def ct_range_warning(arr: np.ndarray) -> str | None:
    """Models here are trained on CT in Hounsfield units; say so when the input clearly is not."""
    lo, hi = np.percentile(arr[:: max(1, arr.shape[0] // 16)], [1, 99])
    if lo > -500 or hi > 5000 or hi < 0:
        return (f"the input intensities (1st-99th percentile {lo:.0f}..{hi:.0f}) do not look like CT in Hounsfield "
                "units; results may be meaningless")
    return None


PREPROCESSING_KEYS = ("orientation", "spacing", "intensity", "pad_value")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_preprocessing(pre: Any, source: str = "--preprocessing", unknown_keys: bool = False) -> None:
    """One-line error for preprocessing settings that would fail (or silently mislead) deep inside a run.

    ``orientation``: three letters, one of R/L, A/P, S/I each; ``spacing``: null or three finite numbers > 0;
    ``intensity``: ``a_min < a_max`` (finite), optional finite ``b_min``/``b_max`` and boolean ``clip``;
    ``pad_value``: a finite number. ``unknown_keys=False`` refuses keys nothing reads (a typo is silent otherwise).
    """
    if not isinstance(pre, dict):
        raise UserError(f"{source}: expected a JSON object, got {type(pre).__name__}")
    extra = sorted(set(pre) - set(PREPROCESSING_KEYS))
    if extra and not unknown_keys:
        raise UserError(f"{source}: unknown key(s) {', '.join(map(repr, extra))}; known: "
                        + ", ".join(PREPROCESSING_KEYS))
    if "orientation" in pre:
        code = pre["orientation"]
        axes = [{"R", "L"}, {"A", "P"}, {"S", "I"}]
        ok = isinstance(code, str) and len(code) == 3 and sorted(
            next((i for i, a in enumerate(axes) if ch in a), -1) for ch in code.upper()) == [0, 1, 2]
        if not ok:
            raise UserError(f"{source}: orientation {code!r} must be three letters, one of R/L, A/P and S/I each "
                            "(e.g. 'RAS')")
    if pre.get("spacing") is not None:
        sp = pre["spacing"]
        if not (isinstance(sp, list) and len(sp) == 3 and all(_finite(v) and v > 0 for v in sp)):
            raise UserError(f"{source}: spacing {sp!r} must be null or three finite numbers > 0 (mm)")
    if "intensity" in pre:
        it = pre["intensity"]
        if not isinstance(it, dict) or not _finite(it.get("a_min")) or not _finite(it.get("a_max")) \
                or not it["a_min"] < it["a_max"]:
            raise UserError(f"{source}: intensity {it!r} needs finite numbers a_min < a_max")
        for key in ("b_min", "b_max"):
            if key in it and not _finite(it[key]):
                raise UserError(f"{source}: intensity {key} {it[key]!r} must be a finite number")
        if "clip" in it and not isinstance(it["clip"], bool):
            raise UserError(f"{source}: intensity clip {it['clip']!r} must be true or false")
    if "pad_value" in pre and not _finite(pre["pad_value"]):
        raise UserError(f"{source}: pad_value {pre['pad_value']!r} must be a finite number")


def prepare(img: sitk.Image, preprocessing: dict[str, Any], spacing: Sequence[float] | None = None) -> Prepared:
    """Orientation → spacing → intensity window; returns the (1,1,X,Y,Z) tensor and its grid."""
    warnings: list[str] = []
    code = str(preprocessing.get("orientation", "RAS"))
    sp = spacing or preprocessing.get("spacing")
    work = sitk.Cast(img, sitk.sitkFloat32)
    work = orient(work, code)
    if sp:
        work = resample_to_spacing(work, sp, sitk.sitkLinear, default=float(preprocessing.get("pad_value", -1024)))
    arr = sitk.GetArrayViewFromImage(work)  # (Z, Y, X)
    if warn := ct_range_warning(np.asarray(arr)):
        warnings.append(warn)
    norm = intensity_window(np.asarray(arr), preprocessing["intensity"])
    tensor = torch.from_numpy(np.ascontiguousarray(norm.transpose(2, 1, 0)))[None, None]
    grid = sitk.Image(work.GetSize(), sitk.sitkUInt8)
    grid.CopyInformation(work)
    return Prepared(tensor=tensor, grid=grid, warnings=warnings)
