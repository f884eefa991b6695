"""Read and write 3D volumes with SimpleITK, validating them at the boundary.

Everything downstream (resampling, inference, cohort) trusts that a volume coming out of :func:`read_image` is a
3D scalar image with finite voxels and positive spacing, and that :func:`write_image` never leaves a partial
file. Problems are reported as one-line :class:`~vocoslicer.errors.UserError` naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from vocoslicer.errors import UserError
from vocoslicer.io.atomic import atomic_path

VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".seg.nrrd")
_WRITE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".seg.nrrd")


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series found in a folder."""

    uid: str
    files: tuple[str, ...]
    description: str = ""


def _ext(path: Path) -> str:
    name = path.name.lower()
    for ext in sorted(VOLUME_EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    return path.suffix.lower()


def list_dicom_series(folder: str | os.PathLike[str]) -> list[DicomSeries]:
    """List the DICOM series below ``folder`` (recursively), largest first."""
    folder = Path(folder)
    reader = sitk.ImageSeriesReader()
    uids: set[str] = set()
    dirs = [folder] + [p for p in folder.rglob("*") if p.is_dir()]
    series: list[DicomSeries] = []
    for d in dirs:
        for uid in reader.GetGDCMSeriesIDs(str(d)) or ():
            if uid in uids:
                continue
            files = reader.GetGDCMSeriesFileNames(str(d), uid)
            if not files:
                continue
            uids.add(uid)
            desc = ""
            try:
                fr = sitk.ImageFileReader()
                fr.SetFileName(files[0])
                fr.ReadImageInformation()
                if fr.HasMetaDataKey("0008|103e"):
                    desc = fr.GetMetaData("0008|103e").strip()
            except RuntimeError:
                pass
            series.append(DicomSeries(uid=uid, files=tuple(files), description=desc))
    series.sort(key=lambda s: -len(s.files))
    return series


def _read_dicom_folder(folder: Path, series_uid: str | None) -> sitk.Image:
    series = list_dicom_series(folder)
    if not series:
        if not any(folder.iterdir()):
            raise UserError(f"{folder}: the folder is empty")
        raise UserError(f"{folder}: no DICOM series found in this folder")
    if series_uid is not None:
        chosen = [s for s in series if s.uid == series_uid]
        if not chosen:
            raise UserError(f"{folder}: no series with UID {series_uid}; found: " + ", ".join(s.uid for s in series))
        pick = chosen[0]
    elif len(series) > 1:
        listing = "; ".join(f"{s.uid} ({len(s.files)} files{', ' + s.description if s.description else ''})"
                            for s in series)
        raise UserError(f"{folder}: {len(series)} DICOM series found, choose one with --series UID: {listing}")
    else:
        pick = series[0]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(pick.files))
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise UserError(f"{folder}: cannot read DICOM series {pick.uid}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK messages start with file/line noise; keep the most informative short line
    for ln in lines:
        if ln.lower().startswith(("description:", "itk::error")):
            return ln.split(":", 1)[-1].strip()
    return lines[-1] if lines else type(exc).__name__


def validate_image(img: sitk.Image, source: str, allow_nan: bool = False) -> sitk.Image:
    """Check that ``img`` is a usable 3D scalar volume; return it (squeezing a trailing singleton 4th axis)."""
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
    if img.GetDimension() != 3:
        raise UserError(f"{source}: expected a 3D image, got a {img.GetDimension()}D image of size {img.GetSize()}")
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise UserError(f"{source}: expected a scalar image, got {img.GetNumberOfComponentsPerPixel()} components "
                        "per voxel (colour or vector image)")
    if min(img.GetSize()) < 2:
        raise UserError(f"{source}: expected a 3D image, got size {img.GetSize()} (a 2D slice?)")
    spacing = np.asarray(img.GetSpacing(), dtype=float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise UserError(f"{source}: invalid voxel spacing {tuple(spacing.tolist())} (must be finite and > 0)")
    direction = np.asarray(img.GetDirection(), dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(direction)) or abs(abs(np.linalg.det(direction)) - 1) > 1e-3:
        raise UserError(f"{source}: invalid direction matrix (not orthonormal)")
    if not np.all(np.isfinite(img.GetOrigin())):
        raise UserError(f"{source}: invalid origin {img.GetOrigin()}")
    if not allow_nan and img.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        arr = sitk.GetArrayViewFromImage(img)
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise UserError(f"{source}: {bad} voxels are NaN or infinite")
    return img


def read_image(path: str | os.PathLike[str], series_uid: str | None = None, validate: bool = True) -> sitk.Image:
    """Read a NIfTI/NRRD/MHA file or a DICOM series folder as a validated 3D scalar image."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file or folder")
    if p.is_dir():
        img = _read_dicom_folder(p, series_uid)
    else:
        if p.stat().st_size == 0:
            raise UserError(f"{p}: the file is empty")
        try:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(p))
            img = reader.Execute()
        except RuntimeError as exc:
            raise UserError(f"{p}: cannot read image ({_first_line(exc)})") from None
    if validate:
        img = validate_image(img, str(p))
        if _ext(p) in (".nii", ".nii.gz") and img.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
            _check_nifti_nan(p)
    return img


def _check_nifti_nan(p: Path) -> None:
    """ITK's NIfTI reader turns NaN voxels into 0 (water, in HU) without a word; look at the raw data instead."""
    try:
        import nibabel as nib
    except ImportError:  # pragma: no cover - nibabel is a dependency
        return
    data = np.asanyarray(nib.load(str(p)).dataobj)
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise UserError(f"{p}: {bad} voxels are NaN or infinite")


def write_image(img: sitk.Image, path: str | os.PathLike[str], compress: bool = True) -> Path:
    """Write ``img`` atomically; the format follows the extension (.nii.gz, .nii, .nrrd, .mha, .seg.nrrd)."""
    p = Path(path)
    ext = _ext(p)
    if ext not in _WRITE_EXTENSIONS:
        raise UserError(f"{p}: unsupported output format {ext or '(none)'}; use one of {', '.join(_WRITE_EXTENSIONS)}")
    with atomic_path(p) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=compress)
    return p


@dataclass(frozen=True)
class Geometry:
    """The voxel grid of an image: what must be identical between an input and its segmentation."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    def matches(self, other: Geometry, tol: float = 1e-4) -> bool:
        """True when both grids are the same within ``tol`` (mm for origin/spacing)."""
        return (
            self.size == other.size
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )


def geometry(img: sitk.Image) -> Geometry:
    """Return the grid of ``img``."""
    return Geometry(tuple(img.GetSize()), tuple(img.GetSpacing()), tuple(img.GetOrigin()), tuple(img.GetDirection()))


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    """True when ``a`` and ``b`` share size, spacing, origin and direction."""
    return geometry(a).matches(geometry(b), tol)


def copy_geometry(src: sitk.Image, dst: sitk.Image) -> sitk.Image:
    """Stamp ``src``'s spacing/origin/direction onto ``dst`` (same size) and return it."""
    dst.SetSpacing(src.GetSpacing())
    dst.SetOrigin(src.GetOrigin())
    dst.SetDirection(src.GetDirection())
    return dst


def from_array(arr: np.ndarray, reference: sitk.Image | None = None, spacing: Sequence[float] | None = None
               ) -> sitk.Image:
    """Make an image from a (z, y, x) array on ``reference``'s grid (or with ``spacing``)."""
    img = sitk.GetImageFromArray(arr)
    if reference is not None:
        copy_geometry(reference, img)
    elif spacing is not None:
        img.SetSpacing(tuple(float(s) for s in spacing))
    return img
