"""Phantom findings: same patient with/without, an enlarged spleen, a hypodense liver lesion, the truth file, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from vocoslicer.cli import main
from vocoslicer.data.phantom import generate_phantom
from vocoslicer.data.phantom_shapes import LIVER, SPLEEN
from vocoslicer.errors import UserError

GRID = {"spacing": (4.0, 4.0, 4.0), "size": (88, 72, 64)}


def arrays(seed: int, finding: str | None) -> tuple[np.ndarray, np.ndarray]:
    ph = generate_phantom(seed, finding=finding, **GRID)
    return sitk.GetArrayFromImage(ph.image), sitk.GetArrayFromImage(ph.label)


@pytest.mark.parametrize("seed", [0, 5])
def test_findings_change_only_their_organ(seed: int) -> None:
    img0, lab0 = arrays(seed, None)
    img_none, lab_none = arrays(seed, "none")
    assert np.array_equal(img0, img_none) and np.array_equal(lab0, lab_none)  # "none" = the plain phantom
    img_s, lab_s = arrays(seed, "splenomegaly")
    ratio = (lab_s == SPLEEN).sum() / (lab0 == SPLEEN).sum()
    assert 2.5 < ratio < 9.0  # 1.6-2.0x per axis, less what the kidneys/stomach painted later cover
    assert np.array_equal(lab_s == LIVER, lab0 == LIVER)  # the rest of the patient is the same
    img_l, lab_l = arrays(seed, "liver_lesion")
    assert np.array_equal(lab_l, lab0)  # the lesion is inside the liver and keeps its label
    changed = img_l != img0
    assert changed.any() and np.all(lab0[changed] == LIVER)
    assert img_l[changed].mean() < img0[changed].mean() - 10  # hypodense


def test_cli_writes_truth_and_refuses_unknown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ph"
    assert main(["phantom", "--seed", "3", "--size", "40", "40", "30", "--spacing", "8", "8", "8",
                 "--finding", "splenomegaly", "-o", str(out)]) == 0
    truth = json.loads((out / "phantom_3_finding.json").read_text())
    assert truth["seed"] == 3 and truth["finding"] == "splenomegaly" and 1.6 <= truth["spleen_scale"] <= 2.0
    assert main(["phantom", "--seed", "4", "--size", "40", "40", "30", "-o", str(out)]) == 0
    assert not (out / "phantom_4_finding.json").exists()  # no finding asked for: no truth file
    with pytest.raises(SystemExit):
        main(["phantom", "--finding", "fracture", "-o", str(out)])
    with pytest.raises(UserError, match="unknown finding"):
        generate_phantom(0, finding="fracture", **GRID)
