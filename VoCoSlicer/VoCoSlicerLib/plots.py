"""Live training curves: job ``metric`` events -> per-metric arrays -> table + plot-series nodes in a chart.

One table per metric (columns ``step`` and the metric) rather than one wide table, because training loss is
reported every step and validation Dice every few hundred steps: a shared table would be mostly empty cells.
"""

from __future__ import annotations

import bisect
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

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
        """(steps, values) of one metric as the chart shows them: a step that does not advance (a resumed run
        reporting again from its checkpoint, or the next command of a chain) replaces everything from there on."""
        steps: list[float] = []
        values: list[float] = []
        for step, value in self.values.get(name, []):
            if steps and steps[-1] >= step:
                cut = bisect.bisect_left(steps, step)
                del steps[cut:], values[cut:]
            steps.append(float(step))
            values.append(value)
        return np.array(steps, dtype=np.float64), np.array(values, dtype=np.float64)

    def since(self, name: str, start: int) -> np.ndarray:
        """The points of one metric reported after the first ``start`` ones, as an (n, 2) array (step, value)."""
        new = self.values.get(name, [])[start:]
        return np.array(new, dtype=np.float64).reshape(len(new), 2)

    def last(self, name: str) -> float | None:
        """Most recent value of a metric."""
        v = self.values.get(name)
        return v[-1][1] if v else None


CHART_ATTRIBUTE = "VoCo.LiveChart"  # token on the chart node: an ID reused after a scene close is not ours
MAX_POINTS = 4000  # per curve on screen; longer runs are decimated (every 2nd, 4th, ... point kept)


def new_chart(scene: slicer.vtkMRMLScene, title: str) -> slicer.vtkMRMLPlotChartNode:
    """An empty chart for a job's curves."""
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", title)
    chart.SetTitle(title)
    chart.SetXAxisTitle("step")
    chart.SetLegendVisibility(True)
    return chart


def _new_series(scene: slicer.vtkMRMLScene, chart: slicer.vtkMRMLPlotChartNode,
                name: str) -> slicer.vtkMRMLTableNode:
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{chart.GetName()} {name}")
    for col_name in ("step", name):
        col = vtk.vtkDoubleArray()
        col.SetName(col_name)
        table.GetTable().AddColumn(col)
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
    table.SetAttribute(SERIES_ATTRIBUTE, series.GetID())  # so a curve whose table is deleted drops its series
    return table


class _Curve:
    """One metric's table, fed only with the points it has not seen (``consumed`` counts the history's points).

    The table holds every ``stride``-th point plus, when that one is not kept, the latest point as a tail, so a
    long run costs at most :data:`MAX_POINTS` rows; doubling ``stride`` halves the table once in a while.
    A step that does not advance (a resumed run reports again from its checkpoint) cuts the curve back first.
    """

    def __init__(self, table: slicer.vtkMRMLTableNode, cap: int) -> None:
        self.table_id = table.GetID()
        self.series_id = table.GetAttribute(SERIES_ATTRIBUTE) or ""
        self.cap = cap
        self.consumed = 0
        self.stride = 1
        self.kept = 0  # raw points offered since the curve was last cut back (decides which ones are kept)
        self.tail = False

    def _columns(self, table: slicer.vtkMRMLTableNode) -> tuple[vtk.vtkDoubleArray, vtk.vtkDoubleArray]:
        t = table.GetTable()
        return t.GetColumn(0), t.GetColumn(1)

    @staticmethod
    def _write(cols: tuple[vtk.vtkDoubleArray, vtk.vtkDoubleArray], start: int, data: np.ndarray) -> None:
        """Write ``data`` (n x 2) at row ``start``: at most one VTK resize + one numpy copy per column."""
        end = start + len(data)
        for j, col in enumerate(cols):
            if end > col.GetNumberOfTuples():
                col.InsertValue(end - 1, 0.0)  # grows capacity geometrically (SetNumberOfValues reallocates)
            if len(data):
                numpy_support.vtk_to_numpy(col)[start:end] = data[:, j]

    def add(self, table: slicer.vtkMRMLTableNode, points: np.ndarray) -> None:
        """Append new raw points (n x 2: step, value); the cost depends on ``len(points)``, not on the run."""
        cols = self._columns(table)
        rows = cols[0].GetNumberOfTuples() - (1 if self.tail else 0)  # the tail is rewritten every time
        # split where a step does not advance: each piece first cuts the curve back to the steps before it
        for piece in np.split(points, np.flatnonzero(np.diff(points[:, 0]) <= 0) + 1):
            steps = numpy_support.vtk_to_numpy(cols[0])  # fresh view: a resize moves the memory
            if rows and steps[rows - 1] >= piece[0, 0]:
                rows = int(np.searchsorted(steps[:rows], piece[0, 0], side="left"))
                self.kept = rows * self.stride
            while rows + len(piece) // self.stride > self.cap:  # decimate: keep every 2nd point on screen
                half = np.column_stack([numpy_support.vtk_to_numpy(c)[:rows:2].copy() for c in cols])
                self._write(cols, 0, half)
                rows, self.stride = len(half), self.stride * 2
            keep = piece[(self.kept + np.arange(len(piece))) % self.stride == 0]
            self.kept += len(piece)
            self._write(cols, rows, keep)
            rows += len(keep)
        last = points[-1:]
        self.tail = not rows or float(numpy_support.vtk_to_numpy(cols[0])[rows - 1]) != float(last[0, 0])
        if self.tail:
            self._write(cols, rows, last)
            rows += 1
        for col in cols:
            if col.GetNumberOfTuples() > rows:
                col.SetNumberOfTuples(rows)  # only after a cut-back or a decimation
            col.Modified()
        table.GetTable().Modified()
        table.Modified()


class LiveChart:
    """The curves of the job a panel follows: append-only, and never a reason for a timer tick to raise.

    The chart is identified by node ID plus a token attribute, so a closed scene (``reset``), a chart node the
    user deleted or a table removed with it is noticed and re-created on the next :meth:`update` instead of
    raising every tick; curves resume from the full history (decimated), not from where they stopped.
    """

    def __init__(self, title: str, cap: int = MAX_POINTS) -> None:
        self.title = title
        self.cap = cap
        self.chart_id: str | None = None
        self._token = ""
        self._curves: dict[str, _Curve] = {}
        self._serial = 0
        self.error = ""  # the last drawing failure, for the log; cleared by a good update

    def reset(self) -> None:
        """Forget the chart (the scene is closing: its node IDs may be reused by the next scene)."""
        self.chart_id, self._token, self._curves = None, "", {}

    def chart(self, scene: slicer.vtkMRMLScene) -> slicer.vtkMRMLPlotChartNode | None:
        """The chart node if it is still ours and in ``scene``."""
        node = scene.GetNodeByID(self.chart_id) if self.chart_id else None
        return node if node is not None and node.GetAttribute(CHART_ATTRIBUTE) == self._token else None

    def follow(self, scene: slicer.vtkMRMLScene) -> slicer.vtkMRMLPlotChartNode:
        """Start a fresh chart (a new run is followed)."""
        self.reset()
        return self._create(scene)

    def _create(self, scene: slicer.vtkMRMLScene) -> slicer.vtkMRMLPlotChartNode:
        self._serial += 1
        chart = new_chart(scene, self.title)
        self._token = f"{id(self)}-{self._serial}"
        chart.SetAttribute(CHART_ATTRIBUTE, self._token)
        self.chart_id, self._curves = chart.GetID(), {}
        return chart

    def update(self, scene: slicer.vtkMRMLScene, history: MetricHistory, create: bool = True) -> bool:
        """Draw the points added to ``history`` since the last call; True when a chart was (re)created.

        Errors are caught and kept in :attr:`error` (the panel logs them): a timer tick must never raise.
        """
        try:
            return self._update(scene, history, create)
        except Exception as exc:  # noqa: BLE001 - drawing curves must not break the job it follows
            if f"live curves: {exc}" != self.error:
                logging.getLogger("VoCoSlicer").warning("live curves: %s", exc, exc_info=True)  # once, not per tick
            self.error = f"live curves: {exc}"
            self.reset()
            return False

    def _update(self, scene: slicer.vtkMRMLScene, history: MetricHistory, create: bool) -> bool:
        chart = self.chart(scene)
        created = False
        if chart is None:
            if not create or not history.names():
                return False
            chart, created = self._create(scene), True
        for name in history.names():
            curve = self._curves.get(name)
            table = scene.GetNodeByID(curve.table_id) if curve else None
            if table is None:  # new metric, or its table was deleted: start it again from the whole history
                orphan = scene.GetNodeByID(curve.series_id) if curve else None
                if orphan is not None:
                    scene.RemoveNode(orphan)
                curve = self._curves[name] = _Curve(_new_series(scene, chart, name), self.cap)
                table = scene.GetNodeByID(curve.table_id)
            points = history.since(name, curve.consumed)
            if len(points):
                curve.add(table, points)
                curve.consumed += len(points)
        self.error = ""
        return created


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
