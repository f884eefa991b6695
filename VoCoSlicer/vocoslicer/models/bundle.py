"""Model bundles: the one format the CLI, the finetuner, the worker and Slicer all read.

A bundle is a folder (or a zip of one) holding::

    model.json          architecture + args, task, labels, preprocessing, inference settings, provenance
    weights.safetensors (or weights.pt: a plain state dict, loaded with ``weights_only=True``)
    labels.csv          the label table (segmentation) or class list (classification), for humans and Slicer
    README.md           optional model card

Weights are never pickled code, their sha256 is recorded in model.json and checked on load, and a bundle is
written into a temporary folder and renamed into place, so a cancelled finetune never leaves a half bundle.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import io
import json
import math
import os
import shutil
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vocoslicer.errors import UserError
from vocoslicer.ids import check_id, id_problem, inside
from vocoslicer.io.atomic import atomic_write_json, atomic_write_text, make_temp_dir
from vocoslicer.labels import LabelTable

BUNDLE_FORMAT = "vocoslicer-bundle/1"
TASKS = ("segmentation", "classification", "backbone")

# VoCo's official CT preprocessing (spec §6.1): used when a bundle does not say otherwise
DEFAULT_PREPROCESSING: dict[str, Any] = {
    "orientation": "RAS",
    "spacing": [1.5, 1.5, 1.5],
    "intensity": {"a_min": -175.0, "a_max": 250.0, "b_min": 0.0, "b_max": 1.0, "clip": True},
}
DEFAULT_INFERENCE: dict[str, Any] = {"roi_size": [96, 96, 96], "overlap": 0.5, "mode": "gaussian", "sw_batch_size": 4}


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a safetensors or torch state dict without executing pickled code."""
    p = Path(path)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a bad file for the user
        raise UserError(f"{p}: cannot load weights ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{p}: not a state dict of tensors")
    return obj


@dataclass
class ModelBundle:
    """A loaded bundle: ``meta`` is model.json, ``path`` the folder it came from (None if not saved yet)."""

    meta: dict[str, Any]
    labels: LabelTable = field(default_factory=LabelTable)
    path: Path | None = None

    # ----------------------------------------------------------------- accessors
    @property
    def id(self) -> str:
        """Catalog id (stable across versions)."""
        return str(self.meta.get("id", "unnamed"))

    @property
    def version(self) -> str:
        """Semantic version string."""
        return str(self.meta.get("version", "0.0.0"))

    @property
    def task(self) -> str:
        """segmentation | classification | backbone."""
        return str(self.meta.get("task", "segmentation"))

    @property
    def architecture(self) -> tuple[str, dict[str, Any]]:
        """(name, args) to rebuild the network."""
        arch = self.meta.get("architecture") or {}
        return str(arch.get("name", "")), dict(arch.get("args", {}))

    @property
    def preprocessing(self) -> dict[str, Any]:
        """Orientation, spacing and intensity window the network expects."""
        return {**DEFAULT_PREPROCESSING, **(self.meta.get("preprocessing") or {})}

    @property
    def inference(self) -> dict[str, Any]:
        """Sliding-window settings."""
        return {**DEFAULT_INFERENCE, **(self.meta.get("inference") or {})}

    @property
    def channel_values(self) -> list[int]:
        """Label value of each output channel (channel 0 = background)."""
        cv = self.meta.get("channel_values")
        return [int(v) for v in cv] if cv else [0, *self.labels.values]

    @property
    def classes(self) -> list[str]:
        """Class names of a classification bundle, in output order."""
        return [str(c) for c in self.meta.get("classes", [])]

    @property
    def weights_path(self) -> Path:
        """The weights file inside the bundle folder."""
        if self.path is None:
            raise UserError("bundle has not been saved: no weights file")
        name = str((self.meta.get("weights") or {}).get("file", "weights.safetensors"))
        return inside(self.path, check_id(name, f"{self.path}: weights file"), "weights file")

    def describe(self) -> str:
        """One line for logs and the CLI."""
        return f"{self.id} v{self.version} ({self.task}, {self.architecture[0]})"

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        """Check model.json for the mistakes that would otherwise surface deep inside inference."""
        src = str(self.path or self.id)
        for what, value in (("model id", self.meta.get("id", "unnamed")), ("version", self.version)):
            problem = id_problem(value)
            if problem:
                raise UserError(f"{src}: {what} {value!r} {problem}")
        _check_settings(src, self.inference, self.preprocessing)
        if self.task not in TASKS:
            raise UserError(f"{src}: unknown task {self.task!r} (expected one of {', '.join(TASKS)})")
        name, args = self.architecture
        if not name:
            raise UserError(f"{src}: model.json has no architecture name")
        out = args.get("out_channels")
        if self.task == "segmentation":
            cv = self.channel_values
            if out is not None and int(out) != len(cv):
                raise UserError(f"{src}: the network has {out} output channels but the label table defines "
                                f"{len(cv)} (background + {len(cv) - 1} labels)")
            if cv[0] != 0 or len(set(cv)) != len(cv):
                raise UserError(f"{src}: channel_values must start with 0 (background) and be unique, got {cv}")
            missing = sorted(set(cv[1:]) - set(self.labels.values))
            if missing:
                raise UserError(f"{src}: channel values {missing} have no entry in the label table")
        if self.task == "classification":
            n = args.get("num_classes", out)
            if not self.classes:
                raise UserError(f"{src}: a classification bundle needs a 'classes' list")
            if n is not None and int(n) != len(self.classes):
                raise UserError(f"{src}: the network has {n} outputs but {len(self.classes)} classes are listed")

    # ----------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ModelBundle:
        """Load model.json and labels from a bundle folder or zip (weights are read by :meth:`state_dict`)."""
        p = Path(path)
        if not p.exists():
            raise UserError(f"{p}: no such model bundle")
        if p.is_file() and zipfile.is_zipfile(p):
            p = _extract_zip(p)
        if p.is_file() and p.name == "model.json":
            p = p.parent
        mj = p / "model.json"
        if not mj.is_file():
            raise UserError(f"{p}: not a model bundle (no model.json)")
        inside(p, mj, "model.json")
        try:
            meta = json.loads(mj.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{mj}: unreadable model.json ({exc})") from None
        if not isinstance(meta, dict):
            raise UserError(f"{mj}: model.json must hold a JSON object")
        try:
            labels = LabelTable.from_list(meta.get("labels", [])) if meta.get("labels") else LabelTable()
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{mj}: malformed labels list ({type(exc).__name__}: {exc})") from None
        bundle = cls(meta=meta, labels=labels, path=p)
        bundle.validate()
        bundle._check_labels_csv()
        return bundle

    def _check_labels_csv(self) -> None:
        """labels.csv is what Slicer and people read, model.json what the engine uses: they must agree."""
        assert self.path is not None
        csv_path = self.path / "labels.csv"
        if not csv_path.is_file():
            return
        inside(self.path, csv_path, "labels.csv")
        if self.task == "classification":
            try:
                rows = list(csv.DictReader(io.StringIO(csv_path.read_text(encoding="utf-8"))))
                names = [str(r["name"]) for r in sorted(rows, key=lambda r: int(r["index"]))]
            except (OSError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
                raise UserError(f"{csv_path}: unreadable class list ({type(exc).__name__})") from None
            if names != self.classes:
                raise UserError(f"{csv_path}: classes {names} disagree with model.json's {self.classes}")
            return
        table = LabelTable.read_csv(csv_path)
        if table != self.labels:
            ours = {lb.value: lb for lb in self.labels}
            theirs = {lb.value: lb for lb in table}
            diff = next((v for v in sorted(set(ours) | set(theirs)) if ours.get(v) != theirs.get(v)), None)
            a, b = theirs.get(diff), ours.get(diff)
            raise UserError(f"{csv_path}: disagrees with model.json at label value {diff} "
                            f"(labels.csv: {a.name if a else 'absent'!r}{'' if a is None else ' ' + str(a.rgb)}, "
                            f"model.json: {b.name if b else 'absent'!r}{'' if b is None else ' ' + str(b.rgb)})")

    def state_dict(self, verify: bool = True) -> dict[str, torch.Tensor]:
        """Read the weights, checking the recorded sha256 first (a truncated download fails here, clearly)."""
        wp = self.weights_path
        if not wp.is_file():
            raise UserError(f"{self.path}: weights file {wp.name} is missing")
        if verify:
            self._check_sha(wp)
        return load_state_dict_file(wp)

    def _check_sha(self, wp: Path) -> None:
        if not wp.is_file():
            raise UserError(f"{self.path}: weights file {wp.name} is missing")
        expected = (self.meta.get("weights") or {}).get("sha256")
        if expected:
            actual = sha256_file(wp)
            if actual != expected:
                raise UserError(f"{wp}: sha256 mismatch (file {actual[:12]}…, model.json {expected[:12]}…): "
                                "the weights are corrupted or were replaced")

    def build_model(self, load_weights: bool = True, strict: bool = True) -> torch.nn.Module:
        """Rebuild the network from model.json and load its weights."""
        from vocoslicer.models.factory import build_model

        name, args = self.architecture
        model = build_model(name, args)
        if load_weights:
            sd = self.state_dict()
            result = model.load_state_dict(sd, strict=False)
            if strict and (result.missing_keys or result.unexpected_keys):
                miss, unexp = result.missing_keys, result.unexpected_keys
                raise UserError(f"{self.path}: weights do not match architecture {name}: {len(miss)} missing "
                                f"(e.g. {miss[:2]}), {len(unexp)} unexpected (e.g. {unexp[:2]})")
        return model

    def verify_loadable(self) -> None:
        """Prove the bundle runs before it is installed: sha256, network build, weight shapes, one forward pass.

        The network is built with its parameters on the ``meta`` device (no memory, even for VoCo-H) and the
        forward pass runs on meta tensors, so wrong shapes, impossible architecture arguments and ROI sizes the
        network cannot take are one-line errors at import instead of a traceback at the first segmentation.
        """
        from vocoslicer.models.convert import parameters_on_meta
        from vocoslicer.models.factory import build_model

        src = str(self.path)
        self._check_sha(self.weights_path)
        name, args = self.architecture
        try:
            with parameters_on_meta(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = build_model(name, args)
        except UserError as exc:
            raise UserError(f"{src}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - builders reject bad arguments with assorted exception types
            raise UserError(f"{src}: architecture {name!r} cannot be built with {args}: {_first_line(exc)}") from None
        sd = self._weight_layout({n for n, _ in model.named_parameters()})
        try:
            with warnings.catch_warnings():  # "copying into a meta parameter is a no-op": that is the point here
                warnings.simplefilter("ignore")
                result = model.load_state_dict(sd, strict=False)
        except RuntimeError as exc:  # size mismatches
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip().startswith("size mismatch")]
            raise UserError(f"{src}: weights do not fit architecture {name}: "
                            f"{(lines or [_first_line(exc)])[0][:200]}") from None
        if self.meta.get("weights_subset") is None and (result.missing_keys or result.unexpected_keys):
            miss, unexp = result.missing_keys, result.unexpected_keys
            raise UserError(f"{src}: weights do not match architecture {name}: {len(miss)} missing "
                            f"(e.g. {miss[:2]}), {len(unexp)} unexpected (e.g. {unexp[:2]})")
        if self.task == "backbone":
            return  # a backbone is only ever finetuned into another network, which checks its own input size
        inf = self.inference
        size = [int(v) for v in (inf.get("input_size") or inf["roi_size"])]
        x = torch.empty(1, int(args.get("in_channels", 1)), *size, device="meta")
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                y = model.eval()(x)
        except NotImplementedError:
            return  # an operator without a meta kernel: the shapes above were still checked
        except Exception as exc:  # noqa: BLE001 - the network's own complaint about the input size
            if "device meta" in str(exc) or "meta tensor" in str(exc):
                return  # the network makes a real tensor inside forward (e.g. PUMIT's RoPE table): meta can't run it
            raise UserError(f"{src}: the network cannot take its ROI size {size}: {_first_line(exc)}") from None
        if self.task == "segmentation":
            want = (1, len(self.channel_values), *size)
        else:
            want = (1, len(self.classes))
        if tuple(y.shape) != want:
            raise UserError(f"{src}: at ROI size {size} the network outputs shape {list(y.shape)}, expected "
                            f"{list(want)}")

    def _weight_layout(self, params: set[str]) -> dict[str, torch.Tensor]:
        """The weights with ``params`` as meta tensors of the right shapes: a 4.6 GB file is never loaded.

        Buffers (index tables such as Swin's ``relative_position_index``) are read for real: the meta forward
        pass indexes with them, and they are small.
        """
        wp = self.weights_path
        if wp.suffix != ".safetensors":
            return {k: v.to("meta") if k in params else v for k, v in self.state_dict(verify=False).items()}
        from safetensors import safe_open

        try:
            with safe_open(str(wp), framework="pt") as fh:
                return {k: torch.empty(fh.get_slice(k).get_shape(), device="meta") if k in params
                        else fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        except Exception as exc:  # noqa: BLE001 - a damaged header is a bad file for the user
            raise UserError(f"{wp}: cannot load weights ({type(exc).__name__}: {_first_line(exc)})") from None

    # ----------------------------------------------------------------- saving
    def save(self, out_dir: str | os.PathLike[str], state_dict: dict[str, torch.Tensor],
             dtype: torch.dtype | None = None, card: str | None = None, overwrite: bool = False) -> Path:
        """Write the bundle atomically into ``out_dir`` (a folder) and return it; updates ``self.path``."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        if out.exists() and not overwrite:
            raise UserError(f"{out}: already exists (choose another output or allow overwriting)")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(out.parent, prefix=f".{out.name}.", suffix=".tmp")
        try:
            tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu()
                       .contiguous() for k, v in state_dict.items()}
            wfile = tmp / "weights.safetensors"
            save_file(tensors, str(wfile))
            os.chmod(wfile, tmp.stat().st_mode & 0o666)  # safetensors writes 0600; the folder carries the umask
            meta = dict(self.meta)
            meta.setdefault("format", BUNDLE_FORMAT)
            meta.setdefault("created", _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
            meta["weights"] = {"file": wfile.name, "sha256": sha256_file(wfile),
                               "dtype": str(dtype or next(iter(tensors.values())).dtype).replace("torch.", ""),
                               "bytes": wfile.stat().st_size}
            if len(self.labels):
                meta["labels"] = self.labels.to_list()
                atomic_write_text(tmp / "labels.csv", self.labels.to_csv())
            elif self.classes:
                atomic_write_text(tmp / "labels.csv", "index,name\n" + "".join(
                    f"{i},{c}\n" for i, c in enumerate(self.classes)))
            atomic_write_json(tmp / "model.json", meta)
            if card:
                atomic_write_text(tmp / "README.md", card)
            self.meta = meta
            check = ModelBundle(meta=meta, labels=self.labels, path=tmp)
            check.validate()
            if out.exists():
                backup = out.with_name(f".{out.name}.old")
                if backup.exists():
                    shutil.rmtree(backup)
                os.replace(out, backup)
                os.replace(tmp, out)
                shutil.rmtree(backup, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.path = out
        return out


def _first_line(exc: BaseException) -> str:
    return ((str(exc).strip().splitlines() or [type(exc).__name__])[0])[:200]


def _positive_ints(value: Any, n: int = 3) -> bool:
    return (isinstance(value, list | tuple) and len(value) == n
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 4096 for v in value))


def _check_settings(src: str, inf: dict[str, Any], pre: dict[str, Any]) -> None:
    """Inference and preprocessing values a bundle carries: checked once at load, not deep inside inference."""
    for key in ("roi_size", "input_size"):
        if key in inf and inf[key] is not None and not _positive_ints(inf[key]):
            raise UserError(f"{src}: inference {key} must be three positive integers, got {inf[key]!r}")
    ov = inf.get("overlap", 0.5)
    if not isinstance(ov, int | float) or isinstance(ov, bool) or not 0.0 <= float(ov) < 1.0:
        raise UserError(f"{src}: inference overlap must be a number in [0, 1), got {ov!r}")
    bs = inf.get("sw_batch_size", 1)
    if not isinstance(bs, int) or isinstance(bs, bool) or bs < 1:
        raise UserError(f"{src}: inference sw_batch_size must be a positive integer, got {bs!r}")
    sp = pre.get("spacing")
    if sp is not None and not (isinstance(sp, list | tuple) and len(sp) == 3 and all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in sp)):
        raise UserError(f"{src}: preprocessing spacing must be three positive finite numbers, got {sp!r}")


def _extract_zip(zpath: Path) -> Path:
    """Unpack a zipped bundle next to the VoCoSlicer cache (keyed by content hash, so it happens once)."""
    from vocoslicer.paths import cache_dir

    digest = sha256_file(zpath)[:16]
    dest = cache_dir() / "bundles" / digest
    if (dest / "model.json").is_file():
        return dest
    return unzip_bundle(zpath, dest)


def unzip_bundle(zpath: Path, dest: Path) -> Path:
    """Unpack the bundle inside a zip into ``dest`` (which must not exist yet); every member must stay inside."""
    import zlib

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(dest.parent, prefix=".unzip.", suffix=".tmp")
    try:
        with zipfile.ZipFile(zpath) as zf:
            for member in zf.namelist():
                target = (tmp / member).resolve()
                if "\\" in member or not target.is_relative_to(tmp.resolve()):
                    raise UserError(f"{zpath}: unsafe path in zip: {member}")
            zf.extractall(tmp)
        roots = sorted(tmp.rglob("model.json"), key=lambda q: len(q.parts))
        if not roots:
            raise UserError(f"{zpath}: the zip holds no model.json")
        os.replace(roots[0].parent, dest)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, NotImplementedError) as exc:
        raise UserError(f"{zpath}: damaged zip ({type(exc).__name__}: {_first_line(exc)})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def new_bundle_meta(model_id: str, version: str, task: str, arch_name: str, arch_args: dict[str, Any],
                    **extra: Any) -> dict[str, Any]:
    """Start a model.json with the required fields; callers add preprocessing, inference, parent, training."""
    return {"format": BUNDLE_FORMAT, "id": model_id, "version": version, "task": task,
            "architecture": {"name": arch_name, "args": arch_args}, **extra}
