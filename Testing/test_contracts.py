"""The stdlib-only contracts package (``vocoslicer.contracts``): each contract exercised in a child interpreter in
which torch, MONAI, SimpleITK and numpy cannot be imported (a meta-path finder raises ImportError for them), as
inside the Slicer process; and both sides of the process boundary use the very same definitions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "VoCoSlicer"  # holds both the vocoslicer package and VoCoSlicerLib

BLOCKED_CHILD = r'''
import importlib.abc, sys

BLOCKED = {"torch", "monai", "SimpleITK", "numpy"}


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
        return None


sys.meta_path.insert(0, Block())
for name in list(sys.modules):
    if name.split(".")[0] in BLOCKED:
        del sys.modules[name]

import json, os, socket
from pathlib import Path

import pytest

tmp = Path(sys.argv[1])
os.environ["VOCOSLICER_HOME"] = str(tmp / "home")

from vocoslicer.contracts import MODULES, atomic, dependencies, errors, events, labels, models, paths, rundir, torchrun

# paths: the home and its folders; create=False leaves nothing behind
assert paths.runs_dir(create=False) == tmp / "home" / "runs" and not (tmp / "home").exists()
assert paths.models_dir().is_dir() and paths.locks_dir().is_dir() and paths.cache_dir().is_dir()

# errors: exit codes the client reads; a labels error is both a UserError (CLI: exit 2) and a ValueError
assert (errors.EXIT_OK, errors.EXIT_CRASH, errors.EXIT_USER, errors.EXIT_CANCELLED) == (0, 1, 2, 3)
assert issubclass(labels.LabelsCsvError, errors.UserError) and issubclass(labels.LabelsCsvError, ValueError)

# atomic writes
atomic.atomic_write_json(tmp / "deep" / "x.json", {"a": 1})
assert json.loads((tmp / "deep" / "x.json").read_text()) == {"a": 1}
assert not [p for p in (tmp / "deep").iterdir() if p.name != "x.json"]

# events: encode, decode, malformed lines, non-finite numbers
ev = events.make_event("metric", step=3, loss=float("nan"), path=Path("/a"))
assert ev["kind"] == "metric" and ev["loss"] is None and ev["path"] == "/a"
assert events.parse_event_line(events.event_line(ev)) == ev
try:
    events.make_event("bogus")
    raise SystemExit("an unknown kind was accepted")
except ValueError:
    pass
assert events.parse_event_line("   ") is None
assert events.parse_event_line("{not json")["kind"] == "warning"
assert events.parse_event_line("hello", text_is_log=True)["kind"] == "log"
assert events.client_event("done", status="ok")["source"] == "client"

# run directories: a live run, a dead one, listing order, the client finishing a run, the failure text
run = rundir.new_run_dir("seg ment", root=tmp / "runs")
assert run.parent == tmp / "runs" and run.name.endswith("-seg-ment")
assert rundir.new_run_dir("seg ment", tmp / "runs") != run
me = os.getpid()
atomic.atomic_write_json(run / "run.json", {"status": "running", "pid": me, "pid_start": rundir.pid_start_time(me),
                                           "host": socket.gethostname(), "started": "2026-01-02"})
assert rundir.pid_alive(me, rundir.pid_start_time(me)) and not rundir.pid_alive(None) and not rundir.pid_alive("7")
assert rundir.read_run(run)["status"] == "running"
old = tmp / "runs" / "old"
old.mkdir()
atomic.atomic_write_json(old / "run.json", {"status": "running", "pid": 2**22 + 12345, "host": socket.gethostname(),
                                           "started": "2026-01-01"})
assert rundir.read_run(old)["status"] == "dead"
(tmp / "runs" / "empty").mkdir()
assert [r["run_dir"] for r in rundir.list_runs(tmp / "runs")] == [str(run), str(old)]
assert rundir.list_runs() == []  # the default root does not exist yet
(old / "log.txt").write_text("start\nTraceback (most recent call last):\n  boom\nValueError: x\n")
assert rundir.last_error(old).splitlines() == [
    "the job process ended without recording an end (killed?); resume it to continue",
    "Traceback (most recent call last):", "  boom", "ValueError: x"]
assert rundir.tail_lines(old / "log.txt", 2) == ["  boom", "ValueError: x"]
rundir.append_events(old, [events.client_event("done", status="cancelled")])
rundir.finalize_run_json(old, "cancelled", -15, "cancelled by the user",
                         [sys.executable, "-m", "vocoslicer", "segment"], 5)
ended = rundir.read_run(old)
assert ended["status"] == "cancelled" and ended["exit_code"] == errors.EXIT_CANCELLED and ended["argv"] == ["segment"]
assert events.parse_event_line((old / "events.jsonl").read_text())["status"] == "cancelled"
assert rundir.strip_job_options(["--run-dir", "R", "--events=stdout", "segment", "--events", "x"]) == [
    "segment", "--events", "x"]

# labels CSV: round trip, the file next to a label map, bad tables
table = [labels.Label(1, "liver", (200, 10, 10), "SCT^123037004", "Anatomical Structure"), labels.Label(3, "spleen")]
csv_path = labels.write_labels_csv(table, labels.labels_csv_path(tmp / "seg.nii.gz"))
assert csv_path.name == "seg.labels.csv" and labels.read_labels_csv(csv_path) == table
assert labels.labels_csv_path("a/b.seg.nrrd").name == "b.labels.csv"
assert labels.Label.from_dict(table[0].to_dict()) == table[0] and table[0].rgb_float[0] == 200 / 255
for bad in ("name\nx\n", "value,name\n1,a\n1,b\n", "value,name\nx,a\n", "value,name\n2,\n"):
    try:
        labels.parse_labels_csv(bad)
        raise SystemExit(f"accepted {bad!r}")
    except labels.LabelsCsvError:
        pass

# model ids and versions
assert models.DEMO_MODEL_ID == "vocoslicer-demo-phantom"
assert sorted(["1.10.0", "1.9.2", "1.0.0-rc1", "1.0.0", "1.beta"], key=models.version_key) == [
    "1.0.0", "1.0.0-rc1", "1.9.2", "1.10.0", "1.beta"]

# dependencies: one list, probed from metadata
assert dependencies.installed_version("pytest") and dependencies.installed_version("no-such-dist-vocoslicer") is None
assert "torch" in dependencies.protected_names() and "monai" in dependencies.probed_names()
assert dependencies.requirements_txt().count("==") == len(dependencies.slicer_requirements())

# torchrun command line
assert torchrun.torchrun_command(["vocoslicer", "x"], 2, python="py") == [
    "py", "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "vocoslicer", "x"]
assert "--node_rank=$NODE_RANK" in torchrun.torchrun_command(["m"], 1, nnodes=2, node_rank="$NODE_RANK")

# the Slicer side's engine-facing modules load here too
import VoCoSlicerLib.job_runs, VoCoSlicerLib.labels_csv, VoCoSlicerLib.models_view, VoCoSlicerLib.params  # noqa: E401

heavy = sorted(n for n in sys.modules if n.split(".")[0] in BLOCKED)
engine = sorted(n for n in sys.modules if n.startswith("vocoslicer.") and not n.startswith("vocoslicer.contracts"))
assert not heavy and not engine, (heavy, engine)
assert set(MODULES) == {n.rsplit(".", 1)[1] for n in sys.modules if n.startswith("vocoslicer.contracts.")}
print("ok")
'''


def test_contracts_work_without_torch_monai_simpleitk_or_numpy(tmp_path):
    out = subprocess.run([sys.executable, "-c", BLOCKED_CHILD, str(tmp_path)], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path, env={"PYTHONPATH": str(ENGINE), "PATH": "/usr/bin:/bin",
                                                        "HOME": str(tmp_path)})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_engine_and_slicer_side_share_one_definition():
    from vocoslicer import errors, labels, paths
    from vocoslicer.contracts import labels as clabels
    from vocoslicer.contracts import models as cmodels
    from vocoslicer.contracts import rundir as crundir
    from vocoslicer.infer import segment
    from vocoslicer.jobs import rundir
    from vocoslicer.models import installed
    from VoCoSlicerLib import job_runs, labels_csv, models_view, params

    assert job_runs.read_run is rundir.read_run is crundir.read_run
    assert job_runs.list_runs is rundir.list_runs and job_runs.tail_lines is rundir.tail_lines
    assert labels_csv.LabelInfo is labels.Label is clabels.Label
    assert labels_csv.labels_csv_path is segment.labels_csv_path is clabels.labels_csv_path
    assert params.DEMO_MODEL_ID is installed.DEMO_MODEL_ID is cmodels.DEMO_MODEL_ID
    assert models_view.models_dir is paths.models_dir
    assert errors.UserError.__module__ == "vocoslicer.contracts.errors"


def test_torchrun_environment_is_read_in_one_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank and world size as torchrun announces them; outside torchrun rank 0 of 1, and never a relaunch guard."""
    from vocoslicer.contracts import torchrun

    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert (torchrun.env_rank(), torchrun.env_world_size(), torchrun.under_torchrun()) == (0, 1, False)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert (torchrun.env_rank(), torchrun.env_world_size(), torchrun.under_torchrun()) == (3, 4, True)
    monkeypatch.setenv("RANK", "")
    assert torchrun.env_rank() == 0
