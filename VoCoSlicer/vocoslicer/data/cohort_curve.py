"""What each correction bought: validation Dice against the number of labelled cases, over a cohort's versions.

A Dice curve only means something if every point is measured on the same cases. The cohort's own validation
split grows as cases are added (new labelled cases join it at the cohort's ratio), so the first finetune of a
cohort freezes its validation cases in ``<cohort>/eval_split.json``; every finetune then also evaluates its best
weights on exactly those cases (minus any later moved into training, which would be seen data) and records, in
the new bundle's model.json ``training`` section, how many labelled cases it learnt from (``n_labelled``) and
that Dice overall and per structure (``fixed_val``). ``<cohort>/model_versions.jsonl`` indexes the versions so
``vocoslicer cohort curve`` finds them again, installed or not.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vocoslicer.data.cohort import Cohort
from vocoslicer.data.cohort_manifest import file_lock
from vocoslicer.errors import UserError
from vocoslicer.io import atomic_write_json, atomic_write_text
from vocoslicer.jobs.events import NULL_SINK, EventSink

EVAL_SPLIT = "eval_split.json"
VERSIONS = "model_versions.jsonl"
LOCK = ".curve.lock"


def fixed_val_split(cohort: Cohort, current_val: Sequence[str]) -> list[str]:
    """The frozen validation case ids; the first call with a non-empty ``current_val`` freezes it."""
    path = cohort.root / EVAL_SPLIT
    with file_lock(cohort.root / LOCK):
        if path.is_file():
            try:
                return [str(c) for c in json.loads(path.read_text(encoding="utf-8"))["cases"]]
            except (OSError, json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}: unreadable; restore it (or delete it to freeze a new split)") from None
        if not current_val:
            return []
        atomic_write_json(path, {"cases": sorted(current_val), "cohort_version": cohort.version,
                                 "created": time.time()})
        return sorted(current_val)


def record_fixed_validation(bundle_dir: str | Path, cohort: Cohort, train_ids: Sequence[str], val_prepared: dict,
                            init: Any, roi: Sequence[int], events: EventSink = NULL_SINK) -> dict[str, Any] | None:
    """Evaluate the bundle in ``bundle_dir`` on the fixed split, write the result into its model.json and index the
    version in the cohort. ``val_prepared`` maps the run's validation case ids to their prepared cases (reused);
    empty when the run had no validation case. Returns the ``fixed_val`` record (None: nothing to measure on)."""
    import torch

    from vocoslicer.models.bundle import ModelBundle
    from vocoslicer.train.segmentation import SegCase, make_eval_fn, prepare_case

    ids = fixed_val_split(cohort, sorted(val_prepared))
    known = {c.id: c for c in cohort.cases()}
    seen = [i for i in ids if i in train_ids]
    if seen:
        events.warning(f"fixed validation cases now in training are left out of the curve's Dice: {seen}")
    use = [i for i in ids if i in known and known[i].labelled and i not in train_ids]
    bdir = Path(bundle_dir)
    mj = bdir / "model.json"
    meta = json.loads(mj.read_text(encoding="utf-8"))
    record: dict[str, Any] | None = None
    if use:
        prepared = [val_prepared.get(i) or prepare_case(SegCase(i, known[i].image, known[i].label),
                                                        init.preprocessing, init.channel_values) for i in use]
        model = ModelBundle.load(bdir).build_model().eval()
        with torch.no_grad():
            m = make_eval_fn(prepared, init.labels, init.channel_values, roi)(model, 0)
        record = {"cases": use, "split_file": str(cohort.root / EVAL_SPLIT),
                  "val_dice": round(float(m["val_dice"]), 4),
                  "structures": {k[len("dice_"):]: round(float(v), 4) for k, v in m.items() if k.startswith("dice_")}}
        events.log(f"fixed validation split ({len(use)} cases): Dice {record['val_dice']:.4f}")
    meta.setdefault("training", {})
    meta["training"]["n_labelled"] = len(train_ids)
    meta["training"]["fixed_val"] = record
    atomic_write_json(mj, meta)
    entry = {"id": meta.get("id"), "version": meta.get("version"), "bundle": str(bdir.resolve()),
             "cohort_version": (meta.get("training") or {}).get("cohort_version"), "n_labelled": len(train_ids),
             "fixed_val": record, "time": time.time()}
    with file_lock(cohort.root / LOCK):
        index = cohort.root / VERSIONS
        old = index.read_text(encoding="utf-8") if index.is_file() else ""
        atomic_write_text(index, old + json.dumps(entry) + "\n")
    return record


def _bundle_record(entry: dict[str, Any]) -> dict[str, Any]:
    """The version's own model.json numbers (installed copy first, then the run's bundle), else the index copy."""
    from vocoslicer.models import installed as installed_models

    candidates: list[Path] = []
    try:
        b = installed_models.resolve(f"{entry['id']}@{entry['version']}")
        candidates.append(Path(b.path) / "model.json")
    except (UserError, KeyError, TypeError):
        pass
    candidates.append(Path(str(entry.get("bundle", ""))) / "model.json")
    for mj in candidates:
        try:
            tr = json.loads(mj.read_text(encoding="utf-8")).get("training") or {}
        except (OSError, json.JSONDecodeError):
            continue
        if "n_labelled" in tr:
            return {"n_labelled": tr["n_labelled"], "fixed_val": tr.get("fixed_val"), "source": str(mj.parent)}
    return {"n_labelled": entry.get("n_labelled"), "fixed_val": entry.get("fixed_val"), "source": "index"}


def cohort_curve(cohort_dir: str | Path) -> list[dict[str, Any]]:
    """One row per model version of the cohort (latest record of each id@version), by labelled cases then time."""
    cohort = Cohort(cohort_dir)
    index = cohort.root / VERSIONS
    if not index.is_file():
        raise UserError(f"{cohort.root}: no finetuned version recorded yet; run 'vocoslicer finetune --cohort "
                        f"{cohort.root} ...' first")
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for line in index.read_text(encoding="utf-8").splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a crashed writer: the versions before it still count
        if isinstance(e, dict) and e.get("id"):
            latest[(str(e["id"]), str(e.get("version")))] = e
    rows = []
    for (mid, ver), e in latest.items():
        rec = _bundle_record(e)
        fv = rec["fixed_val"] or {}
        rows.append({"id": mid, "version": ver, "n_labelled": int(rec["n_labelled"] or 0),
                     "val_dice": fv.get("val_dice", math.nan), "n_val": len(fv.get("cases", [])),
                     "structures": dict(fv.get("structures", {})), "time": e.get("time", 0.0),
                     "source": rec["source"]})
    return sorted(rows, key=lambda r: (r["n_labelled"], r["time"]))


def curve_csv(rows: Sequence[dict[str, Any]]) -> str:
    """CSV text: id, version, n_labelled, n_val, val_dice, then one column per structure."""
    names = sorted({n for r in rows for n in r["structures"]})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "version", "n_labelled", "n_val", "val_dice", *[f"dice_{n}" for n in names]])
    for r in rows:
        w.writerow([r["id"], r["version"], r["n_labelled"], r["n_val"], r["val_dice"],
                    *[r["structures"].get(n, "") for n in names]])
    return buf.getvalue()


def write_curve_png(rows: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """Dice against labelled cases (overall bold, structures thin); None when matplotlib is not installed (it is
    not an engine dependency: the CSV and the panel's chart carry the same numbers)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from vocoslicer.io import atomic_path

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    xs = [r["n_labelled"] for r in rows]
    for n in sorted({n for r in rows for n in r["structures"]}):
        ax.plot(xs, [r["structures"].get(n, math.nan) for r in rows], lw=0.8, alpha=0.6, marker=".", label=n)
    ax.plot(xs, [r["val_dice"] for r in rows], lw=2.5, color="black", marker="o", label="mean")
    ax.set_xlabel("labelled cases")
    ax.set_ylabel("validation Dice (fixed split)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out = Path(path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out
