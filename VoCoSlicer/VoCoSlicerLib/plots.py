"""Live training curves: job ``metric`` events -> per-metric arrays -> table + plot-series nodes in a chart.

One table per metric (columns ``step`` and the metric) rather than one wide table, because training loss is
reported every step and validation Dice every few hundred steps: a shared table would be mostly empty cells.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import slicer
import vtk

_NOT_METRICS = {"t", "kind", "step", "split", "epoch", "total"}
SERIES_ATTRIBUTE = "VoCo.Metric"


@dataclass
class MetricHistory:
    """Every numeric value reported by ``metric`` events, keyed ``split/name`` (e.g. ``val/dice``)."""

    values: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def add(self, event: dict[str, Any]) -> bool:
        """Fold in one event; returns True when it carried a metric (the plot needs a refresh)."""
        if event.get("kind") != "metric" or event.get("step") is None:
            return False
        step = int(event["step"])
        split = str(event.get("split") or "train")
        added = False
        for key, value in event.items():
            if key in _NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(float(value)):
                continue
            self.values.setdefault(f"{split}/{key}", []).append((step, float(value)))
            added = True
        return added

    def names(self) -> list[str]:
        """Metric names seen so far, sorted."""
        return sorted(self.values)

    def arrays(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of one metric, by step; a repeated step (after a resume) keeps the latest value."""
        latest = dict(self.values.get(name, []))
        steps = np.array(sorted(latest), dtype=np.float64)
        return steps, np.array([latest[int(s)] for s in steps], dtype=np.float64)

    def last(self, name: str) -> float | None:
        """Most recent value of a metric."""
        v = self.values.get(name)
        return v[-1][1] if v else None


def _table(scene: slicer.vtkMRMLScene, chart: slicer.vtkMRMLPlotChartNode, name: str) -> slicer.vtkMRMLTableNode:
    for i in range(chart.GetNumberOfPlotSeriesNodes()):
        series = chart.GetNthPlotSeriesNode(i)
        if series.GetAttribute(SERIES_ATTRIBUTE) == name:
            return series.GetTableNode()
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{chart.GetName()} {name}")
    series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", name)
    series.SetAttribute(SERIES_ATTRIBUTE, name)
    series.SetAndObserveTableNodeID(table.GetID())
    series.SetXColumnName("step")
    series.SetYColumnName(name)
    series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
    series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone if name.startswith("train/")
                          else slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
    series.SetUniqueColor()
    chart.AddAndObservePlotSeriesNodeID(series.GetID())
    return table


def update_chart(scene: slicer.vtkMRMLScene, chart: slicer.vtkMRMLPlotChartNode, history: MetricHistory,
                 names: list[str] | None = None) -> None:
    """Create/refresh one table + plot series per metric in ``chart`` (all metrics when ``names`` is None)."""
    for name in names or history.names():
        steps, values = history.arrays(name)
        table = _table(scene, chart, name)
        t = table.GetTable()
        t.Initialize()
        for col_name, data in (("step", steps), (name, values)):
            col = vtk.vtkDoubleArray()
            col.SetName(col_name)
            col.SetNumberOfValues(len(data))
            for i, v in enumerate(data):
                col.SetValue(i, float(v))
            t.AddColumn(col)
        table.Modified()
    chart.SetXAxisTitle("step")


def new_chart(scene: slicer.vtkMRMLScene, title: str) -> slicer.vtkMRMLPlotChartNode:
    """An empty chart for a job's curves."""
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", title)
    chart.SetTitle(title)
    chart.SetXAxisTitle("step")
    chart.SetLegendVisibility(True)
    return chart


@dataclass
class Throughput:
    """Steps per second and ETA from ``progress`` events (the engine's own ``eta_s`` wins when given)."""

    window: int = 20
    _points: list[tuple[float, int]] = field(default_factory=list)
    total: int = 0
    eta_s: float | None = None

    def add(self, event: dict[str, Any]) -> None:
        """Fold in one event (non-progress events are ignored)."""
        if event.get("kind") != "progress" or event.get("t") is None:
            return
        self._points.append((float(event["t"]), int(event.get("step") or 0)))
        self._points = self._points[-self.window:]
        self.total = int(event.get("total") or self.total)
        self.eta_s = event.get("eta_s")

    @property
    def steps_per_s(self) -> float | None:
        """Recent rate, or None before two points."""
        if len(self._points) < 2:
            return None
        (t0, s0), (t1, s1) = self._points[0], self._points[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 >= s0 else None

    @property
    def eta(self) -> float | None:
        """Seconds left."""
        if self.eta_s is not None:
            return float(self.eta_s)
        rate = self.steps_per_s
        if not rate or not self._points or not self.total:
            return None
        return max(0.0, (self.total - self._points[-1][1]) / rate)

    def text(self) -> str:
        """``12.3 steps/s, ETA 4 min 05 s`` (empty until known)."""
        rate, eta = self.steps_per_s, self.eta
        parts = []
        if rate is not None:
            parts.append(f"{rate:.3g} steps/s")
        if eta is not None:
            m, s = divmod(int(round(eta)), 60)
            h, m = divmod(m, 60)
            parts.append(f"ETA {h} h {m:02d} min" if h else f"ETA {m} min {s:02d} s")
        return ", ".join(parts)
