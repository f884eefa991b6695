"""Where a panel's job events come from: a child process (:class:`ProcessSource`) or one request to the warm
worker (:class:`WorkerRequestSource`), behind one small protocol that :class:`~VoCoSlicerLib.job_driver.JobDriver`
drives without knowing which it has.

Every method returns at once (they run on Slicer's GUI thread from a ``QTimer``): :meth:`poll` hands over a
bounded batch of new events, :meth:`cancel` only starts the stop, and :attr:`final` turns true once the source has
really ended (a cancelled worker: once its process tree is gone).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from VoCoSlicerLib.jobs import Job

UNAVAILABLE = "unavailable"  # a worker that died before it said anything: the driver may fall back to a job


class JobSource(Protocol):
    """What the driver needs from a source of job events."""

    @property
    def final(self) -> bool:
        """True once the source has ended and every event was handed over."""

    @property
    def more(self) -> bool:
        """True when events are already waiting beyond the last batch (a replay): poll again if time allows."""

    def poll(self) -> list[dict[str, Any]]:
        """New events (never raises)."""

    def foldable(self, event: dict[str, Any]) -> bool:
        """Whether ``event`` is progress/metrics/log for the panel (not the closing response)."""

    def outcome(self) -> tuple[str, str]:
        """``(ok|failed|cancelled|unavailable, message)`` of a final source."""

    def cancel(self) -> None:
        """Start stopping (returns at once; later polls see the end)."""

    def close(self) -> None:
        """Stop following; a source that must not outlive the panel is stopped."""


class ProcessSource:
    """A ``python -m vocoslicer`` child process (:class:`~VoCoSlicerLib.jobs.Job`), started or reattached."""

    def __init__(self, job: Job, grace_s: float = 10.0) -> None:
        self.job = job
        self.grace_s = grace_s

    @property
    def final(self) -> bool:
        """True once the job has ended and its last events were read."""
        return not self.job.running

    @property
    def more(self) -> bool:
        """The last batch stopped at the job client's read limit."""
        return self.job.backlog and self.job.running

    def poll(self) -> list[dict[str, Any]]:
        """The job's next batch of events."""
        return self.job.poll()

    def foldable(self, event: dict[str, Any]) -> bool:
        """Everything but ``done`` (the driver decides when a chain is finished)."""
        return event.get("kind") != "done"

    def outcome(self) -> tuple[str, str]:
        """The job's status (``run.json`` of this attempt has already been applied by the client)."""
        status = self.job.status if self.job.status in ("ok", "cancelled") else "failed"
        return status, "" if status == "ok" else (self.job.error or "")

    def cancel(self) -> None:
        """SIGTERM to the engine now, SIGKILL to the tree after ``grace_s`` (by a later poll)."""
        self.job.cancel(grace_s=self.grace_s)

    def close(self) -> None:
        """An attached (not detached) job is cancelled; a detached run keeps going."""
        self.job.close()


class WorkerRequestSource:
    """One request to a warm worker (:class:`~VoCoSlicerLib.worker_client.WorkerClient`).

    A request cannot be interrupted half-way, so cancel shuts the worker down (its tree gets SIGTERM now,
    SIGKILL a moment later, off the GUI thread); the next request starts a fresh worker.
    """

    def __init__(self, worker: Any, op: str, params: Mapping[str, Any]) -> None:
        self.worker = worker
        self.op = op
        self.request_id: str = worker.submit(op, **params)
        self.response: dict[str, Any] | None = None
        self._seen = False  # the worker said something about this request (so it is not merely unavailable)
        self._cancelled = False

    @property
    def result(self) -> dict[str, Any] | None:
        """The worker's ``result`` response, once it came."""
        return self.response if self.response is not None and self.response.get("kind") == "result" else None

    @property
    def final(self) -> bool:
        """True once answered, or once a cancelled worker's processes are gone."""
        if self._cancelled:
            return not self.worker.stopping
        return self.response is not None

    @property
    def more(self) -> bool:
        """A worker's events arrive as they are made: never a backlog worth a second poll."""
        return False

    def poll(self) -> list[dict[str, Any]]:
        """This request's events and its response (nothing more after a cancel)."""
        if self._cancelled or self.response is not None:
            return []
        mine = [m for m in self.worker.poll() if m.get("request_id") == self.request_id]
        for i, msg in enumerate(mine):
            if msg.get("kind") in ("result", "error"):
                self.response = msg
                return mine[:i + 1]
            self._seen = True
        return mine

    def foldable(self, event: dict[str, Any]) -> bool:
        """Events, not the closing response."""
        return event is not self.response

    def outcome(self) -> tuple[str, str]:
        """``ok``; ``cancelled``; ``unavailable`` (died before any word: fall back); ``failed``."""
        if self._cancelled:
            return "cancelled", ""
        msg = self.response or {}
        if msg.get("kind") == "result":
            return "ok", ""
        if msg.get("source") == "client" and not self._seen:
            return UNAVAILABLE, str(msg.get("message") or "the worker did not start")
        return "failed", str(msg.get("message") or "the worker request failed")

    def cancel(self) -> None:
        """Shut the worker down at once (returns immediately; :attr:`final` once its tree is gone)."""
        if self.response is None and not self._cancelled:
            self._cancelled = True
            self.worker.close(force=True)

    def close(self) -> None:
        """A request still running is cancelled (the worker would keep computing for nobody)."""
        self.cancel()
