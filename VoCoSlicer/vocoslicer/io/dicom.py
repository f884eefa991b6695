"""DICOM series folders: list the series, check that the chosen one is a regular stack, read it.

ITK's series reader stacks whatever GDCM sorted, prints "Non uniform sampling or missing slices detected" on stderr
and carries on with one averaged spacing: a truncated slice (which GDCM silently drops), a duplicated file or a
slice of another orientation becomes a wrong grid without a word. :func:`check_series` reads every slice's header
first and refuses such a series with one line that says exactly which files are wrong.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from vocoslicer.errors import UserError
from vocoslicer.io.native import native_output_to_log

# relative tolerance on the slice spacing: scanners write positions with ~6 decimals; 1% of the spacing is a
# tenth of the smallest real gap (a missing slice doubles it)
SPACING_RTOL = 0.01
ORIENTATION_TOL = 1e-3


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series found in a folder."""

    uid: str
    files: tuple[str, ...]
    description: str = ""

    @property
    def label(self) -> str:
        """How the series is named to the user (an empty UID is said to be empty, not printed as nothing)."""
        return self.uid if self.uid else "(empty SeriesInstanceUID)"


def first_line(exc: BaseException) -> str:
    """The informative line of an ITK exception (its messages start with file/line noise)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if ln.lower().startswith(("description:", "itk::error")):
            return ln.split(":", 1)[-1].strip()
    return lines[-1] if lines else type(exc).__name__


def list_dicom_series(folder: str | os.PathLike[str]) -> list[DicomSeries]:
    """List the DICOM series below ``folder`` (recursively), largest first."""
    folder = Path(folder)
    reader = sitk.ImageSeriesReader()
    uids: set[str] = set()
    dirs = [folder] + [p for p in folder.rglob("*") if p.is_dir()]
    series: list[DicomSeries] = []
    with native_output_to_log("GDCM"):
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


def _is_dicom_file(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _unlisted_dicom_files(series: DicomSeries, others: list[DicomSeries]) -> list[str]:
    """DICOM files next to the series' slices that GDCM left out of every series (truncated, corrupt)."""
    listed = {os.path.normpath(f) for s in [series, *others] for f in s.files}
    dirs = {Path(f).parent for f in series.files}
    out = []
    for d in sorted(dirs):
        for p in sorted(d.iterdir()):
            if p.is_file() and os.path.normpath(str(p)) not in listed and _is_dicom_file(p):
                out.append(p.name)
    return out


def _floats(text: str, n: int) -> np.ndarray | None:
    try:
        vals = np.asarray([float(v) for v in text.replace(" ", "").split("\\") if v != ""], dtype=float)
    except ValueError:
        return None
    return vals if vals.size == n and np.all(np.isfinite(vals)) else None


def check_series(series: DicomSeries, others: list[DicomSeries] = ()) -> None:  # type: ignore[assignment]
    """Refuse a series that is not one regular stack: unreadable slices, mixed orientations, duplicated or
    missing positions, non-uniform spacing. Each problem is one line naming the files."""
    if len(series.files) < 2:
        return  # one slice: validate_image reports the size
    names = [Path(f).name for f in series.files]
    positions, orients = [], []
    reader = sitk.ImageFileReader()
    with native_output_to_log("GDCM"):
        for f, name in zip(series.files, names, strict=True):
            reader.SetFileName(f)
            try:
                reader.ReadImageInformation()
            except RuntimeError as exc:
                raise UserError(f"series {series.label}: slice {name} cannot be read ({first_line(exc)}); "
                                "truncated or corrupt file") from None
            ipp = _floats(reader.GetMetaData("0020|0032"), 3) if reader.HasMetaDataKey("0020|0032") else None
            iop = _floats(reader.GetMetaData("0020|0037"), 6) if reader.HasMetaDataKey("0020|0037") else None
            if ipp is None or iop is None:
                return  # no geometry tags (secondary capture, old files): nothing to check, ITK stacks by order
            positions.append(ipp)
            orients.append(iop)
    ref = orients[0]
    for o, name in zip(orients, names, strict=True):
        if np.max(np.abs(o - ref)) > ORIENTATION_TOL:
            raise UserError(f"series {series.label}: slice {name} has another orientation "
                            f"({_fmt(o)}) than {names[0]} ({_fmt(ref)}); the series mixes orientations")
    normal = np.cross(ref[:3], ref[3:])
    dist = np.asarray([float(np.dot(p, normal)) for p in positions])
    order = np.argsort(dist, kind="stable")
    d_sorted = dist[order]
    gaps = np.diff(d_sorted)
    step = float(np.median(gaps))
    for k, g in enumerate(gaps):
        if g <= max(1e-3, 1e-3 * abs(step)):
            a, b = names[order[k]], names[order[k + 1]]
            raise UserError(f"series {series.label}: slices {a} and {b} lie at the same position "
                            f"({d_sorted[k]:.3f} mm along the slice normal); duplicated slices")
    bad = np.nonzero(np.abs(gaps - step) > SPACING_RTOL * step)[0]
    if bad.size:
        k = int(bad[0])
        a, b = names[order[k]], names[order[k + 1]]
        msg = (f"series {series.label}: non-uniform slice spacing, {gaps[k]:.3f} mm between {a} and {b} where the "
               f"others are {step:.3f} mm apart ({bad.size} irregular gap{'s' if bad.size > 1 else ''}: a missing "
               "or extra slice)")
        unlisted = _unlisted_dicom_files(series, list(others))
        if unlisted:
            msg += (f"; {len(unlisted)} DICOM file(s) in the folder are unreadable (truncated or corrupt?): "
                    + ", ".join(unlisted[:5]))
        raise UserError(msg)


def _fmt(v: np.ndarray) -> str:
    return ",".join(f"{x:g}" for x in np.round(v, 4))


def read_dicom_folder(folder: Path, series_uid: str | None) -> sitk.Image:
    """Read the one series of ``folder`` (or the one named ``series_uid``), checked by :func:`check_series`."""
    if not any(folder.iterdir()):
        raise UserError(f"{folder}: the folder is empty")
    series = list_dicom_series(folder)
    if not series:
        raise UserError(f"{folder}: no DICOM series found in this folder")
    if series_uid is not None:
        chosen = [s for s in series if s.uid == series_uid]
        if not chosen:
            raise UserError(f"{folder}: no series with UID {series_uid or '(empty)'}; found: "
                            + ", ".join(s.label for s in series))
        pick = chosen[0]
    elif len(series) > 1:
        listing = "; ".join(f"{s.label} ({len(s.files)} files{', ' + s.description if s.description else ''})"
                            for s in series)
        hint = " (one series has an empty SeriesInstanceUID: choose it with --series '')" \
            if any(not s.uid for s in series) else ""
        raise UserError(f"{folder}: {len(series)} DICOM series found, choose one with --series UID: {listing}{hint}")
    else:
        pick = series[0]
    check_series(pick, [s for s in series if s is not pick])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(pick.files))
    with native_output_to_log("ITK"):
        try:
            return reader.Execute()
        except RuntimeError as exc:
            raise UserError(f"{folder}: cannot read DICOM series {pick.label}: {first_line(exc)}") from None
