"""Decisions the three panels make, Qt-free: which runs a combo box lists, which sizes a method takes, what
"Start from" accepts, and how a job's state maps onto its button, progress bar and label.

The module files only copy these values onto widgets, so every rule here is tested in pytest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from VoCoSlicerLib.params import PRETRAIN_SIZES

RESUMABLE = ("cancelled", "failed", "dead")


def runs_of(runs: list[dict[str, Any]], command: str) -> list[tuple[str, str]]:
    """``(text, run_dir)`` of the runs whose command starts with ``command`` (newest first, as listed)."""
    return [(f"{Path(r['run_dir']).name}  ({r.get('status', '?')})", str(r["run_dir"])) for r in runs
            if str(r.get("command", "")).startswith(command) and r.get("run_dir")]


def resumable(runs: list[dict[str, Any]], command: str) -> list[str]:
    """Run folders of stopped or failed runs of ``command`` that ``--resume`` can continue, newest first."""
    return [str(r["run_dir"]) for r in runs if str(r.get("command", "")).startswith(command)
            and r.get("status") in RESUMABLE and r.get("run_dir")]


def sizes_for(method: str, current: str) -> tuple[list[str], str]:
    """The model sizes ``pretrain METHOD`` accepts and the one to select (``current`` when allowed)."""
    sizes = list(PRETRAIN_SIZES.get(method, ()))
    if current in sizes:
        return sizes, current
    return sizes, ("B" if "B" in sizes else sizes[0] if sizes else "")


@dataclass(frozen=True)
class StartFrom:
    """How the "Start from" path field behaves for a method."""

    enabled: bool
    folders: bool  # True: pick a folder (a tokenizer run folder or an extracted bundle), False: a checkpoint file
    tooltip: str


def start_from(method: str) -> StartFrom:
    """MIM starts from a trained tokenizer (its run folder or bundle), VoCo optionally from a checkpoint file,
    the tokenizer always from scratch."""
    if method == "mim":
        return StartFrom(True, True, "Trained PUMIT tokenizer: its run folder (from VoCo Pretrain) or bundle")
    if method == "tokenizer":
        return StartFrom(False, False, "The tokenizer trains from scratch (use Resume to continue a run)")
    return StartFrom(True, False, "Optional: a checkpoint to start from (e.g. a VoCo backbone)")


@dataclass(frozen=True)
class JobWidgets:
    """What one job's button, progress bar and status label show."""

    button_text: str
    button_tooltip: str
    button_enabled: bool
    progress_visible: bool
    progress_maximum: int  # 0: busy indicator (unknown total)
    progress_value: int
    label: str


def job_widgets(driver: Any) -> JobWidgets:
    """From a JobDriver's state machine and throughput."""
    view = driver.state.view()
    return JobWidgets(view.button_text, view.button_tooltip, view.button_enabled, view.progress_visible,
                      0 if view.progress_percent < 0 else 100, max(view.progress_percent, 0),
                      (view.progress_text + "   " + driver.throughput.text()).strip())


def show_job(widgets: JobWidgets, button: Any, bar: Any, label: Any) -> None:
    """Copy :class:`JobWidgets` onto a push button, progress bar and label (any objects with those properties)."""
    if button is not None:
        button.text, button.toolTip, button.enabled = widgets.button_text, widgets.button_tooltip, \
            widgets.button_enabled
    bar.visible, bar.maximum, bar.value = widgets.progress_visible, widgets.progress_maximum, widgets.progress_value
    label.text = widgets.label


def show_progress(widgets: JobWidgets, bar: Any, busy: bool) -> None:
    """A progress bar shown only while its job runs (the set-up panel's model and environment jobs)."""
    bar.visible, bar.maximum, bar.value = busy, widgets.progress_maximum, widgets.progress_value
