"""Turn the inputs of a batch ``segment`` into cases: files, folders of volumes, DICOM trees, list files, a cohort.

Every case gets a stable, file-system-safe id that names its output (a DICOM series is named by
patient/study/series so a PACS export of many series stays readable), and the order is deterministic so that
every rank of a ``torchrun`` batch derives the same list and takes its own share of it. An input that cannot be
turned into cases is not fatal: it is returned as a bad input with a one-line reason for the batch summary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from vocoslicer.errors import UserError
from vocoslicer.io.volume import VOLUME_EXTENSIONS, _ext, list_dicom_series, read_image, validate_image

LIST_EXTENSIONS = (".txt", ".lst", ".list")
OUTPUT_EXTENSIONS = {"nifti": ".nii.gz", "nrrd": ".nrrd", "seg.nrrd": ".seg.nrrd", "mha": ".mha", "dicom-seg": ".dcm"}


@dataclass(frozen=True)
class Case:
    """One volume to segment: a file, or one DICOM series (``files`` in slice order)."""

    id: str
    source: str
    files: tuple[str, ...] = ()
    series_uid: str | None = None
    cohort_case: str | None = None

    @property
    def is_dicom(self) -> bool:
        """True when the case is a DICOM series (a SEG can reference it)."""
        return bool(self.files)


@dataclass(frozen=True)
class BadInput:
    """An input that yielded no case, with the reason."""

    source: str
    error: str


def safe_name(text: str, limit: int = 64) -> str:
    """A file-name-safe piece of text (letters, digits, ``-._``)."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip()).strip("._")
    return out[:limit] or "x"


def _volume_stem(path: Path) -> str:
    ext = _ext(path)
    return path.name[: -len(ext)] if ext and path.name.lower().endswith(ext) else path.stem


def _tag(reader: sitk.ImageFileReader, key: str) -> str:
    return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""


def dicom_case_name(first_file: str, uid: str) -> str:
    """``patient_study_series`` from the DICOM tags (falling back on the UIDs' tails when a tag is empty)."""
    r = sitk.ImageFileReader()
    r.SetFileName(first_file)
    try:
        r.ReadImageInformation()
    except RuntimeError:
        return safe_name(uid)
    patient = _tag(r, "0010|0020") or _tag(r, "0010|0010") or "anon"
    study = _tag(r, "0020|0010") or _tag(r, "0008|0020") or _tag(r, "0020|000d").rsplit(".", 1)[-1] or "study"
    number = _tag(r, "0020|0011")
    desc = _tag(r, "0008|103e")
    series = "-".join(p for p in (number, desc) if p) or uid.rsplit(".", 1)[-1]
    return "_".join(safe_name(p, 32) for p in (patient, study, series))


def _dicom_cases(folder: Path) -> list[Case]:
    # looking for DICOM in a folder of NIfTI files is normal here: ITK's "No Series were found" is not for the user
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        found = list_dicom_series(folder)
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    return [Case(id=dicom_case_name(s.files[0], s.uid), source=str(folder), files=tuple(s.files), series_uid=s.uid)
            for s in sorted(found, key=lambda s: s.uid)]


def _is_volume(path: Path) -> bool:
    return _ext(path) in VOLUME_EXTENSIONS


def _expand_one(text: str, base: Path | None, depth: int, cases: list[Case], bad: list[BadInput]) -> None:
    p = Path(text).expanduser()
    if base is not None and not p.is_absolute():
        p = base / p
    if not p.exists():
        bad.append(BadInput(str(p), "no such file or folder"))
        return
    if p.is_file() and p.suffix.lower() in LIST_EXTENSIONS:
        if depth > 3:
            bad.append(BadInput(str(p), "list files nested too deeply"))
            return
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            bad.append(BadInput(str(p), f"cannot read the list file ({exc})"))
            return
        for line in lines:
            line = line.strip()
            if line and not line.startswith("#"):
                _expand_one(line, p.parent, depth + 1, cases, bad)
        return
    if p.is_file():
        if not _is_volume(p):
            bad.append(BadInput(str(p), f"not a volume file ({', '.join(VOLUME_EXTENSIONS)}) nor a list file"))
            return
        cases.append(Case(id=safe_name(_volume_stem(p)), source=str(p)))
        return
    volumes = sorted(f for f in p.rglob("*") if f.is_file() and _is_volume(f))
    for f in volumes:
        rel = f.relative_to(p)
        stem = "_".join([*rel.parent.parts, _volume_stem(f)])
        cases.append(Case(id=safe_name(stem, 96), source=str(f)))
    dicom = _dicom_cases(p)
    cases.extend(dicom)
    if not volumes and not dicom:
        bad.append(BadInput(str(p), "the folder holds no volume files and no DICOM series"))


def _unique(cases: list[Case]) -> list[Case]:
    """Drop repeated sources and make ids unique (``name``, ``name-2``, ...) in input order."""
    seen_src: set[tuple[str, str | None]] = set()
    used: dict[str, int] = {}
    out: list[Case] = []
    for c in cases:
        key = (str(Path(c.source).resolve()), c.series_uid)
        if key in seen_src:
            continue
        seen_src.add(key)
        n = used.get(c.id.lower(), 0) + 1
        used[c.id.lower()] = n
        out.append(c if n == 1 else Case(f"{c.id}-{n}", c.source, c.files, c.series_uid, c.cohort_case))
    return out


def expand_inputs(inputs: list[str]) -> tuple[list[Case], list[BadInput]]:
    """All cases named by ``inputs`` (deterministic order) and the inputs that named none."""
    cases: list[Case] = []
    bad: list[BadInput] = []
    for text in inputs:
        _expand_one(text, None, 0, cases, bad)
    return _unique(cases), bad


def cohort_cases(root: str, unlabelled: bool) -> list[Case]:
    """The cases of a cohort (only those without any label with ``unlabelled``), named by case id."""
    from vocoslicer.data.cohort import Cohort

    cohort = Cohort(root)
    return [Case(id=c.id, source=str(c.image), cohort_case=c.id) for c in cohort.cases()
            if not (unlabelled and c.labelled)]


def read_case(case: Case) -> sitk.Image:
    """Read a case's volume (a DICOM series from exactly its files, so sibling series never interfere)."""
    if not case.files:
        return read_image(case.source)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(case.files))
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        line = [ln for ln in str(exc).splitlines() if ln.strip()][-1:] or [type(exc).__name__]
        raise UserError(f"{case.source}: cannot read DICOM series {case.series_uid}: {line[0].strip()}") from None
    return validate_image(img, f"{case.source} (series {case.series_uid})")
