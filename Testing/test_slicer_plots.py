"""Live curves on a real slicer-core scene: append-only tables, decimation, and a chart that survives a closed
scene or a deleted node (issue 12, items 3 and 10)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from VoCoSlicerLib import plots


def _feed(h: plots.MetricHistory, start: int, stop: int) -> None:
    for s in range(start, stop):
        h.add({"kind": "metric", "step": s, "loss": 1.0 / s})


def _curve(scene, live, name="train/loss"):
    chart = live.chart(scene)
    for i in range(chart.GetNumberOfPlotSeriesNodes()):
        series = chart.GetNthPlotSeriesNode(i)
        if series.GetName() == name:
            t = series.GetTableNode().GetTable()
            return np.array([[t.GetValue(r, 0).ToDouble(), t.GetValue(r, 1).ToDouble()]
                             for r in range(t.GetNumberOfRows())])
    raise AssertionError(f"no curve {name}")


def test_appends_cut_back_on_resume_and_match_the_history(slicer_core):
    scene = slicer_core.scene
    h, live = plots.MetricHistory(), plots.LiveChart("t")
    live.follow(scene)
    _feed(h, 1, 8)
    live.update(scene, h)
    _feed(h, 8, 11)
    live.update(scene, h)
    np.testing.assert_allclose(_curve(scene, live)[:, 0], np.arange(1, 11))
    _feed(h, 6, 9)  # resumed from the checkpoint at step 5
    live.update(scene, h)
    steps, values = h.arrays("train/loss")
    np.testing.assert_allclose(_curve(scene, live), np.column_stack([steps, values]))
    assert steps.tolist() == [1, 2, 3, 4, 5, 6, 7, 8]


def test_long_runs_are_decimated_and_keep_the_latest_point(slicer_core):
    scene = slicer_core.scene
    h, live = plots.MetricHistory(), plots.LiveChart("t", cap=100)
    live.follow(scene)
    for chunk in range(1, 2001, 37):
        _feed(h, chunk, min(chunk + 37, 2001))
        live.update(scene, h)
        curve = _curve(scene, live)
        assert len(curve) <= 101 and curve[-1, 0] == min(chunk + 36, 2000)  # tail = the newest step
        assert np.all(np.diff(curve[:, 0]) > 0)
    assert len(_curve(scene, live)) > 40  # decimated, not emptied


def _c_calls(fn) -> int:
    """C-level calls (VTK methods, numpy) made by ``fn``: a cost count that needs no timing."""
    count = 0

    def prof(frame, event, arg):
        nonlocal count
        count += event == "c_call"

    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count


def test_tick_cost_does_not_grow_with_the_history(slicer_core):
    """A tick after 100k points costs the same VTK/numpy calls as one after 100 (the old code rebuilt every
    table point by point: ~2 calls per point per tick)."""
    scene = slicer_core.scene
    costs = {}
    for n in (100, 100_000):
        h, live = plots.MetricHistory(), plots.LiveChart("t")
        live.follow(scene)
        _feed(h, 1, n)
        live.update(scene, h)  # the catch-up (reattach) tick
        ticks = []
        for k in range(3):
            _feed(h, n + 5 * k, n + 5 * k + 5)
            ticks.append(_c_calls(lambda h=h, live=live: live.update(scene, h)))
        costs[n] = min(ticks)
        assert len(_curve(scene, live)) <= plots.MAX_POINTS + 1
    assert costs[100_000] <= costs[100] + 5, costs


@pytest.mark.parametrize("how", ["clear scene", "delete chart", "delete table"])
def test_chart_survives_a_closed_scene_or_deleted_nodes(slicer_core, how):
    scene = slicer_core.scene
    h, live = plots.MetricHistory(), plots.LiveChart("t")
    first = live.follow(scene)
    _feed(h, 1, 20)
    live.update(scene, h)
    if how == "clear scene":
        scene.Clear(0)
        live.reset()  # what the panel does on StartCloseEvent
        scene.AddNewNodeByClass("vtkMRMLPlotChartNode", "someone else's chart")  # may reuse the old ID
    elif how == "delete chart":
        scene.RemoveNode(first)
    else:
        chart = live.chart(scene)
        scene.RemoveNode(chart.GetNthPlotSeriesNode(0).GetTableNode())
    _feed(h, 20, 30)
    for _ in range(3):  # every tick: no exception
        live.update(scene, h)
        assert live.error == ""
    chart = live.chart(scene)
    assert chart is not None and chart.GetAttribute(plots.CHART_ATTRIBUTE)
    np.testing.assert_allclose(_curve(scene, live)[:, 0], np.arange(1, 30))  # curves resume, whole history
    if how != "delete table":
        assert chart is not first


def test_update_never_raises(slicer_core):
    h, live = plots.MetricHistory(), plots.LiveChart("t")
    _feed(h, 1, 5)
    assert live.update(None, h) is False  # a broken scene: reported, not raised
    assert live.error.startswith("live curves:")
    assert live.update(slicer_core.scene, h) is True and live.error == ""  # re-created on demand
