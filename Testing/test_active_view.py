"""The panel logic of the correct → finetune loop on a real slicer-core scene: uncertainty text and map overlay,
"Next case to correct" from a real ranking of a real cohort, the Dice curve as table + chart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")
slicer = pytest.importorskip("slicer")

from test_cohort_rank import cohort_of, tiny_bundle  # noqa: E402

from VoCoSlicerLib import active_view, segment_flow  # noqa: E402

REPORT = {"uncertainty": 0.21, "tta": "flip", "tta_disagreement": 0.034,
          "structures": {"liver": {"value": 1, "voxels": 900, "entropy": 0.05},
                         "spleen": {"value": 2, "voxels": 40, "entropy": 0.4},
                         "aorta": {"value": 4, "voxels": 0, "entropy": None}}}


def test_uncertainty_text_lists_the_most_doubtful_structure_first(tmp_path: Path) -> None:
    assert [s.name for s in active_view.structure_scores(REPORT)] == ["spleen", "liver", "aorta"]
    text = active_view.uncertainty_text(REPORT)
    assert text.splitlines()[0].startswith("Case uncertainty 0.210") and "3.4% of foreground" in text
    assert "spleen: 0.400 (40 voxels)" in text and "aorta: not found" in text
    assert "no uncertainty" in active_view.uncertainty_text(None)
    (tmp_path / "s.uncertainty.json").write_text(json.dumps(REPORT))
    assert active_view.load_uncertainty({"uncertainty_json": str(tmp_path / "s.uncertainty.json")}) == REPORT
    assert active_view.load_uncertainty({"uncertainty_json": str(tmp_path / "missing.json")}) is None


def test_uncertainty_map_is_overlaid_on_every_slice_view(slicer_core, tmp_path: Path) -> None:
    scene = slicer_core.scene
    img = sitk.GetImageFromArray(np.linspace(0, 1, 6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8))
    img.SetSpacing((2.0, 2.0, 3.0))
    sitk.WriteImage(img, str(tmp_path / "u.nrrd"))
    bg = slicer_core.volumes.AddArchetypeVolume(str(tmp_path / "u.nrrd"), "ct", 0)
    comps = [scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(3)]
    node = active_view.show_uncertainty_map(scene, tmp_path / "u.nrrd", bg, opacity=0.4)
    assert node.GetImageData().GetDimensions() == (8, 7, 6)
    d = node.GetDisplayNode()
    assert (d.GetWindow(), d.GetLevel()) == pytest.approx((1.0, 0.5)) and not d.GetAutoWindowLevel()
    for c in comps:
        assert c.GetForegroundVolumeID() == node.GetID() and c.GetBackgroundVolumeID() == bg.GetID()
        assert c.GetForegroundOpacity() == pytest.approx(0.4)
    assert d.GetColorNodeID() in active_view.MAP_COLORS
    with pytest.raises(FileNotFoundError, match="no uncertainty map"):
        active_view.show_uncertainty_map(scene, tmp_path / "none.nrrd")


def test_next_case_follows_the_ranking_and_skips_corrected_cases(slicer_core, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from vocoslicer.data.cohort_rank import rank_cohort

    monkeypatch.setenv("VOCOSLICER_HOME", str(tmp_path / "home"))
    bundle = tiny_bundle(tmp_path / "b")
    cohort = cohort_of(tmp_path / "cohort", labelled=1, unlabelled=2)
    assert active_view.next_case(cohort.root) is None  # not ranked yet: the panel starts rank_args
    assert active_view.rank_args(str(cohort.root), "m", n=3)[-2:] == ["-n", "3"]
    ranking = rank_cohort(cohort.root, str(bundle), "uncertainty", device="cpu")["ranking"]
    nxt = active_view.next_case(cohort.root)
    assert nxt is not None and nxt.case == ranking[0]["case"] and nxt.rank == 1 and nxt.proposal is not None
    vol, seg = active_view.load_next_case(slicer_core.scene, cohort.root, nxt)
    assert vol.GetName() == nxt.case and seg is not None
    assert seg.GetAttribute(segment_flow.MODEL_ATTRIBUTE) == "tiny-rank"
    assert segment_flow.labels_of(seg)[0].name == "liver"  # ready for "Add to cohort" with the model's values
    cohort.add_label(nxt.case, str(nxt.proposal))  # the user accepted (corrected) the proposal
    after = active_view.next_case(cohort.root)
    assert after is not None and after.case == ranking[1]["case"] and after.rank == 2
    assert nxt.case in nxt.summary() and "uncertainty" in nxt.summary()


def test_curve_becomes_a_table_and_one_series_per_structure(slicer_core) -> None:
    rows = [{"n_labelled": 1, "val_dice": 0.2, "structures": {"liver": 0.5}},
            {"n_labelled": 2, "val_dice": 0.4, "structures": {"liver": 0.7, "spleen": 0.1}}]
    x, ys = active_view.curve_arrays(rows)
    assert list(x) == [1, 2] and np.isnan(ys["spleen"][0]) and list(ys["mean"]) == [0.2, 0.4]
    chart = active_view.curve_to_chart(slicer_core.scene, rows)
    assert chart.GetNumberOfPlotSeriesNodes() == 3
    rows.append({"n_labelled": 4, "val_dice": 0.6, "structures": {"liver": 0.8, "spleen": 0.3}})
    assert active_view.curve_to_chart(slicer_core.scene, rows, chart) is chart
    table = chart.GetNthPlotSeriesNode(0).GetTableNode().GetTable()
    assert chart.GetNumberOfPlotSeriesNodes() == 3 and table.GetNumberOfRows() == 3
    assert table.GetColumnByName("mean").GetValue(2) == pytest.approx(0.6)
