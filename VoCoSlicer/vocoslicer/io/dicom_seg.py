"""Write a label map as a DICOM Segmentation (SEG) object with highdicom, so results go back to a PACS.

A SEG must reference the source images it was derived from (one frame per source slice, same plane positions),
so it can only be written when the CT came as a DICOM series: either the input itself, or a series given with
``--dicom-source`` that has exactly the label map's grid. Segments are named, coloured and coded from the model's
label table (SNOMED CT codes ``SCT^value``), and every segment carries the algorithm identification (model id,
version and the weights' sha256) so a reader can tell which model produced it.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from vocoslicer.errors import UserError
from vocoslicer.io.atomic import atomic_path
from vocoslicer.io.volume import list_dicom_series, same_grid, validate_image
from vocoslicer.labels import Label, LabelTable

# used when a label has no type code of its own: SNOMED CT "Tissue", a valid and honest catch-all
_FALLBACK_CATEGORY = ("85756007", "SCT", "Tissue")
_FALLBACK_TYPE = ("85756007", "SCT", "Tissue")
SEG_EXTENSIONS = (".dcm",)
log = logging.getLogger("vocoslicer.dicom_seg")


def is_dicom_seg_path(path: str | os.PathLike[str]) -> bool:
    """True for an output name that asks for a DICOM SEG (``.dcm``)."""
    return str(path).lower().endswith(SEG_EXTENSIONS)


def _code(code: str, meaning: str, fallback: tuple[str, str, str]) -> Any:
    from highdicom.sr import CodedConcept

    scheme, _, value = (code or "").partition("^")
    if scheme and value:  # "SCT^10200004" as in the label tables
        return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning or value)
    return CodedConcept(value=fallback[0], scheme_designator=fallback[1], meaning=fallback[2])


def _cielab(rgb: tuple[int, int, int]) -> Any:
    from highdicom.color import CIELabColor

    # sRGB (0-255) → CIE L*a*b* (D65), what DICOM's RecommendedDisplayCIELabValue holds
    c = np.asarray(rgb, dtype=float) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = m @ c / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = (116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2]))
    return CIELabColor(float(np.clip(lab[0], 0, 100)), float(np.clip(lab[1], -128, 127)),
                       float(np.clip(lab[2], -128, 127)))


def dicom_series_files(source: str | os.PathLike[str], series_uid: str | None = None) -> list[str]:
    """The files of the DICOM series in ``source`` in the slice order SimpleITK reads them (= label map z order)."""
    folder = Path(source)
    if not folder.is_dir():
        raise UserError(f"{folder}: a DICOM SEG needs the source DICOM series folder (not a file)")
    series = list_dicom_series(folder)
    if series_uid is not None:
        series = [s for s in series if s.uid == series_uid]
    if not series:
        raise UserError(f"{folder}: no DICOM series found{' with UID ' + series_uid if series_uid else ''}")
    if len(series) > 1:
        raise UserError(f"{folder}: {len(series)} DICOM series found, choose one with --series UID")
    return list(series[0].files)


def _read_series(files: Sequence[str]) -> sitk.Image:
    """The volume of exactly these files (a sibling series in the same folder must not interfere)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(files))
    try:
        return validate_image(reader.Execute(), str(Path(files[0]).parent))
    except RuntimeError as exc:
        raise UserError(f"{Path(files[0]).parent}: cannot read the source DICOM series "
                        f"({str(exc).strip().splitlines()[-1][:160]})") from None


def _segment_descriptions(table: LabelTable, values: Sequence[int], algo: Any) -> list[Any]:
    from highdicom.seg import SegmentAlgorithmTypeValues, SegmentDescription

    out = []
    for number, value in enumerate(values, start=1):
        lb: Label = table.by_value(value)
        out.append(SegmentDescription(
            segment_number=number, segment_label=lb.name,
            segmented_property_category=_code(lb.category_code, lb.category_meaning, _FALLBACK_CATEGORY),
            segmented_property_type=_code(lb.type_code, lb.type_meaning, _FALLBACK_TYPE),
            algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algo,
            display_color=_cielab(lb.rgb)))
    return out


def write_dicom_seg(label: sitk.Image, out: str | os.PathLike[str], table: LabelTable, source_files: Sequence[str],
                    model_id: str, model_version: str, model_sha256: str = "", source_image: sitk.Image | None = None
                    ) -> Path:
    """Write ``label`` (on the source series' grid) as a DICOM SEG at ``out``, atomically; returns the path.

    Every label of ``table`` becomes one segment (numbered 1..N in table order), present in the map or not, so
    the segment list of a SEG is the model's, not the case's.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from vocoslicer import __version__

    ref = source_image if source_image is not None else _read_series(source_files)
    if not same_grid(label, ref, tol=1e-3):
        raise UserError("the label map is not on the grid of the source DICOM series; a DICOM SEG must match it")
    try:
        datasets = [pydicom.dcmread(f) for f in source_files]
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a bad source series for the user
        raise UserError(f"cannot read the source DICOM series: {type(exc).__name__}: {exc}") from None
    arr = sitk.GetArrayFromImage(label)
    if arr.shape[0] != len(datasets):
        raise UserError(f"the label map has {arr.shape[0]} slices but the source series {len(datasets)} files")
    values = table.values
    table.check_values(np.unique(arr).tolist(), "segmentation")
    lut = np.zeros(max(values, default=0) + 1, dtype=np.uint16)
    for number, value in enumerate(values, start=1):
        lut[value] = number
    segment_numbers = lut[arr]  # label value → segment number (1..N), 0 stays background
    params = {"model_id": model_id, "model_version": model_version}
    if model_sha256:
        params["weights_sha256"] = model_sha256
    algo = hd.AlgorithmIdentificationSequence(name=model_id[:64], family=codes.cid7162.ArtificialIntelligence,
                                              version=model_version[:64], source="VoCoSlicer", parameters=params)
    descriptions = _segment_descriptions(table, values, algo)
    try:
        with warnings.catch_warnings(record=True) as caught:  # highdicom's advice goes to the log, not the terminal
            warnings.simplefilter("always")
            seg = hd.seg.Segmentation(
                source_images=datasets,
                pixel_array=segment_numbers.astype(np.uint8 if len(values) < 256 else np.uint16),
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
                series_instance_uid=hd.UID(), series_number=9900, sop_instance_uid=hd.UID(), instance_number=1,
                manufacturer="VoCoSlicer", manufacturer_model_name=model_id[:64], software_versions=__version__,
                device_serial_number=(model_sha256 or "none")[:16],
                series_description=f"{model_id} segmentation"[:64], content_label="VOCOSEG",
                content_description=f"{model_id} v{model_version}"[:64], omit_empty_frames=False)
        for w in caught:
            log.info("highdicom: %s", str(w.message).splitlines()[0])
    except (ValueError, TypeError, AttributeError) as exc:
        raise UserError(f"cannot build a DICOM SEG from this series: {str(exc).splitlines()[0][:200]}") from None
    p = Path(out)
    with atomic_path(p) as tmp:
        seg.save_as(str(tmp))
    return p


def read_dicom_seg_labels(path: str | os.PathLike[str], source_files: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Read a SEG back as a (z, y, x) array of segment numbers in the order of ``source_files`` plus segment names.

    For tests and for checking a SEG against the label map it came from.
    """
    import highdicom as hd
    import pydicom

    seg = hd.seg.segread(str(path))
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in source_files]
    arr = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True,
                                            assert_missing_frames_are_empty=True)
    names = [seg.get_segment_description(n).segment_label for n in seg.segment_numbers]
    return np.asarray(arr), names
