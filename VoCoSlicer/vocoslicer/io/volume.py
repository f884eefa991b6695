"""Read and write 3D volumes with SimpleITK, validating them at the boundary.

Everything downstream (resampling, inference, cohort) trusts that a volume coming out of :func:`read_image` is a
3D scalar image with finite voxels and positive spacing, and that :func:`write_image` never leaves a partial
file. Problems are reported as one-line :class:`~vocoslicer.errors.UserError` naming the file.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from vocoslicer.errors import UserError
from vocoslicer.io.atomic import atomic_path
from vocoslicer.io.dicom import DicomSeries, first_line, list_dicom_series, read_dicom_folder  # noqa: F401
from vocoslicer.io.native import native_output_to_log

VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".seg.nrrd")
_WRITE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".seg.nrrd")
_COMPLEX = (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64)


def _ext(path: Path) -> str:
    name = path.name.lower()
    for ext in sorted(VOLUME_EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    return path.suffix.lower()


def validate_image(img: sitk.Image, source: str, allow_nan: bool = False) -> sitk.Image:
    """Check that ``img`` is a usable 3D scalar volume; return it (squeezing a trailing singleton 4th axis)."""
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
    if img.GetDimension() != 3:
        raise UserError(f"{source}: expected a 3D image, got a {img.GetDimension()}D image of size {img.GetSize()}")
    if img.GetPixelID() in _COMPLEX:
        raise UserError(f"{source}: the voxels are complex numbers (an MR phase/k-space image?); expected a "
                        "real-valued CT volume")
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
        img = read_dicom_folder(p, series_uid)
    else:
        if p.stat().st_size == 0:
            raise UserError(f"{p}: the file is empty")
        if _ext(p) in (".nii", ".nii.gz"):
            check_nifti_file(p)  # before ITK: niftilib prints and "repairs" what it finds wrong
        with native_output_to_log("ITK") as captured:
            try:
                reader = sitk.ImageFileReader()
                reader.SetFileName(str(p))
                img = reader.Execute()
            except RuntimeError as exc:
                err: BaseException | None = exc
            else:
                err = None
        if err is not None:
            raise UserError(f"{p}: cannot read image ({_read_failure(err, captured.text)})") from None
    if validate:
        img = validate_image(img, str(p))
        if _ext(p) in (".nii", ".nii.gz") and img.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
            _check_nifti_nan(p)
    return img


def _read_failure(exc: BaseException, native: str) -> str:
    """Why a read failed, in words: MetaIO says it on stderr only, ITK's exception then blames errno."""
    m = re.search(r"data not read completely\s*ideal\s*=\s*(\d+)\s*:\s*actual\s*=\s*(\d+)", native)
    if m:
        return (f"the header describes {int(m.group(1)):,} bytes of voxel data but the file holds only "
                f"{int(m.group(2)):,}: truncated, or a wrong header")
    for line in str(exc).splitlines():
        line = line.strip()
        if line.upper().startswith("ITK ERROR:"):  # "ITK ERROR: MetaImageIO(0x...): File cannot be read: ..."
            return re.sub(r"^ITK ERROR:\s*\w+\(0x[0-9a-fA-F]+\):\s*", "", line, flags=re.IGNORECASE)
    return first_line(exc)


def check_nifti_file(p: Path) -> None:
    """Refuse a NIfTI file whose raw header or data is broken, before ITK papers over it.

    ITK replaces a zero, negative or NaN ``pixdim`` by 1 mm (with WARNING lines) and reads a truncated
    ``.nii.gz`` as if the missing voxels were there; nibabel sees both. The data length is checked by
    decompressing once (the only way: a truncated gzip stream has no trustworthy length field).
    """
    try:
        hdr = _raw_nifti_header(p)
        dims = [int(d) for d in hdr["dim"][1:1 + int(hdr["dim"][0])]]
        pixdim = [float(v) for v in hdr["pixdim"][1:1 + min(len(dims), 3)]]
        offset, bitpix = max(int(hdr.get_data_offset()), int(hdr["vox_offset"])), int(hdr["bitpix"])
    except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds on a bad header
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        reason = reason.replace(f"File {p} ", "").replace(str(p), "")
        raise UserError(f"{p}: cannot read image (not a readable NIfTI file: {reason})") from None
    if not all(math.isfinite(v) and v > 0 for v in pixdim):
        raise UserError(f"{p}: invalid voxel spacing {tuple(pixdim)} in the NIfTI header (pixdim must be finite "
                        "and > 0)")
    if not dims or min(dims) < 1 or bitpix <= 0:
        raise UserError(f"{p}: invalid NIfTI header (dimensions {dims}, {bitpix} bits per voxel)")
    expected = offset + math.prod(dims) * bitpix // 8
    actual = _data_length(p, expected)
    if actual < expected:
        raise UserError(f"{p}: truncated file: the header describes {'x'.join(map(str, dims))} voxels "
                        f"({expected:,} bytes) but the file holds {actual:,} (an interrupted copy or download?)")


def _raw_nifti_header(p: Path):  # noqa: ANN202 - a nibabel Nifti1Header or Nifti2Header
    """The header exactly as stored: ``nib.load`` "fixes" a zero or negative pixdim (and logs about it)."""
    import nibabel as nib

    opener = gzip.open if p.name.lower().endswith(".gz") else open
    with opener(p, "rb") as fh:
        head = fh.read(540)
    if len(head) < 348:
        raise ValueError(f"only {len(head)} header bytes")
    size_le, size_be = struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0]
    cls = nib.Nifti2Header if 540 in (size_le, size_be) else nib.Nifti1Header
    return cls.from_fileobj(io.BytesIO(head), check=False)


def _data_length(p: Path, wanted: int) -> int:
    """Bytes of (decompressed) content, counted up to ``wanted``; a stream that just stops counts what it held."""
    if not p.name.lower().endswith(".gz"):
        return p.stat().st_size
    total = 0
    try:
        with p.open("rb") as fh:
            dec = zlib.decompressobj(16 + zlib.MAX_WBITS)
            while total < wanted:
                chunk = fh.read(1 << 20)
                if not chunk:
                    break
                while chunk and total < wanted:
                    total += len(dec.decompress(chunk))
                    chunk = b""
                    if dec.eof and dec.unused_data:  # a multi-member gzip file: the next member follows
                        chunk, dec = dec.unused_data, zlib.decompressobj(16 + zlib.MAX_WBITS)
    except (OSError, zlib.error) as exc:
        raise UserError(f"{p}: corrupt compressed data ({exc})") from None
    return total


def _check_nifti_nan(p: Path) -> None:
    """ITK's NIfTI reader turns NaN voxels into 0 (water, in HU) without a word; look at the raw data instead."""
    import nibabel as nib
    from nibabel.imageglobals import LoggingOutputSuppressor

    with LoggingOutputSuppressor():  # the header was checked; nibabel's own repairs must not reach stderr
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
    try:
        with atomic_path(p) as tmp, native_output_to_log("ITK"):
            sitk.WriteImage(img, str(tmp), useCompression=compress)
    except OSError as exc:
        raise UserError(f"{p}: cannot write the file ({exc.strerror or exc})") from None
    except RuntimeError as exc:
        raise UserError(f"{p}: cannot write the file ({first_line(exc)})") from None
    return p


def check_output_path(output: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]] = (),
                      sidecars: Sequence[str | os.PathLike[str]] = (),
                      extensions: Sequence[str] = _WRITE_EXTENSIONS) -> Path:
    """Refuse an output that cannot or must not be written, before any work is done.

    Checked: the extension, that the output is not a folder and is none of ``inputs`` (a segmentation written
    over its CT destroys the CT), that the folder it goes into exists as a folder (or can be created) and is
    writable, and that no sidecar (the ``.labels.csv``) is a folder or an input.
    """
    p = Path(output).expanduser()
    if p.is_dir():
        raise UserError(f"{p}: is a folder; give an output file name such as {p / ('segmentation' + extensions[0])}")
    for target in (p, *(Path(s) for s in sidecars)):
        for inp in inputs:
            if _same_file(target, Path(inp).expanduser()):
                raise UserError(f"{target}: is the input; choose another output name (it would be overwritten)")
    ext = _ext(p)
    if ext not in extensions:
        raise UserError(f"{p}: unsupported output format {ext or '(none)'}; use one of {', '.join(extensions)}")
    for side in sidecars:
        if Path(side).is_dir():
            raise UserError(f"{side}: is a folder, but the table that goes with {p.name} must be written there; "
                            "remove or rename it")
    parent = p.parent if str(p.parent) else Path(".")
    anc = parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise UserError(f"{p}: cannot create the output folder: {anc} is a file")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise UserError(f"{p}: the folder {anc} is not writable")
    return p


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


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
