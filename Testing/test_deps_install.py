"""Install / repair dependencies: the pip plan ("Force reinstall" really reinstalls), the torch probe that never
imports torch into the Slicer process, the environment advice (never "Ready" below the torch floor), and the
shape of ``VoCoSlicerLogic.installDependencies`` (read from source: it needs the Slicer app to run)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from vocoslicer.contracts import dependencies
from VoCoSlicerLib import deps

ROOT = Path(__file__).resolve().parent.parent
PINS = dependencies.slicer_requirements()
ALL_THERE = {d.name: d.slicer_pin for d in dependencies.DEPENDENCIES if d.slicer_pin}


def test_force_reinstalls_every_listed_package_without_touching_torch_or_slicers_builds(tmp_path):
    c = tmp_path / "constraints.txt"
    plan = deps.install_plan(["torch>=2.8", *PINS, "numpy==2.0.0"], c, force=True, versions=ALL_THERE)
    assert not plan.empty
    assert plan.force_reinstall == PINS and plan.install == PINS  # protected ones dropped even when listed
    assert plan.no_deps_requirements() == ["--force-reinstall", *PINS]
    first, second = plan.pip_argv()
    # --no-deps: a plain --force-reinstall would also reinstall torch and numpy from PyPI
    assert first == ["install", "--force-reinstall", *PINS, "--no-deps", "-c", str(c)]
    assert second == ["install", *PINS, "-c", str(c)]


def test_without_force_only_missing_or_other_versions_are_installed(tmp_path):
    c = tmp_path / "constraints.txt"
    assert deps.install_plan(PINS, c, versions=ALL_THERE).empty  # all satisfied: nothing to run
    older = {**ALL_THERE, "monai": "1.5.0", "nibabel": None}
    plan = deps.install_plan(PINS, c, versions=older)
    assert plan.force_reinstall == [] and plan.no_deps_requirements() is None
    assert plan.install == ["monai==1.6.1", "nibabel==5.4.2"]
    assert plan.pip_argv() == [["install", "monai==1.6.1", "nibabel==5.4.2", "-c", str(c)]]


def test_constraints_freeze_the_protected_packages(tmp_path):
    path = deps.write_constraints(tmp_path / "c.txt")
    lines = path.read_text().splitlines()
    assert {line.split("==")[0] for line in lines} == {"torch", "numpy", "SimpleITK"}  # all installed here
    assert f"torch=={deps.installed_version('torch')}" in lines


def test_restart_is_offered_only_for_packages_the_slicer_process_loaded():
    assert deps.loaded_requirements(PINS, {"yaml": object(), "os": object()}) == ["PyYAML==6.0.3"]
    assert deps.loaded_requirements(PINS, {}) == []


def test_torch_probe_reads_metadata_and_never_imports_torch():
    code = ("import sys; from VoCoSlicerLib import deps; v = deps.installed_torch(); "
            "print(v, deps.torch_install_needed(v), 'torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "VoCoSlicer")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    version, needed, imported = out.stdout.split()
    assert version.startswith("2.") and needed == "False" and imported == "False"


def test_torch_floor_decisions():
    assert deps.torch_install_needed(None)
    assert deps.torch_install_needed("2.7.1+cu121")  # accepted by the old >=2.3 floor, rejected by MONAI
    assert deps.torch_install_needed("2.8.0.dev20250601")  # pip judges a nightly below MONAI's torch>=2.8.0 too
    assert deps.torch_install_needed("not-a-version")
    assert not deps.torch_install_needed("2.8.0+cu126") and not deps.torch_install_needed("2.13.0+cpu")


def _complete(**kw) -> deps.EnvReport:
    packages = {n: dependencies.by_name(n).slicer_pin or "9.0" for n in dependencies.probed_names()}
    packages.update(kw.pop("packages", {}))
    return deps.EnvReport(**{"torch": "2.13.0+cpu", "packages": packages, **kw})


def test_panel_is_ready_only_when_torch_meets_the_floor():
    assert _complete().ready and _complete().summary().startswith("Ready")
    old = _complete(torch="2.7.1+cu121", torch_cuda="12.1", cuda_available=True, driver="550.54")
    assert not old.ready
    assert not old.summary().startswith("Ready")
    assert f"PyTorch 2.7.1+cu121 is too old: MONAI needs PyTorch >= {deps.MIN_TORCH}" in old.summary()


def test_advice_names_missing_and_too_old_packages():
    rep = _complete(packages={"nibabel": None, "monai": "1.3.0", "numpy": "1.21.0"})
    text = rep.summary()
    assert "Missing packages ['nibabel']" in text
    assert "monai 1.3.0 is too old (need >= 1.4): press 'Install / repair dependencies'" in text
    assert "numpy 1.21.0 is too old (need >= 1.24): it comes with Slicer" in text
    assert not rep.ready


def _logic_method(name: str) -> ast.FunctionDef:
    tree = ast.parse((ROOT / "VoCoSlicer" / "VoCoSlicer.py").read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "VoCoSlicerLogic")
    return next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == name)


def test_logic_imports_slicer_packaging_first_and_never_torch():
    """Static check of code that only runs in the Slicer app. ``hasattr(slicer, "packaging")`` was False in a
    fresh Slicer 5.12 session (slicer/__init__.py never imports it), so MONAI & co. were never installed."""
    install = _logic_method("installDependencies")
    calls = [ast.unparse(n.func) for n in ast.walk(install) if isinstance(n, ast.Call)]
    assert "hasattr" not in calls
    first = install.body[1]  # body[0] is the docstring; the import binds the local name ``slicer`` for the rest
    assert isinstance(first, ast.Try) and ast.unparse(first.body[0]) == "import slicer.packaging"
    assert "slicer.packaging.pip_ensure" in calls and "slicer.packaging.load_requirements" in calls
    assert not [c for c in calls if c.endswith("torchInstalled")]  # PyTorchUtils' check imports torch
    imports = {a.name for n in ast.walk(install) if isinstance(n, ast.Import) for a in n.names}
    assert "torch" not in imports and "deps.installed_torch" in calls


def test_logic_installs_nothing_and_never_restarts_under_testing():
    """pip_ensure skips in testing mode on its own; the force path (pip_install, restart) must too: right after
    the import, the method returns when slicer.app.testingEnabled()."""
    install = _logic_method("installDependencies")
    guard = install.body[2]
    assert isinstance(guard, ast.If) and ast.unparse(guard.test) == "slicer.app.testingEnabled()"
    assert isinstance(guard.body[-1], ast.Return)
    calls = [ast.unparse(n.func) for n in ast.walk(install) if isinstance(n, ast.Call)]
    assert "slicer.util.restart" in calls and "slicer.util.pip_install" not in calls  # no legacy path left
    assert "no_deps_requirements=plan.no_deps_requirements()" in ast.unparse(install)  # force reaches pip


# ---------------------------------------------------------------- the force plan through a real pip, offline


def _wheel(folder: Path, name: str, requires: list[str]) -> None:
    """A minimal pure-Python wheel (``name`` 1.0, one module), written by hand so no index or build is needed."""
    import base64
    import hashlib
    import zipfile

    info = f"{name}-1.0.dist-info"
    files = {f"{name}.py": "STATE = 'installed'\n",
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: " + name + "\nVersion: 1.0\n"
             + "".join(f"Requires-Dist: {r}\n" for r in requires),
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,"]) + "\n"
    with zipfile.ZipFile(folder / f"{name}-1.0-py3-none-any.whl", "w") as z:
        for path, text in files.items():
            z.writestr(path, text)


def _pip(target_python: Path, argv: list[str], wheels: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "--python", str(target_python), "--disable-pip-version-check", *argv,
           "--no-index", "--find-links", str(wheels)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_force_plan_run_by_pip_reinstalls_the_package_but_not_its_protected_dependency(tmp_path):
    """A real pip (offline: hand-made wheels, a bare venv) runs the plan's command lines. ``app`` stands for monai,
    ``dep`` for torch: both installed and then damaged; the forced plan repairs ``app`` and leaves ``dep`` alone
    (frozen by the constraints file, never reinstalled), which a plain ``--force-reinstall`` would not."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "vocodummy_app", ["vocodummy_dep"])
    _wheel(wheels, "vocodummy_dep", [])
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "env")], check=True, timeout=60)
    python = tmp_path / "env" / "bin" / "python"
    _pip(python, ["install", "vocodummy_app==1.0"], wheels)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    for name in ("vocodummy_app", "vocodummy_dep"):
        (site / f"{name}.py").write_text("STATE = 'damaged'\n")
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("vocodummy_dep==1.0\n")
    plan = deps.install_plan(["vocodummy_app==1.0"], constraints, force=True)
    for argv in plan.pip_argv():
        _pip(python, argv, wheels)
    assert "installed" in (site / "vocodummy_app.py").read_text()
    assert "damaged" in (site / "vocodummy_dep.py").read_text()
    # what the plan avoids: --force-reinstall without --no-deps reinstalls the dependency too (torch from PyPI)
    _pip(python, ["install", "--force-reinstall", "vocodummy_app==1.0", "-c", str(constraints)], wheels)
    assert "installed" in (site / "vocodummy_dep.py").read_text()
