"""Cohort store: add/list/remove/versions, dedup, splits, label checks, crash safety, concurrency, recovery."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from vocoslicer.data import cohort as cohort_mod
from vocoslicer.data.cohort import Cohort, Provenance
from vocoslicer.errors import UserError
from vocoslicer.labels import Label, LabelTable

TABLE = LabelTable((Label(1, "liver", (200, 0, 0)), Label(2, "spleen", (0, 200, 0))))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "VoCoSlicer")}


def make_case(tmp: Path, seed: int, spacing: float = 2.0, size: int = 12) -> tuple[Path, Path]:
    """A tiny image + a two-label map on the same grid, written to ``tmp``."""
    rng = np.random.default_rng(seed)
    arr = rng.normal(size=(size, size, size)).astype(np.float32)
    lab = np.zeros(arr.shape, np.uint8)
    lab[2:6, 2:6, 2:6] = 1
    lab[7:10, 7:10, 7:10] = 2
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((spacing,) * 3)
    img.SetOrigin((seed, 0.0, 0.0))
    labimg = sitk.GetImageFromArray(lab)
    labimg.CopyInformation(img)
    ip, lp = tmp / f"img{seed}.nii.gz", tmp / f"lab{seed}.nii.gz"
    sitk.WriteImage(img, str(ip))
    sitk.WriteImage(labimg, str(lp))
    return ip, lp


@pytest.fixture()
def table_csv(tmp_path: Path) -> Path:
    return TABLE.write_csv(tmp_path / "labels.csv")


def test_add_list_remove_versions_and_dedup(tmp_path: Path, table_csv: Path) -> None:
    c = Cohort.init(tmp_path / "c", val_ratio=0.34)
    assert c.version == 0
    ip, lp = make_case(tmp_path, 1)
    r = c.add(ip, lp, table_csv, Provenance(model_id="demo", model_version="1", corrected=True, by="ann"))
    assert (r.case_id, r.created, r.label_version) == ("case0001", True, 1)
    ip2, _ = make_case(tmp_path, 2)
    r2 = c.add(ip2)
    assert r2.case_id == "case0002" and r2.label_version is None
    # same image again (re-saved as .nrrd: same voxels + grid) → dedup, no new case
    nrrd = tmp_path / "img1.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(ip)), str(nrrd))
    again = c.add(nrrd)
    assert again.case_id == "case0001" and not again.created
    # a re-correction keeps history
    lab = sitk.ReadImage(str(lp))
    arr = sitk.GetArrayFromImage(lab)
    arr[0, 0, 0] = 2
    lab2 = sitk.GetImageFromArray(arr)
    lab2.CopyInformation(lab)
    r3 = c.add(ip, lab2, provenance=Provenance(corrected=True, by="bob", note="fixed corner"))
    assert r3.case_id == "case0001" and r3.label_version == 2
    case = c.case("case0001")
    assert [v["version"] for v in case.label_versions] == [1, 2]
    assert case.label == c.root / "labels/case0001/v2.nii.gz"
    assert (c.root / "labels/case0001/v1.nii.gz").is_file()
    assert case.label_versions[0]["provenance"]["model_id"] == "demo"
    assert case.label_versions[1]["provenance"]["by"] == "bob"
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(case.label)))[0, 0, 0] == 2
    v_before = c.version
    c.remove("case0002")
    assert [x.id for x in c.cases()] == ["case0001"]
    assert not (c.root / "images/case0002.nii.gz").exists()
    assert c.version == v_before + 1
    # ids are never reused after a removal
    assert c.add(ip2).case_id == "case0003"
    assert [lb.name for lb in c.labels] == ["liver", "spleen"]


def test_split_is_stable_across_additions(tmp_path: Path, table_csv: Path) -> None:
    c = Cohort.init(tmp_path / "c", val_ratio=0.3)
    for s in range(4):
        ip, lp = make_case(tmp_path, s)
        c.add(ip, lp, table_csv)
    first = {x.id: x.split for x in c.cases()}
    assert list(first.values()).count("val") == 1 and None not in first.values()
    for s in range(4, 10):
        ip, lp = make_case(tmp_path, s)
        c.add(ip, lp, table_csv)
    after = {x.id: x.split for x in c.cases()}
    assert all(after[k] == v for k, v in first.items())  # nobody moved
    assert list(after.values()).count("val") == 3
    with pytest.raises(UserError, match="already in"):
        c.set_split([k for k, v in first.items() if v == "val"], "train")


def test_label_table_mismatch_and_grid_checks(tmp_path: Path, table_csv: Path) -> None:
    c = Cohort.init(tmp_path / "c")
    ip, lp = make_case(tmp_path, 1)
    only_liver = LabelTable((Label(1, "liver"),))
    with pytest.raises(UserError, match=r"label values \[2\] are not in the label table"):
        c.add(ip, lp, only_liver)
    assert c.cases() == []  # nothing written
    c.add(ip, lp, table_csv)
    renamed = LabelTable((Label(1, "kidney"), Label(2, "spleen")))
    ip2, lp2 = make_case(tmp_path, 2)
    with pytest.raises(UserError, match="value 1 is 'kidney' but the cohort calls it 'liver'"):
        c.add(ip2, lp2, renamed)
    # label on a coarser grid covering the same region
    img = sitk.ReadImage(str(ip2))
    coarse = sitk.Resample(sitk.ReadImage(str(lp2)), [6, 6, 6], sitk.Transform(), sitk.sitkNearestNeighbor,
                           img.GetOrigin(), [4.0, 4.0, 4.0], img.GetDirection(), 0, sitk.sitkUInt8)
    with pytest.raises(UserError, match="differs from the image grid.*--resample-label"):
        c.add(ip2, coarse, table_csv)
    r = c.add(ip2, coarse, table_csv, resample_label=True)
    stored = sitk.ReadImage(str(c.case(r.case_id).label))
    assert stored.GetSize() == img.GetSize() and np.any(sitk.GetArrayFromImage(stored) == 2)
    # a label elsewhere in space is refused even with --resample-label
    far = sitk.ReadImage(str(lp2))
    far.SetOrigin((500.0, 500.0, 500.0))
    ip3, _ = make_case(tmp_path, 3)
    with pytest.raises(UserError, match="do not overlap"):
        c.add(ip3, far, table_csv, resample_label=True)


def test_exception_mid_add_leaves_manifest_valid(tmp_path: Path, table_csv: Path, monkeypatch) -> None:
    c = Cohort.init(tmp_path / "c")
    ip, lp = make_case(tmp_path, 1)
    c.add(ip, lp, table_csv)
    v = c.version

    def boom(*a, **k):  # files are written, then the manifest write fails
        raise OSError("disk full")

    monkeypatch.setattr(cohort_mod, "save_manifest", boom)
    ip2, lp2 = make_case(tmp_path, 2)
    with pytest.raises(OSError):
        c.add(ip2, lp2, table_csv)
    monkeypatch.undo()
    assert c.version == v and [x.id for x in c.cases()] == ["case0001"]
    assert c.add(ip2, lp2, table_csv).case_id == "case0002"  # the orphan name is simply reused
    assert len(c.cases()) == 2


_SLOW_ADDER = """
import sys, time
from vocoslicer.data import cohort as m
real = m.write_image
def slow(img, path, **k):
    out = real(img, path, **k)
    print("WROTE", flush=True)
    time.sleep(60)
    return out
m.write_image = slow
m.Cohort(sys.argv[1]).add(sys.argv[2])
"""


def test_killed_adder_leaves_manifest_valid_and_lock_free(tmp_path: Path, table_csv: Path) -> None:
    c = Cohort.init(tmp_path / "c")
    ip, lp = make_case(tmp_path, 1)
    c.add(ip, lp, table_csv)
    ip2, _ = make_case(tmp_path, 2)
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_ADDER, str(c.root), str(ip2)], stdout=subprocess.PIPE,
                            text=True, env=ENV)
    try:
        assert proc.stdout.readline().strip() == "WROTE"  # image file written, manifest not yet, lock held
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [x.id for x in c.cases()] == ["case0001"]
    json.loads((c.root / "manifest.json").read_text())
    orphan = c.root / "images" / "case0002.nii.gz"
    assert orphan.is_file()  # the complete image the dead writer never referenced (issue 18 item 17)
    c.assign_splits()  # the next write (any write) sweeps it, under the lock the dead process released
    assert not orphan.exists() and sorted(p.name for p in (c.root / "images").iterdir()) == ["case0001.nii.gz"]
    assert c.add(ip2).case_id == "case0002"  # the OS released the dead process's lock


_ADDER = """
import sys
from pathlib import Path
from vocoslicer.data.cohort import Cohort
c = Cohort(sys.argv[1])
for p in sys.argv[2:]:
    c.add(p, Path(p).with_name(Path(p).name.replace("img", "lab")), sys.argv[1] + "/../labels.csv")
"""


def test_two_concurrent_adders_lose_nothing(tmp_path: Path, table_csv: Path) -> None:
    c = Cohort.init(tmp_path / "c")
    paths = [make_case(tmp_path, s)[0] for s in range(10)]
    procs = [subprocess.Popen([sys.executable, "-c", _ADDER, str(c.root), *map(str, paths[i::2])], env=ENV)
             for i in range(2)]
    for p in procs:
        assert p.wait(120) == 0
    cases = c.cases()
    assert len(cases) == 10 and len({x.hash for x in cases}) == 10
    assert all(x.labelled for x in cases)
    assert c.version == 10
    # every write swept the folders while the other writer was active: nothing referenced may have gone
    assert all(x.image.is_file() and x.label is not None and x.label.is_file() for x in cases)
    stray = [p for p in (*(c.root / "images").iterdir(), *(c.root / "labels").rglob("*")) if p.name.startswith(".")]
    assert not stray


def test_next_write_sweeps_what_a_killed_writer_left(tmp_path: Path, table_csv: Path) -> None:
    """A simulated kill -9 mid-add (files left, manifest not written): the next write removes exactly those."""
    c = Cohort.init(tmp_path / "c")
    ip, lp = make_case(tmp_path, 1)
    c.add(ip, lp, table_csv)
    before = {p: p.read_bytes() for p in c.root.rglob("*") if p.is_file()}
    junk = [c.root / "images" / ".case0002.ab12cd34.tmp.nii.gz", c.root / "images" / "case0007.nii.gz",
            c.root / "labels" / "case0001" / "v2.nii.gz", c.root / "labels" / "case0009" / "v1.nii.gz",
            c.root / "labels" / "case0001" / ".v2.0badf00d.tmp.nii.gz", c.root / ".manifest.1234abcd.tmp.json"]
    for j in junk:
        j.parent.mkdir(parents=True, exist_ok=True)
        j.write_bytes(b"left by a killed writer")
    (c.root / "images" / "notes").mkdir()  # not a file a writer makes: not ours to judge
    (c.root / "notes.txt").write_text("mine")
    outside = tmp_path / "outside.nii.gz"
    outside.write_bytes(b"x")
    (c.root / "images" / "link.nii.gz").symlink_to(outside)  # unlinked, never followed
    # after a recovery from the backup the newest manifest is unknown: nothing is judged then
    good = (c.root / "manifest.json").read_text()
    (c.root / "manifest.json").write_text("{broken")
    c.assign_splits()
    assert all(j.exists() for j in junk)
    assert json.loads((c.root / "manifest.json").read_text())["cases"] == json.loads(good)["cases"]
    ip2, _ = make_case(tmp_path, 2)
    assert c.add(ip2).case_id == "case0002"
    assert not any(j.exists() for j in junk) and not (c.root / "labels" / "case0009").exists()
    assert not (c.root / "images" / "link.nii.gz").is_symlink() and outside.read_bytes() == b"x"
    assert (c.root / "images" / "notes").is_dir() and (c.root / "notes.txt").read_text() == "mine"
    for p, data in before.items():
        if p.name not in ("manifest.json", "manifest.bak.json"):
            assert p.read_bytes() == data, p
    assert (c.root / "images" / "case0002.nii.gz").is_file()


def test_files_and_folders_honour_the_umask(tmp_path: Path, table_csv: Path) -> None:
    """Issue 18 item 15: a shared cohort must be readable by the group (mkstemp/mkdtemp would make 0600/0700)."""
    from vocoslicer.io.atomic import atomic_write_text, make_temp_dir

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        d = make_temp_dir(tmp_path)
        c = Cohort.init(tmp_path / "c")
        ip, lp = make_case(tmp_path, 1)
        c.add(ip, lp, table_csv)
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.txt", "x")
    finally:
        os.umask(old)

    def mode(p: Path) -> int:
        return p.stat().st_mode & 0o777

    assert mode(tmp_path / "a.txt") == 0o644 and mode(d) == 0o755
    for p in ("manifest.json", "manifest.bak.json", "labels.csv", "images/case0001.nii.gz",
              "labels/case0001/v1.nii.gz"):
        assert mode(c.root / p) == 0o644, p
    assert mode(c.root / "labels" / "case0001") == 0o755
    assert mode(tmp_path / "private.txt") == 0o600  # a stricter umask is honoured too


def test_corrupted_manifest_recovers_from_backup(tmp_path: Path, table_csv: Path) -> None:
    c = Cohort.init(tmp_path / "c")
    ip, lp = make_case(tmp_path, 1)
    c.add(ip, lp, table_csv)
    (c.root / "manifest.json").write_text('{"format": "vocoslicer-coh')  # truncated by a disk problem
    again = Cohort(c.root)
    assert again.warning and "recovered cohort version 1" in again.warning
    assert [x.id for x in again.cases()] == ["case0001"]
    again.repair()
    assert json.loads((c.root / "manifest.json").read_text())["version"] == 2
    (c.root / "manifest.json").write_text("garbage")
    (c.root / "manifest.bak.json").write_text("garbage")
    with pytest.raises(UserError, match="cannot recover"):
        Cohort(c.root)


def test_cli_roundtrip_and_errors(tmp_path: Path, table_csv: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "vocoslicer", "cohort", *args], capture_output=True, text=True,
                              env=ENV, timeout=60)

    root = tmp_path / "c"
    assert run("init", str(root), "--labels", str(table_csv)).returncode == 0
    ip, lp = make_case(tmp_path, 1)
    r = run("add", str(root), "--image", str(ip), "--label", str(lp), "--model-id", "demo", "--by", "ann")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["case"] == "case0001"
    bad = run("add", str(root), "--image", str(tmp_path / "missing.nii.gz"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("vocoslicer: error:") and "no such file" in bad.stderr.splitlines()[0]
    listing = json.loads(run("list", str(root), "--json").stdout)
    assert listing["cases"][0]["label_versions"][0]["provenance"]["by"] == "ann"
    out = tmp_path / "export"
    assert run("export", str(root), "--out", str(out)).returncode == 0
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["labels"] == {"0": "background", "1": "liver", "2": "spleen"} and ds["numTraining"] == 1
    assert (out / ds["training"][0]["label"]).is_file()
    assert run("remove", str(root), "case0001").returncode == 0
    assert "0 cases" in run("list", str(root)).stdout
