"""VoCoSegment's jobs and what follows from them, Qt-free: segment/classify (one-shot or warm worker), the model
list with its real default and the VoComni-B download offer, cohort adds, finetuning with live curves.

The widget passes in what needs the Slicer application (temporary folder, interpreter, "show this result",
"run this later" = ``QTimer.singleShot``) and copies :meth:`SegmentPanel.view` onto its widgets; everything
else is here and runs in pytest on a slicer-core scene with real child processes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from VoCoSlicerLib import cohort_view, engine, models_view, module_support, panels, plots, segment_flow
from VoCoSlicerLib.job_driver import JobDriver
from VoCoSlicerLib.job_runs import list_runs, new_run_dir
from VoCoSlicerLib.params import CohortParams, FinetuneParams, SegmentParams
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


class SegmentPanel:
    """The four jobs of the panel. Callbacks: ``show_segmentation(seg, volume)``, ``show_table(table)``,
    ``show_models(entries, index)``, ``defer(fn)`` (run after the current tick)."""

    def __init__(self, scene: Any, temp_dir: Callable[[], str], python: Callable[[], str],
                 show_segmentation: Callable[[Any, Any], None], show_table: Callable[[Any], None],
                 show_models: Callable[[list[models_view.Entry], int], None],
                 defer: Callable[[Callable[[], Any]], None], chart_title: str = "Finetune",
                 startup_env: Any = None) -> None:
        if startup_env is not None:  # Slicer's ``slicer.util.startupEnvironment``: for a foreign "Python for jobs"
            engine.set_startup_environment(startup_env)
        self.scene, self.temp_dir, self.python = scene, temp_dir, python
        self.show_segmentation, self.show_table, self.show_models, self.defer = (
            show_segmentation, show_table, show_models, defer)
        self.job = JobDriver("Segment", on_finished=self._job_finished)
        self.cohort = JobDriver("Add", on_finished=self._cohort_finished)
        self.finetune = JobDriver("Finetune", on_finished=self._finetune_finished)
        self.models = JobDriver("Models", on_finished=self._models_finished)
        self.curves = plots.LiveChart(chart_title)
        self.entries: list[models_view.Entry] = []
        self.model = ""  # the selected model spec (what the parameter node's ``model`` holds)
        self.cohort_text = ""
        self.model_error = ""
        self.task: segment_flow.Task | None = None
        self.worker: Any = None
        self._download: str | None = None
        self._segment_next: Callable[[], Any] | None = None

    @property
    def drivers(self) -> tuple[JobDriver, ...]:
        return self.job, self.cohort, self.finetune, self.models

    @property
    def busy(self) -> bool:
        return any(d.busy for d in self.drivers)

    @property
    def downloading(self) -> bool:
        return self._download is not None and self.models.busy

    def close(self) -> None:
        """The panel goes away: stop its jobs (finetune runs are detached on purpose and keep going)."""
        for driver in (self.job, self.cohort, self.models):
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
            else:
                self.show_table(segment_flow.load_classify_result(self.scene, task, task.volume))
        except segment_flow.StaleResult as exc:  # the scene was closed meanwhile: nothing to load into
            driver.state.message = str(exc)
            driver.log.append(str(exc))

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
    def add_case(self, volume: Any, segmentation: Any, params: CohortParams, labelled: bool) -> None:
        """Export the case (labelled: with the corrected segmentation) into the cohort, then count it."""
        if labelled and segmentation is None:
            raise ValueError("segment the volume (and correct it) first")
        if volume is None:
            raise ValueError("select an input volume first")
        work, runs = self._scratch(), self._scratch()  # ``cohort add`` copies the case into the cohort
        commands = segment_flow.prepare_cohort_case(self.scene, volume, segmentation if labelled else None,
                                                    params, work)
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
            self.cohort_text = cohort_view.counts_from_list(driver.json_output()).summary()

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

    # ------------------------------------------------------------------ polling and view
    def tick_steps(self) -> list[tuple[str, Callable[[], Any]]]:
        """The work of one timer tick, for :class:`VoCoSlicerLib.module_support.TimerTick`."""
        return [(d.state.action, d.tick) for d in self.drivers if d.busy]

    def view(self) -> PanelView:
        job = self.models if self.downloading else self.job
        segmenting = self.downloading or self.job.state.action == "Segment"
        return PanelView(panels.job_widgets(job), segmenting, not job.busy, panels.job_widgets(self.finetune),
                         not self.finetune.busy, not job.busy and not self.cohort.busy, not self.models.busy)

    def logs(self) -> list[tuple[str, Any]]:
        """``(prefix, log)`` of every job, for :class:`VoCoSlicerLib.module_support.LogFollower`."""
        return [(f"[{d.state.action}] ", d.log) for d in self.drivers]



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
