"""``vocoslicer env [--json]``: what this Python can run on (torch build, CUDA, GPUs, driver, packages).

The Slicer set-up panel runs this in a child process (never importing torch into Slicer itself) to explain
the most common support problem: a CPU-only torch next to a working GPU, or a driver too old for the build.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from vocoslicer.contracts.dependencies import installed_version, installed_versions, probed_names

# every engine dependency but torch (reported on its own rows); the set-up panel checks them against their floors
PACKAGES = probed_names()


def driver_version() -> str | None:
    """NVIDIA driver version from the kernel module or nvidia-smi, without needing torch."""
    proc = Path("/proc/driver/nvidia/version")
    if proc.is_file():
        for word in proc.read_text(errors="replace").split():
            if word[:1].isdigit() and word.count(".") >= 1:
                return word
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=10, check=False).stdout.strip().splitlines()
            return out[0].strip() if out else None
        except (OSError, subprocess.TimeoutExpired):
            return None
    return None


def probe() -> dict[str, Any]:
    """The environment report (JSON-safe)."""
    report: dict[str, Any] = {"python": f"{platform.python_version()} ({sys.executable})", "torch": None,
                              "torch_cuda": None, "cuda_available": False, "driver": driver_version(), "gpus": [],
                              "packages": installed_versions(PACKAGES), "problems": []}
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - a broken torch install is exactly what this probe must report
        if installed_version("torch"):
            report["problems"].append(f"torch is installed but does not import: {type(exc).__name__}: {exc}")
        return report
    report["torch"] = torch.__version__
    report["torch_cuda"] = torch.version.cuda
    try:
        report["cuda_available"] = bool(torch.cuda.is_available())
        for i in range(torch.cuda.device_count() if report["cuda_available"] else 0):
            p = torch.cuda.get_device_properties(i)
            report["gpus"].append({"index": i, "name": p.name, "memory_gb": round(p.total_memory / 2**30, 2),
                                   "capability": f"{p.major}.{p.minor}"})
    except Exception as exc:  # noqa: BLE001 - e.g. a driver too old for this CUDA build
        report["problems"].append(f"CUDA initialisation failed: {type(exc).__name__}: {exc}")
    return report


def run(args: argparse.Namespace) -> int:
    """Handler: print the report as JSON or as aligned text."""
    report = probe()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"python        {report['python']}")
    print(f"torch         {report['torch'] or 'not installed'}  (CUDA build: {report['torch_cuda'] or 'none'})")
    print(f"driver        {report['driver'] or 'none found'}")
    for g in report["gpus"]:
        print(f"gpu {g['index']}         {g['name']}, {g['memory_gb']} GB, compute {g['capability']}")
    if not report["gpus"]:
        print("gpu           none usable: jobs run on the CPU")
    for name, version in report["packages"].items():
        print(f"{name:<13} {version or 'not installed'}")
    for problem in report["problems"]:
        print(f"problem       {problem}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``env`` command."""
    p = sub.add_parser("env", help="report torch, CUDA, GPUs, driver and package versions of this Python")
    p.add_argument("--json", action="store_true", help="print JSON (what the Slicer set-up panel reads)")
    p.set_defaults(func=run)
