"""benchmarks/gpu_suite.py keeps working without a GPU: the smoke mode runs every part at toy size and writes the
dated markdown section and the JSON; a budget too small for a part skips it with a line instead of failing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
PARTS = ["model throughput", "official inference", "end to end", "VoCo pretraining", "PUMIT", "label efficiency"]


def run_suite(tmp_path: Path, *extra: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "VoCoSlicer"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SUITE), "--results-md", str(tmp_path / "RESULTS.md"), "--json",
                           str(tmp_path / "suite.json"), "--work", str(tmp_path / "work"), *extra],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=tmp_path)


@pytest.mark.slow
def test_smoke_runs_every_part_and_writes_markdown_and_json(tmp_path: Path) -> None:
    (tmp_path / "RESULTS.md").write_text("# Benchmark results\n\n## Older section\nkept\n")
    proc = run_suite(tmp_path, "--device", "cpu", "--smoke")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "suite.json").read_text())
    assert [p["part"] for p in report["parts"]] == PARTS
    assert {p["part"]: p["status"] for p in report["parts"]} == dict.fromkeys(PARTS, "ok")
    throughput = report["parts"][0]["result"]
    assert throughput["plain_monai_fp32"] > 0 and throughput["ours_amp_sdpa"] > 0
    md = (tmp_path / "RESULTS.md").read_text()
    assert md.startswith("# Benchmark results\n\n## Older section\nkept\n")  # appended, nothing lost
    assert "## GPU suite (issue 17)" in md and "smoke" in md
    for name in PARTS:
        assert f"**{name}**" in md
    assert "| plain_monai_fp32 |" in md and "loss only" in md  # the parts' own tables are carried over


def test_parts_that_do_not_fit_are_skipped_with_a_line(tmp_path: Path) -> None:
    proc = run_suite(tmp_path, "--device", "cpu", "--smoke", "--budget-s", "5", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "suite.json").read_text())
    assert [p["part"] for p in report["parts"]] == PARTS
    assert all(p["status"].startswith("skipped: ") and "needs at least" in p["status"] for p in report["parts"])
    md = (tmp_path / "RESULTS.md").read_text()
    assert md.count("— skipped: ") == len(PARTS)


def test_cuda_without_a_gpu_is_a_one_line_error(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the suite would run")
    proc = run_suite(tmp_path, "--device", "cuda", timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "no CUDA GPU" in proc.stderr
    assert not (tmp_path / "suite.json").exists()
