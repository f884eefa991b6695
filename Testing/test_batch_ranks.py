"""Two ranks with gloo on CPU shard one batch and share one status file (the torchrun environment, spawned)."""

from __future__ import annotations

import json
import multiprocessing as mp
import socket

from helpers_batch import box_volume, rank_main, save_tiny_bundle

from vocoslicer.infer.batch import STATUS_FILE
from vocoslicer.io import write_image


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_shard_a_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("VOCOSLICER_HOME", str(tmp_path / "home"))
    bundle = save_tiny_bundle(tmp_path / "bundle")
    ins = [str(write_image(box_volume(i), tmp_path / "in" / f"c{i}.nii.gz")) for i in range(5)]
    out = tmp_path / "out"
    argv = ["segment", *ins, "-o", str(out), "--model", str(bundle), "--device", "cpu"]
    ctx = mp.get_context("spawn")
    codes = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=rank_main, args=(r, 2, port, str(tmp_path / "home"), argv, codes)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(codes.get(timeout=5) for _ in procs) == [(0, 0), (1, 0)]
    recs = [json.loads(line) for line in (out / STATUS_FILE).read_text().splitlines()]
    assert sorted(r["case"] for r in recs) == [f"c{i}" for i in range(5)]  # every case exactly once
    by_rank = {r["case"]: r["rank"] for r in recs}
    assert by_rank == {"c0": 0, "c1": 1, "c2": 0, "c3": 1, "c4": 0}  # cases[rank::world_size]
    assert all(r["status"] == "done" for r in recs)
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"c{i}.nii.gz" for i in range(5)]
