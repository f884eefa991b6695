"""Live training curves: cost of one timer tick vs the length of the run (issue 12, item 10), same process.

- baseline: what the panels did before: every tick rebuilds every metric's table point by point in Python
  (``vtkDoubleArray.SetValue`` per point), reproduced here as ``rebuild_tick``;
- ours: :class:`VoCoSlicerLib.plots.LiveChart` (only new points, numpy -> VTK in one copy per column, curves
  decimated to ``MAX_POINTS``).

For 4 metrics and a history of N points each, one tick adds 10 new points per metric. Reported: milliseconds
per tick (median of 5) and the ratio baseline/ours. Needs slicer-core (a real MRML scene), no Slicer app.
"""

from __future__ import annotations

import argparse
import statistics
import time

import slicer
import vtk

from VoCoSlicerLib import plots

METRICS = ("train/loss", "train/lr", "train/dice", "val/dice")


def feed(history: plots.MetricHistory, start: int, stop: int) -> None:
    for s in range(start, stop):
        history.add({"kind": "metric", "step": s, "loss": 1.0 / s, "lr": 1e-4, "dice": s % 97 / 97})
        history.add({"kind": "metric", "step": s, "split": "val", "dice": s % 89 / 89})


def rebuild_tick(scene: slicer.vtkMRMLScene, tables: dict, history: plots.MetricHistory) -> None:
    """The previous ``plots.update_chart``: all tables re-filled value by value."""
    for name in history.names():
        steps, values = history.arrays(name)
        if name not in tables:
            tables[name] = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
        t = tables[name].GetTable()
        t.Initialize()
        for col_name, data in (("step", steps), (name, values)):
            col = vtk.vtkDoubleArray()
            col.SetName(col_name)
            col.SetNumberOfValues(len(data))
            for i, v in enumerate(data):
                col.SetValue(i, float(v))
            t.AddColumn(col)
        tables[name].Modified()


def new_scene() -> tuple[slicer.vtkMRMLScene, tuple]:
    """A scene with colour tables (plot series pick their colours from one), as Testing/conftest.py sets up."""
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    colors = app_logic.GetColorLogic()
    colors.SetMRMLScene(scene)
    return scene, (app_logic, colors)  # keep the logics referenced: the app logic holds raw pointers


def measure(n: int, repeats: int) -> tuple[float, float]:
    scene, _keep = new_scene()
    out = []
    for kind in ("baseline", "ours"):
        history = plots.MetricHistory()
        feed(history, 1, n)
        live, tables = plots.LiveChart("bench"), {}
        live.follow(scene)
        tick = (lambda h=history, t=tables: rebuild_tick(scene, t, h)) if kind == "baseline" else \
            (lambda h=history, lc=live: lc.update(scene, h))
        tick()  # catch-up
        times, step = [], n
        for _ in range(repeats):
            feed(history, step, step + 10)
            step += 10
            t0 = time.perf_counter()
            tick()
            times.append(time.perf_counter() - t0)
        out.append(statistics.median(times) * 1e3)
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"| points per metric ({len(METRICS)} metrics) | baseline ms/tick | ours ms/tick | ratio |")
    print("|---|---|---|---|")
    for n in args.points:
        base, ours = measure(n, args.repeats)
        print(f"| {n} | {base:.1f} | {ours:.2f} | {base / ours:.0f}x |")


if __name__ == "__main__":
    main()
