"""Storage layer of a cohort: the inter-process lock, the JSON manifest with its last-good copy, content hashes.

A cohort is edited from Slicer, from a terminal and from scripts, possibly at the same time, and it holds the
only copy of hours of manual corrections. So every change happens under an exclusive file lock (read, modify,
write), the manifest is replaced atomically, and a second copy (``manifest.bak.json``) is written after each
successful change so that a manifest damaged by a disk problem or a bad hand edit can be recovered.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from filelock import FileLock, Timeout

from vocoslicer.errors import UserError
from vocoslicer.ids import id_problem
from vocoslicer.io.atomic import atomic_write_json

FORMAT = "vocoslicer-cohort"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BACKUP = "manifest.bak.json"
LOCK = ".cohort.lock"
SPLITS = ("train", "val")


@contextlib.contextmanager
def file_lock(path: Path, timeout: float = 120.0) -> Iterator[None]:
    """Hold an exclusive OS lock on ``path`` (``filelock``: released by the OS if the holder dies, so no stale
    locks); a one-line error after ``timeout`` seconds, since the holder may be a Slicer session left open."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        lock = FileLock(path).acquire(timeout=timeout)
    except Timeout:
        raise UserError(f"{path.parent}: the cohort is locked by another process (waited {timeout:.0f} s)") from None
    with lock:
        yield


def empty_manifest(val_ratio: float) -> dict[str, Any]:
    """A new cohort's manifest."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "version": 0, "created": time.time(),
            "modified": time.time(), "val_ratio": float(val_ratio), "next_id": 1, "labels": [], "cases": {}}


def validate_manifest(data: Any) -> str | None:
    """Return why ``data`` is not a usable manifest, or None when it is."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return "not a VoCoSlicer cohort manifest"
    if int(data.get("format_version", 0)) > FORMAT_VERSION:
        return f"manifest format {data.get('format_version')} is newer than this VoCoSlicer understands"
    for key, typ in (("version", int), ("next_id", int), ("cases", dict), ("labels", list)):
        if not isinstance(data.get(key), typ):
            return f"manifest field {key!r} is missing or has the wrong type"
    for cid, case in data["cases"].items():
        if not isinstance(case, dict) or case.get("id") != cid or not isinstance(case.get("image"), str):
            return f"case {cid!r} is malformed"
        if not isinstance(case.get("labels"), list) or case.get("split") not in (*SPLITS, None):
            return f"case {cid!r} has malformed labels or split"
        problem = id_problem(cid)
        if problem:
            return f"case id {cid!r} {problem}"
        if not _plain_path(case["image"], "images"):
            return f"case {cid!r}: image path {case['image']!r} is not a file directly inside images/"
        for lv in case["labels"]:
            if not isinstance(lv, dict) or not isinstance(lv.get("path"), str) or not lv["path"]:
                return f"case {cid!r} has a label entry without a path"
            if not _plain_path(lv["path"], "labels", cid):
                return f"case {cid!r}: label path {lv['path']!r} is not a file directly inside labels/{cid}/"
    return None


def _plain_path(rel: str, *folders: str) -> bool:
    """A manifest path may only name a file in the cohort folder it belongs to (a received cohort is untrusted)."""
    if "\\" in rel or rel.startswith("/"):
        return False
    parts = rel.split("/")
    return tuple(parts[:-1]) == folders and id_problem(parts[-1]) is None


def _read_json(path: Path) -> tuple[dict[str, Any] | None, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, "missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"unreadable ({type(exc).__name__})"
    problem = validate_manifest(data)
    return (None, problem) if problem else (data, "")


def load_manifest(root: Path) -> tuple[dict[str, Any], str | None]:
    """Load the manifest, falling back to the last good copy; returns (manifest, warning-or-None)."""
    main, why = _read_json(root / MANIFEST)
    if main is not None:
        return main, None
    if why == "missing" and not (root / BACKUP).exists():
        raise UserError(f"{root}: not a cohort (no {MANIFEST}); create one with 'vocoslicer cohort init'")
    backup, why_b = _read_json(root / BACKUP)
    if backup is None:
        raise UserError(f"{root / MANIFEST}: {why}, and the backup copy {BACKUP} is {why_b}; cannot recover")
    return backup, (f"{root / MANIFEST} was {why}; recovered cohort version {backup['version']} "
                    f"from {BACKUP}")


def save_manifest(root: Path, data: dict[str, Any]) -> None:
    """Write the manifest atomically, then its backup copy (a crash between the two leaves a valid main file)."""
    problem = validate_manifest(data)
    if problem:  # never persist something we could not read back
        raise RuntimeError(f"refusing to write an invalid cohort manifest: {problem}")
    atomic_write_json(root / MANIFEST, data)
    atomic_write_json(root / BACKUP, data)


def sweep_unreferenced(root: Path, data: dict[str, Any]) -> list[Path]:
    """Delete what a killed writer left behind; call it holding the cohort lock, with the manifest just read.

    Writers create files in ``images/`` and ``labels/<case>/`` only while they hold the lock, and reference them
    in the manifest before releasing it, so under the lock any file there that neither the manifest nor its
    backup copy references (stale ``.*.tmp.*`` files, complete images whose manifest write never happened) can
    never become referenced. Only plain files directly in those folders and root-level manifest/labels temp
    files are touched; links are unlinked, never followed; anything else is left alone.
    """
    keep: set[str] = set()
    backup, _ = _read_json(root / BACKUP)
    for manifest in (data, backup or {"cases": {}}):
        for rec in manifest["cases"].values():
            keep.add(rec["image"])
            keep.update(lv["path"] for lv in rec["labels"])
    doomed: list[Path] = []
    images, labels = root / "images", root / "labels"
    if images.is_dir() and not images.is_symlink():
        doomed += [f for f in images.iterdir() if f"images/{f.name}" not in keep and (f.is_symlink() or f.is_file())]
    if labels.is_dir() and not labels.is_symlink():
        for d in labels.iterdir():
            if d.is_symlink() or not d.is_dir():
                continue
            doomed += [f for f in d.iterdir()
                       if f"labels/{d.name}/{f.name}" not in keep and (f.is_symlink() or f.is_file())]
    doomed += [f for f in root.iterdir() if f.name.startswith((".manifest.", ".labels.")) and ".tmp" in f.name
               and f.is_file() and not f.is_symlink()]
    for f in doomed:
        remove_quietly(f)
    if labels.is_dir() and not labels.is_symlink():
        for d in labels.iterdir():
            if d.is_dir() and not d.is_symlink() and d.name not in data["cases"] and not any(d.iterdir()):
                with contextlib.suppress(OSError):
                    d.rmdir()
    return doomed


def image_hash(img: sitk.Image) -> str:
    """sha256 of voxel data, pixel type and grid: the same scan saved twice (any format) hashes the same."""
    h = hashlib.sha256()
    arr = np.ascontiguousarray(sitk.GetArrayViewFromImage(img))
    h.update(str(arr.dtype.str).encode())
    h.update(str(arr.shape).encode())
    h.update(arr.tobytes())
    # geometry rounded so that float noise from a format round-trip (NIfTI stores float32) does not matter
    for values in (img.GetSpacing(), img.GetOrigin(), img.GetDirection()):
        h.update(json.dumps([round(float(v), 3) for v in values]).encode())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_fraction(digest: str) -> float:
    """Map a hex digest to [0, 1): deterministic ordering for split assignment."""
    return int(digest[:12], 16) / float(1 << 48)


def assign_splits(records: list[dict[str, Any]], ratio: float) -> None:
    """Give the ``records`` without a split one: validation until ``round(ratio * len(records))`` of them are,
    then training, in image-hash order. Existing assignments never move, so validation scores stay comparable
    across finetunes; label maps (all labelled cases) and case classes (each class) share this rule."""
    pending = sorted((r for r in records if r.get("split") is None), key=lambda r: hash_fraction(r["hash"]))
    n_val = sum(1 for r in records if r.get("split") == "val")
    want = int(np.floor(ratio * len(records) + 0.5))
    for r in pending:
        if n_val < want:
            r["split"] = "val"
            n_val += 1
        else:
            r["split"] = "train"


def remove_quietly(path: Path) -> None:
    """Delete a file if it exists."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
