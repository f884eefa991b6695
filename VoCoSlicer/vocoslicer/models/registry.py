"""Installed model bundles: ``<models_dir>/<id>/<version>/``, plus the demo model shipped in the package.

``--model`` everywhere accepts a bundle path, ``ID`` (newest installed version) or ``ID@VERSION``; with no
``--model`` the bundled demo model is used, so a fresh install can segment something at once. A finetune
registers its result here, which is why Segment can use a new version immediately.
"""

from __future__ import annotations

import os
import re
import shutil
import zipfile
from pathlib import Path

from vocoslicer.contracts.models import DEMO_MODEL_ID
from vocoslicer.contracts.models import version_key as _version_key
from vocoslicer.errors import UserError
from vocoslicer.models.bundle import ModelBundle
from vocoslicer.paths import cache_dir, models_dir, resources_dir


def demo_bundle_path() -> Path:
    """The demo model bundled with the package (trained on phantoms by ``scripts/train_demo_model.sh``)."""
    return resources_dir() / "demo_model"


def installed() -> list[ModelBundle]:
    """Every installed bundle (all versions) plus the demo model, newest version first per id."""
    out: list[ModelBundle] = []
    root = models_dir()
    for id_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        versions = sorted((p for p in id_dir.iterdir() if (p / "model.json").is_file()),
                          key=lambda p: _version_key(p.name), reverse=True)
        for vdir in versions:
            try:
                out.append(ModelBundle.load(vdir))
            except UserError:
                continue  # a broken bundle must not hide the others; `models list` reports it separately
    demo = demo_bundle_path()
    if (demo / "model.json").is_file() and not any(b.id == DEMO_MODEL_ID for b in out):
        out.append(ModelBundle.load(demo))
    return out


def resolve(spec: str | os.PathLike[str] | None) -> ModelBundle:
    """Turn a ``--model`` value into a loaded bundle (see module docstring)."""
    if spec is None or str(spec) == "":
        demo = demo_bundle_path()
        if not (demo / "model.json").is_file():
            raise UserError("no --model given and the bundled demo model is missing from this installation")
        return ModelBundle.load(demo)
    text = str(spec)
    p = Path(text).expanduser()
    if p.is_file() and _is_checkpoint_file(p):
        return checkpoint_bundle(p)
    if p.exists():
        return ModelBundle.load(p)
    model_id, _, version = text.partition("@")
    candidates = [b for b in installed() if b.id == model_id and (not version or b.version == version)]
    if not candidates:
        known = sorted({f"{b.id}@{b.version}" for b in installed()})
        raise UserError(f"model {text!r} is neither a bundle path nor an installed model "
                        f"(installed: {', '.join(known) or 'none'})")
    return max(candidates, key=lambda b: _version_key(b.version))


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")


def _is_checkpoint_file(p: Path) -> bool:
    """An official checkpoint (a torch zip or safetensors file), not a zipped bundle with a model.json."""
    if p.suffix.lower() not in CHECKPOINT_SUFFIXES:
        return False
    if not zipfile.is_zipfile(p):
        return True
    with zipfile.ZipFile(p) as zf:
        return not any(Path(n).name == "model.json" for n in zf.namelist())


def checkpoint_bundle(path: str | os.PathLike[str]) -> ModelBundle:
    """``--model VoComni_B.pt``: convert an official checkpoint on the fly, as ``models import`` does.

    The bundle goes into the cache (keyed by the file's sha256, so it is converted once), not into the installed
    models: pointing at a file should not change what ``models list`` shows. A catalog file whose hash differs
    from the catalog's is refused, like on import.
    """
    from vocoslicer.models.bundle import sha256_file
    from vocoslicer.models.catalog import checkpoint_to_bundle, find_entry

    p = Path(path)
    digest = sha256_file(p)
    dest = cache_dir() / "checkpoints" / digest[:16]
    if (dest / "model.json").is_file():
        return ModelBundle.load(dest)
    entry = find_entry(p.name)
    verified = bool(entry is not None and entry.sha256 and entry.sha256 == digest)
    if entry is not None and entry.sha256 and not verified:
        raise UserError(f"{p}: sha256 {digest[:16]}… differs from the catalog's for {entry.id}; not used")
    mid = entry.id if entry is not None else p.name.split(".")[0].lower().replace("_", "-")
    ver = entry.version if entry is not None else "1.0.0"
    try:
        bundle, _ = checkpoint_to_bundle(p, dest, entry=entry, model_id=mid, version=ver, source_sha256=digest,
                                         sha256_verified=verified, overwrite=True)
    except UserError as exc:
        raise UserError(f"{str(exc).splitlines()[0]} (to choose labels or an id: vocoslicer models import {p} "
                        "--labels CSV)") from None
    return ModelBundle.load(bundle.path)


def install(bundle_dir: str | os.PathLike[str], overwrite: bool = False) -> ModelBundle:
    """Copy a saved bundle into the models folder under ``<id>/<version>`` (atomic rename) and return it."""
    src = ModelBundle.load(bundle_dir)
    dest = models_dir() / src.id / src.version
    if dest.exists():
        if not overwrite:
            raise UserError(f"model {src.id}@{src.version} is already installed ({dest})")
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src.path, tmp)  # type: ignore[arg-type]
    os.replace(tmp, dest)
    return ModelBundle.load(dest)


def next_version(model_id: str, base: str = "1.0.0") -> str:
    """The next free patch-level version for ``model_id`` (finetunes create new versions, never overwrite)."""
    versions = [b.version for b in installed() if b.id == model_id]
    if not versions:
        return base
    newest = max(versions, key=_version_key)
    nums = [int(x) for x in re.findall(r"\d+", newest)[:3]] + [0, 0, 0]
    return f"{nums[0]}.{nums[1]}.{nums[2] + 1}"


def remove(spec: str) -> Path:
    """Delete an installed ``ID@VERSION`` (or every version of ``ID``); the demo model cannot be removed."""
    model_id, _, version = spec.partition("@")
    target = models_dir() / model_id / version if version else models_dir() / model_id
    if not target.exists() or not model_id:
        raise UserError(f"model {spec!r} is not installed")
    shutil.rmtree(target)
    return target
