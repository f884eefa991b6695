"""Batch segmentation: many cases, one model load, resumable, sharded over ``torchrun`` ranks.

Why a batch command and not a shell loop of ``segment``: a loop pays Python start-up, imports and the model load
per case, and one bad case stops it. Here the model is built once, the next case is read and preprocessed in a
background thread while the current one is inferred, each finished or failed case is appended to a JSON-lines
status file (``segment_status.jsonl`` in the output folder; appends under a :mod:`filelock` lock, so all ranks
share one file), and a rerun skips the cases recorded as done. Under ``torchrun`` every rank derives the same
case list and takes ``cases[rank::world_size]`` (process group from :mod:`vocoslicer.train.distributed`); rank 0
reports progress over all ranks by reading the status file, and the summary gathers every rank's failures.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from vocoslicer.errors import Cancelled, UserError
from vocoslicer.infer.batch_inputs import OUTPUT_EXTENSIONS, BadInput, Case, read_case
from vocoslicer.jobs.events import NULL_SINK, EventSink
from vocoslicer.models.bundle import ModelBundle

STATUS_FILE = "segment_status.jsonl"


@dataclass
class BatchOptions:
    """What every case of a batch is segmented and written with."""

    model: str | None = None
    device: str = "auto"
    fmt: str = "nifti"
    fast: bool = False
    overlap: float | None = None
    largest_component: bool = False
    dicom_source: str | None = None
    cohort: str | None = None
    unlabelled: bool = False
    runtime: str = "eager"  # the CPU inference runtime (vocoslicer.infer.runtime); the CLI passes --runtime


@dataclass
class BatchSummary:
    """The outcome over all ranks."""

    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)
    bad_inputs: list[BadInput] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        """0 when every case succeeded, 2 when some inputs or cases were bad."""
        return 2 if self.failed or self.bad_inputs else 0


class StatusFile:
    """The per-case JSON-lines log of a batch; the last record of a case wins."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from filelock import FileLock

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.path) + ".lock", timeout=120)

    def read(self) -> dict[str, dict[str, Any]]:
        """Last record per case id (a torn last line from a killed run is ignored)."""
        out: dict[str, dict[str, Any]] = {}
        if not self.path.is_file():
            return out
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "case" in rec:
                out[str(rec["case"])] = rec
        return out

    def append(self, record: dict[str, Any]) -> None:
        """Append one record atomically with respect to other processes (lock + single write + fsync)."""
        line = json.dumps({"t": round(time.time(), 3), **record}, separators=(",", ":")) + "\n"
        data = line.encode("utf-8")
        with self._lock, open(self.path, "ab+") as fh:
            end = fh.seek(0, os.SEEK_END)
            if end > 0:  # a run killed mid-write left a torn line: start on a fresh one
                fh.seek(end - 1)
                if fh.read(1) != b"\n":
                    data = b"\n" + data
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def output_path(out_dir: Path, case: Case, fmt: str) -> Path:
    """``OUT_DIR/<case id><ext of the format>``."""
    return out_dir / f"{case.id}{OUTPUT_EXTENSIONS[fmt]}"


def check_dicom_seg_inputs(cases: Iterable[Case], opts: BatchOptions) -> list[str]:
    """Refuse a DICOM SEG for non-DICOM inputs up front (before any model load) unless a source series is given."""
    if opts.fmt != "dicom-seg":
        return []
    if opts.dicom_source:
        from vocoslicer.io.dicom_seg import dicom_series_files

        return dicom_series_files(opts.dicom_source)
    not_dicom = [c.source for c in cases if not c.is_dicom]
    if not_dicom:
        raise UserError(f"{not_dicom[0]}: a DICOM SEG references the source DICOM series; this input is not DICOM "
                        "(give the series it was made from with --dicom-source DIR, or choose another --format)")
    return []


def write_result(label: sitk.Image, img: sitk.Image, case: Case, out: Path, opts: BatchOptions, bundle: ModelBundle,
                 source_files: list[str]) -> Path:
    """Write one case's label map in the batch's format (atomically)."""
    from vocoslicer.infer.segment import labels_csv_path
    from vocoslicer.io import write_image

    if opts.fmt == "dicom-seg":
        from vocoslicer.io.dicom_seg import write_dicom_seg

        files = list(case.files) or source_files
        sha = str((bundle.meta.get("weights") or {}).get("sha256", ""))
        return write_dicom_seg(label, out, bundle.labels, files, bundle.id, bundle.version, sha,
                               source_image=img if case.files else None)
    write_image(label, out)
    bundle.labels.write_csv(labels_csv_path(out))
    return out


class CaseRunner:
    """Holds the model once and turns prepared cases into label maps."""

    def __init__(self, bundle: ModelBundle, device: Any, opts: BatchOptions) -> None:
        if bundle.task != "segmentation":
            raise UserError(f"model {bundle.describe()} is a {bundle.task} model, not a segmentation model")
        self.bundle, self.device, self.opts = bundle, device, opts
        self.model = bundle.build_model().to(device).eval()
        inf = bundle.inference
        self.overlap = float(opts.overlap if opts.overlap is not None else inf["overlap"])

    def load(self, case: Case) -> tuple[sitk.Image, Any]:
        """Read and preprocess one case (runs in the prefetch thread)."""
        from vocoslicer.infer.preprocess import prepare
        from vocoslicer.infer.segment import FAST_SPACING

        img = read_case(case)
        return img, prepare(img, self.bundle.preprocessing, FAST_SPACING if self.opts.fast else None)

    def infer(self, img: sitk.Image, prepared: Any, cancel: Any = None) -> sitk.Image:
        """The label map of one prepared case on its input's grid."""
        from vocoslicer.infer.postprocess import keep_largest_component_image
        from vocoslicer.infer.segment import bundle_key
        from vocoslicer.infer.sliding import segment_prepared

        inf = self.bundle.inference
        label = segment_prepared(self.model, prepared.tensor, prepared.grid, img, self.bundle.channel_values,
                                 inf["roi_size"], self.overlap, str(inf["mode"]), int(inf["sw_batch_size"]),
                                 self.device, NULL_SINK, smooth=not self.opts.fast, cancel=cancel,
                                 whole_volume=self.opts.fast, runtime=self.opts.runtime,
                                 model_key=bundle_key(self.bundle))
        return keep_largest_component_image(label) if self.opts.largest_component else label


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    return msg if isinstance(exc, UserError) else f"{type(exc).__name__}: {msg}"[:300]


def _store(runner: CaseRunner, case: Case, label: sitk.Image, img: sitk.Image, out_dir: Path | None,
           opts: BatchOptions, source_files: list[str]) -> str:
    if opts.unlabelled and case.cohort_case:
        from vocoslicer.data.cohort import Cohort, Provenance

        b = runner.bundle
        prov = Provenance(model_id=b.id, model_version=b.version,
                          model_sha256=str((b.meta.get("weights") or {}).get("sha256", "")), corrected=False,
                          note="proposal from vocoslicer segment --cohort --unlabelled")
        version = Cohort(opts.cohort).add_label(case.cohort_case, label, labels=b.labels, provenance=prov)  # type: ignore[arg-type]
        return f"{opts.cohort}#{case.cohort_case}@v{version}"
    assert out_dir is not None
    return str(write_result(label, img, case, output_path(out_dir, case, opts.fmt), opts, runner.bundle,
                            source_files))


def _progress(events: EventSink, status: StatusFile, ids: list[str], initially_done: int, t0: float,
              current: str) -> None:
    recs = status.read()
    done = sum(1 for i in ids if recs.get(i, {}).get("status") == "done")
    failed = sum(1 for i in ids if recs.get(i, {}).get("status") == "failed")
    remaining = len(ids) - done - failed
    handled = done + failed - initially_done
    eta = (time.perf_counter() - t0) / handled * remaining if handled > 0 else None
    events.progress(done + failed, len(ids), stage=f"case {current}", eta_s=None if eta is None else round(eta, 1),
                    done=done, failed=failed, remaining=remaining)


def run_batch(cases: list[Case], bad: list[BadInput], out_dir: str | None, opts: BatchOptions,
              events: EventSink | None = None) -> BatchSummary:
    """Segment ``cases`` (this rank's share) and return the summary over every rank."""
    from vocoslicer.device import pick_device
    from vocoslicer.jobs import current_job
    from vocoslicer.models.installed import resolve
    from vocoslicer.train import distributed as D

    job = current_job()
    events = events if events is not None else job.events
    t0 = time.perf_counter()
    source_files = check_dicom_seg_inputs(cases, opts)
    out = Path(out_dir) if out_dir else None
    if out is not None:
        if out.exists() and not out.is_dir():
            raise UserError(f"{out}: exists and is not a folder (batch output needs a folder)")
        out.mkdir(parents=True, exist_ok=True)
    status = StatusFile((out if out is not None else Path(str(opts.cohort))) / STATUS_FILE)
    bundle = resolve(opts.model)
    dev = pick_device(opts.device)
    ctx, dev = D.setup(str(dev)) if D.env_world_size() > 1 else (D.DistContext(), dev)
    try:
        summary = _run_rank(cases, bad, out, opts, events, job, bundle, dev, ctx, status, source_files, t0)
    except BaseException:
        D.teardown(ctx)
        raise
    D.teardown(ctx, sync=True)
    return summary


def _run_rank(cases: list[Case], bad: list[BadInput], out: Path | None, opts: BatchOptions, events: EventSink,
              job: Any, bundle: ModelBundle, dev: Any, ctx: Any, status: StatusFile, source_files: list[str],
              t0: float) -> BatchSummary:
    from vocoslicer.train import distributed as D

    ids = [c.id for c in cases]
    previous = status.read()

    def finished(c: Case) -> bool:
        rec = previous.get(c.id)
        if not rec or rec.get("status") != "done":
            return False
        return bool(opts.unlabelled and c.cohort_case) or Path(str(rec.get("output", ""))).is_file()

    mine = cases[ctx.rank::ctx.world_size]
    todo = [c for c in mine if not finished(c)]
    skipped = len(mine) - len(todo)
    initially_done = sum(1 for c in cases if finished(c))
    events.log(f"batch: {len(cases)} cases ({initially_done} already done), rank {ctx.rank}/{ctx.world_size} "
               f"takes {len(todo)}; model {bundle.describe()} on {dev}")
    failed: list[dict[str, Any]] = []
    done = 0
    with job.gpu_lock(dev) if todo else contextlib.nullcontext():
        runner = CaseRunner(bundle, dev, opts) if todo else None  # a finished batch loads no model
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
            nxt: Future | None = pool.submit(runner.load, todo[0]) if runner is not None else None
            for i, case in enumerate(todo):
                assert runner is not None
                current, nxt = nxt, (pool.submit(runner.load, todo[i + 1]) if i + 1 < len(todo) else None)
                c0 = time.perf_counter()
                try:
                    img, prepared = current.result()  # type: ignore[union-attr]
                    label = runner.infer(img, prepared, cancel=job.should_stop)
                    if job.should_stop():
                        raise Cancelled("batch cancelled; finished cases are kept, a rerun resumes")
                    where = _store(runner, case, label, img, out, opts, source_files)
                except (Cancelled, KeyboardInterrupt):
                    if nxt is not None:
                        nxt.cancel()
                    raise
                except Exception as exc:  # noqa: BLE001 - one bad case must not stop the batch
                    reason = _one_line(exc)
                    failed.append({"case": case.id, "source": case.source, "error": reason})
                    status.append({"case": case.id, "source": case.source, "status": "failed", "error": reason,
                                   "rank": ctx.rank})
                    events.warning(f"case {case.id} failed: {reason}")
                else:
                    done += 1
                    secs = round(time.perf_counter() - c0, 3)
                    status.append({"case": case.id, "source": case.source, "status": "done", "output": where,
                                   "seconds": secs, "rank": ctx.rank, "model": bundle.id,
                                   "model_version": bundle.version})
                    events.artifact(where, "segmentation", case=case.id, model=bundle.id,
                                    model_version=bundle.version, seconds=secs)
                del current
                if ctx.is_main:
                    _progress(events, status, ids, initially_done, t0, case.id)
    gathered = D.gather_to_main({"done": done, "skipped": skipped, "failed": failed}, ctx)
    summary = BatchSummary(total=len(cases), bad_inputs=list(bad), seconds=time.perf_counter() - t0)
    for part in gathered:
        summary.done += int(part["done"])
        summary.skipped += int(part["skipped"])
        summary.failed.extend(part["failed"])
    return summary


def format_summary(summary: BatchSummary, where: str) -> str:
    """The lines printed at the end of a batch: counts, then every failed case and bad input with its reason."""
    lines = [f"segmented {summary.done} of {summary.total} cases into {where} ({summary.skipped} already done, "
             f"{len(summary.failed)} failed, {len(summary.bad_inputs)} bad inputs, {summary.seconds:.1f} s)"]
    lines += [f"  failed: {f['case']} ({f['source']}): {f['error']}" for f in summary.failed]
    lines += [f"  bad input: {b.source}: {b.error}" for b in summary.bad_inputs]
    return "\n".join(lines)
