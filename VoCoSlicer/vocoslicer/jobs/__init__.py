"""Background job runtime: run directories, events, cancel/resume (engine side)."""

from vocoslicer.jobs.events import NULL_SINK, EventSink

__all__ = ["NULL_SINK", "EventSink"]
