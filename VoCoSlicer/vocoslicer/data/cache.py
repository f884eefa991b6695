"""Preprocessing cache of every pretraining recipe: each volume is preprocessed once into a memory-mapped array.

The official code caches MONAI ``PersistentDataset`` pickles (30 TB for 160K CTs). Here each volume is
preprocessed once into a plain ``.npy`` that DataLoader workers memory-map, so a crop reads only its own voxels.
What "preprocessed" means is the recipe's *preprocessor*: a frozen dataclass called as ``cfg(source) -> (array,
meta)`` (VoCo: :class:`PreprocessConfig`, RAS + resampling + HU window; PUMIT: native spacing, depth first, see
:mod:`vocoslicer.data.anisotropy`). Entries are keyed by a hash of (source path, mtime, size, preprocessor
fields): editing a file or changing the spacing makes a new entry, runs reuse the rest. A byte limit evicts
least-recently-used entries of other runs; what still does not fit is streamed (preprocessed on the fly each
time it is sampled) instead of cached. Unreadable, empty, tiny or 2-D volumes are listed as bad (remembered in
the index, never retried until the file changes) and skipped. Runs and torchrun ranks may share a cache folder:
index updates happen under a ``filelock`` lock (released by the OS if the holder dies; Windows too), and a
volume being preprocessed is locked too, so that a second process waits for it instead of doing it again.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import SimpleITK as sitk
from filelock import FileLock

from vocoslicer.data.sources import Source, find_sources
from vocoslicer.errors import UserError
from vocoslicer.io.atomic import atomic_path, atomic_write_json
from vocoslicer.io.volume import read_image
from vocoslicer.train.recipes import VOCO

__all__ = ["Entry", "MappedArrays", "PreprocessConfig", "Preprocessor", "Source", "VolumeCache", "find_sources",
           "prepare_entries", "preprocess"]

INDEX = "index.json"


class Preprocessor(Protocol):
    """What a recipe gives the cache: a frozen dataclass (its fields key the entries) that preprocesses a source."""

    def __call__(self, source: Source) -> tuple[np.ndarray, dict[str, Any]]: ...


@dataclass(frozen=True)
class PreprocessConfig:
    """What one cached array means: orientation, spacing (mm, None = keep), HU window, storage dtype."""

    spacing: tuple[float, float, float] | None = (VOCO.spacing,) * 3
    orientation: str = "RAS"
    a_min: float = VOCO.a_min
    a_max: float = VOCO.a_max
    dtype: str = VOCO.cache_dtype  # int16: HU clipped to [a_min, a_max]; uint8: window scaled to 0..255 (half size)
    crop_foreground: bool = True  # like CropForegroundd on the windowed image (voxels above a_min)
    min_size: int = 16  # smaller along any axis after preprocessing → bad volume

    def __post_init__(self) -> None:
        if self.dtype not in ("int16", "uint8"):
            raise UserError(f"cache dtype must be int16 or uint8, got {self.dtype!r}")
        if not self.a_max > self.a_min:
            raise UserError(f"intensity window: a_max ({self.a_max}) must be above a_min ({self.a_min})")

    def __call__(self, source: Source) -> tuple[np.ndarray, dict[str, Any]]:
        """The VoCo preprocessor: :func:`preprocess` with this configuration."""
        return preprocess(source, self)

    def to_unit(self, arr: np.ndarray) -> np.ndarray:
        """Stored values → float32 in [0, 1] (ScaleIntensityRange(a_min, a_max, 0, 1, clip) of the original)."""
        if self.dtype == "uint8":
            return arr.astype(np.float32) * np.float32(1 / 255)
        return (arr.astype(np.float32) - np.float32(self.a_min)) * np.float32(1 / (self.a_max - self.a_min))


@dataclass
class Entry:
    """A volume ready for sampling: cached (``file`` set) or streamed (preprocessed when sampled)."""

    key: str
    source: Source
    shape: tuple[int, ...]
    file: str | None = None
    nbytes: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def cached(self) -> bool:
        """True when the array is on disk in the cache."""
        return self.file is not None


def preprocess(source: Source, cfg: PreprocessConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """Read, reorient, resample and window one volume → (stored-dtype array in x,y,z order, metadata)."""
    img = read_image(source.path, series_uid=source.series_uid)
    img = sitk.DICOMOrient(sitk.Cast(img, sitk.sitkFloat32), cfg.orientation)
    if cfg.spacing is not None:
        old_sp = np.asarray(img.GetSpacing())
        new_sp = np.asarray(cfg.spacing, dtype=float)
        size = np.maximum(1, np.round(np.asarray(img.GetSize()) * old_sp / new_sp)).astype(int)
        img = sitk.Resample(img, [int(s) for s in size], sitk.Transform(), sitk.sitkLinear, img.GetOrigin(),
                            [float(s) for s in new_sp], img.GetDirection(), float(cfg.a_min), sitk.sitkFloat32)
    arr = sitk.GetArrayViewFromImage(img).transpose(2, 1, 0)  # (z,y,x) → (x,y,z), MONAI's array order
    arr = np.clip(arr, cfg.a_min, cfg.a_max)
    bbox = [(0, n) for n in arr.shape]
    if cfg.crop_foreground:
        fg = arr > cfg.a_min
        if not fg.any():
            raise UserError(f"{source.label()}: no voxel above {cfg.a_min} HU (empty after the intensity window)")
        bbox = []
        for ax in range(3):
            hit = np.flatnonzero(fg.any(axis=tuple(a for a in range(3) if a != ax)))
            bbox.append((int(hit[0]), int(hit[-1]) + 1))
        arr = arr[tuple(slice(a, b) for a, b in bbox)]
    if min(arr.shape) < cfg.min_size:
        raise UserError(f"{source.label()}: too small after preprocessing ({'x'.join(map(str, arr.shape))} voxels, "
                        f"minimum {cfg.min_size} per axis)")
    if cfg.dtype == "uint8":
        out = np.round((arr - cfg.a_min) * (255.0 / (cfg.a_max - cfg.a_min))).astype(np.uint8)
    else:
        out = np.round(arr).astype(np.int16)
    meta = {"spacing": list(img.GetSpacing()), "foreground_bbox": bbox}
    return np.ascontiguousarray(out), meta


def _locked(root: Path) -> FileLock:
    # several runs (or torchrun ranks) may share a cache folder: serialise index updates
    root.mkdir(parents=True, exist_ok=True)
    return FileLock(root / ".lock")


class VolumeCache:
    """A cache folder: ``index.json`` + ``volumes/<key>.npy``; see the module docstring for the policy."""

    def __init__(self, root: str | os.PathLike[str], cfg: Preprocessor | None = None,
                 limit_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.cfg: Any = cfg or PreprocessConfig()
        self.limit_bytes = limit_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "volumes").mkdir(exist_ok=True)
        (self.root / "locks").mkdir(exist_ok=True)

    # ---------------------------------------------------------------- index
    def _read_index(self) -> dict[str, Any]:
        path = self.root / INDEX
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(data, dict) and isinstance(data.get("entries"), dict):
                    data.setdefault("bad", {})
                    return data
            except ValueError:
                pass  # a corrupt index only costs re-preprocessing: files are re-validated below
        return {"version": 1, "entries": {}, "bad": {}}

    def _write_index(self, index: dict[str, Any]) -> None:
        atomic_write_json(self.root / INDEX, index)

    def key(self, source: Source) -> str:
        """Hash of (source signature, preprocessing config)."""
        blob = json.dumps({"src": source.signature(), "cfg": asdict(self.cfg)}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def size_bytes(self) -> int:
        """Bytes of cached arrays currently listed in the index."""
        return sum(int(e["nbytes"]) for e in self._read_index()["entries"].values())

    # ---------------------------------------------------------------- main entry point
    def prepare(self, sources: Sequence[Source], on_warning: Callable[[str], None] | None = None,
                on_progress: Callable[[int, int], None] | None = None) -> tuple[list[Entry], list[tuple[str, str]]]:
        """Make every source usable: reuse or create cache entries, within the limit; returns (entries, bad).

        ``bad`` lists (source, reason) for volumes that cannot be used; they are reported via ``on_warning``.
        """
        warn = on_warning or (lambda msg: None)
        keys = {s: self.key(s) for s in sources}
        wanted = set(keys.values())
        entries: list[Entry] = []
        bad: list[tuple[str, str]] = []
        if self.limit_bytes is not None:  # a lowered limit applies now, to entries this run does not need
            with _locked(self.root):
                index = self._read_index()
                self._make_room(index, 0, wanted)
                self._write_index(index)
        for i, src in enumerate(sources):
            key = keys[src]
            known_bad, rec = self._lookup(key)
            if known_bad is None and rec is None:
                # one process preprocesses a volume; another run or torchrun rank that needs it meanwhile waits
                # here and then reuses it, so ranks that prepare the same list share the work instead of doubling
                # it. 256 lock files (by key prefix), not one per volume: a 160K-volume cache stays tidy.
                with FileLock(self.root / "locks" / f"{key[:2]}.lock"):
                    known_bad, rec = self._lookup(key)
                    entry = self._add(src, key, wanted, warn, bad) if known_bad is None and rec is None else None
                if entry is not None:
                    entries.append(entry)
            if known_bad is not None:
                bad.append((src.label(), known_bad))
                warn(f"skipping {src.label()}: {known_bad}")
            elif rec is not None:
                entries.append(Entry(key, src, tuple(rec["shape"]), rec["file"], int(rec["nbytes"]), rec["meta"]))
            if on_progress is not None:
                on_progress(i + 1, len(sources))
        return entries, bad

    def _lookup(self, key: str) -> tuple[str | None, dict[str, Any] | None]:
        """(why it is bad, or its index record) for ``key``; (None, None) when it still has to be preprocessed."""
        with _locked(self.root):
            index = self._read_index()
            known_bad = index["bad"].get(key)
            rec = index["entries"].get(key)
            if rec is not None and not (self.root / rec["file"]).is_file():
                rec = None
            if rec is not None:
                rec["last_used"] = time.time()
                self._write_index(index)
        return known_bad, rec

    def _add(self, src: Source, key: str, protected: set[str], warn: Callable[[str], None],
             bad: list[tuple[str, str]]) -> Entry | None:
        try:
            arr, meta = self.cfg(src)
        except UserError as exc:
            reason = str(exc).split(": ", 1)[-1] if str(exc).startswith(src.path) else str(exc)
            with _locked(self.root):
                index = self._read_index()
                index["bad"][key] = reason
                self._write_index(index)
            bad.append((src.label(), reason))
            warn(f"skipping {src.label()}: {reason}")
            return None
        except Exception as exc:  # noqa: BLE001 - a broken volume must never stop a pretraining run
            reason = f"cannot preprocess ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
            bad.append((src.label(), reason))
            warn(f"skipping {src.label()}: {reason}")
            return None
        nbytes = int(arr.nbytes)
        rel = f"volumes/{key}.npy"
        with _locked(self.root):
            index = self._read_index()
            if not self._make_room(index, nbytes, protected):
                self._write_index(index)
                warn(f"cache limit reached: {src.label()} is streamed (preprocessed whenever it is sampled)")
                return Entry(key, src, tuple(arr.shape), None, 0, meta)
            with atomic_path(self.root / rel) as tmp, open(tmp, "wb") as fh:
                np.save(fh, arr)
            index["entries"][key] = {"file": rel, "source": src.label(), "shape": list(arr.shape),
                                     "dtype": str(arr.dtype), "nbytes": nbytes, "meta": meta,
                                     "last_used": time.time()}
            self._write_index(index)
        return Entry(key, src, tuple(arr.shape), rel, nbytes, meta)

    def _make_room(self, index: dict[str, Any], nbytes: int, protected: set[str]) -> bool:
        """Evict least-recently-used entries not needed by this run until ``nbytes`` fit; False if impossible."""
        if self.limit_bytes is None:
            return True
        entries = index["entries"]
        used = sum(int(e["nbytes"]) for e in entries.values())
        for key in sorted((k for k in entries if k not in protected), key=lambda k: entries[k]["last_used"]):
            if used + nbytes <= self.limit_bytes:
                break
            used -= int(entries[key]["nbytes"])
            with contextlib.suppress(FileNotFoundError):
                (self.root / entries.pop(key)["file"]).unlink()
        return used + nbytes <= self.limit_bytes

    # ---------------------------------------------------------------- reading
    def open(self, entry: Entry) -> np.ndarray:
        """The stored array of ``entry``: a read-only memory map when cached, else preprocessed now."""
        if entry.file is not None:
            return np.load(self.root / entry.file, mmap_mode="r")
        return self.cfg(entry.source)[0]


class MappedArrays:
    """Read-only memory maps of cached arrays for one process, the ``limit`` most recently used kept open.

    Reopening a map per crop costs a header read; keeping one per volume costs a file descriptor each (CPython's
    mmap holds a duplicate), and a DataLoader worker that has sampled a thousand volumes would hit the usual
    1024-descriptor limit. Pickling (to start workers) drops the maps: every process opens its own.
    """

    def __init__(self, limit: int = 64) -> None:
        self.limit = int(limit)
        self._maps: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()

    def get(self, path: str | os.PathLike[str]) -> np.ndarray:
        """The array at ``path`` as a read-only memory map."""
        key = str(path)
        arr = self._maps.pop(key, None)
        if arr is None:
            arr = np.load(key, mmap_mode="r")
        self._maps[key] = arr
        while len(self._maps) > self.limit:
            self._maps.popitem(last=False)
        return arr

    def __len__(self) -> int:
        return len(self._maps)

    def __getstate__(self) -> dict[str, Any]:
        return {"limit": self.limit}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["limit"])  # type: ignore[misc]


def prepare_entries(sources: Sequence[Source], cache: VolumeCache, events: Any = None,
                    run_dir: str | os.PathLike[str] | None = None) -> list[Entry]:
    """Cache ``sources`` for a run and report it: the one data-preparation step of every pretraining recipe.

    Progress goes out as ``stage="cache"`` events and one warning per skipped volume; ``run_dir/bad_volumes.json``
    lists what was skipped and why, so the user can fix the data without reading the whole log.
    """
    from vocoslicer.jobs.events import NULL_SINK

    ev = events if events is not None else NULL_SINK
    ev.log(f"{len(sources)} volumes found; preprocessing into {cache.root} (once, reused by later runs)")
    entries, bad = cache.prepare(sources, on_warning=ev.warning,
                                 on_progress=lambda i, n: ev.progress(i, n, stage="cache"))
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(run_dir) / "bad_volumes.json", [{"source": s, "reason": r} for s, r in bad])
    streamed = sum(not e.cached for e in entries)
    ev.log(f"{len(entries)} usable volumes ({streamed} streamed), {len(bad)} skipped; cache "
           f"{cache.size_bytes() / 1e9:.2f} GB")
    return entries
