"""What VoCoSegment shows for the correct → finetune loop: uncertainty per structure, the next case to correct and
the Dice-per-labelled-case curve. Qt-free: scene nodes and plain data in, nodes and text out.

The engine writes everything this reads (``vocoslicer segment --uncertainty`` → ``<output>.uncertainty.json``,
``vocoslicer cohort rank`` → ``<cohort>/ranking/latest.json``, ``vocoslicer cohort curve --json``); the panel
runs those commands as jobs and calls these functions on their outputs.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import vtk

from VoCoSlicerLib import mrml_io, segment_flow
from VoCoSlicerLib.labels_csv import read_labels_csv

RANKING = Path("ranking") / "latest.json"  # vocoslicer/data/cohort_rank.py RANK_DIR / LATEST
MANIFEST = "manifest.json"
MAP_COLORS = ("vtkMRMLColorTableNodeFileInferno.txt", "vtkMRMLColorTableNodeRainbow")  # first that exists
MAP_ATTRIBUTE = "VoCo.UncertaintyMap"
CURVE_ATTRIBUTE = "VoCo.DiceCurve"


# ------------------------------------------------------------------------------------------ uncertainty
@dataclass(frozen=True)
class StructureScore:
    """One structure's mean entropy (0 sure … 1 uniform) inside its predicted voxels."""

    name: str
    entropy: float | None  # None: the model predicted no voxel of it
    voxels: int


def load_uncertainty(artifact: dict[str, Any] | None) -> dict[str, Any] | None:
    """The report behind a segmentation ``artifact`` event (its ``uncertainty_json``), or None."""
    path = (artifact or {}).get("uncertainty_json")
    if not path:
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and "uncertainty" in data else None


def structure_scores(report: dict[str, Any]) -> list[StructureScore]:
    """Structures most doubtful first; structures not found last (by name)."""
    rows = [StructureScore(str(name), None if s.get("entropy") is None else float(s["entropy"]),
                           int(s.get("voxels", 0))) for name, s in (report.get("structures") or {}).items()]
    return sorted(rows, key=lambda r: (r.entropy is None, -(r.entropy or 0.0), r.name))


def uncertainty_text(report: dict[str, Any] | None) -> str:
    """The panel's text: the case score, the TTA disagreement when measured, then one line per structure."""
    if not report:
        return "no uncertainty computed (enable 'Uncertainty' before segmenting)"
    lines = [f"Case uncertainty {float(report['uncertainty']):.3f} (mean entropy in the predicted foreground, "
             "0 = sure, 1 = guessing)"]
    if report.get("tta_disagreement") is not None:
        lines.append(f"Flip TTA disagreement {100 * float(report['tta_disagreement']):.1f}% of foreground voxels")
    for s in structure_scores(report):
        lines.append(f"  {s.name}: not found" if s.entropy is None else f"  {s.name}: {s.entropy:.3f} "
                     f"({s.voxels} voxels)")
    return "\n".join(lines)


def show_uncertainty_map(scene: slicer.vtkMRMLScene, map_path: str | os.PathLike[str],
                         background: slicer.vtkMRMLVolumeNode | None = None, opacity: float = 0.5,
                         node: slicer.vtkMRMLScalarVolumeNode | None = None) -> slicer.vtkMRMLScalarVolumeNode:
    """Load (or reload into ``node``) the entropy map and overlay it on every slice view, window 0..1."""
    p = Path(map_path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no uncertainty map (segment with --uncertainty-map)")
    target = node or scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{p.name.split('.')[0]} uncertainty")
    sn = slicer.vtkMRMLVolumeArchetypeStorageNode()
    sn.SetFileName(str(p))
    if not sn.ReadData(target) or target.GetImageData() is None:
        if node is None:
            scene.RemoveNode(target)
        raise OSError(f"{p}: could not read the uncertainty map")
    target.SetAttribute(MAP_ATTRIBUTE, "1")
    if target.GetDisplayNode() is None:
        target.CreateDefaultDisplayNodes()
    display = target.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    color = next((c for c in MAP_COLORS if scene.GetNodeByID(c) is not None), None)
    if color:
        display.SetAndObserveColorNodeID(color)
    if background is not None:
        target.SetAndObserveTransformNodeID(background.GetTransformNodeID())
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        comp = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        if background is not None:
            comp.SetBackgroundVolumeID(background.GetID())
        comp.SetForegroundVolumeID(target.GetID())
        comp.SetForegroundOpacity(float(opacity))
    return target


# ------------------------------------------------------------------------------------------ next case
@dataclass(frozen=True)
class NextCase:
    """The top-ranked case that is still waiting for a correction."""

    case: str
    rank: int
    score: float
    uncertainty: float | None
    image: Path
    proposal: Path | None
    strategy: str
    model: str
    model_version: str

    def summary(self) -> str:
        """One line for the button's tooltip / status."""
        u = "" if self.uncertainty is None else f", uncertainty {self.uncertainty:.3f}"
        return f"{self.case} (#{self.rank} by {self.strategy}, score {self.score:.3f}{u})"


def rank_args(cohort: str, model: str, strategy: str = "uncertainty", n: int | None = None,
              device: str = "auto", seed: int = 0) -> list[str]:
    """``vocoslicer`` arguments of the ranking job the button starts when no ranking is stored yet."""
    args = ["cohort", "rank", str(cohort), "--model", model, "--strategy", strategy, "--device", device,
            "--seed", str(int(seed)), "--json"]
    return args + (["-n", str(int(n))] if n else [])


def _corrected_ids(cohort: Path) -> set[str]:
    try:
        cases = json.loads((cohort / MANIFEST).read_text(encoding="utf-8")).get("cases", {})
    except (OSError, json.JSONDecodeError):
        return set()
    return {cid for cid, rec in cases.items()
            if any((v.get("provenance") or {}).get("corrected", True) for v in rec.get("labels", []))}


def next_case(cohort_dir: str | os.PathLike[str]) -> NextCase | None:
    """The best-ranked case of the stored ranking not corrected since (None: rank first, or all done)."""
    root = Path(cohort_dir)
    try:
        data = json.loads((root / RANKING).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    done = _corrected_ids(root)
    for r in data.get("ranking", []):
        image = Path(str(r.get("image", "")))
        if r.get("case") in done or not image.is_file():
            continue
        prop = Path(r["proposal"]) if r.get("proposal") and Path(r["proposal"]).is_file() else None
        return NextCase(str(r["case"]), int(r["rank"]), float(r["score"]),
                        None if r.get("uncertainty") is None else float(r["uncertainty"]), image, prop,
                        str(data.get("strategy", "")), str(data.get("model", "")), str(data.get("model_version", "")))
    return None


def load_next_case(scene: slicer.vtkMRMLScene, cohort_dir: str | os.PathLike[str], nxt: NextCase
                   ) -> tuple[slicer.vtkMRMLScalarVolumeNode, slicer.vtkMRMLSegmentationNode | None]:
    """Load the case's image and its proposal (as a segmentation ready to correct and "Add to cohort")."""
    vol = slicer.modules.volumes.logic().AddArchetypeVolume(str(nxt.image), nxt.case, 0)
    if vol is None:
        raise OSError(f"{nxt.image}: could not load the case image")
    if nxt.proposal is None:
        return vol, None
    labels_csv = Path(cohort_dir) / "labels.csv"
    labels = read_labels_csv(labels_csv)
    seg = mrml_io.segmentation_from_label_file(scene, nxt.proposal, labels, vol, name=f"{nxt.case} proposal")
    seg.SetAttribute(segment_flow.LABELS_ATTRIBUTE, labels_csv.read_text(encoding="utf-8"))
    seg.SetAttribute(segment_flow.MODEL_ATTRIBUTE, nxt.model)
    seg.SetAttribute(segment_flow.VERSION_ATTRIBUTE, nxt.model_version)
    return vol, seg


# ------------------------------------------------------------------------------------------ curve
def curve_arrays(rows: list[dict[str, Any]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``cohort curve --json`` rows → x (labelled cases) and one y array per series (``mean`` + structures);
    missing values are NaN so every series has the x length."""
    x = np.array([float(r["n_labelled"]) for r in rows])
    names = sorted({n for r in rows for n in (r.get("structures") or {})})
    ys = {"mean": np.array([float(r["val_dice"]) if r.get("val_dice") is not None else math.nan for r in rows])}
    for n in names:
        ys[n] = np.array([float((r.get("structures") or {}).get(n, math.nan)) for r in rows])
    return x, ys


def curve_to_chart(scene: slicer.vtkMRMLScene, rows: list[dict[str, Any]],
                   chart: slicer.vtkMRMLPlotChartNode | None = None) -> slicer.vtkMRMLPlotChartNode:
    """One table (n_labelled + one column per series) and one plot series per column in a chart."""
    x, ys = curve_arrays(rows)
    if chart is None:
        chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", "Dice per labelled case")
        chart.SetTitle("Validation Dice (fixed split) per labelled case")
        chart.SetXAxisTitle("labelled cases")
        chart.SetYAxisTitle("Dice")
        chart.SetLegendVisibility(True)
        chart.SetAttribute(CURVE_ATTRIBUTE, "1")
    table = None
    if chart.GetNumberOfPlotSeriesNodes():
        table = chart.GetNthPlotSeriesNode(0).GetTableNode()
    if table is None:
        table = scene.AddNewNodeByClass("vtkMRMLTableNode", "Dice per labelled case")
    t = table.GetTable()
    t.Initialize()
    for name, data in (("n_labelled", x), *ys.items()):
        col = vtk.vtkDoubleArray()
        col.SetName(name)
        col.SetNumberOfValues(len(data))
        for i, v in enumerate(data):
            col.SetValue(i, float(v))
        t.AddColumn(col)
    table.Modified()
    have = {chart.GetNthPlotSeriesNode(i).GetName() for i in range(chart.GetNumberOfPlotSeriesNodes())}
    for name in ys:
        if name in have:
            continue
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", name)
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName("n_labelled")
        series.SetYColumnName(name)
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
        series.SetLineWidth(4 if name == "mean" else 1)
        series.SetUniqueColor()
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    return chart
