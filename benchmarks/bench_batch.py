"""Batch segmentation throughput: ``vocoslicer segment CASES... -o DIR`` vs a loop of single ``segment`` calls.

Both run in the same invocation over the same phantoms with the same model and device, each as real child
processes exactly as a user would type them: the loop pays Python start-up, imports and the model load per case,
the batch pays them once and reads the next case while the current one is inferred. Reported: seconds and cases
per hour for each, the ratio batch/loop, whether both wrote identical label maps, and the machine's load
(``os.getloadavg``) before and after, because on a shared machine the load moves the absolute numbers.
``--append`` adds the table to benchmarks/RESULTS.md under "Batch segmentation (issue 14)".
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Batch segmentation (issue 14)"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vocoslicer", *args]


def run(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return time.perf_counter() - t0


def load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=5, help="number of phantoms (default 5)")
    ap.add_argument("--size", type=int, nargs=3, default=(64, 64, 48), help="phantom grid (default 64 64 48)")
    ap.add_argument("--spacing", type=float, nargs=3, default=(3.0, 3.0, 3.0), help="phantom spacing in mm")
    ap.add_argument("--model", default=None, help="model (default: the bundled demo model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the children (default 2)")
    ap.add_argument("--fast", action="store_true", help="pass --fast to both")
    ap.add_argument("--append", action="store_true", help="append the results to benchmarks/RESULTS.md")
    a = ap.parse_args()

    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONPATH": str(ROOT / "VoCoSlicer")}
    common = ["--device", a.device] + (["--model", a.model] if a.model else []) + (["--fast"] if a.fast else [])
    with tempfile.TemporaryDirectory(prefix="bench_batch.") as tmp:
        t = Path(tmp)
        run(cli("phantom", "--seed", "0", "--count", str(a.cases), "-o", str(t / "ct"), "--size",
                *map(str, a.size), "--spacing", *map(str, a.spacing)), env)
        cases = sorted(str(p) for p in (t / "ct").glob("*_ct.nii.gz"))
        load_before = load()
        loop_s = 0.0
        for c in cases:
            loop_s += run(cli("segment", c, "-o", str(t / "loop" / Path(c).name), *common), env)
        batch_s = run(cli("segment", *cases, "-o", str(t / "batch"), *common), env)
        load_after = load()
        same = all(np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(t / "loop" / Path(c).name))),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(t / "batch" / Path(c).name))))
                   for c in cases)
    n = len(cases)
    rows = [("loop of single `segment` calls", loop_s, n * 3600 / loop_s, ""),
            ("`segment CASES... -o DIR` (batch)", batch_s, n * 3600 / batch_s, f"x{loop_s / batch_s:.2f} vs loop")]
    cmd = "python benchmarks/bench_batch.py " + " ".join(sys.argv[1:])
    lines = [f"### {dt.date.today().isoformat()} — {platform.machine()} CPU, device {a.device}, "
             f"OMP_NUM_THREADS={a.threads}, load average (1/5/15 min) {load_before} before, {load_after} after",
             f"`{cmd}`  ",
             f"{n} phantoms {tuple(a.size)} at {tuple(a.spacing)} mm, model {a.model or 'bundled demo'}"
             f"{', --fast' if a.fast else ''}; identical label maps: {'yes' if same else 'NO'}", "",
             "| run | seconds | cases per hour | ratio |", "|---|---|---|---|"]
    lines += [f"| {name} | {s:.1f} | {cph:.0f} | {ratio} |" for name, s, cph, ratio in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.append:
        res = ROOT / "benchmarks" / "RESULTS.md"
        body = res.read_text(encoding="utf-8")
        if SECTION not in body:
            body = body.rstrip("\n") + f"\n\n{SECTION}\n"
        res.write_text(body.rstrip("\n") + "\n\n" + text, encoding="utf-8")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
