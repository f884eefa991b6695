"""What the segmentation and the classification finetune share: opening the cohort, the train/validation split,
the training configuration, the next bundle version and publishing the best bundle.

Written once so that both recipes report the same warnings, version their bundles by the same rule and pass every
option (``--weight-decay`` included) to the shared :class:`vocoslicer.train.loop.Trainer` the same way.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vocoslicer.data.cohort import Cohort
from vocoslicer.errors import UserError
from vocoslicer.io.atomic import atomic_write_json
from vocoslicer.jobs.events import EventSink

if TYPE_CHECKING:
    from vocoslicer.train.loop import TrainConfig


def open_cohort(path: str | Path, events: EventSink, saved: dict[str, Any] | None = None) -> tuple[Cohort, int]:
    """The cohort at ``path`` and its version now (the one the run records); its own warning (a recovered
    manifest) and, when resuming (``saved``), a warning that its cases changed since the run started."""
    cohort = Cohort(path)
    if cohort.warning:
        events.warning(cohort.warning)
    version = cohort.version
    if saved:
        warn_if_changed(saved, version, events)
    return cohort, version


def warn_if_changed(saved: dict[str, Any], cohort_version: int, events: EventSink) -> None:
    """A resumed run continues on the cohort's current cases; say so when they are not the ones it started on."""
    if saved and saved.get("cohort_version") != cohort_version:
        events.warning(f"the cohort changed since this run started (version {saved.get('cohort_version')} → "
                       f"{cohort_version}); continuing on its current cases")


def split_train_val(cases: list[Any], source: str, events: EventSink, kind: str = "labelled",
                    metric: str = "Dice") -> tuple[list[Any], list[Any]]:
    """The cohort's fixed split of ``cases`` (records with a ``split``): training and validation cases.

    No training case is an error (nothing to learn from); no validation case validates on the training cases
    with a warning, since a first finetune on a handful of corrections should still run.
    """
    train = [c for c in cases if c.split != "val"]
    val = [c for c in cases if c.split == "val"]
    if not train:
        raise UserError(f"{source}: every {kind} case is in validation; put some in training with "
                        "'vocoslicer cohort split --train CASE'")
    if not val:
        events.warning(f"the cohort has no validation case: validating on the training cases (optimistic {metric})")
        val = train
    return train, val


def train_config(opts: Any, warmup_steps: int, select_metric: str, **extra: Any) -> TrainConfig:
    """The loop's configuration from a finetune's options (:class:`FinetuneOptions` or :class:`ClsOptions`):
    ``--eval-every`` 0 means ten evaluations per run, and a checkpoint is written at each evaluation."""
    from vocoslicer.train.loop import TrainConfig

    eval_every = opts.eval_every or max(1, opts.steps // 10)
    return TrainConfig(steps=opts.steps, lr=opts.lr, weight_decay=opts.weight_decay, warmup_steps=warmup_steps,
                       amp=opts.amp, grad_accum=opts.grad_accum, compile=opts.compile, ckpt_every=eval_every,
                       eval_every=eval_every, log_every=max(1, min(10, eval_every)), seed=opts.seed,
                       device=opts.device, early_stop_patience=opts.patience, select_metric=select_metric, **extra)


def new_version(model_id: str, parent: dict[str, Any] | None) -> str:
    """The next free version of ``model_id``, always above the parent's (which may not be installed)."""
    from vocoslicer.models import installed as installed_models

    candidate = installed_models.next_version(model_id)
    if parent and parent.get("id") == model_id:
        nums = [int(x) for x in re.findall(r"\d+", str(parent.get("version", "")))[:3]] + [0, 0, 0]
        bumped = (nums[0], nums[1], nums[2] + 1)
        have = tuple(([int(x) for x in re.findall(r"\d+", candidate)[:3]] + [0, 0, 0])[:3])
        if have < bumped:
            candidate = ".".join(map(str, bumped))
    return candidate


def publish(best_dir: Path, summary: dict[str, Any], install: bool, overwrite: bool, events: EventSink,
            **artifact: Any) -> dict[str, Any]:
    """Install the best bundle (or keep it in the run folder: ``install`` false), report it as the run's model
    artifact and write ``summary.json`` next to it; returns ``summary`` (with ``installed`` when installed)."""
    from vocoslicer.models import installed as installed_models

    where = best_dir
    if install:
        installed = installed_models.install(best_dir, overwrite=overwrite)
        summary["installed"] = str(installed.path)
        where = installed.path
    events.artifact(where, "model", id=summary["id"], version=summary["version"], **artifact)
    atomic_write_json(best_dir.parent / "summary.json", summary)
    return summary
