"""Batch segmentation: mixed inputs, a bad case in the middle, resume after a kill, DICOM trees, list files, cohorts.

All with the Threshold known-answer model saved as a real bundle (Testing/helpers_batch.py), in-process through
``vocoslicer.cli.main`` so each test takes seconds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from helpers_batch import box_volume, register_tiny, save_tiny_bundle, write_ct_series

from vocoslicer.cli import main
from vocoslicer.infer.batch import STATUS_FILE
from vocoslicer.io import write_image


@pytest.fixture(autouse=True)
def _tiny(monkeypatch, tmp_path):
    monkeypatch.setenv("VOCOSLICER_HOME", str(tmp_path / "home"))
    register_tiny()


@pytest.fixture()
def bundle(tmp_path):
    return str(save_tiny_bundle(tmp_path / "bundle"))


def _status(out):
    return [json.loads(line) for line in (out / STATUS_FILE).read_text().splitlines()]


def _expected(img):
    return (sitk.GetArrayFromImage(img) > 50).astype(np.uint8) * 6


def test_mixed_inputs_with_a_bad_case_in_the_middle(tmp_path, bundle, capsys):
    a = write_image(box_volume(0), tmp_path / "in" / "a.nii.gz")
    (tmp_path / "in" / "bad.nii.gz").write_bytes(b"\x1f\x8b not a nifti at all")
    folder = tmp_path / "more"
    write_image(box_volume(1), folder / "b.nrrd")
    write_image(box_volume(2), folder / "sub" / "c.mha")
    out = tmp_path / "out"
    code = main(["segment", str(a), str(tmp_path / "in" / "bad.nii.gz"), str(folder), str(tmp_path / "missing.nii"),
                 "-o", str(out), "--model", bundle, "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 2  # some inputs were bad, the rest was segmented
    for name, seed in (("a", 0), ("b", 1), ("sub_c", 2)):
        got = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{name}.nii.gz")))
        np.testing.assert_array_equal(got, _expected(box_volume(seed)))
        assert (out / f"{name}.labels.csv").is_file()
    recs = {r["case"]: r for r in _status(out)}
    assert recs["bad"]["status"] == "failed" and "cannot read" in recs["bad"]["error"]
    assert [recs[c]["status"] for c in ("a", "b", "sub_c")] == ["done"] * 3
    assert "failed: bad" in captured.out and "missing.nii: no such file" in captured.out
    assert not list(out.glob("bad*"))  # nothing half-written for the bad case


def test_rerun_after_a_kill_skips_finished_cases(tmp_path, bundle, capsys):
    ins = [str(write_image(box_volume(i), tmp_path / "in" / f"c{i}.nii.gz")) for i in range(3)]
    out = tmp_path / "out"
    assert main(["segment", *ins, "-o", str(out), "--model", bundle, "--device", "cpu"]) == 0
    lines = (out / STATUS_FILE).read_text().splitlines()
    # a kill during case c2: its record never made it (a torn line instead) and its output is gone
    (out / STATUS_FILE).write_text("\n".join(lines[:2]) + '\n{"case": "c2", "sta')
    (out / "c2.nii.gz").unlink()
    before = {n: (out / f"{n}.nii.gz").stat().st_mtime_ns for n in ("c0", "c1")}
    capsys.readouterr()
    assert main(["--events", "stdout", "segment", *ins, "-o", str(out), "--model", bundle, "--device", "cpu"]) == 0
    assert {n: (out / f"{n}.nii.gz").stat().st_mtime_ns for n in ("c0", "c1")} == before
    assert (out / "c2.nii.gz").is_file()
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    prog = [e for e in events if e["kind"] == "progress"]
    assert prog[-1]["done"] == 3 and prog[-1]["remaining"] == 0 and prog[-1]["total"] == 3
    arts = [e for e in events if e["kind"] == "artifact"]
    assert [a["case"] for a in arts] == ["c2"]  # only the unfinished case ran
    assert main(["segment", *ins, "-o", str(out), "--model", bundle, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out  # a finished batch: nothing to do, exit 0
    assert "segmented 0 of 3 cases" in printed and "3 already done" in printed


def test_dicom_tree_with_two_series_gives_one_output_per_series(tmp_path, bundle):
    tree = tmp_path / "pacs"
    write_ct_series(box_volume(0), tree / "p1" / "ct", "1.2.826.0.1.3680043.2.1125.7", patient="P001", series_number=2)
    write_ct_series(box_volume(3), tree / "p2" / "ct", "1.2.826.0.1.3680043.2.1125.8", patient="P002", series_number=5)
    out = tmp_path / "out"
    assert main(["segment", str(tree), "-o", str(out), "--model", bundle, "--device", "cpu"]) == 0
    names = sorted(p.name for p in out.glob("*.nii.gz"))
    assert names == ["P001_S1_2-abdomen.nii.gz", "P002_S1_5-abdomen.nii.gz"]
    got = sitk.ReadImage(str(out / names[1]))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(got), _expected(box_volume(3)))


def test_dicom_tree_as_dicom_seg_batch(tmp_path, bundle):
    from vocoslicer.io.dicom_seg import read_dicom_seg_labels

    files = write_ct_series(box_volume(0), tmp_path / "pacs" / "a", "1.2.826.0.1.3680043.2.1125.9")
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "pacs"), "-o", str(out), "--format", "dicom-seg", "--model", bundle,
                 "--device", "cpu"]) == 0
    (seg,) = out.glob("*.dcm")
    numbers, _ = read_dicom_seg_labels(seg, files)
    assert np.count_nonzero(numbers == 2) == np.count_nonzero(_expected(box_volume(0)))


def test_list_file_with_relative_paths_and_comments(tmp_path, bundle):
    write_image(box_volume(0), tmp_path / "data" / "x.nii.gz")
    write_image(box_volume(1), tmp_path / "data" / "y.nii.gz")
    lst = tmp_path / "data" / "cases.txt"
    lst.write_text("# cases to segment\nx.nii.gz\n\n  y.nii.gz  \n")
    out = tmp_path / "out"
    assert main(["segment", str(lst), "-o", str(out), "--model", bundle, "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["x.nii.gz", "y.nii.gz"]


def test_cohort_unlabelled_gets_uncorrected_proposals(tmp_path, bundle):
    from helpers_batch import LABELS

    from vocoslicer.data.cohort import Cohort

    cohort = Cohort.init(tmp_path / "cohort", labels=LABELS)
    c0 = cohort.add(box_volume(0)).case_id
    truth = sitk.Cast(box_volume(1) > 50, sitk.sitkUInt8) * 6
    c1 = cohort.add(box_volume(1), truth, labels=LABELS).case_id
    assert main(["segment", "--cohort", str(tmp_path / "cohort"), "--unlabelled", "--model", bundle,
                 "--device", "cpu"]) == 0
    case0, case1 = Cohort(tmp_path / "cohort").case(c0), Cohort(tmp_path / "cohort").case(c1)
    assert len(case0.label_versions) == 1 and len(case1.label_versions) == 1  # the labelled case is untouched
    prov = case0.label_versions[0]["provenance"]
    assert prov["corrected"] is False and prov["model_id"] == "thr-test" and prov["model_version"] == "1.2.3"
    assert len(prov["model_sha256"]) == 64
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(case0.label)))
    np.testing.assert_array_equal(got, _expected(box_volume(0)))
    # a rerun has nothing left to do
    assert main(["segment", "--cohort", str(tmp_path / "cohort"), "--unlabelled", "--model", bundle]) == 2


def test_batch_without_output_folder_is_a_one_line_error(tmp_path, bundle, capsys):
    a = write_image(box_volume(0), tmp_path / "a.nii.gz")
    assert main(["segment", str(a), str(a), "--model", bundle]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "-o OUT_DIR" in err


def test_folder_of_volumes_prints_no_itk_warning(tmp_path, bundle, capfd):
    write_image(box_volume(0), tmp_path / "vols" / "a.nii.gz")
    assert main(["segment", str(tmp_path / "vols"), "-o", str(tmp_path / "out"), "--model", bundle,
                 "--device", "cpu"]) == 0
    err = capfd.readouterr().err  # ITK writes to the C-level stderr
    assert "No Series were found" not in err and "WARNING: In" not in err


def test_real_kill_mid_batch_then_resume(tmp_path, bundle):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    ins = [str(write_image(box_volume(i, shape_zyx=(24, 40, 40)), tmp_path / "in" / f"k{i:02d}.nii.gz"))
           for i in range(12)]
    out = tmp_path / "out"
    argv = ["segment", *ins, "-o", str(out), "--model", bundle, "--device", "cpu"]
    here = Path(__file__).parent
    code = (f"import sys; sys.path[:0] = [{str(here)!r}]; from helpers_batch import register_tiny; register_tiny(); "
            f"from vocoslicer.cli import main; sys.exit(main({argv!r}))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    status = out / STATUS_FILE
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if status.is_file() and len(status.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: what a crash or an OOM kill does
    proc.wait(30)
    done_before = {r["case"] for r in _status(out) if r["status"] == "done"}
    assert 2 <= len(done_before) < 12, "the kill should land mid-batch"
    mtimes = {c: (out / f"{c}.nii.gz").stat().st_mtime_ns for c in done_before}
    assert main(argv) == 0
    assert {c: (out / f"{c}.nii.gz").stat().st_mtime_ns for c in done_before} == mtimes  # not redone
    recs = _status(out)
    assert {r["case"] for r in recs if r["status"] == "done"} == {f"k{i:02d}" for i in range(12)}
    assert sum(1 for r in recs if r["status"] == "done") == 12  # every case segmented exactly once overall
