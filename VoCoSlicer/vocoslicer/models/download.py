"""Downloading and installing catalog models: streamed, resumable, checksummed, atomic.

Official weights are up to 4.6 GB, hospital networks drop connections, and a half-written file must never be
mistaken for a model. So the transfer goes to ``<file>.part`` (resumed with an HTTP ``Range`` request when the
server allows it), the sha256 is computed while streaming, the file is renamed into place only when complete and
verified, and the bundle is built next to its final place and renamed in. When the catalog has no published
checksum the computed one is recorded in ``model.json`` and a warning says that it could not be verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from vocoslicer import __version__
from vocoslicer.errors import Cancelled, UserError
from vocoslicer.jobs.events import NULL_SINK, EventSink
from vocoslicer.paths import models_dir

CHUNK = 1 << 20


@dataclass(frozen=True)
class DownloadResult:
    """A completed download."""

    path: Path
    sha256: str
    verified: bool  # True when a published sha256 was checked
    bytes: int
    resumed_from: int  # bytes already present in the .part file (0 = fresh download)


class ProgressBar:
    """A one-line text bar on a terminal stream (stderr); silent when the stream is not a terminal."""

    def __init__(self, label: str, stream: IO[str] | None = None, force: bool = False) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = force or bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = 0.0

    def update(self, done: int, total: int | None, final: bool = False) -> None:
        """Redraw (at most 10 times a second)."""
        now = time.monotonic()
        if not self.enabled or (not final and now - self._last < 0.1):
            return
        self._last = now
        mb = done / 1e6
        if total:
            frac = min(1.0, done / total)
            bar = "#" * int(30 * frac)
            text = f"\r{self.label} [{bar:<30}] {frac * 100:5.1f}% {mb:,.1f}/{total / 1e6:,.1f} MB"
        else:
            text = f"\r{self.label} {mb:,.1f} MB"
        self.stream.write(text + ("\n" if final else ""))
        self.stream.flush()


def _total_from_headers(status: int, headers: Any, offset: int) -> int | None:
    if status == 206:
        m = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", headers.get("Content-Range", ""))
        if not m or int(m.group(1)) != offset:
            return -1  # the server answered a different range: restart
        return int(m.group(3)) if m.group(3) != "*" else None
    length = headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def download(url: str, dest: str | os.PathLike[str], sha256: str | None = None, events: EventSink = NULL_SINK,
             bar: ProgressBar | None = None, timeout: float = 60.0, cancel: Callable[[], bool] | None = None
             ) -> DownloadResult:
    """Fetch ``url`` into ``dest`` (atomic), resuming ``dest.part`` if present; verify ``sha256`` when given."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"vocoslicer/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)  # noqa: S310
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # nothing left to fetch (or a stale .part): start over once
            part.unlink()
            return download(url, dest, sha256, events, bar, timeout, cancel)
        raise UserError(f"{url}: download failed (HTTP {exc.code} {exc.reason})") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"{url}: cannot connect ({reason})") from None
    h = hashlib.sha256()
    with resp:
        total = _total_from_headers(resp.status, resp.headers, offset)
        if resp.status != 206 or total == -1:
            offset, total = 0, _total_from_headers(200, resp.headers, 0)
        resumed_from = offset
        if offset:
            events.log(f"resuming {dest.name} at {offset / 1e6:.1f} MB")
            with open(part, "rb") as fh:
                while block := fh.read(CHUNK):
                    h.update(block)
        done = offset
        last_event = 0.0
        try:
            with open(part, "ab" if offset else "wb") as out:
                while True:
                    if cancel is not None and cancel():
                        raise Cancelled(f"download of {dest.name} cancelled; run again to resume")
                    block = resp.read(CHUNK)
                    if not block:
                        break
                    out.write(block)
                    h.update(block)
                    done += len(block)
                    now = time.monotonic()
                    if now - last_event >= 0.25:
                        last_event = now
                        events.progress(done, total or 0, stage=f"downloading {dest.name}")
                    if bar is not None:
                        bar.update(done, total)
        except (OSError, http.client.HTTPException) as exc:  # connection dropped: keep the .part for a resume
            raise UserError(f"{url}: download interrupted at {done / 1e6:.1f} MB ({exc}); run the same command "
                            "again to resume") from None
    if bar is not None:
        bar.update(done, total, final=True)
    if total is not None and done != total:
        raise UserError(f"{url}: download interrupted at {done:,} of {total:,} bytes; run the same command again "
                        "to resume")
    digest = h.hexdigest()
    if sha256 and digest.lower() != sha256.lower():
        part.unlink(missing_ok=True)
        raise UserError(f"{dest.name}: sha256 mismatch (got {digest[:16]}…, expected {sha256[:16]}…); the download "
                        "was deleted and nothing was installed")
    os.replace(part, dest)
    events.progress(done, total or done, stage=f"downloaded {dest.name}")
    return DownloadResult(dest, digest, bool(sha256), done, resumed_from)


def downloads_dir() -> Path:
    """Where raw files wait while they are downloaded (hidden from the installed-model listing)."""
    p = models_dir() / ".downloads"
    p.mkdir(parents=True, exist_ok=True)
    return p


def _convert_and_install(checkpoint: Path, force: bool, **kwargs: Any) -> tuple[Any, Any]:
    """Convert a checkpoint into a staging folder, then install it like any bundle (verified, atomic, locked)."""
    from vocoslicer.models.convert import checkpoint_to_bundle
    from vocoslicer.models.installed import install, staging_dir

    stage = staging_dir()
    try:
        _, report = checkpoint_to_bundle(checkpoint, stage / "bundle", **kwargs)
        installed = install(stage / "bundle", overwrite=force, move=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return installed, report


def install_from_catalog(key: str, events: EventSink = NULL_SINK, bar: ProgressBar | None = None,
                         force: bool = False, keep_download: bool = False,
                         cancel: Callable[[], bool] | None = None) -> dict[str, Any]:
    """``models download ID``: download, verify, convert into a bundle and install it; returns a summary."""
    from vocoslicer.models.catalog import find_entry, load_catalog
    from vocoslicer.models.installed import install_path

    entries = load_catalog()
    entry = find_entry(key, entries)
    if entry is None:
        raise UserError(f"model {key!r} is not in the catalog (known: {', '.join(e.id for e in entries)})")
    target = install_path(entry.id, entry.version)
    if (target / "model.json").is_file() and not force:
        return {"id": entry.id, "version": entry.version, "path": str(target), "status": "already installed"}
    raw = downloads_dir() / entry.filename
    if raw.is_file() and entry.sha256:  # a completed earlier download: reuse it if it still verifies
        from vocoslicer.models.bundle import sha256_file

        result = DownloadResult(raw, sha256_file(raw), True, raw.stat().st_size, raw.stat().st_size)
        if result.sha256 != entry.sha256:
            raw.unlink()
            result = download(entry.url, raw, entry.sha256, events, bar, cancel=cancel)
    else:
        raw.unlink(missing_ok=True)
        result = download(entry.url, raw, entry.sha256, events, bar, cancel=cancel)
    if not result.verified:
        events.warning(f"{entry.filename}: no published sha256 for this file, so it could not be verified; "
                       f"recorded the computed sha256 {result.sha256} in model.json")
    events.progress(0, 1, stage=f"converting {entry.filename} into a model bundle")
    error: str | None = None
    try:
        bundle, report = _convert_and_install(raw, force, entry=entry, source_sha256=result.sha256,
                                              sha256_verified=result.verified)
    except UserError as exc:
        error = str(exc)
    # after the except block (its traceback would keep the memory-mapped tensors alive, and Windows cannot delete
    # a mapped file); a wrong file must not be picked up again by the next attempt
    if error is not None or not keep_download:
        with contextlib.suppress(OSError):
            raw.unlink(missing_ok=True)
    if error is not None:
        raise UserError(error)
    events.log(report.summary())
    events.artifact(target, "model", id=entry.id, version=entry.version)
    return {"id": entry.id, "version": entry.version, "path": str(target), "status": "installed",
            "sha256": result.sha256, "sha256_verified": result.verified, "bytes": result.bytes,
            "resumed_from": result.resumed_from, "load_report": report.summary(), "task": bundle.task}


def import_path(path: str | os.PathLike[str], model_id: str | None = None, version: str | None = None,
                labels_csv: str | None = None, force: bool = False, events: EventSink = NULL_SINK
                ) -> dict[str, Any]:
    """``models import PATH``: install a bundle folder/zip, or convert and install an official checkpoint.

    Ids and versions (flags or model.json) are validated before anything touches the disk, and the bundle is
    verified in a staging folder inside the models home (removed on any failure) before it is renamed in.
    """
    from vocoslicer.ids import check_id
    from vocoslicer.labels import LabelTable
    from vocoslicer.models.bundle import sha256_file
    from vocoslicer.models.catalog import find_entry
    from vocoslicer.models.installed import CHECKPOINT_SUFFIXES, install, install_path

    if model_id is not None:
        check_id(model_id, "--id")
    if version is not None:
        check_id(version, "--version")
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{p}: no such file or folder")
    is_bundle = p.is_dir() or (p.suffix == ".zip")
    if is_bundle:
        override = {k: v for k, v in (("id", model_id), ("version", version)) if v is not None}
        installed = install(p, overwrite=force, meta=override or None)
        events.artifact(installed.path, "model", id=installed.id, version=installed.version)
        return {"id": installed.id, "version": installed.version, "path": str(installed.path),
                "status": "installed"}
    if p.suffix not in CHECKPOINT_SUFFIXES:
        raise UserError(f"{p}: import takes a bundle folder or .zip, or a .pt/.pth/.safetensors checkpoint")
    entry = None if model_id else find_entry(p.name)
    labels = LabelTable.read_csv(labels_csv) if labels_csv else None
    digest = sha256_file(p)
    verified = bool(entry is not None and entry.sha256 and entry.sha256 == digest)
    if entry is not None and entry.sha256 and not verified:
        raise UserError(f"{p}: sha256 {digest[:16]}… differs from the catalog's for {entry.id}; not installed")
    mid = model_id or (entry.id if entry is not None else p.name.split(".")[0].lower().replace("_", "-"))
    ver = version or (entry.version if entry is not None else "1.0.0")
    target = install_path(check_id(mid, "model id (from the file name; pass --id)"), ver)
    if target.exists() and not force:
        raise UserError(f"model {mid}@{ver} is already installed ({target}); use --force")
    bundle, report = _convert_and_install(p, force, entry=entry, model_id=mid, version=ver, labels=labels,
                                          source_sha256=digest, sha256_verified=verified)
    events.log(report.summary())
    events.artifact(target, "model", id=mid, version=ver)
    return {"id": mid, "version": ver, "path": str(bundle.path), "status": "installed", "task": bundle.task,
            "load_report": report.summary(), "sha256": digest, "sha256_verified": verified}


def remove_installed(spec: str) -> dict[str, Any]:
    """``models remove ID[@VERSION]`` via :mod:`vocoslicer.models.installed` (the demo model cannot be removed)."""
    from vocoslicer.models.installed import remove

    path = remove(spec)
    with contextlib.suppress(OSError):
        if path.parent != models_dir().resolve() and not any(path.parent.iterdir()):
            path.parent.rmdir()
    return {"removed": spec, "path": str(path)}
