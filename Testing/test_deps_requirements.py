"""One list of engine dependencies (``vocoslicer.contracts.dependencies``) and everything that must agree with it:
the Slicer requirements file (parsed exactly as Slicer's ``load_requirements`` does), pyproject.toml, the packages
``vocoslicer env`` probes, the set-up panel's torch floor, and MONAI's own requirements."""

from __future__ import annotations

import ast
import importlib.metadata
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import Version

from vocoslicer.commands import env
from vocoslicer.contracts import dependencies
from VoCoSlicerLib import deps

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "VoCoSlicer" / "Resources" / "requirements.txt"


def load_requirements_like_slicer(path: Path) -> list[Requirement]:
    """Mirror of ``slicer.packaging.load_requirements`` (Base/Python/slicer/packaging.py:40-69 in Slicer 5.13):
    every stripped line that is not empty and starts with neither ``#`` nor ``-`` goes whole to ``Requirement``.
    slicer-core does not ship ``slicer.packaging``, so the parsing is repeated here with the same library."""
    reqs = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#") and not line.startswith("-"):
                reqs.append(Requirement(line))
    return reqs


def test_requirements_file_parses_line_by_line_as_slicer_does():
    reqs = load_requirements_like_slicer(REQUIREMENTS)
    assert [str(r) for r in reqs] == dependencies.slicer_requirements()
    assert {r.name for r in reqs} == {"monai", "einops", "nibabel", "safetensors", "PyYAML", "filelock", "highdicom"}
    assert all(len(r.specifier) == 1 and next(iter(r.specifier)).operator == "==" for r in reqs)  # exact pins


def test_the_mirror_rejects_inline_comments_like_slicer(tmp_path):
    """The defect of the old file: ``monai==1.6.1  # ...`` on one line raises in ``load_requirements``."""
    bad = tmp_path / "requirements.txt"
    bad.write_text("# a comment line is fine\nmonai==1.6.1        # SwinUNETR(downsample=...)\n")
    with pytest.raises(InvalidRequirement):
        load_requirements_like_slicer(bad)


def test_requirements_file_is_the_rendered_list():
    assert REQUIREMENTS.read_text(encoding="utf-8") == dependencies.requirements_txt(), (
        "regenerate: PYTHONPATH=VoCoSlicer python -c \"from vocoslicer.contracts.dependencies import "
        "requirements_txt as r; print(r(), end='')\" > VoCoSlicer/Resources/requirements.txt")
    # deps.requirement_lines (used by the force-reinstall path) reads the same requirements
    assert deps.requirement_lines(REQUIREMENTS) == dependencies.slicer_requirements()


def test_pyproject_dependencies_are_the_list():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert [str(Requirement(r)) for r in project["dependencies"]] == dependencies.pyproject_requirements()


def test_env_probes_every_dependency_and_deps_uses_the_same_floors():
    assert set(env.PACKAGES) == {d.name for d in dependencies.DEPENDENCIES} - {"torch"}
    assert deps.MIN_TORCH == dependencies.TORCH_FLOOR and deps.TORCH_REQUIREMENT == f">={dependencies.TORCH_FLOOR}"
    assert set(deps.PROTECTED) == {"torch", "numpy", "SimpleITK"}
    # the module file hands PyTorchUtils the same floor (read from its source: it needs the Slicer app to import)
    tree = ast.parse((ROOT / "VoCoSlicer" / "VoCoSlicer.py").read_text(encoding="utf-8"))
    value = next(ast.unparse(n.value) for n in tree.body if isinstance(n, ast.Assign)
                 and getattr(n.targets[0], "id", "") == "MIN_TORCH")
    assert value == "deps.TORCH_REQUIREMENT"


def _monai_requirements() -> dict[str, Requirement]:
    out = {}
    for text in importlib.metadata.requires("monai") or []:
        req = Requirement(text)
        if req.marker is None:  # the hard requirements, not the extras
            out[req.name.lower()] = req
    return out


def test_pinned_monai_is_installed_and_torch_floor_is_monais():
    """The torch floor was 2.3 while MONAI 1.6.1 declares torch>=2.8.0: pip accepted torch 2.3-2.7 for VoCoSlicer
    and then conflicted over MONAI. The floor must be exactly what the pinned MONAI declares."""
    assert importlib.metadata.version("monai") == dependencies.by_name("monai").slicer_pin
    torch_req = _monai_requirements()["torch"]
    floors = [s.version for s in torch_req.specifier if s.operator == ">="]
    assert floors and Version(floors[0]) == Version(dependencies.TORCH_FLOOR), torch_req
    assert not torch_req.specifier.contains("2.7.1") and torch_req.specifier.contains(dependencies.TORCH_FLOOR)


def test_no_floor_is_below_what_monai_declares():
    for name, req in _monai_requirements().items():
        dep = dependencies.by_name(name)
        for spec in req.specifier:
            if spec.operator == ">=":
                assert Version(dep.floor) >= Version(spec.version), (name, dep.floor, str(req))


def test_installed_slicer_pins_satisfy_the_floors():
    for dep in dependencies.DEPENDENCIES:
        if dep.slicer_pin:
            assert Version(dep.slicer_pin) >= Version(dep.floor), dep
