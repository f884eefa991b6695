"""Small builders shared by the I/O and CLI tests (not a test module)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROTATED = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # a 90° in-plane rotation: a non-identity direction


def make_volume(shape_zyx=(6, 7, 8), spacing=(0.7, 0.9, 2.5), origin=(-10.0, 20.0, 30.0), direction=ROTATED,
                dtype=np.int16, seed: int = 0) -> sitk.Image:
    """A random volume with a non-trivial geometry."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(-1000, 1000, size=shape_zyx).astype(dtype)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def write_dicom_series(img: sitk.Image, folder: Path, series_uid: str = "1.2.826.0.1.3680043.2.1125.1",
                       description: str = "test series") -> list[Path]:
    """Write ``img`` as a CT DICOM series (one file per slice) with consistent geometry tags."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = img.GetDirection()
    files = []
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|103e": description,
            "0020|000d": series_uid + ".0",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0037": "\\".join(f"{v:.6f}" for v in (direction[0], direction[3], direction[6],
                                                          direction[1], direction[4], direction[7])),
            "0020|0032": "\\".join(f"{v:.6f}" for v in img.TransformIndexToPhysicalPoint((0, 0, k))),
            "0018|0050": f"{img.GetSpacing()[2]:.6f}",
            "0028|1053": "1",
            "0028|1052": "0",
        }
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        sl.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")
        path = folder / f"slice_{k:03d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(sl)
        files.append(path)
    return files


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m vocoslicer ...`` in a real child process."""
    return subprocess.run([sys.executable, "-m", "vocoslicer", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)
