"""The "Segment a folder..." job as the panel drives it: engine command line, progress text, end-of-batch summary.

Qt-free so it is tested without Slicer. The widget starts the list returned by :func:`segment_folder_args` (or
:func:`cohort_proposals_args`) with ``JobDriver.start([...], run_dir=...)``, shows :func:`progress_text` of each
``progress`` event, and after the job reads :func:`read_status` for the table of failed cases. A rerun with the same
output folder resumes: the engine skips the cases its status file lists as done. :class:`FolderSegment` is that
whole loop for VoCoPretrain's "Segment a folder" section, so the module file only copies its values onto widgets.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from VoCoSlicerLib import panels
from VoCoSlicerLib.state import JobState

if TYPE_CHECKING:
    from VoCoSlicerLib.job_driver import JobDriver

STATUS_FILE = "segment_status.jsonl"  # written by vocoslicer.infer.batch
FORMATS = ("nifti", "nrrd", "seg.nrrd", "mha", "dicom-seg")


def _common(model: str | None, device: str, fmt: str, fast: bool) -> list[str]:
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r} (one of {', '.join(FORMATS)})")
    args = ["--device", device or "auto", "--format", fmt]
    if model:
        args += ["--model", str(model)]
    if fast:
        args.append("--fast")
    return args


def segment_folder_args(inputs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
                        model: str | None = None, device: str = "auto", fmt: str = "nifti", fast: bool = False,
                        dicom_source: str | os.PathLike[str] | None = None) -> list[str]:
    """``segment INPUT... -o OUT_DIR ...`` (the arguments after ``python -m vocoslicer``).

    Raises ``ValueError`` with a message for the panel when the choice cannot work (no input, or the output
    folder inside an input folder, where the next run would pick the results up as inputs).
    """
    if not inputs:
        raise ValueError("choose at least one input file or folder")
    out = Path(out_dir).expanduser().resolve()
    for src in inputs:
        p = Path(src).expanduser().resolve()
        if p.is_dir() and (out == p or p in out.parents):
            raise ValueError(f"the output folder {out} is inside the input folder {p}; choose another one")
    args = ["segment", *(str(i) for i in inputs), "-o", str(out), *_common(model, device, fmt, fast)]
    if dicom_source:
        args += ["--dicom-source", str(dicom_source)]
    return args


def cohort_proposals_args(cohort: str | os.PathLike[str], model: str | None = None, device: str = "auto",
                          fast: bool = False) -> list[str]:
    """``segment --cohort C --unlabelled``: proposals for the cohort's unlabelled cases, written into the cohort."""
    if not cohort:
        raise ValueError("choose a cohort folder")
    args = ["segment", "--cohort", str(cohort), "--unlabelled", "--device", device or "auto"]
    if model:
        args += ["--model", str(model)]
    return args + (["--fast"] if fast else [])


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 90:
        return f"{s} s"
    if s < 5400:
        return f"{round(s / 60)} min"
    return f"{s // 3600} h {round((s % 3600) / 60)} min"


def progress_text(event: Mapping[str, Any]) -> str:
    """``12/40 cases, 1 failed, ETA 3 min`` from a batch ``progress`` event (empty for other events)."""
    if event.get("kind") != "progress" or "remaining" not in event:
        return ""
    total = int(event.get("total") or 0)
    finished = int(event.get("done") or 0) + int(event.get("failed") or 0)
    parts = [f"{finished}/{total} cases"]
    if event.get("failed"):
        parts.append(f"{int(event['failed'])} failed")
    eta = event.get("eta_s")
    if isinstance(eta, (int, float)) and event.get("remaining"):
        parts.append(f"ETA {_duration(float(eta))}")
    return ", ".join(parts)


@dataclass
class BatchStatus:
    """What the status file of an output folder says: the last record of each case."""

    done: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (case, one-line reason)
    outputs: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the panel's status label."""
        text = f"{len(self.done)} segmented"
        return text + (f", {len(self.failed)} failed" if self.failed else "")


def read_status(out_dir: str | os.PathLike[str]) -> BatchStatus:
    """Read ``OUT_DIR/segment_status.jsonl`` (tolerating a torn last line of a killed run)."""
    path = Path(out_dir) / STATUS_FILE
    last: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "case" in rec:
                last[str(rec["case"])] = rec
    status = BatchStatus()
    for case, rec in last.items():
        if rec.get("status") == "done":
            status.done.append(case)
            status.outputs[case] = str(rec.get("output", ""))
        elif rec.get("status") == "failed":
            status.failed.append((case, str(rec.get("error", ""))))
    return status


class FolderSegment:
    """One "Segment a folder" job: Start/Cancel, the batch's own progress text, and the summary once it ended.

    Why not only :class:`JobDriver`: its state machine knows the fraction of a ``progress`` event but not the batch's
    done/failed counts and ETA, and a batch with failed cases exits 2, which the driver calls "failed" although most
    cases were segmented; the status file, read when the job ends, says which.
    """

    def __init__(self, action: str = "Segment folder") -> None:
        from VoCoSlicerLib.job_driver import JobDriver  # pulls in plots (slicer, vtk); the helpers above need neither

        self.driver = JobDriver(action, on_finished=self._finished)
        self.progress = ""  # progress_text of the latest progress event
        self.status: BatchStatus | None = None  # the output folder's status file, read when the job ended
        self.out_dir: Path | None = None

    @property
    def busy(self) -> bool:
        """True while the batch runs or is being cancelled (the panel's timer keeps ticking)."""
        return self.driver.busy

    def toggle(self, input_dir: str, out_dir: str, model: str = "", device: str = "auto", python: str | None = None,
               run_dir: str | os.PathLike[str] | Callable[[], str | os.PathLike[str]] | None = None) -> str:
        """The Start/Cancel button: cancel a running batch (``"cancelling"``), else start one (``"started"``).

        ``run_dir`` (keeps the job's log and console) may be a function, called only when a batch starts, so a
        Cancel or a refused choice leaves no empty run folder behind.

        Raises ``ValueError`` with a message for the panel for a missing folder or a choice that cannot work.
        """
        if self.driver.busy:
            self.driver.cancel()
            return "cancelling"
        if not str(input_dir or "").strip() or not Path(input_dir).is_dir():
            raise ValueError(f"choose an existing input folder (not {str(input_dir or '')!r})")
        if not str(out_dir or "").strip():
            raise ValueError("choose an output folder")
        args = segment_folder_args([input_dir], out_dir, model=(model or "").strip() or None, device=device)
        self.progress, self.status, self.out_dir = "", None, Path(args[args.index("-o") + 1])
        self.driver.start([args], run_dir=run_dir() if callable(run_dir) else run_dir, python=python)
        return "started"

    def tick(self) -> None:
        """Poll the job once (the panel's timer); keeps the latest batch progress text."""
        for event in self.driver.tick():
            self.progress = progress_text(event) or self.progress

    def _finished(self, driver: JobDriver) -> None:
        if self.out_dir is not None:
            self.status = read_status(self.out_dir)

    def label(self) -> str:
        """The status label: batch progress while running, the summary (and the first failures) after it."""
        state = self.driver.state
        if state.state is JobState.RUNNING:
            return self.progress or state.view().progress_text
        if state.state is JobState.CANCELLING or self.status is None or not (self.status.done or self.status.failed):
            return state.view().progress_text
        text = f"{self.status.summary()} into {self.out_dir}"
        if state.state is JobState.IDLE:
            text = f"cancelled: {text}"
        if self.status.failed:
            shown = "; ".join(f"{case} ({why})" for case, why in self.status.failed[:3])
            text += f". Failed: {shown}" + ("; ..." if len(self.status.failed) > 3 else "")
        return text

    def show(self, button: Any, bar: Any, label: Any) -> None:
        """Copy button text, progress bar and status label onto widgets (any objects with those properties)."""
        panels.show_job(replace(panels.job_widgets(self.driver), label=self.label()), button, bar, label)
