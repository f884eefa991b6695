"""Loading the official VoCo checkpoints into our networks, and saying what was (not) loaded.

The official loader (voco_spec.md §5.3) picks the weights dict, strips ``module.`` and ``backbone.``, renames
``swin_vit`` to ``swinViT``, then copies every tensor whose name and shape match and silently keeps random
weights for the rest. We apply the same renames and the same name+shape rule, but return a :class:`LoadReport`
so the CLI can print exactly which tensors stayed random (the decoder of an SSL checkpoint, an ``out`` layer of
another class count, ...). Files are read with ``torch.load(weights_only=True)``: a checkpoint can never run
code. The VoComni files carry a numpy scalar (``best_acc``) next to the weights; those numpy types are
allow-listed explicitly.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vocoslicer.errors import UserError

CONTAINER_KEYS = ("state_dict", "network_weights", "net", "student")
"""Keys that may hold the weights inside a checkpoint, in the order the official loader tries them."""

BACKBONE_PREFIXES = ("swinViT.", "encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10.")
"""SwinUNETR tensors that a VoCo SSL checkpoint provides (145 tensors for every size)."""


@dataclass
class LoadReport:
    """What happened when a checkpoint was copied into a model (all key lists use the model's names)."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model tensors the checkpoint does not provide
    unexpected: list[str] = field(default_factory=list)  # checkpoint tensors the model does not have
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # key, ckpt, model
    container: str = ""  # which top-level key held the weights ("" = the file itself)
    renames: list[str] = field(default_factory=list)

    @property
    def missing_backbone(self) -> list[str]:
        """Missing or shape-mismatched encoder tensors (these matter: the decoder is expected to be random)."""
        bad = self.missing + [k for k, _, _ in self.mismatched]
        return sorted(k for k in bad if k.startswith(BACKBONE_PREFIXES))

    def summary(self) -> str:
        """One line for the CLI and the event log."""
        total = len(self.loaded) + len(self.missing) + len(self.mismatched)
        parts = [f"{self.source}: loaded {len(self.loaded)}/{total} tensors"]
        if self.missing:
            parts.append(f"{len(self.missing)} left at random init ({_group(self.missing)})")
        if self.mismatched:
            shapes = _group([k for k, _, _ in self.mismatched])
            parts.append(f"{len(self.mismatched)} skipped for shape mismatch ({shapes})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} checkpoint tensors unused ({_group(self.unexpected)})")
        return "; ".join(parts)

    def details(self) -> list[str]:
        """Every skipped tensor, one line each (for ``--verbose`` and log files)."""
        lines = [f"missing (random init): {k}" for k in self.missing]
        lines += [f"shape mismatch: {k} checkpoint {list(a)} vs model {list(b)}" for k, a, b in self.mismatched]
        lines += [f"unused checkpoint tensor: {k}" for k in self.unexpected]
        return lines

    def to_dict(self) -> dict[str, Any]:
        """JSON form (for ``--json`` output and model.json provenance)."""
        return {"source": self.source, "container": self.container, "renames": self.renames,
                "loaded": len(self.loaded), "missing": self.missing, "unexpected": self.unexpected,
                "mismatched": [{"key": k, "checkpoint": list(a), "model": list(b)} for k, a, b in self.mismatched]}


def _group(keys: list[str], limit: int = 4) -> str:
    # "decoder1.* x5, out.* x2": module-level summary keeps the one-line message short
    counts: dict[str, int] = {}
    for k in keys:
        head = k.split(".", 1)[0]
        counts[head] = counts.get(head, 0) + 1
    items = [f"{h}.* x{n}" if n > 1 else f"{h}.*" for h, n in counts.items()]
    return ", ".join(items[:limit]) + (f", +{len(items) - limit} more" if len(items) > limit else "")


def _numpy_safe_globals() -> list[Any]:
    # numpy scalars/dtypes as pickled by the official trainers (numpy 1.x names them numpy.core.multiarray)
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    allowed: list[Any] = [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


def read_checkpoint(path: str | os.PathLike[str]) -> Any:
    """Read a ``.pt``/``.pth``/``.safetensors`` checkpoint without executing code; bad files are one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such checkpoint file")
    if p.stat().st_size == 0:
        raise UserError(f"{p}: the checkpoint file is empty")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            if zipfile.is_zipfile(p):  # memory-map: a 4.6 GB VoComni-H is not copied into RAM before conversion
                return torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
            return torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any decoding failure means a bad file for the user
        if "Weights only load failed" in str(exc):  # torch's own advice (retry unsafely) is the wrong one to show
            raise UserError(f"{p}: refused: the file holds pickled Python objects besides tensors, which could run "
                            "code when loaded; only plain weights are accepted") from None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(f"{p}: not a readable checkpoint (truncated or corrupted?): {first}") from None


def official_state_dict(obj: Any, source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """Apply the official selection and renames; return (state dict, container key, renames applied)."""
    container = ""
    if isinstance(obj, Mapping):
        for key in CONTAINER_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj, container = obj[key], key
                break
    if not isinstance(obj, Mapping):
        raise UserError(f"{source}: does not contain a state dict (got {type(obj).__name__})")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise UserError(f"{source}: holds no tensors (keys: {', '.join(list(map(str, obj))[:5])})")
    renames: list[str] = []
    for old, new in (("module.", ""), ("backbone.", ""), ("swin_vit", "swinViT")):
        if any(old in k for k in sd):
            sd = {k.replace(old, new): v for k, v in sd.items()}
            renames.append(f"{old}->{new or '(removed)'}")
    return sd, container, renames


def match_state_dict(sd: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                     source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Keep the tensors of ``sd`` whose name and shape exist in ``target`` (a state dict, possibly on ``meta``).

    Pure bookkeeping, no model needed: this is also how an official checkpoint becomes a bundle without
    building a multi-gigabyte network in memory.
    """
    sd = dict(sd)
    report = LoadReport(source=source)
    # v1 training checkpoints keep full student/teacher copies: use the student when nothing else matches
    if not (set(sd) & set(target)) and any(k.startswith("student.") for k in sd):
        sd = {k[len("student."):]: v for k, v in sd.items() if k.startswith("student.")}
        report.renames.append("student.->(removed), teacher.* dropped")
    matched: dict[str, torch.Tensor] = {}
    for key, current in target.items():
        value = sd.get(key)
        if value is None:
            report.missing.append(key)
        elif tuple(value.shape) != tuple(current.shape):
            report.mismatched.append((key, tuple(value.shape), tuple(current.shape)))
        else:
            matched[key] = value if value.dtype == current.dtype else value.to(dtype=current.dtype)
            report.loaded.append(key)
    report.unexpected = sorted(k for k in sd if k not in target)
    return matched, report


def prepare_official(checkpoint: str | os.PathLike[str] | Mapping[str, Any], target: Mapping[str, torch.Tensor],
                     source: str | None = None) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Read (if a path), select, rename and match a checkpoint against ``target``; nothing is loaded yet."""
    if isinstance(checkpoint, Mapping):
        src = source or "checkpoint"
        obj: Any = checkpoint
    else:
        src = source or str(checkpoint)
        obj = read_checkpoint(checkpoint)
    sd, container, renames = official_state_dict(obj, src)
    matched, report = match_state_dict(sd, target, src)
    report.container = container
    report.renames = renames + report.renames
    return matched, report


def load_official_weights(model: torch.nn.Module, checkpoint: str | os.PathLike[str] | Mapping[str, Any],
                          source: str | None = None) -> LoadReport:
    """Copy every checkpoint tensor whose (renamed) name and shape match into ``model``; report the rest.

    Like the official ``load()``: tensors that do not match keep the model's current values. Unlike it, nothing
    is silent: the returned report lists missing, unexpected and shape-mismatched keys.
    """
    matched, report = prepare_official(checkpoint, model.state_dict(), source)
    model.load_state_dict(matched, strict=False)
    return report
