"""Python dependencies of the engine inside Slicer, and the environment report shown in the set-up panel.

torch comes from the PyTorch extension (it picks the CUDA build for the driver); SimpleITK and numpy are
Slicer's own and must never be replaced by pip (Slicer/Slicer#6711, #7661). The rest is pinned in
``Resources/requirements.txt``. Installing with a constraints file that freezes the protected packages at their
installed versions makes pip fail with a clear conflict instead of silently swapping Slicer's builds.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROTECTED = ("torch", "numpy", "SimpleITK")
MIN_TORCH = (2, 3)


def write_constraints(path: str | os.PathLike[str]) -> Path:
    """Write :func:`protected_constraints` to a file for ``pip -c`` (pip_ensure's ``constraints``)."""
    p = Path(path)
    p.write_text(protected_constraints(), encoding="utf-8")
    return p


def requirement_lines(path: str | os.PathLike[str]) -> list[str]:
    """Requirement strings of a requirements file (comments, blank lines and pip options dropped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            out.append(line)
    return out


def requirement_name(req: str) -> str:
    """The distribution name of a simple requirement string (``monai==1.6.1`` -> ``monai``)."""
    for sep in ("[", "=", "<", ">", "!", "~", ";", " "):
        req = req.split(sep, 1)[0]
    return req.strip()


def installed_version(name: str) -> str | None:
    """Installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def protected_constraints(versions: dict[str, str | None] | None = None) -> str:
    """Constraints-file text pinning the protected packages that are installed to their current versions."""
    versions = versions if versions is not None else {n: installed_version(n) for n in PROTECTED}
    return "".join(f"{n}=={v}\n" for n, v in versions.items() if v)


def missing_requirements(lines: list[str], versions: dict[str, str | None] | None = None) -> list[str]:
    """Requirements whose distribution is absent or at another version (exact ``==`` pins only are compared)."""
    missing = []
    for req in lines:
        name = requirement_name(req)
        have = versions.get(name) if versions is not None else installed_version(name)
        if have is None or ("==" in req and req.split("==", 1)[1].split(";")[0].strip() != have):
            missing.append(req)
    return missing


@dataclass
class EnvReport:
    """What ``vocoslicer env --json`` found in the child Python (torch, CUDA, GPUs, packages)."""

    python: str = ""
    torch: str | None = None
    torch_cuda: str | None = None
    cuda_available: bool = False
    driver: str | None = None
    gpus: list[dict[str, Any]] = field(default_factory=list)
    packages: dict[str, str | None] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, text: str | dict[str, Any]) -> EnvReport:
        """Parse the probe's JSON text or its already-decoded dict (unknown keys ignored)."""
        d = json.loads(text) if isinstance(text, str) else text
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)

    def rows(self) -> list[tuple[str, str]]:
        """(item, value) rows for the environment panel."""
        rows = [("Python", self.python or "?"),
                ("PyTorch", self.torch or "not installed"),
                ("PyTorch CUDA build", self.torch_cuda or ("CPU only" if self.torch else "-")),
                ("NVIDIA driver", self.driver or "none found")]
        if self.gpus:
            for i, g in enumerate(self.gpus):
                mem = g.get("memory_gb")
                rows.append((f"GPU {i}", f"{g.get('name', '?')}" + (f", {mem:.1f} GB" if mem else "")))
        else:
            rows.append(("GPU", "none usable (inference and training run on the CPU)"))
        for name, version in sorted(self.packages.items()):
            rows.append((name, version or "not installed"))
        return rows

    def advice(self) -> list[str]:
        """What the user should do, most important first (empty when all is well)."""
        out = list(self.problems)
        if not self.torch:
            out.append("PyTorch is missing: press 'Install / repair dependencies' (uses the PyTorch extension).")
        else:
            parts = tuple(int(p) for p in self.torch.split("+")[0].split(".")[:2] if p.isdigit())
            if parts and parts < MIN_TORCH:
                out.append(f"PyTorch {self.torch} is too old (need >= {'.'.join(map(str, MIN_TORCH))}): "
                           "reinstall it from the PyTorch Utils module.")
            if self.driver and not self.torch_cuda:
                out.append("An NVIDIA driver is present but PyTorch is a CPU-only build: reinstall PyTorch with "
                           "CUDA from the PyTorch Utils module.")
            elif self.torch_cuda and not self.cuda_available:
                out.append("PyTorch has CUDA but no GPU is usable (driver too old or no GPU): jobs will use the CPU.")
        missing = [n for n, v in self.packages.items() if not v]
        if missing:
            out.append(f"Missing packages {missing}: press 'Install / repair dependencies'.")
        return out
