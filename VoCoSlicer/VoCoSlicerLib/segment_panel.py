"""VoCoSegment's jobs and what follows from them, Qt-free: segment/classify (one-shot or warm worker), the model
list with its real default and the VoComni-B download offer, cohort adds, finetuning with live curves.

The widget passes in what needs the Slicer application (temporary folder, interpreter, "show this result",
"run this later" = ``QTimer.singleShot``) and copies :meth:`SegmentPanel.view` onto its widgets; everything
else is here and runs in pytest on a slicer-core scene with real child processes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from VoCoSlicerLib import (
    active_view,
    classify_view,
    cohort_view,
    engine,
    models_view,
    module_support,
    panels,
    plots,
    segment_flow,
)
from VoCoSlicerLib.job_driver import JobDriver
from VoCoSlicerLib.job_runs import list_runs, new_run_dir
from VoCoSlicerLib.params import DEMO_MODEL_ID, CohortParams, FinetuneParams, SegmentParams
from VoCoSlicerLib.state import JobState


@dataclass(frozen=True)
class PanelView:
    """Everything the panel's buttons, bars and labels show, for one redraw."""

    segment: panels.JobWidgets  # the job behind the Segment/Classify buttons (or the model download)
    segmenting: bool  # the Segment button (not Classify) carries ``segment``
    idle: bool
    finetune: panels.JobWidgets
    resume_enabled: bool
    add_enabled: bool
    refresh_enabled: bool
    active_enabled: bool  # "Next case to correct" and "Dice curve" (their rank / curve job is not running)


class SegmentPanel:
    """The four jobs of the panel. Callbacks: ``show_segmentation(seg, volume)``, ``show_table(table)``,
    ``show_models(entries, index)``, ``defer(fn)`` (run after the current tick), ``show_chart(chart)``."""

    def __init__(self, scene: Any, temp_dir: Callable[[], str], python: Callable[[], str],
                 show_segmentation: Callable[[Any, Any], None], show_table: Callable[[Any], None],
                 show_models: Callable[[list[models_view.Entry], int], None],
                 defer: Callable[[Callable[[], Any]], None], chart_title: str = "Finetune",
                 startup_env: Any = None, show_chart: Callable[[Any], None] | None = None) -> None:
        if startup_env is not None:  # Slicer's ``slicer.util.startupEnvironment``: for a foreign "Python for jobs"
            engine.set_startup_environment(startup_env)
        self.scene, self.temp_dir, self.python = scene, temp_dir, python
        self.show_segmentation, self.show_table, self.show_models, self.defer = (
            show_segmentation, show_table, show_models, defer)
        self.job = JobDriver("Segment", on_finished=self._job_finished)
        self.cohort = JobDriver("Add", on_finished=self._cohort_finished)
        self.finetune = JobDriver("Finetune", on_finished=self._finetune_finished)
        self.models = JobDriver("Models", on_finished=self._models_finished)
        self.active = JobDriver("Rank", on_finished=self._active_finished)  # ``cohort rank`` / ``cohort curve``
        self.show_chart = show_chart or (lambda chart: None)
        self.curves = plots.LiveChart(chart_title)
        self.entries: list[models_view.Entry] = []
        self.model = ""  # the selected model spec (what the parameter node's ``model`` holds)
        self.cohort_text = ""
        self.model_error = ""
        self.task: segment_flow.Task | None = None
        self.worker: Any = None
        self._download: str | None = None
        self._segment_next: Callable[[], Any] | None = None
        self.classes: list[str] = []  # the cohort's class names: the "Case class" items
        self.class_proposal: str | None = None  # what Classify proposes for the field (taken once by the widget)
        self.uncertainty_text = ""
        self.active_text = ""
        self.map_node: Any = None  # the uncertainty overlay, reloaded by the next segmentation
        self.curve_chart: Any = None
        self._next_cohort = ""
        self._show_map = False

    @property
    def drivers(self) -> tuple[JobDriver, ...]:
        return self.job, self.cohort, self.finetune, self.models, self.active

    @property
    def busy(self) -> bool:
        return any(d.busy for d in self.drivers)

    @property
    def downloading(self) -> bool:
        return self._download is not None and self.models.busy

    def close(self) -> None:
        """The panel goes away: stop its jobs (finetune runs are detached on purpose and keep going)."""
        for driver in (self.job, self.cohort, self.models, self.active):
            driver.cancel()
        if self.worker is not None:
            self.worker.close()

    # ------------------------------------------------------------------ segment / classify
    def run(self, op: str, volume: Any, segmentation: Any, params: SegmentParams,
            entry: models_view.Entry | None) -> str:
        """Segment or classify; returns ``cancelled`` (a click while busy), ``confirm`` (the selected model must
        be downloaded first: ask, then :meth:`download`) or ``started``."""
        for driver in (self.job, self.models if self._download else None):
            if driver is not None and driver.busy:
                driver.cancel()
                return "cancelled"
        if entry is None:
            raise ValueError("the model list is not loaded yet (see Refresh)")
        if op == "segment" and entry.kind == "download":
            self._segment_next = lambda: self.run(op, volume, segmentation, params, None)
            return "confirm"
        if volume is None:
            raise ValueError("select an input volume first")
        prepare = segment_flow.prepare_segment if op == "segment" else segment_flow.prepare_classify
        self.task = prepare(volume, params, self._scratch())
        self.task.segmentation = segmentation if op == "segment" else None
        self._show_map = params.uncertaintyMap
        if op == "segment":
            self.uncertainty_text = ""  # the previous case's, stale once another run starts
        self.job.state.action = "Segment" if op == "segment" else "Classify"
        self.job.python = self.python()
        if params.useWarmWorker:
            self.job.start_request(self._warm_worker(), op, self.task.request, fallback=self.task.args,
                                   temp_paths=[self.task.work_dir])
        else:
            self.job.start([self.task.args], python=self.python(), temp_paths=[self.task.work_dir])
        return "started"

    def _scratch(self) -> str:
        return module_support.scratch_dir(self.temp_dir())

    def _warm_worker(self) -> Any:
        from VoCoSlicerLib.worker_client import WorkerClient

        if self.worker is None or self.worker.python != self.python():
            if self.worker is not None:
                self.worker.close()
            self.worker = WorkerClient(python=self.python())
        return self.worker

    def _artifact(self) -> dict[str, Any] | None:
        result = self.job.result or {}
        return self.job.artifact("segmentation") or ({
            "labels": result.get("labels"), "model": result.get("model_id") or result.get("model"),
            "model_version": result.get("model_version")} if result else None)

    def _job_finished(self, driver: JobDriver) -> None:
        task, self.task = self.task, None
        if driver.state.state is not JobState.DONE or task is None:
            return
        try:
            if driver.state.action == "Segment":
                seg = segment_flow.load_segment_result(self.scene, task, task.volume, task.segmentation,
                                                       self._artifact())
                self.show_segmentation(seg, task.volume)
                self._show_uncertainty(task)
            else:
                segment_flow.check_target(self.scene, task)
                result = json.loads(task.output.read_text(encoding="utf-8"))
                self.show_table(classify_view.show_result(self.scene, result, task.volume))
                self.class_proposal = classify_view.proposed_text(result)
        except segment_flow.StaleResult as exc:  # the scene was closed meanwhile: nothing to load into
            driver.state.message = str(exc)
            driver.log.append(str(exc))

    def _show_uncertainty(self, task: segment_flow.Task) -> None:
        """The case's uncertainty text, and (when asked for) its entropy map over the slice views; the job's work
        folder is deleted after this callback, so the map is read into memory here."""
        artifact = self._artifact()
        self.uncertainty_text = active_view.uncertainty_text(active_view.load_uncertainty(artifact))
        path = (artifact or {}).get("uncertainty_map")
        node = self.map_node if self.map_node is not None and self.scene.IsNodePresent(self.map_node) else None
        if self._show_map and path:
            self.map_node = active_view.show_uncertainty_map(self.scene, path, task.volume, node=node)
        elif node is not None:  # the overlay shows an earlier result: gone (views drop their reference to it)
            self.scene.RemoveNode(node)
            self.map_node = None

    # ------------------------------------------------------------------ models
    def refresh_models(self) -> None:
        """List installed and downloadable models (no-op while a model job runs)."""
        if not self.models.busy:
            self._download = None
            runs = self._scratch()
            self.models.start([models_view.list_args()], run_dir=runs, python=self.python(), temp_paths=[runs])

    def download(self, entry: models_view.Entry) -> None:
        """Download the offered model (a ``models download`` job: progress, checksum, Cancel = Segment button);
        when installed, the list is refreshed, it becomes the default and the Segment asked for runs."""
        self._download = entry.spec
        self.models.start([models_view.download_args(entry.row)], python=self.python())

    def _models_finished(self, driver: JobDriver) -> None:
        download, self._download = self._download, None
        if driver.state.state is not JobState.DONE:
            self.model_error = "model job failed: " + (driver.state.message or driver.state.state.value)
            self._segment_next = None
            return
        self.model_error = ""
        if download:
            self.model = download.split("@")[0]  # the installed one is matched by ID
            self.defer(self.refresh_models)
            return
        self.entries = models_view.selector_entries(models_view.parse_catalog(driver.json_output()))
        index = models_view.default_index(self.entries, self.model)
        self.select(index)
        self.show_models(self.entries, index)
        segment_next, self._segment_next = self._segment_next, None
        if segment_next is not None and self.entries[index].kind != "download":
            self.defer(segment_next)

    def select(self, index: int) -> models_view.Entry | None:
        """The user (or the default) picked selector entry ``index``."""
        if not 0 <= index < len(self.entries):
            return None
        self.model = self.entries[index].spec
        return self.entries[index]

    # ------------------------------------------------------------------ cohort
    def add_case(self, volume: Any, segmentation: Any, params: CohortParams, labelled: bool,
                 class_text: str = "") -> None:
        """Export the case (labelled: with the corrected segmentation) into the cohort with the "Case class"
        field's classes (a new name is created, a known one keeps the cohort's spelling), then count it."""
        if labelled and segmentation is None:
            raise ValueError("segment the volume (and correct it) first")
        if volume is None:
            raise ValueError("select an input volume first")
        work, runs = self._scratch(), self._scratch()  # ``cohort add`` copies the case into the cohort
        commands = classify_view.with_class(segment_flow.prepare_cohort_case(
            self.scene, volume, segmentation if labelled else None, params, work), class_text, self.classes)
        self.cohort.start([*commands, params.list_args()], run_dir=runs, python=self.python(),
                          temp_paths=[work, runs])

    def cohort_folder_changed(self, folder: str) -> None:
        """Count an existing cohort; a new folder is created by the first add."""
        params = CohortParams(cohortDir=folder)
        if self.cohort.busy:
            return
        if not cohort_view.is_cohort(params.cohortDir):
            self.cohort_text = "New cohort: created on the first add." if params.cohortDir else ""
            return
        runs = self._scratch()
        self.cohort.start([params.list_args()], run_dir=runs, python=self.python(), temp_paths=[runs])

    def _cohort_finished(self, driver: JobDriver) -> None:
        if driver.state.state is not JobState.DONE:
            self.cohort_text = "Not added: " + driver.state.message
        else:
            listing = driver.json_output()
            self.classes = classify_view.class_items(listing)
            self.cohort_text = " ".join(t for t in (cohort_view.counts_from_list(listing).summary(),
                                                    classify_view.counts_summary(listing)) if t)

    # ------------------------------------------------------------------ finetune
    def start_finetune(self, params: FinetuneParams) -> Any:
        """Start (or, while one runs, stop) a detached finetune run; returns the new chart or None."""
        if self.finetune.busy:
            self.finetune.cancel()
            return None
        run_dir = new_run_dir("finetune")
        self.finetune.start([params.args(str(run_dir))], run_dir=run_dir, detached=True, python=self.python())
        return self.curves.follow(self.scene)

    def resume_finetune(self) -> Any:
        """Resume the newest stopped finetune run; returns its chart."""
        runs = panels.resumable(list_runs(), "finetune")
        if not runs:
            raise ValueError("there is no stopped finetune run to resume")
        self.finetune.python = self.python()
        self.finetune.resume(runs[0], detached=True)
        return self.curves.follow(self.scene)

    def _finetune_finished(self, driver: JobDriver) -> None:
        model = driver.artifact("model")
        if driver.state.state is JobState.DONE and model:
            self.model = model["path"]  # selected once the refreshed list arrives
            self.defer(self.refresh_models)
            driver.state.message = "New model {} {} (validation Dice {})".format(
                model.get("id", ""), model.get("version", ""), model.get("val_dice", "?"))

    def draw_curves(self) -> Any:
        """Append the finetune run's new points; returns a chart that was (re)created (to show), else None."""
        if self.curves.update(self.scene, self.finetune.metrics, create=self.finetune.busy):
            return self.curves.chart(self.scene)
        return None

    # ------------------------------------------------------------------ active learning
    def next_case(self, cohort_dir: str, device: str = "auto") -> None:
        """Load the best-ranked case not corrected yet with its proposal (to correct, then "Add to cohort");
        without a stored ranking (or with every ranked case done) rank with the selected model first, then retry."""
        if not cohort_view.is_cohort(cohort_dir):
            raise ValueError("choose an existing cohort folder first")
        if self.active.busy:
            self.active.cancel()
            return
        nxt = active_view.next_case(cohort_dir)
        if nxt is None:
            self._next_cohort = cohort_dir
            self.active.state.action = "Rank"
            self.active.start([active_view.rank_args(cohort_dir, self.model or DEMO_MODEL_ID, device=device)],
                              run_dir=self._scratch(), python=self.python())
            self.active_text = "Ranking the unlabelled cases ..."
            return
        self._load_next(cohort_dir, nxt)

    def _load_next(self, cohort_dir: str, nxt: active_view.NextCase) -> None:
        volume, seg = active_view.load_next_case(self.scene, cohort_dir, nxt)
        self.active_text, self.uncertainty_text = "Next case: " + nxt.summary(), ""
        self.show_segmentation(seg, volume)

    def dice_curve(self, cohort_dir: str) -> None:
        """``cohort curve DIR --json`` as a job; its rows become a chart (the same one, redrawn, next time)."""
        if not cohort_view.is_cohort(cohort_dir):
            raise ValueError("choose an existing cohort folder first")
        if not self.active.busy:
            self.active.state.action = "Curve"
            self.active.start([["cohort", "curve", str(cohort_dir), "--json"]], run_dir=self._scratch(),
                              python=self.python())

    def _active_finished(self, driver: JobDriver) -> None:
        if driver.state.state is not JobState.DONE:
            self.active_text = f"{driver.state.action} failed: " + (driver.state.message or driver.state.state.value)
            return
        if driver.state.action == "Curve":
            rows = (driver.json_output() or {}).get("rows") or []  # the engine refuses a cohort without any
            chart = self.curve_chart if self.curve_chart is not None and self.scene.IsNodePresent(
                self.curve_chart) else None
            self.curve_chart = active_view.curve_to_chart(self.scene, rows, chart)
            self.active_text = f"Dice curve: {len(rows)} model versions"
            self.show_chart(self.curve_chart)
            return
        nxt = active_view.next_case(self._next_cohort)
        if nxt is None:
            self.active_text = "Every ranked case is corrected: add unlabelled cases to the cohort."
            return
        try:
            self._load_next(self._next_cohort, nxt)
        except OSError as exc:
            self.active_text = str(exc)
            driver.log.append(str(exc))

    # ------------------------------------------------------------------ polling and view
    def tick_steps(self) -> list[tuple[str, Callable[[], Any]]]:
        """The work of one timer tick, for :class:`VoCoSlicerLib.module_support.TimerTick`."""
        return [(d.state.action, d.tick) for d in self.drivers if d.busy]

    def view(self) -> PanelView:
        job = self.models if self.downloading else self.job
        segmenting = self.downloading or self.job.state.action == "Segment"
        return PanelView(panels.job_widgets(job), segmenting, not job.busy, panels.job_widgets(self.finetune),
                         not self.finetune.busy, not job.busy and not self.cohort.busy, not self.models.busy,
                         not self.active.busy or self.active.state.action == "Rank")

    def logs(self) -> list[tuple[str, Any]]:
        """``(prefix, log)`` of every job, for :class:`VoCoSlicerLib.module_support.LogFollower`."""
        return [(f"[{d.state.action}] ", d.log) for d in self.drivers]

    def take_class_proposal(self) -> str | None:
        """The class Classify proposed, once (the user may overwrite the field afterwards)."""
        proposal, self.class_proposal = self.class_proposal, None
        return proposal


def show_models(combo: Any, entries: list[models_view.Entry], index: int,
                on_selected: Callable[[int], Any] | None = None) -> None:
    """Fill the model QComboBox (text, spec as item data) and select ``index`` without signals, then call
    ``on_selected(index)`` once (one info-label update, one parameter write)."""
    blocked = combo.blockSignals(True)
    combo.clear()
    for entry in entries:
        combo.addItem(entry.text, entry.spec)
    combo.setCurrentIndex(index)
    combo.blockSignals(blocked)
    if on_selected is not None:
        on_selected(index)


def show_classes(combo: Any, items: list[str], proposal: str | None) -> None:
    """Refill the editable "Case class" QComboBox only when the cohort's classes changed (it is called every
    tick: rebuilding would reset what the user is typing), keeping its text; then put ``proposal`` in it."""
    if [combo.itemText(i) for i in range(combo.count)] != items:
        text = combo.currentText
        blocked = combo.blockSignals(True)
        combo.clear()
        combo.addItems(items)
        combo.setEditText(text)
        combo.blockSignals(blocked)
    if proposal is not None:
        combo.setEditText(proposal)


def self_test(scene: Any, tmp: Path, load_volume: Callable[[Path], Any],
              wait: Callable[[JobDriver], None]) -> tuple[int, cohort_view.CohortCounts]:
    """VoCoSegment's in-app test, written once so pytest runs it too: phantom -> segment with the bundled model
    -> add to a cohort. ``wait(driver)`` must fail unless the job ended well. Returns (segments, cohort counts)."""
    driver = JobDriver("test", log_lines=100)
    driver.start([["phantom", "--seed", "7", "--size", "64", "64", "32", "-o", str(tmp / "ph"), "--format", ".nrrd"]])
    wait(driver)
    volume = load_volume(sorted((tmp / "ph").glob("*_ct.nrrd"))[0])
    task = segment_flow.prepare_segment(volume, SegmentParams(device="cpu", fast=True), tmp / "job")
    driver.start([task.args])
    wait(driver)
    seg = segment_flow.load_segment_result(scene, task, volume, artifact=driver.artifact("segmentation"))
    cohort = CohortParams(cohortDir=str(tmp / "cohort"), annotator="self-test")
    commands = segment_flow.prepare_cohort_case(scene, volume, seg, cohort, tmp / "case")
    driver.start([*commands, cohort.list_args()], run_dir=tmp / "cohort-runs")
    wait(driver)
    return seg.GetSegmentation().GetNumberOfSegments(), cohort_view.counts_from_list(driver.json_output())
