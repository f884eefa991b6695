"""Python dependencies of the engine inside Slicer, the install plan, and the environment report of the set-up panel.

torch comes from the PyTorch extension (it picks the CUDA build for the driver); SimpleITK and numpy are
Slicer's own and must never be replaced by pip (Slicer/Slicer#6711, #7661). The rest is pinned in
``Resources/requirements.txt``. The list, every floor and the metadata probe come from
``vocoslicer.contracts.dependencies`` (the engine's contracts are the one part of it this package may import:
standard library only, never torch). Installing with a constraints file that freezes the protected packages at
their installed versions makes pip fail with a clear conflict instead of silently swapping Slicer's builds.

torch is probed here through its distribution metadata and ``importlib.util.find_spec`` only: importing torch into
the Slicer process costs seconds and memory, and a broken install would take Slicer down with it. The full probe
(CUDA, GPUs) runs in a child process: ``vocoslicer env --json``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from vocoslicer.contracts.dependencies import (
    TORCH_FLOOR,
    by_name,
    installed_version,
    installed_versions,
    protected_names,
)

PROTECTED = protected_names()
MIN_TORCH = TORCH_FLOOR
TORCH_REQUIREMENT = f">={MIN_TORCH}"  # what PyTorchUtils' installTorch(torchVersionRequirement=...) is given


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


def protected_constraints(versions: dict[str, str | None] | None = None) -> str:
    """Constraints-file text pinning the protected packages that are installed to their current versions."""
    versions = versions if versions is not None else installed_versions(PROTECTED)
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


def at_least(version: str | None, floor: str) -> bool:
    """True when ``version`` is a valid version >= ``floor`` (PEP 440, so ``2.8.0+cu126`` counts as 2.8.0 and a
    ``2.8.0.dev`` nightly does not, exactly as pip judges MONAI's ``torch>=2.8.0``)."""
    if not version:
        return False
    try:
        return Version(version) >= Version(floor)
    except InvalidVersion:
        return False


def installed_torch() -> str | None:
    """Version of the torch distribution that Slicer's Python would import, without importing it (metadata plus
    ``find_spec``, which locates the package but runs none of its code); None when absent or half-removed."""
    version = installed_version("torch")
    if version is None or importlib.util.find_spec("torch") is None:
        return None
    return version


def torch_install_needed(version: str | None) -> bool:
    """Whether PyTorch must be (re)installed through the PyTorch extension: absent or below the floor MONAI needs."""
    return not at_least(version, MIN_TORCH)


def loaded_requirements(requirements: list[str], modules: dict[str, Any] | None = None) -> list[str]:
    """Requirements whose module the Slicer process has already imported (only those need a restart after pip:
    the engine itself runs in child processes, which load the new versions on their next start)."""
    modules = sys.modules if modules is None else modules
    out = []
    for req in requirements:
        name = requirement_name(req)
        try:
            module = by_name(name).import_name
        except KeyError:
            module = name
        if module in modules:
            out.append(req)
    return out


@dataclass(frozen=True)
class InstallPlan:
    """The pip runs for "Install / repair dependencies", decided here so pytest can check them without Slicer.

    ``force_reinstall`` (when not empty) is installed first with ``--no-deps``: pip's ``--force-reinstall`` alone
    would also reinstall every dependency, torch and numpy included, from PyPI - replacing the CUDA build of
    torch and Slicer's numpy. ``install`` then resolves whatever those packages still miss. Both runs use the
    constraints file that freezes the protected packages.
    """

    install: list[str]
    force_reinstall: list[str]
    constraints: str

    @property
    def empty(self) -> bool:
        """Nothing to run (every requirement already satisfied and no forced reinstall)."""
        return not self.install and not self.force_reinstall

    def no_deps_requirements(self) -> list[str] | None:
        """Value for ``slicer.packaging.pip_install(no_deps_requirements=...)``: the forced packages behind
        ``--force-reinstall`` (that function adds ``--no-deps`` and ``-c`` itself), or None."""
        return ["--force-reinstall", *self.force_reinstall] if self.force_reinstall else None

    def pip_argv(self) -> list[list[str]]:
        """The ``pip`` command lines of this plan, in the order and form ``slicer.packaging.pip_install`` builds them
        (``_build_pip_args``: install, requirements, ``--no-deps``, ``-c FILE``); the tests run them with a real pip."""
        runs = []
        no_deps = self.no_deps_requirements()
        if no_deps:
            runs.append(["install", *no_deps, "--no-deps", "-c", self.constraints])
        if self.install:
            runs.append(["install", *self.install, "-c", self.constraints])
        return runs


def install_plan(requirements: list[str], constraints: str | os.PathLike[str], force: bool = False,
                 versions: dict[str, str | None] | None = None) -> InstallPlan:
    """What to install: with ``force``, every listed requirement is reinstalled (and all are re-resolved); without,
    only those absent or at another pinned version. Protected packages are never part of a plan: they are frozen by
    the constraints file, and torch has its own installer (the PyTorch extension)."""
    protected = {n.lower() for n in PROTECTED}
    listed = [r for r in requirements if requirement_name(r).lower() not in protected]
    if force:
        return InstallPlan(install=listed, force_reinstall=listed, constraints=str(constraints))
    return InstallPlan(install=missing_requirements(listed, versions), force_reinstall=[],
                       constraints=str(constraints))


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
            if not at_least(self.torch, MIN_TORCH):
                out.append(f"PyTorch {self.torch} is too old: MONAI needs PyTorch >= {MIN_TORCH}. Press 'Install / "
                           "repair dependencies' or update it in the PyTorch Utils module.")
            if self.driver and not self.torch_cuda:
                out.append("An NVIDIA driver is present but PyTorch is a CPU-only build: reinstall PyTorch with "
                           "CUDA from the PyTorch Utils module.")
            elif self.torch_cuda and not self.cuda_available:
                out.append("PyTorch has CUDA but no GPU is usable (driver too old or no GPU): jobs will use the CPU.")
        missing = [n for n, v in self.packages.items() if not v]
        if missing:
            out.append(f"Missing packages {missing}: press 'Install / repair dependencies'.")
        for name, version in sorted(self.packages.items()):
            try:
                dep = by_name(name)
            except KeyError:
                continue
            if version and not at_least(version, dep.floor):
                where = "press 'Install / repair dependencies'" if dep.slicer_pin else "it comes with Slicer: " \
                    "use a newer Slicer"
                out.append(f"{name} {version} is too old (need >= {dep.floor}): {where}.")
        return out

    @property
    def ready(self) -> bool:
        """True only when nothing needs the user's attention (the panel says "Ready" only then)."""
        return not self.advice()

    def summary(self) -> str:
        """The set-up panel's advice text: the advice lines, or "Ready" when there are none."""
        return "\n".join(self.advice()) or "Ready: PyTorch and all packages found."
