"""The local cohort: images, corrected label maps with history and provenance, and a stable train/val split.

This is where the segment → correct → finetune loop keeps its data. The rules that make it trustworthy:

- a case id never changes and an image is stored once (deduplicated by voxel data + grid hash);
- re-correcting a case adds a label version (``labels/<case>/v2.nii.gz``); nothing is overwritten;
- every label records who/what produced it (model bundle id/version/sha256, corrected or not, by whom, when);
- a label map is checked against the label table and the image grid; a different grid is resampled (nearest)
  only when asked and only when the two overlap physically, never silently misaligned;
- a case placed in validation stays there across finetunes, so validation Dice stays comparable;
- every change happens under an OS file lock and ends with an atomic manifest replace, and ``version`` grows by one,
  so finetuning can record exactly which cohort state it learned from.
"""

from __future__ import annotations

import getpass
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from vocoslicer.data.cohort_manifest import (
    LOCK,
    MANIFEST,
    SPLITS,
    assign_splits,
    empty_manifest,
    file_lock,
    image_hash,
    load_manifest,
    remove_quietly,
    save_manifest,
    sweep_unreferenced,
)
from vocoslicer.errors import UserError
from vocoslicer.ids import check_id, inside, relative_inside
from vocoslicer.io import atomic_write_json, read_image, same_grid, write_image
from vocoslicer.labels import LabelTable


@dataclass(frozen=True)
class Provenance:
    """Where a label came from: the model that proposed it (if any) and whether/who corrected it."""

    model_id: str = ""
    model_version: str = ""
    model_sha256: str = ""
    corrected: bool = False
    by: str = ""
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON form stored in the manifest (with the time it was recorded)."""
        d = asdict(self)
        d["by"] = self.by or _user()
        d["time"] = time.time()
        return d


@dataclass(frozen=True)
class AddResult:
    """What :meth:`Cohort.add` did."""

    case_id: str
    created: bool  # False: the image was already in the cohort (deduplicated)
    label_version: int | None  # the label version written, None when no label was given
    cohort_version: int


@dataclass
class Case:
    """A read-only view of one case, with absolute paths."""

    id: str
    image: Path
    hash: str
    split: str | None
    source: str
    added: float
    label_versions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        """True when at least one label version exists."""
        return bool(self.label_versions)

    @property
    def label(self) -> Path | None:
        """Path of the latest label version (what training uses)."""
        return Path(self.label_versions[-1]["abs_path"]) if self.label_versions else None


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


def _as_table(labels: LabelTable | str | Path | None) -> LabelTable | None:
    if labels is None or isinstance(labels, LabelTable):
        return labels
    return LabelTable.read_csv(labels)


def _merge_tables(current: LabelTable, new: LabelTable, source: str) -> LabelTable:
    """Union of two tables; the same value with a different name is an error (labels would be mixed up)."""
    merged = list(current.labels)
    for lb in new:
        if lb.value in current.values:
            old = current.by_value(lb.value)
            if old.name.lower() != lb.name.lower():
                raise UserError(f"{source}: label value {lb.value} is {lb.name!r} but the cohort calls it "
                                f"{old.name!r}; relabel the map or use a matching labels table")
        else:
            merged.append(lb)
    return LabelTable(tuple(sorted(merged, key=lambda lb: lb.value)))


def _bounds(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    size = np.asarray(img.GetSize(), dtype=float)
    corners = []
    for i in range(8):
        idx = [(-0.5 if not (i >> a) & 1 else size[a] - 0.5) for a in range(3)]
        corners.append(img.TransformContinuousIndexToPhysicalPoint(idx))
    pts = np.asarray(corners)
    return pts.min(axis=0), pts.max(axis=0)


def _overlap_fraction(label: sitk.Image, image: sitk.Image) -> float:
    lo_a, hi_a = _bounds(label)
    lo_b, hi_b = _bounds(image)
    inter = np.clip(np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b), 0, None)
    vol_b = float(np.prod(hi_b - lo_b))
    return float(np.prod(inter)) / vol_b if vol_b > 0 else 0.0


def prepare_label(label: sitk.Image, image: sitk.Image, table: LabelTable, source: str,
                  resample: bool = False) -> sitk.Image:
    """Check a label map against its label table and its image; return it as an integer map on the image grid."""
    arr = sitk.GetArrayViewFromImage(label)
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.equal(np.mod(arr, 1), 0)):
        raise UserError(f"{source}: label map has non-integer values (is this an image, not a label map?)")
    values = np.unique(arr).astype(np.int64)
    if values.min(initial=0) < 0:
        raise UserError(f"{source}: label map has negative values")
    table.check_values(values.tolist(), source)
    out_type = sitk.sitkUInt8 if table.max_value < 256 else sitk.sitkUInt16
    label = sitk.Cast(label, out_type)
    if same_grid(label, image, tol=1e-3):
        label.CopyInformation(image)  # remove float noise of the format round-trip
        return label
    if not resample:
        raise UserError(f"{source}: label grid (size {label.GetSize()}, spacing "
                        f"{tuple(round(s, 3) for s in label.GetSpacing())}) differs from the image grid (size "
                        f"{image.GetSize()}, spacing {tuple(round(s, 3) for s in image.GetSpacing())}); pass "
                        "--resample-label to resample it (nearest neighbour) onto the image")
    if _overlap_fraction(label, image) < 0.5:
        raise UserError(f"{source}: label and image do not overlap physically (less than half of the image is "
                        "covered); they probably belong to different scans, refusing to resample")
    out = sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, out_type)
    if values.max(initial=0) > 0 and not np.any(sitk.GetArrayViewFromImage(out)):
        raise UserError(f"{source}: after resampling onto the image grid no labelled voxel is left")
    return out


class Cohort:
    """A cohort directory: ``images/``, ``labels/<case>/vN.nii.gz``, ``manifest.json`` (+ backup), ``labels.csv``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise UserError(f"{self.root}: no such cohort folder; create one with 'vocoslicer cohort init'")
        self.warning: str | None = None
        self._load()  # fail early when this is not a cohort

    # ------------------------------------------------------------------ creation and reading
    @classmethod
    def init(cls, root: str | Path, val_ratio: float = 0.2, labels: LabelTable | str | Path | None = None
             ) -> Cohort:
        """Create an empty cohort (an existing non-empty folder that is not a cohort is refused)."""
        path = Path(root).expanduser().resolve()
        if not 0.0 <= val_ratio < 1.0:
            raise UserError(f"val ratio must be in [0, 1), got {val_ratio}")
        if path.exists() and not path.is_dir():
            raise UserError(f"{path}: is a file; a cohort is a folder")
        if (path / MANIFEST).exists():
            raise UserError(f"{path}: already a cohort")
        if path.exists() and any(p.name != LOCK for p in path.iterdir()):
            raise UserError(f"{path}: folder exists and is not empty; choose a new folder")
        path.mkdir(parents=True, exist_ok=True)
        with file_lock(path / LOCK):
            data = empty_manifest(val_ratio)
            table = _as_table(labels)
            if table is not None:
                data["labels"] = table.to_list()
                table.write_csv(path / "labels.csv")
            (path / "images").mkdir(exist_ok=True)
            (path / "labels").mkdir(exist_ok=True)
            save_manifest(path, data)
        return cls(path)

    def _load(self) -> dict[str, Any]:
        data, warning = load_manifest(self.root)
        if warning:
            self.warning = warning
        return data

    @property
    def manifest(self) -> dict[str, Any]:
        """A fresh copy of the manifest (another process may have changed it)."""
        return self._load()

    @property
    def version(self) -> int:
        """Increments on every change; finetuning records it."""
        return int(self._load()["version"])

    @property
    def labels(self) -> LabelTable:
        """The cohort's label table (union of the tables of every labelled case added)."""
        return LabelTable.from_list(self._load()["labels"])

    def _file(self, rel: str, what: str) -> Path:
        """Absolute path of a manifest entry, resolved (links too) and required to lie inside the cohort."""
        return relative_inside(self.root, rel, f"{self.root}: {what}")

    def _case(self, rec: dict[str, Any]) -> Case:
        versions = [dict(v, abs_path=str(self._file(v["path"], f"label of case {rec['id']}"))) for v in rec["labels"]]
        return Case(rec["id"], self._file(rec["image"], f"image of case {rec['id']}"), rec["hash"], rec.get("split"),
                    rec.get("source", ""), rec.get("added", 0.0), versions)

    def _load_for_write(self) -> dict[str, Any]:
        """Load the manifest under the lock and clear what a killed writer left (skipped after a recovery)."""
        data, warning = load_manifest(self.root)
        if warning:
            self.warning = warning  # the newest manifest is unreadable: do not judge what it referenced
        else:
            sweep_unreferenced(self.root, data)
        return data

    def cases(self) -> list[Case]:
        """All cases in id order."""
        data = self._load()
        return [self._case(data["cases"][cid]) for cid in sorted(data["cases"])]

    def case(self, case_id: str) -> Case:
        """One case by id."""
        data = self._load()
        if case_id not in data["cases"]:
            raise UserError(f"{self.root}: no case {case_id!r}")
        return self._case(data["cases"][case_id])

    def find(self, img: sitk.Image) -> str | None:
        """The id of the case holding exactly this image, if any."""
        digest = image_hash(img)
        for cid, rec in self._load()["cases"].items():
            if rec["hash"] == digest:
                return cid
        return None

    # ------------------------------------------------------------------ changes (all under the lock)
    def _commit(self, data: dict[str, Any]) -> int:
        data["version"] = int(data["version"]) + 1
        data["modified"] = time.time()
        save_manifest(self.root, data)
        self.warning = None
        return data["version"]

    def add(self, image: str | Path | sitk.Image, label: str | Path | sitk.Image | None = None,
            labels: LabelTable | str | Path | None = None, provenance: Provenance | None = None,
            case_id: str | None = None, split: str | None = None, resample_label: bool = False) -> AddResult:
        """Add an image (optionally with a label map); an image already present gets a new label version."""
        if split is not None and split not in SPLITS:
            raise UserError(f"split must be one of {SPLITS}, got {split!r}")
        if case_id is not None:
            check_id(case_id, "case id")
        source = str(image) if not isinstance(image, sitk.Image) else "<memory>"
        img = image if isinstance(image, sitk.Image) else read_image(image)
        lab = None
        if label is not None:
            lab = label if isinstance(label, sitk.Image) else read_image(label)
        table = _as_table(labels)
        digest = image_hash(img)
        with file_lock(self.root / LOCK):
            data = self._load_for_write()
            existing = next((cid for cid, r in data["cases"].items() if r["hash"] == digest), None)
            if existing is not None and case_id is not None and case_id != existing:
                raise UserError(f"{source}: this image is already in the cohort as case {existing!r}; --id "
                                f"{case_id!r} cannot rename it (omit --id to add a label version to {existing!r})")
            if existing is not None:
                if lab is None:
                    return AddResult(existing, False, None, int(data["version"]))
                version = self._add_label_locked(data, existing, lab, table, provenance, resample_label,
                                                 str(label))
                return AddResult(existing, False, version, self._commit(data))
            cid = case_id or f"case{int(data['next_id']):04d}"
            if cid in data["cases"]:
                raise UserError(f"{self.root}: case id {cid!r} already exists")
            rel = f"images/{cid}.nii.gz"
            if lab is not None:  # validate the label before writing anything
                merged = self._check_table(data, table, str(label))
                prepare_label(lab, img, merged, str(label), resample_label)
            write_image(img, self._file(rel, f"image of case {cid}"))
            data["cases"][cid] = {"id": cid, "image": rel, "hash": digest, "source": source, "added": time.time(),
                                  "size": list(img.GetSize()), "spacing": [round(s, 5) for s in img.GetSpacing()],
                                  "split": split, "labels": []}
            if case_id is None:
                data["next_id"] = int(data["next_id"]) + 1
            version = None
            if lab is not None:
                version = self._add_label_locked(data, cid, lab, table, provenance, resample_label, str(label),
                                                 image=img)
            return AddResult(cid, True, version, self._commit(data))

    def add_label(self, case_id: str, label: str | Path | sitk.Image, labels: LabelTable | str | Path | None = None,
                  provenance: Provenance | None = None, resample_label: bool = False) -> int:
        """Add a new label version to an existing case (a re-correction); returns the version number."""
        lab = label if isinstance(label, sitk.Image) else read_image(label)
        table = _as_table(labels)
        with file_lock(self.root / LOCK):
            data = self._load_for_write()
            if case_id not in data["cases"]:
                raise UserError(f"{self.root}: no case {case_id!r}")
            version = self._add_label_locked(data, case_id, lab, table, provenance, resample_label, str(label))
            self._commit(data)
            return version

    def _check_table(self, data: dict[str, Any], table: LabelTable | None, source: str) -> LabelTable:
        current = LabelTable.from_list(data["labels"])
        if table is None:
            if not len(current):
                raise UserError(f"{source}: a labels table (CSV value,name,...) is needed for the first label "
                                "map of a cohort")
            return current
        return _merge_tables(current, table, source)

    def _add_label_locked(self, data: dict[str, Any], cid: str, lab: sitk.Image, table: LabelTable | None,
                          provenance: Provenance | None, resample: bool, source: str,
                          image: sitk.Image | None = None) -> int:
        merged = self._check_table(data, table, source)
        rec = data["cases"][cid]
        if image is None:
            image = read_image(self._file(rec["image"], f"image of case {cid}"))
        if table is not None:  # the map must satisfy the table it came with, not only the cohort's union
            table.check_values(np.unique(sitk.GetArrayViewFromImage(lab)).tolist(), source)
        ready = prepare_label(lab, image, merged, source, resample)
        version = len(rec["labels"]) + 1
        rel = f"labels/{cid}/v{version}.nii.gz"
        write_image(ready, self._file(rel, f"label of case {cid}"))
        present = sorted(int(v) for v in np.unique(sitk.GetArrayViewFromImage(ready)) if v != 0)
        rec["labels"].append({"version": version, "path": rel, "values": present,
                              "provenance": (provenance or Provenance(corrected=True)).to_dict()})
        if merged.to_list() != data["labels"]:
            data["labels"] = merged.to_list()
            merged.write_csv(self.root / "labels.csv")
        self._assign_pending(data)
        return version

    @staticmethod
    def _assign_pending(data: dict[str, Any], ratio: float | None = None) -> None:
        """Give labelled cases without a split one; existing assignments never move."""
        ratio = float(data.get("val_ratio", 0.2) if ratio is None else ratio)
        assign_splits([r for r in data["cases"].values() if r["labels"]], ratio)

    def remove(self, case_id: str) -> int:
        """Remove a case and its files (manifest first, so a crash leaves unused files, never dangling ones)."""
        with file_lock(self.root / LOCK):
            data = self._load_for_write()
            if case_id not in data["cases"]:
                raise UserError(f"{self.root}: no case {case_id!r}")
            rec = data["cases"][case_id]
            image = self._file(rec["image"], f"image of case {case_id}")  # checked before anything changes
            label_dir = inside(self.root, f"labels/{check_id(case_id, 'case id')}", "label folder")
            del data["cases"][case_id]
            version = self._commit(data)
            remove_quietly(image)
            if label_dir.is_dir() and not label_dir.is_symlink():
                shutil.rmtree(label_dir, ignore_errors=True)
            return version

    def set_split(self, case_ids: list[str], split: str, force: bool = False) -> int:
        """Place cases in train/val explicitly; moving an already assigned case needs ``force``."""
        if split not in SPLITS:
            raise UserError(f"split must be one of {SPLITS}, got {split!r}")
        with file_lock(self.root / LOCK):
            data = self._load_for_write()
            for cid in case_ids:
                if cid not in data["cases"]:
                    raise UserError(f"{self.root}: no case {cid!r}")
                cur = data["cases"][cid].get("split")
                if cur not in (None, split) and not force:
                    raise UserError(f"case {cid} is already in {cur!r}; moving it changes what validation Dice "
                                    "means across finetunes (use --force if you really mean it)")
            for cid in case_ids:
                data["cases"][cid]["split"] = split
            return self._commit(data)

    def assign_splits(self, val_ratio: float | None = None) -> int:
        """Assign labelled cases that have no split yet (new ratio applies to new cases only)."""
        with file_lock(self.root / LOCK):
            data = self._load_for_write()
            if val_ratio is not None:
                if not 0.0 <= val_ratio < 1.0:
                    raise UserError(f"val ratio must be in [0, 1), got {val_ratio}")
                data["val_ratio"] = float(val_ratio)
            self._assign_pending(data)
            return self._commit(data)

    def repair(self) -> int:
        """Rewrite the manifest from the state just loaded (used after recovering from the backup copy)."""
        with file_lock(self.root / LOCK):
            return self._commit(self._load())

    # ------------------------------------------------------------------ export
    def export(self, out: str | Path) -> Path:
        """Write an MSD-style copy (imagesTr/labelsTr/imagesUn + dataset.json) with the latest labels."""
        dest = Path(out).expanduser().resolve()
        if dest.exists() and not dest.is_dir():
            raise UserError(f"{dest}: --out must be a new or empty folder, not a file")
        if dest.exists() and any(dest.iterdir()):
            raise UserError(f"{dest}: export folder exists and is not empty")
        if dest == self.root or dest.is_relative_to(self.root):
            raise UserError(f"{dest}: the export folder may not lie inside the cohort itself")
        data = self._load()
        for rec in data["cases"].values():  # every source is checked before the first file is copied
            self._case(rec)
        entries: dict[str, list[dict[str, str]]] = {"training": [], "validation": [], "unlabeled": []}
        for cid in sorted(data["cases"]):
            rec = data["cases"][cid]
            if rec["labels"]:
                img_rel, lab_rel = f"imagesTr/{cid}.nii.gz", f"labelsTr/{cid}.nii.gz"
                _copy(self._file(rec["image"], f"image of case {cid}"), dest / img_rel)
                _copy(self._file(rec["labels"][-1]["path"], f"label of case {cid}"), dest / lab_rel)
                key = "validation" if rec.get("split") == "val" else "training"
                entries[key].append({"image": img_rel, "label": lab_rel})
            else:
                img_rel = f"imagesUn/{cid}.nii.gz"
                _copy(self._file(rec["image"], f"image of case {cid}"), dest / img_rel)
                entries["unlabeled"].append({"image": img_rel})
        table = LabelTable.from_list(data["labels"])
        table.write_csv(dest / "labels.csv")
        atomic_write_json(dest / "dataset.json", {
            "name": self.root.name, "cohort_version": data["version"], "modality": {"0": "image"},
            "labels": {"0": "background", **{str(lb.value): lb.name for lb in table}},
            "numTraining": len(entries["training"]) + len(entries["validation"]), **entries})
        return dest / "dataset.json"


def _copy(src: Path, dst: Path) -> None:
    from vocoslicer.io import atomic_path

    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
