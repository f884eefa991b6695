"""The version gate (VoCoSlicerLib/compat.py): a clear message on Slicer < 5.12 / Python < 3.12, and a file that
itself imports on the old Pythons it has to talk to (checked with the parser's feature_version: no older
interpreter is installed here)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from VoCoSlicerLib import compat

ROOT = Path(__file__).resolve().parent.parent
COMPAT = ROOT / "VoCoSlicer" / "VoCoSlicerLib" / "compat.py"


class FakeApp:
    """Stands in for ``slicer.app`` (qSlicerCoreApplication's majorVersion/minorVersion properties)."""

    majorVersion = 5
    minorVersion = 8


def test_old_slicer_and_python_get_one_clear_message():
    msg = compat.unsupported_message((3, 9, 10, "final", 0), compat.running_slicer_version(FakeApp()))
    assert msg.startswith("VoCoSlicer needs 3D Slicer 5.12 or later (Python 3.12); this is 3D Slicer 5.8 with "
                          "Python 3.9.10.")
    assert "https://download.slicer.org" in msg


@pytest.mark.parametrize(("python", "slicer", "ok"), [
    ((3, 12, 10), (5, 12), True), ((3, 13, 0), (5, 13), True), ((3, 12, 0), None, True),
    ((3, 11, 7), (5, 12), False), ((3, 12, 10), (5, 10), False), ((3, 9, 10), None, False), ((2, 7, 18), None, False),
])
def test_thresholds(python, slicer, ok):
    assert (compat.unsupported_message(python, slicer) is None) is ok


def test_this_interpreter_and_sys_version_info():
    expected_ok = sys.version_info[:2] >= (3, 12)
    assert (compat.unsupported_message(sys.version_info) is None) is expected_ok


def test_slicer_version_of_an_object_without_one():
    assert compat.running_slicer_version(object()) is None
    assert compat.running_slicer_version(FakeApp()) == (5, 8)


@pytest.mark.parametrize("feature_version", [(3, 6), (3, 9)])
def test_compat_parses_as_old_python(feature_version):
    ast.parse(COMPAT.read_text(encoding="utf-8"), filename=str(COMPAT), feature_version=feature_version)


def test_compat_uses_nothing_an_old_python_would_evaluate_and_fail_on():
    tree = ast.parse(COMPAT.read_text(encoding="utf-8"))
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)], "stdlib-free on purpose"
    for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
        annotations = [a.annotation for a in fn.args.args + fn.args.kwonlyargs if a.annotation] + \
            ([fn.returns] if fn.returns else [])
        for ann in annotations:  # evaluated at def time on 3.6-3.9: ``str | None`` or ``tuple[int]`` would raise
            assert isinstance(ann, ast.Constant) and isinstance(ann.value, str) or \
                (isinstance(ann, ast.Name) and ann.id in {"str", "int", "bool", "object"}), ast.unparse(ann)
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "UTC"]  # 3.11+
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.keyword) and n.arg == "strict"]  # zip(strict=), 3.10+


def test_package_init_that_compat_import_runs_parses_as_python_3_9():
    """``import VoCoSlicerLib.compat`` executes VoCoSlicerLib/__init__.py first: it has to survive too."""
    init = ROOT / "VoCoSlicer" / "VoCoSlicerLib" / "__init__.py"
    tree = ast.parse(init.read_text(encoding="utf-8"), feature_version=(3, 9))
    tops = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    assert all(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in tops) or not tops


def test_declared_minimum_matches_cmake_and_readme():
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    need = ".".join(map(str, compat.MIN_SLICER))
    assert re.search(rf'set\(VOCOSLICER_MINIMUM_SLICER_VERSION "{re.escape(need)}"\)', cmake)
    assert "find_package(Slicer ${VOCOSLICER_MINIMUM_SLICER_VERSION} REQUIRED)" in cmake
    python = ".".join(map(str, compat.MIN_PYTHON))
    assert re.search(rf'set\(VOCOSLICER_MINIMUM_PYTHON_VERSION "{re.escape(python)}"\)', cmake)
    assert "Slicer_REQUIRED_PYTHON_VERSION VERSION_LESS VOCOSLICER_MINIMUM_PYTHON_VERSION" in cmake
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"3D Slicer ≥ {need}" in readme and f"Python {python}" in readme
    screenshots = re.search(r'set\(EXTENSION_SCREENSHOTURLS "([^"]+)"\)', cmake)
    assert screenshots and all(u.startswith("https://") for u in screenshots.group(1).split())
