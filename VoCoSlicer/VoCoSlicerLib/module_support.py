"""What the three module widgets share, written once and Qt-free: the "Python for jobs" setting, the timer tick
(one error report per tick, no re-entry), the incremental log view and the self-test wait loop.

Qt objects come in as arguments (``QSettings`` has ``value``/``setValue``; a log view has ``appendPlainText``),
so these helpers run in pytest with plain stand-ins and in Slicer with the real widgets.
"""

from __future__ import annotations

import collections
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

PYTHON_SETTING = "VoCoSlicer/PythonExecutable"  # application setting: one interpreter for all scenes


def path_text(path: Any) -> str:
    """A path widget's or parameter's text with the "no path" spellings ("", ".", None) as ""."""
    text = "" if path is None else str(path).strip()
    return "" if text in ("", ".") else text


def read_python(settings: Any) -> str:
    """The saved "Python for jobs" path ("" = Slicer's own PythonSlicer)."""
    return path_text(settings.value(PYTHON_SETTING, ""))


def write_python(settings: Any, path: Any) -> str:
    """Save a new "Python for jobs" path ("" clears it); returns what was saved."""
    text = path_text(path)
    settings.setValue(PYTHON_SETTING, text)
    return text


class LogLines(collections.deque):
    """A job's log (bounded deque) that also counts every line ever added, so a view appends only new ones."""

    def __init__(self, lines: Iterable[str] = (), maxlen: int | None = None) -> None:
        super().__init__(lines, maxlen)
        self.appended = len(self)

    def append(self, line: str) -> None:
        """Add one line (the oldest drops out past ``maxlen``)."""
        super().append(line)
        self.appended += 1


class LogFollower:
    """Feeds a text view only the lines it has not shown yet (``appendPlainText``, never ``setPlainText``:
    rewriting the view every tick reset the user's scroll position and selection)."""

    def __init__(self) -> None:
        self._seen: dict[int, int] = {}

    def new_lines(self, logs: Iterable[tuple[str, Any]]) -> list[str]:
        """Lines added to each ``(prefix, log)`` since the last call; ``log`` has ``appended`` (LogLines) or is
        any sequence (then its length counts)."""
        out = []
        for prefix, log in logs:
            total = getattr(log, "appended", None)
            total = len(log) if total is None else total
            fresh = total - self._seen.get(id(log), 0)
            self._seen[id(log)] = total
            if fresh > 0:
                out += [prefix + line for line in list(log)[max(len(log) - fresh, 0):]]
        return out

    def show(self, view: Any, logs: Iterable[tuple[str, Any]]) -> int:
        """Append the new lines to ``view`` (a QPlainTextEdit); returns how many."""
        lines = self.new_lines(logs)
        if lines:
            view.appendPlainText("\n".join(lines))
        return len(lines)


class TimerTick:
    """Runs a panel's timer work: each step may fail without stopping the others, all failures of one tick are
    reported once, and a tick that arrives while a report (a modal dialog runs its own event loop) or another
    tick is in progress does nothing. Nested ``tryWithErrorDisplay`` blocks showed two dialogs per failure
    and let the timer re-enter."""

    def __init__(self, report: Callable[[str], None], log: logging.Logger | None = None) -> None:
        self.report = report
        self.log = log or logging.getLogger("VoCoSlicer")
        self.running = False

    def __call__(self, steps: Iterable[tuple[str, Callable[[], Any]]]) -> list[str]:
        """Run ``(what, fn)`` steps; returns the failure messages (empty when all went well or re-entered)."""
        if self.running:
            return []
        self.running = True
        try:
            errors = []
            for what, fn in steps:
                try:
                    fn()
                except Exception as exc:  # noqa: BLE001 - shown to the user once, below
                    self.log.exception("%s failed", what)
                    errors.append(f"{what}: {exc}")
            if errors:
                self.report("\n".join(errors))
            return errors
        finally:
            self.running = False


def scratch_dir(temp_dir: str) -> str:
    """A fresh folder of one job's own inside ``temp_dir`` (``slicer.util.tempDirectory()``, which names folders by
    the millisecond, so two jobs started in one tick would share a run folder); the job's driver deletes it."""
    os.makedirs(temp_dir, exist_ok=True)
    return tempfile.mkdtemp(prefix="vocoslicer-", dir=temp_dir)


def fill_table(table: Any, rows: Sequence[Sequence[str]], make_item: Callable[[str], Any],
               tooltips: Sequence[str] | None = None) -> None:
    """Fill a ``QTableWidget`` with text cells (``make_item`` is ``qt.QTableWidgetItem``), one tooltip per row."""
    table.setRowCount(len(rows))
    for i, cells in enumerate(rows):
        for j, text in enumerate(cells):
            item = make_item(str(text))
            if tooltips is not None:
                item.setToolTip(tooltips[i])
            table.setItem(i, j, item)
    table.resizeColumnsToContents()


def wait_for(driver: Any, process_events: Callable[[], Any] = lambda: None, timeout: float = 600.0,
             interval: float = 0.1) -> bool:
    """Tick ``driver`` until it is idle or ``timeout`` s passed (self-tests; the GUI uses its timer instead).
    Returns True when the job ended."""
    deadline = time.monotonic() + timeout
    while driver.busy and time.monotonic() < deadline:
        driver.tick()
        process_events()
        time.sleep(interval)
    return not driver.busy


def job_python(settings: Any) -> str:
    """The interpreter jobs run with: the saved "Python for jobs", else Slicer's own PythonSlicer."""
    from VoCoSlicerLib.engine import python_executable

    return python_executable(read_python(settings))


class PanelPlumbing:
    """The parameter-node and scene-close plumbing of Slicer's scripted-module template, written once for the
    three widgets. Mixed in before ``ScriptedLoadableModuleWidget``; uses ``self.logic.getParameterNode()``,
    ``self.ui``, ``self.parent.isEntered`` and ``addObserver`` (VTKObservationMixin). Widgets override the hooks
    ``parameterNodeSet``, ``sceneClosing`` and ``sceneClosed``; Qt stays in the widgets."""

    _parameterNode: Any = None
    _parameterNodeGuiTag: Any = None

    def observeSceneClose(self, scene: Any) -> None:
        """Follow the scene's StartClose/EndClose events."""
        self.addObserver(scene, scene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(scene, scene.EndCloseEvent, self.onSceneEndClose)

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, node: Any) -> None:
        if self._parameterNode is not None and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode, self._parameterNodeGuiTag = node, None
        if node is not None:
            self._parameterNodeGuiTag = node.connectGui(self.ui)
            self.parameterNodeSet()

    def parameterNodeSet(self) -> None:
        """Hook: a parameter node was just bound to the GUI."""

    def sceneClosing(self) -> None:
        """Hook: the scene starts closing (forget node references and chart IDs)."""

    def sceneClosed(self) -> None:
        """Hook: the scene was closed (before the parameter node is bound again)."""

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller: Any, event: Any) -> None:
        self.setParameterNode(None)
        self.sceneClosing()

    def onSceneEndClose(self, caller: Any, event: Any) -> None:
        self.sceneClosed()
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onReload(self) -> None:
        """Reload VoCoSlicerLib too (Slicer's Reload only reloads the module file)."""
        import VoCoSlicerLib

        VoCoSlicerLib.reload_package()
        super().onReload()  # ScriptedLoadableModuleWidget.onReload
