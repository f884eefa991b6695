"""Installed model bundles: ``<models_dir>/<id>/<version>/``, plus the demo model shipped in the package.

``--model`` everywhere accepts a bundle path, ``ID`` (newest installed version) or ``ID@VERSION``; with no
``--model`` the bundled demo model is used, so a fresh install can segment something at once. A finetune
registers its result here, which is why Segment can use a new version immediately.

This module is the only place that names an installed folder (:func:`install_path`) and the only way one comes
into being (:func:`install`: staged, verified, renamed in under a lock); ``models download``/``import`` and the
finetuners all go through it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vocoslicer.contracts.models import DEMO_MODEL_ID
from vocoslicer.contracts.models import version_key as _version_key
from vocoslicer.errors import UserError
from vocoslicer.ids import check_id, inside
from vocoslicer.io.atomic import atomic_write_json, make_temp_dir
from vocoslicer.models.bundle import ModelBundle
from vocoslicer.paths import cache_dir, locks_dir, models_dir, resources_dir


def demo_bundle_path() -> Path:
    """The demo model bundled with the package (trained on phantoms by ``scripts/train_demo_model.sh``)."""
    return resources_dir() / "demo_model"


def list_installed() -> list[ModelBundle]:
    """Every installed bundle (all versions) plus the demo model, newest version first per id."""
    out: list[ModelBundle] = []
    root = models_dir()
    for id_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")):
        versions = sorted((p for p in id_dir.iterdir() if not p.is_symlink() and (p / "model.json").is_file()),
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
    candidates = [b for b in list_installed() if b.id == model_id and (not version or b.version == version)]
    if not candidates:
        known = sorted({f"{b.id}@{b.version}" for b in list_installed()})
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
    from vocoslicer.models.catalog import find_entry
    from vocoslicer.models.convert import checkpoint_to_bundle

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


def install_path(model_id: str, version: str | None = None) -> Path:
    """``<models>/<id>[/<version>]`` after validating both parts (the only way to name an installed folder)."""
    parts = [check_id(model_id, "model id")]
    if version is not None:
        parts.append(check_id(version, "model version"))
    return inside(models_dir(), Path(*parts), "model folder")


INSTALL_LOCK_TIMEOUT_S = 300.0


@contextlib.contextmanager
def _install_lock() -> Iterator[None]:
    """Serialise the check-and-rename of installs and removals across processes (two finetunes that finish
    together, a download next to an import): the second one then sees the first one's folder."""
    from filelock import FileLock, Timeout

    try:
        with FileLock(str(locks_dir() / "models-install.lock"), timeout=INSTALL_LOCK_TIMEOUT_S):
            yield
    except Timeout:
        raise UserError("another process has been installing a model for minutes; try again later") from None


def staging_dir() -> Path:
    """A fresh folder inside the models home for building a bundle before it is installed (hidden from listings)."""
    return make_temp_dir(models_dir() / ".staging", prefix=".", suffix=".stage")


def _copy_bundle_files(src: Path, dst: Path) -> None:
    """Copy a bundle folder file by file, refusing links that lead out of it (they would copy foreign files in)."""
    root = src.resolve()
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        for d in dirs:
            if (here / d).is_symlink():
                raise UserError(f"{here / d}: a model bundle may not contain linked folders")
            (dst / (here / d).relative_to(root)).mkdir(exist_ok=True)
        for f in files:
            real = inside(root, here / f, "bundle file")
            shutil.copyfile(real, dst / (here / f).relative_to(root))


def install(bundle_dir: str | os.PathLike[str], overwrite: bool = False, meta: dict[str, Any] | None = None,
            move: bool = False) -> ModelBundle:
    """Install a bundle under ``<id>/<version>`` and return it; nothing is installed unless it fully loads.

    The bundle is staged next to its final place (copied, or renamed when ``move`` and the source is a staging
    folder we own), ``meta`` overrides model.json fields (``models import --id/--version``), the staged copy is
    verified (weights sha256, network built on the meta device, every weight shape, one meta forward at the
    ROI size), and only then renamed into place under the install lock. On any failure the staging folder is
    removed.
    """
    if Path(bundle_dir).is_file() and zipfile.is_zipfile(bundle_dir):  # unpack into staging, not the cache
        from vocoslicer.models.bundle import unzip_bundle

        stage = staging_dir()
        try:
            unzip_bundle(Path(bundle_dir), stage / "bundle")
            return install(stage / "bundle", overwrite=overwrite, meta=meta, move=True)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    src = ModelBundle.load(bundle_dir)
    if meta:
        src = ModelBundle(meta={**src.meta, **meta}, labels=src.labels, path=src.path)
    dest = install_path(src.id, src.version)
    if dest.exists() and not overwrite:
        raise UserError(f"model {src.id}@{src.version} is already installed ({dest}); use --force to replace it")
    assert src.path is not None
    tmp = staging_dir()
    old = None
    try:
        if move:
            tmp.rmdir()
            os.replace(src.path, tmp)
        else:
            _copy_bundle_files(src.path, tmp)
        if meta:
            atomic_write_json(tmp / "model.json", src.meta)
        ModelBundle.load(tmp).verify_loadable()
        with _install_lock():
            if dest.exists() and not overwrite:  # installed by another process while this one was verifying
                raise UserError(f"model {src.id}@{src.version} is already installed ({dest}); use --force to "
                                "replace it")
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():  # swap: the old version stays complete until the new one is in place
                old = make_temp_dir(models_dir() / ".staging", prefix=".", suffix=".old")
                os.replace(dest, old / "bundle")
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not dest.exists() and (old / "bundle").exists():
            os.replace(old / "bundle", dest)
        if not dest.exists() and dest.parent.is_dir() and not any(dest.parent.iterdir()):
            dest.parent.rmdir()
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return ModelBundle.load(dest)


def next_version(model_id: str, base: str = "1.0.0") -> str:
    """The next free patch-level version for ``model_id`` (finetunes create new versions, never overwrite)."""
    check_id(model_id, "model id")
    versions = [b.version for b in list_installed() if b.id == model_id]
    if not versions:
        return base
    newest = max(versions, key=_version_key)
    nums = [int(x) for x in re.findall(r"\d+", newest)[:3]] + [0, 0, 0]
    return f"{nums[0]}.{nums[1]}.{nums[2] + 1}"


def remove(spec: str) -> Path:
    """Delete an installed ``ID@VERSION`` (or every version of ``ID``); the demo model cannot be removed."""
    model_id, sep, version = spec.partition("@")
    target = install_path(model_id, version if sep else None)
    with _install_lock():
        if not target.is_dir():
            raise UserError(f"model {spec!r} is not installed")
        shutil.rmtree(target)
    return target
