"""Synthetic abdominal CT phantoms: the project's test, demo and benchmark data (no real CT can ship with it).

A phantom is a CT-like volume in Hounsfield units with a label map of eight structures in anatomically
consistent places (see :mod:`vocoslicer.data.phantom_anatomy`), random shape/size/position per seed, partial
volume at every edge, Gaussian noise, random (anisotropic) spacing and optionally a random axis order/orientation
of the array that leaves the physical anatomy unchanged. Liver (~60 HU) and spleen (~50 HU) overlap in
intensity on purpose: telling them apart needs the geometric context that VoCo pretraining learns.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from vocoslicer.data.phantom_anatomy import paint_anatomy
from vocoslicer.data.phantom_finding import Finding, draw_finding
from vocoslicer.data.phantom_shapes import Canvas
from vocoslicer.errors import UserError
from vocoslicer.io.atomic import atomic_write_json
from vocoslicer.io.volume import write_image
from vocoslicer.labels import Label, LabelTable

_CAT = ("SCT^123037004", "Anatomical Structure")
PHANTOM_LABELS = LabelTable((
    Label(1, "liver", (221, 130, 101), *_CAT, "SCT^10200004", "Liver"),
    Label(2, "spleen", (157, 108, 162), *_CAT, "SCT^78961009", "Spleen"),
    Label(3, "kidney_right", (185, 102, 83), *_CAT, "SCT^9846003", "Right kidney"),
    Label(4, "kidney_left", (244, 214, 49), *_CAT, "SCT^18639004", "Left kidney"),
    Label(5, "aorta", (216, 40, 40), *_CAT, "SCT^15825003", "Aorta"),
    Label(6, "vertebrae", (241, 214, 145), *_CAT),
    Label(7, "stomach", (88, 106, 215), *_CAT, "SCT^69695003", "Stomach"),
    Label(8, "lungs", (128, 174, 128), *_CAT, "SCT^39607008", "Lung"),
))

SLICE_SPACINGS = (0.7, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0)
MIN_SIZE = 16
MAX_VOXELS = 1_500_000_000  # ~6 GB of float32 work memory; beyond that it is a typo, not a phantom
_NOISE_CHUNK = 16  # slices per chunk when adding noise and converting to int16 (keeps the work in cache)


@dataclass
class Phantom:
    """One generated case: CT image (int16 HU), its truth label map on the same grid, the label table, the seed."""

    image: sitk.Image
    label: sitk.Image
    labels: LabelTable
    seed: int
    finding: Finding | None = None  # set when a finding was asked for (even "none"): its truth is written too


def _check_triplet(name: str, value: Sequence[float] | None, integer: bool) -> tuple | None:
    if value is None:
        return None
    try:
        vals = tuple(value)
    except TypeError:
        raise UserError(f"phantom: {name} must be three numbers (x, y, z), got {value!r}") from None
    if len(vals) != 3:
        raise UserError(f"phantom: {name} must be three numbers (x, y, z), got {len(vals)}")
    if integer:
        if any(isinstance(v, bool) or not float(v).is_integer() for v in vals):
            raise UserError(f"phantom: {name} must be whole numbers of voxels, got {vals}")
        ints = tuple(int(v) for v in vals)
        if min(ints) < MIN_SIZE:
            raise UserError(f"phantom: {name} {ints} is too small (at least {MIN_SIZE} voxels per axis)")
        return ints
    floats = tuple(float(v) for v in vals)
    if not all(math.isfinite(v) and v > 0 for v in floats):
        raise UserError(f"phantom: {name} {floats} must be finite and > 0 mm")
    return floats


def generate_phantom(seed: int, spacing: Sequence[float] | None = None, size: Sequence[int] | None = None,
                     random_orientation: bool = False, noise_hu: float | None = None,
                     finding: str | None = None) -> Phantom:
    """Generate the phantom of ``seed`` (bit-identical for the same arguments).

    ``spacing`` (mm) and ``size`` (voxels), both in SimpleITK (x, y, z) order, override the random grid; the grid
    stays centred on the body and voxels outside the body are air. The anatomy depends on the seed only, so the
    same seed at another spacing is the same patient. ``random_orientation`` permutes/flips the array axes and
    sets the direction matrix (and a random origin) so that the anatomy in physical LPS space is unchanged.
    ``finding`` (``none`` | ``splenomegaly`` | ``liver_lesion``) draws a case-level finding with known truth
    (:mod:`vocoslicer.data.phantom_finding`) without changing the rest of the patient.
    """
    sp = _check_triplet("spacing", spacing, integer=False)
    sz = _check_triplet("size", size, integer=True)
    if noise_hu is not None and not (math.isfinite(noise_hu) and noise_hu >= 0):
        raise UserError(f"phantom: noise_hu must be >= 0, got {noise_hu}")
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise UserError(f"phantom: seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    drawn = draw_finding(finding, seed) if finding is not None else None
    rng = np.random.default_rng(seed)
    # grid and orientation draws happen whether or not they are overridden, so the anatomy never depends on them
    pix = round(float(rng.uniform(0.6, 1.0)), 3)
    slice_sp = float(rng.choice(SLICE_SPACINGS))
    fov = (rng.uniform(330, 350), rng.uniform(270, 290), rng.uniform(200, 260))
    perm, flips, shift = rng.permutation(3), rng.integers(0, 2, 3), rng.uniform(-150, 150, 3)
    noise = float(rng.uniform(10, 20)) if noise_hu is None else float(noise_hu)
    noise_seed = int(rng.integers(0, 2**63))
    anatomy_rng = np.random.default_rng(rng.integers(0, 2**63))

    sp = sp or (pix, pix, slice_sp)
    sz = sz or tuple(max(MIN_SIZE, round(f / s)) for f, s in zip(fov, sp, strict=True))
    if math.prod(sz) > MAX_VOXELS:
        raise UserError(f"phantom: grid {sz} has {math.prod(sz)} voxels, more than the {MAX_VOXELS} allowed")
    axes = [((np.arange(n) - (n - 1) / 2.0) * s) for n, s in zip(sz, sp, strict=True)]
    cv = Canvas(axes[0], axes[1], axes[2], sp)
    paint_anatomy(cv, anatomy_rng, drawn)
    image = _finish_hu(cv.img, noise, noise_seed)
    label = cv.lab
    del cv

    origin = np.array([a[0] for a in axes])
    direction = np.eye(3)
    spacing_out = np.asarray(sp, dtype=float)
    if random_orientation:
        image, label, spacing_out, origin, direction = _reorient(image, label, sp, sz, origin, perm, flips)
        origin = origin + shift
    return Phantom(_to_sitk(image, spacing_out, origin, direction), _to_sitk(label, spacing_out, origin, direction),
                   PHANTOM_LABELS, seed, drawn)


def _finish_hu(img: np.ndarray, noise: float, noise_seed: int) -> np.ndarray:
    """Add Gaussian noise and round to int16 HU, chunk by chunk of slices.

    The noise comes from a pool of three slices' worth of samples read at a random offset per slice: drawing
    fresh normals for 80 M voxels would cost more than the whole anatomy, and offset windows of a pool are
    indistinguishable from independent noise for training and for the eye.
    """
    nz, ny, nx = img.shape
    plane = ny * nx
    nrng = np.random.default_rng(noise_seed)
    pool = nrng.standard_normal(3 * plane, dtype=np.float32)
    pool *= np.float32(noise)
    offsets = nrng.integers(0, 2 * plane, nz)
    out = np.empty(img.shape, dtype=np.int16)
    for k0 in range(0, nz, _NOISE_CHUNK):
        k1 = min(nz, k0 + _NOISE_CHUNK)
        chunk = img[k0:k1]
        if noise > 0:
            for k in range(k0, k1):
                chunk[k - k0] += pool[offsets[k]:offsets[k] + plane].reshape(ny, nx)
        chunk += np.float32(0.5)
        np.floor(chunk, out=chunk)
        np.clip(chunk, -1024, 3071, out=chunk)
        out[k0:k1] = chunk
    return out


def _reorient(image: np.ndarray, label: np.ndarray, sp: Sequence[float], sz: Sequence[int], origin: np.ndarray,
              perm: np.ndarray, flips: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Permute/flip the array axes; new ITK axis k is old axis perm[k], reversed when flips[k]."""
    sp_arr = np.asarray(sp, dtype=float)
    new_dir = np.zeros((3, 3))
    new_origin = origin.astype(float).copy()
    for k in range(3):
        j = int(perm[k])
        sign = -1.0 if flips[k] else 1.0
        new_dir[j, k] = sign
        if flips[k]:
            new_origin[j] += (sz[j] - 1) * sp_arr[j]
    # numpy axes are the reverse of ITK axes: new numpy axis (2 - k) is old numpy axis (2 - perm[k])
    np_axes = [2 - int(perm[2 - m]) for m in range(3)]
    flip_np = tuple(2 - k for k in range(3) if flips[k])

    def move(a: np.ndarray) -> np.ndarray:
        b = np.transpose(a, np_axes)
        if flip_np:
            b = np.flip(b, axis=flip_np)
        return np.ascontiguousarray(b)

    return move(image), move(label), sp_arr[perm], new_origin, new_dir


def _to_sitk(arr: np.ndarray, spacing: np.ndarray, origin: np.ndarray, direction: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(o) for o in origin))
    img.SetDirection(tuple(float(d) for d in direction.ravel()))
    return img


def write_phantom(ph: Phantom, out_dir: str | os.PathLike[str], fmt: str = ".nii.gz") -> dict[str, Path]:
    """Write ``phantom_<seed>_ct<fmt>``, ``phantom_<seed>_truth<fmt>`` and ``phantom_labels.csv`` atomically
    (plus ``phantom_<seed>_finding.json``, the case-level truth, when a finding was asked for)."""
    fmt = fmt if fmt.startswith(".") else "." + fmt
    if fmt not in (".nii.gz", ".nii", ".nrrd", ".mha"):
        raise UserError(f"phantom: unsupported format {fmt}; use .nii.gz, .nii, .nrrd or .mha")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    paths = {
        "image": write_image(ph.image, out / f"phantom_{ph.seed}_ct{fmt}"),
        "label": write_image(ph.label, out / f"phantom_{ph.seed}_truth{fmt}"),
        "labels": ph.labels.write_csv(out / "phantom_labels.csv"),
    }
    if ph.finding is not None:
        paths["finding"] = atomic_write_json(out / f"phantom_{ph.seed}_finding.json",
                                             {"seed": ph.seed, **ph.finding.to_dict()})
    return paths
