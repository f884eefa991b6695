"""The engine's third-party Python packages and their version floors: the one list.

Three places name these packages: ``pyproject.toml`` (pip installs of the engine), the Slicer requirements file
``VoCoSlicer/Resources/requirements.txt`` (``slicer.packaging.pip_ensure`` inside Slicer) and ``vocoslicer env``
(the set-up panel's report). Kept by hand they drifted: a torch floor of 2.3 while the pinned MONAI needs 2.8,
and nibabel missing in Slicer so the NaN guard was silently off there. ``Testing/test_deps_requirements.py``
fails as soon as any of the three disagrees with this module.

Standard library only, and it imports nothing from the engine: ``VoCoSlicerLib`` imports it inside the Slicer
process, which must never load torch. The version probe (:func:`installed_version`) reads distribution metadata
only, for the same reason: both ``vocoslicer env`` and the set-up panel use it.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable
from dataclasses import dataclass

# MONAI 1.6.1 (the Slicer pin below) declares ``torch>=2.8.0``; an older torch passes pip's check of our own
# requirement and then conflicts with MONAI, so the floor is MONAI's.
TORCH_FLOOR = "2.8"


@dataclass(frozen=True)
class Dependency:
    """One distribution the engine imports.

    ``floor`` is the lowest version the engine supports (pyproject's ``>=``). ``slicer_pin`` is the exact version
    installed into Slicer's Python; ``None`` means pip must never install it there (torch comes from the PyTorch
    extension with the CUDA build for the driver, numpy and SimpleITK are Slicer's own builds) and the constraints
    file freezes it instead.
    """

    name: str
    floor: str
    why: str
    slicer_pin: str | None = None
    module: str = ""

    @property
    def import_name(self) -> str:
        """Top-level module name (``PyYAML`` -> ``yaml``), for probing without importing."""
        return self.module or self.name


DEPENDENCIES: tuple[Dependency, ...] = (
    Dependency("torch", TORCH_FLOOR, "from the PyTorch extension (CUDA build for the driver); MONAI 1.6.1 needs "
               "torch>=2.8"),
    Dependency("monai", "1.4", "SwinUNETR(downsample=..., use_v2), sliding_window_inference(buffer_steps)",
               "1.6.1"),
    Dependency("einops", "0.7", "imported by MONAI's SwinUNETR but not declared by monai itself", "0.8.2"),
    Dependency("SimpleITK", "2.3", "Slicer's own build with its ITK IO; the PyPI wheel breaks Simple Filters "
               "(Slicer/Slicer#7661)"),
    Dependency("nibabel", "5", "raw NIfTI checks: ITK silently reads NaN voxels as 0", "5.4.2"),
    Dependency("numpy", "1.24", "Slicer's own build; replacing it breaks compiled modules"),
    Dependency("safetensors", "0.4", "model bundle weights (no pickle, safe to download)", "0.8.0"),
    Dependency("PyYAML", "6", "run configs (--config file.yaml)", "6.0.3", module="yaml"),
    Dependency("filelock", "3.12", "the one inter-process lock (cache, GPU, cohort manifest); torch needs it too",
               "4.3.1"),
    Dependency("highdicom", "0.22", "DICOM SEG output (segment --format dicom-seg); needs pydicom>=3.0.1 (Slicer "
               "ships 3.0.2)", "0.28.2"),
)


def by_name(name: str) -> Dependency:
    """The dependency called ``name`` (case-insensitive), or KeyError."""
    for dep in DEPENDENCIES:
        if dep.name.lower() == name.lower():
            return dep
    raise KeyError(name)


def pyproject_requirements() -> list[str]:
    """What ``[project].dependencies`` in pyproject.toml must say, in this order."""
    return [f"{d.name}>={d.floor}" for d in DEPENDENCIES]


def slicer_requirements() -> list[str]:
    """The exact pins of ``Resources/requirements.txt`` (what pip installs into Slicer's Python)."""
    return [f"{d.name}=={d.slicer_pin}" for d in DEPENDENCIES if d.slicer_pin]


def protected_names() -> tuple[str, ...]:
    """Distributions pip must not replace inside Slicer (frozen at their installed versions by a constraints file)."""
    return tuple(d.name for d in DEPENDENCIES if not d.slicer_pin)


def probed_names() -> tuple[str, ...]:
    """Packages ``vocoslicer env`` reports by version (torch gets its own, richer rows)."""
    return tuple(d.name for d in DEPENDENCIES if d.name != "torch")


def requirements_txt() -> str:
    """The text of ``Resources/requirements.txt``: every comment on a line of its own, because Slicer's
    ``load_requirements`` hands each non-comment line whole to ``packaging.requirements.Requirement``."""
    lines = ["# Python packages the VoCoSlicer engine needs inside Slicer's Python, installed with",
             "# slicer.packaging.pip_ensure from the VoCoSlicer module (\"Install / repair dependencies\").",
             "# Written by requirements_txt() in VoCoSlicer/vocoslicer/contracts/dependencies.py;",
             "# Testing/test_deps_requirements.py fails when this file and that list disagree.",
             "# Comments stay on lines of their own: Slicer parses every other line as one requirement.",
             "# NOT listed on purpose (pip runs with a constraints file freezing them at their installed versions):"]
    lines += [f"#   {d.name}: {d.why}" for d in DEPENDENCIES if not d.slicer_pin]
    for d in DEPENDENCIES:
        if d.slicer_pin:
            lines += [f"# {d.why}", f"{d.name}=={d.slicer_pin}"]
    return "\n".join(lines) + "\n"


def installed_version(name: str) -> str | None:
    """Installed version of a distribution (from its metadata, without importing it), or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def installed_versions(names: Iterable[str]) -> dict[str, str | None]:
    """:func:`installed_version` of each name, in the given order."""
    return {n: installed_version(n) for n in names}
