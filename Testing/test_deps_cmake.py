"""The top-level CMakeLists.txt really refuses a Slicer older than 5.12 or one built with Python < 3.12.

No Slicer build tree exists here, so CMake configures the real CMakeLists.txt against a stand-in Slicer package:
a ``SlicerConfigVersion.cmake`` with the same comparison as Slicer's own template
(Slicer CMake/SlicerConfigVersion.cmake.in: ``PACKAGE_VERSION`` is ``Slicer_VERSION``, i.e. major.minor, see
CMake/SlicerVersion.cmake:86), and a ``SlicerConfig.cmake`` whose module macro only checks that every listed file
exists. Skipped where cmake or a C/C++ compiler is missing (``project()`` enables C and C++).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not (shutil.which("cmake") and shutil.which("c++")), reason="needs cmake and c++")

CONFIG_VERSION = """set(PACKAGE_VERSION "{version}")
if("${{PACKAGE_VERSION}}" VERSION_LESS "${{PACKAGE_FIND_VERSION}}")
  set(PACKAGE_VERSION_COMPATIBLE FALSE)
else()
  set(PACKAGE_VERSION_COMPATIBLE TRUE)
endif()
"""

CONFIG = """set(Slicer_REQUIRED_PYTHON_VERSION "{python}")
set(Slicer_USE_FILE "${{CMAKE_CURRENT_LIST_DIR}}/UseSlicer.cmake")
set(Slicer_EXTENSION_GENERATE_CONFIG "${{CMAKE_CURRENT_LIST_DIR}}/Empty.cmake")
set(Slicer_EXTENSION_CPACK "${{CMAKE_CURRENT_LIST_DIR}}/Empty.cmake")
"""

USE = """macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MOD "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  foreach(f IN LISTS MOD_SCRIPTS MOD_RESOURCES)
    if(NOT EXISTS "${CMAKE_CURRENT_SOURCE_DIR}/${f}")
      message(FATAL_ERROR "listed but missing: ${f}")
    endif()
  endforeach()
  message(STATUS "scripted module ${MOD_NAME}")
endmacro()
message(STATUS "extension description: ${EXTENSION_DESCRIPTION}")
"""


def _configure(tmp_path: Path, slicer: str, python: str) -> subprocess.CompletedProcess:
    fake = tmp_path / f"slicer-{slicer}-py{python}"
    fake.mkdir()
    (fake / "SlicerConfigVersion.cmake").write_text(CONFIG_VERSION.format(version=slicer))
    (fake / "SlicerConfig.cmake").write_text(CONFIG.format(python=python))
    (fake / "UseSlicer.cmake").write_text(USE)
    (fake / "Empty.cmake").write_text("")
    build = tmp_path / f"build-{slicer}-{python}"
    return subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), f"-DSlicer_DIR={fake}"],
                          capture_output=True, text=True, timeout=180)


def test_cmake_accepts_slicer_5_12_and_refuses_older_slicer_or_python(tmp_path):
    ok = _configure(tmp_path, "5.12", "3.12.10")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "scripted module VoCoSlicer" in ok.stdout and "scripted module VoCoSegment" in ok.stdout
    assert "extension description: Requires 3D Slicer 5.12 or later." in ok.stdout

    old_slicer = _configure(tmp_path, "5.8", "3.12.10")
    assert old_slicer.returncode != 0
    assert "5.8" in old_slicer.stderr and "5.12" in old_slicer.stderr  # find_package's own version message

    old_python = _configure(tmp_path, "5.12", "3.9.10")
    assert old_python.returncode != 0
    assert "VoCoSlicer needs a Slicer built with Python >= 3.12; this Slicer uses Python 3.9.10" in \
        " ".join(old_python.stderr.split())
