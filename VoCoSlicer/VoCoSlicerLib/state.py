"""The processing state of one background job, driving Apply <-> Cancel, the progress bar and enabled widgets.

One explicit state machine per running job replaces scattered ``if self.process`` checks in widgets: the widget
only calls :meth:`JobStateMachine.start`, :meth:`~JobStateMachine.request_cancel` and
:meth:`~JobStateMachine.apply_event` and redraws itself from :meth:`~JobStateMachine.view`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class JobState(enum.Enum):
    """The five states a job can be in, as seen by the GUI."""

    IDLE = "idle"
    RUNNING = "running"
    CANCELLING = "cancelling"
    FAILED = "failed"
    DONE = "done"


_ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.IDLE: frozenset({JobState.RUNNING}),
    JobState.RUNNING: frozenset({JobState.CANCELLING, JobState.FAILED, JobState.DONE, JobState.IDLE}),
    JobState.CANCELLING: frozenset({JobState.IDLE, JobState.FAILED, JobState.DONE}),
    JobState.FAILED: frozenset({JobState.RUNNING, JobState.IDLE}),
    JobState.DONE: frozenset({JobState.RUNNING, JobState.IDLE}),
}


class InvalidTransition(RuntimeError):
    """A GUI action arrived in a state where it makes no sense (e.g. Cancel while idle)."""


@dataclass(frozen=True)
class JobView:
    """What the widgets should show for the current state."""

    button_text: str
    button_enabled: bool
    button_tooltip: str
    inputs_enabled: bool
    progress_visible: bool
    progress_percent: int  # 0..100, or -1 for "busy" (unknown total)
    progress_text: str


@dataclass
class JobStateMachine:
    """State of one job plus the latest progress, stage text and user-facing message.

    >>> sm = JobStateMachine(action="Segment")
    >>> sm.start(); sm.apply_event({"kind": "progress", "step": 1, "total": 4, "stage": "inference"})
    >>> sm.view().button_text, sm.view().progress_percent
    ('Cancel', 25)
    """

    action: str = "Apply"
    state: JobState = JobState.IDLE
    stage: str = ""
    fraction: float | None = None
    message: str = ""
    on_change: Callable[[JobState, JobState], None] | None = None

    def _go(self, new: JobState) -> None:
        old = self.state
        if new not in _ALLOWED[old]:
            raise InvalidTransition(f"cannot go from {old.value} to {new.value}")
        self.state = new
        if self.on_change is not None and old is not new:
            self.on_change(old, new)

    @property
    def busy(self) -> bool:
        """True while a job is running or being cancelled (inputs must not change)."""
        return self.state in (JobState.RUNNING, JobState.CANCELLING)

    def start(self, stage: str = "starting") -> None:
        """A job was launched."""
        self.stage, self.fraction, self.message = stage, None, ""
        self._go(JobState.RUNNING)

    def request_cancel(self) -> None:
        """The user pressed Cancel; the job is asked to stop and we wait for it to exit."""
        self.stage = "cancelling"
        self._go(JobState.CANCELLING)

    def finish(self, status: str, message: str = "") -> None:
        """The job ended: ``status`` is ``ok``, ``cancelled`` or ``failed`` (the engine's ``done`` statuses)."""
        if status == "ok":
            self.fraction, self.stage = 1.0, "done"
            self.message = message or self.message
            self._go(JobState.DONE)
        elif status == "cancelled":
            self.stage, self.message = "", message or "cancelled"
            self._go(JobState.IDLE)
        else:
            self.stage = "failed"
            self.message = message or self.message or "the job failed (see the log)"
            self._go(JobState.FAILED)

    def reset(self) -> None:
        """Back to idle after the user has seen a result or an error."""
        if self.state is not JobState.IDLE:
            self._go(JobState.IDLE)
        self.stage, self.fraction = "", None

    def apply_event(self, event: dict[str, Any]) -> None:
        """Fold one engine event (see vocoslicer/contracts/events.py) into the state; unknown kinds are ignored."""
        kind = event.get("kind")
        if kind == "progress":
            total = event.get("total") or 0
            step = event.get("step") or 0
            self.fraction = max(0.0, min(1.0, step / total)) if total else None
            if event.get("stage"):
                self.stage = str(event["stage"])
        elif kind == "error":
            self.message = str(event.get("message") or "error")
        elif kind == "done" and self.busy:
            self.finish(str(event.get("status") or "failed"), self.message)

    def view(self) -> JobView:
        """How the action button and the progress bar should look now."""
        pct = -1 if self.fraction is None else int(round(100 * self.fraction))
        if self.state is JobState.RUNNING:
            text = self.stage or "running"
            return JobView("Cancel", True, f"Stop the running {self.action.lower()} job", False, True, pct,
                           text if pct < 0 else f"{text} {pct}%")
        if self.state is JobState.CANCELLING:
            return JobView("Cancelling...", False, "Waiting for the job to stop", False, True, -1, "cancelling")
        if self.state is JobState.FAILED:
            return JobView(self.action, True, self.message, True, True, 0, f"failed: {self.message}")
        if self.state is JobState.DONE:
            return JobView(self.action, True, "", True, True, 100, self.message or "done")
        return JobView(self.action, True, "", True, bool(self.message), 0, self.message)
