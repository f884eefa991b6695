"""A saved known-answer bundle (the Threshold model) and small CT volumes for the batch and DICOM SEG tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from helpers_models import Threshold

from vocoslicer.labels import Label, LabelTable
from vocoslicer.models.bundle import ModelBundle, new_bundle_meta

LABELS = LabelTable((
    Label(1, "liver", (221, 130, 101), "SCT^123037004", "Anatomical Structure", "SCT^10200004", "Liver"),
    Label(6, "spleen", (157, 108, 162), "SCT^123037004", "Anatomical Structure", "SCT^78961009", "Spleen"),
))


def register_tiny() -> None:
    """Make architecture ``tiny`` build the Threshold model (call in every process that builds the model)."""
    from vocoslicer.models import factory

    factory.register_architecture("tiny", replace=True)(lambda out_channels=2: Threshold())


def save_tiny_bundle(folder: Path) -> Path:
    """A real bundle on disk: channel 1 (→ label 6, spleen) where the CT is above 50 HU; liver is never found."""
    meta = new_bundle_meta("thr-test", "1.2.3", "segmentation", "tiny", {"out_channels": 2},
                           preprocessing={"spacing": [2.0, 2.0, 2.0],
                                          "intensity": {"a_min": 0, "a_max": 100, "b_min": 0, "b_max": 1}},
                           inference={"roi_size": [16, 16, 16], "overlap": 0.25, "sw_batch_size": 1},
                           channel_values=[0, 6])
    return ModelBundle(meta=meta, labels=LABELS).save(folder, Threshold().state_dict())


def box_volume(seed: int = 0, shape_zyx=(10, 18, 20), spacing=(1.5, 1.7, 2.5)) -> sitk.Image:
    """A CT-like int16 volume with a bright (100 HU) box whose position depends on ``seed``."""
    arr = np.zeros(shape_zyx, np.int16)
    z, y, x = 2 + seed % 3, 3 + seed % 4, 4 + seed % 5
    arr[z:z + 5, y:y + 8, x:x + 9] = 100
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin((-20.0 + seed, 10.0, 5.0))
    return img


def write_ct_series(img: sitk.Image, folder: Path, series_uid: str = "1.2.826.0.1.3680043.2.1125.1",
                    patient: str = "P001", series_number: int = 3, description: str = "abdomen") -> list[str]:
    """``helpers_io.write_dicom_series`` plus the tags every scanner writes and a SEG needs (frame of reference,
    patient, study id, series number), added with pydicom."""
    import pydicom
    from helpers_io import write_dicom_series

    files = write_dicom_series(img, folder, series_uid=series_uid, description=description)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.FrameOfReferenceUID = series_uid + ".9"
        ds.PatientID = patient
        ds.PatientName = f"Doe^{patient}"
        ds.StudyID = "S1"
        ds.SeriesNumber = series_number
        ds.save_as(f)
    return [str(f) for f in files]


def rank_main(rank: int, world: int, port: int, home: str, argv: list[str], codes: object) -> None:
    """One torchrun-like rank (what torchrun's environment looks like) running ``vocoslicer`` in-process."""
    import os

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "VOCOSLICER_HOME": home,
                       "OMP_NUM_THREADS": "1"})
    register_tiny()
    from vocoslicer.cli import main

    codes.put((rank, main(argv)))  # type: ignore[attr-defined]
