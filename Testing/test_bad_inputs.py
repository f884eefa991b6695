"""The bad-input sweep as a table: every broken input, through the real CLI in a child process.

Each :class:`Case` says how its input is generated (truncations, header edits, broken DICOM series, hostile
options), the command, the exit code, the one line stderr must be (``vocoslicer: error: ...`` naming the problem,
nothing else: no ITK/GDCM/torch warning, no traceback) and which files the command may write. Everything under
the case folder and the shared inputs is snapshotted before and compared after: a failed command leaves nothing
behind (no run folder, no events.jsonl, no half-written output) and changes no input.

The few cases that run a (tiny) network are marked ``slow``.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers_io import make_volume, write_dicom_series

from vocoslicer.data.cohort import Cohort
from vocoslicer.labels import Label, LabelTable
from vocoslicer.models.bundle import ModelBundle, new_bundle_meta
from vocoslicer.models.classifier import VoCoClassifier
from vocoslicer.models.swin import build_swinunetr

LABELS = LabelTable((Label(1, "liver"), Label(2, "spleen")))
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
ROTATED = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------- generated inputs
def ct_volume(values: tuple[float, float] = (-1000, 400), shape=(16, 24, 24), seed: int = 0) -> sitk.Image:
    arr = np.random.default_rng(seed).uniform(*values, size=shape).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((3.0, 3.0, 3.0))
    return img


def nifti_with_pixdim(path: Path, axis: int, value: float) -> Path:
    """A .nii.gz whose raw header says ``pixdim[axis] = value`` (a header edit, the voxels untouched)."""
    raw = path.with_name("raw.nii")
    sitk.WriteImage(ct_volume(), str(raw))
    data = bytearray(raw.read_bytes())
    struct.pack_into("<f", data, 76 + 4 * axis, value)  # nifti-1: float pixdim[8] at byte 76
    raw.unlink()
    path.write_bytes(gzip.compress(bytes(data)))
    return path


def truncated_nifti(path: Path) -> Path:
    raw = path.with_name("raw.nii")
    sitk.WriteImage(ct_volume(), str(raw))
    packed = gzip.compress(raw.read_bytes())
    raw.unlink()
    path.write_bytes(packed[: len(packed) // 2])
    return path


def dicom(folder: Path, uid: str = "1.2.826.0.1.3680043.2.1125.7") -> list[Path]:
    return write_dicom_series(make_volume(shape_zyx=(6, 12, 12), direction=IDENTITY), folder, series_uid=uid)


def dicom_truncated(d: Path) -> Path:
    files = dicom(d)
    files[3].write_bytes(files[3].read_bytes()[:-150])
    return d


def dicom_other_orientation(d: Path) -> Path:
    files = dicom(d)
    other = write_dicom_series(make_volume(shape_zyx=(6, 12, 12), direction=ROTATED), d.parent / "rot",
                               series_uid="1.2.826.0.1.3680043.2.1125.7")
    shutil.copy(other[3], files[3])
    shutil.rmtree(d.parent / "rot")
    return d


def dicom_duplicated(d: Path) -> Path:
    files = dicom(d)
    shutil.copy(files[2], d / "copy_of_slice_002.dcm")
    return d


def dicom_missing(d: Path) -> Path:
    dicom(d)[3].unlink()
    return d


def dicom_mixed_empty_uid(d: Path) -> Path:
    dicom(d / "a", uid="1.2.826.0.1.3680043.2.1125.8")
    dicom(d / "b", uid="")
    return d


def metaimage_claiming_1200(path: Path) -> Path:
    path.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 1200 1200 1200\nElementType = MET_SHORT\n"
                     b"ElementDataFile = LOCAL\n" + b"\0" * 1024)
    return path


def complex_image(path: Path) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((6, 8, 8), np.complex64)), str(path))
    return path


def latin1_csv(path: Path) -> Path:
    path.write_bytes("value,name\n1,f\xe9gado\n".encode("latin-1"))
    return path


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - the malicious pickle: touch a marker file when unpickled
        return (open, (str(self.marker), "w"))


def evil_checkpoint(path: Path) -> Path:
    torch.save({"state_dict": {}, "payload": _Evil(path.with_name("PWNED"))}, str(path))
    return path


def resume_state(run: Path, text: str) -> Path:
    run.mkdir()
    (run / "finetune.json").write_text(text, encoding="utf-8")
    return run


# ---------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Case:
    """One bad input: ``make(case_dir)`` generates it (its path is ``{in}``), ``args`` the command line."""

    name: str
    args: tuple[str, ...]
    make: Callable[[Path], Path] | None = None
    code: int = 2
    match: str = ""  # a substring of the one stderr line
    may_write: tuple[str, ...] = ()  # names (relative to the case folder) a successful command writes
    slow: bool = False
    needs_non_root: bool = False


SEG = ("segment", "{in}", "-o", "{case}/seg.nii.gz", "--model", "{bundle}", "--device", "cpu")
FT = ("finetune", "--cohort", "{cohort}", "--init", "{bundle}", "--out", "{case}/run", "--device", "cpu")
VOCO = ("pretrain", "voco", "--data", "{ctdir}", "--out", "{case}/run", "--device", "cpu", "--steps", "1")
TOK = ("pretrain", "tokenizer", "--data", "{ctdir}", "--out", "{case}/run", "--device", "cpu", "--steps", "1")
MIM = ("pretrain", "mim", "--tokenizer", "{case}/none", "--data", "{ctdir}", "--out", "{case}/run",
       "--device", "cpu")


def _seg(name: str, make: Callable[[Path], Path], match: str, **kw) -> Case:
    return Case(name, SEG, make, match=match, **kw)


TABLE: list[Case] = [
    # item 5: truncated compressed NIfTI
    _seg("nifti_truncated_gz", lambda c: truncated_nifti(c / "t.nii.gz"), "truncated file"),
    Case("cohort_add_truncated_gz", ("cohort", "add", "{cohort}", "--image", "{in}"),
         lambda c: truncated_nifti(c / "t.nii.gz"), match="truncated file"),
    Case("classify_truncated_gz", ("classify", "{in}", "--model", "{cls}", "--device", "cpu"),
         lambda c: truncated_nifti(c / "t.nii.gz"), match="truncated file"),
    # item 6: spacing from the raw header
    _seg("nifti_spacing_zero", lambda c: nifti_with_pixdim(c / "z.nii.gz", 1, 0.0), "invalid voxel spacing"),
    _seg("nifti_spacing_negative", lambda c: nifti_with_pixdim(c / "n.nii.gz", 2, -1.5), "invalid voxel spacing"),
    _seg("nifti_spacing_nan", lambda c: nifti_with_pixdim(c / "nan.nii.gz", 3, float("nan")),
         "invalid voxel spacing"),
    _seg("nifti_spacing_inf", lambda c: nifti_with_pixdim(c / "inf.nii.gz", 1, float("inf")),
         "invalid voxel spacing"),
    # item 7 (+ 18): DICOM series that are not one regular stack
    _seg("dicom_truncated_slice", lambda c: dicom_truncated(c / "dcm"), "unreadable (truncated or corrupt?)"),
    _seg("dicom_other_orientation", lambda c: dicom_other_orientation(c / "dcm"), "mixes orientations"),
    _seg("dicom_duplicated_slice", lambda c: dicom_duplicated(c / "dcm"), "duplicated slices"),
    _seg("dicom_missing_slice", lambda c: dicom_missing(c / "dcm"), "non-uniform slice spacing"),
    _seg("dicom_mixed_empty_uid", lambda c: dicom_mixed_empty_uid(c / "dcm"), "empty SeriesInstanceUID"),
    # item 12: no library noise around the line
    _seg("dicom_empty_folder", lambda c: _mkdir(c / "empty"), "the folder is empty"),
    _seg("dicom_not_dicom", lambda c: _text(c / "notes" / "readme.txt"), "no DICOM series"),
    _seg("metaimage_1200_cubed", lambda c: metaimage_claiming_1200(c / "big.mha"), "file holds only 1,024"),
    Case("finetune_malicious_pickle", ("finetune", "--cohort", "{cohort}", "--init", "{in}", "--out", "{case}/run",
                                       "--device", "cpu"),
         lambda c: evil_checkpoint(c / "evil.pt"), match="refused"),
    # item 8: output checked before any work
    Case("segment_output_is_input", ("segment", "{ct}", "-o", "{ct}", "--model", "{bundle}"),
         match="is the input"),
    Case("segment_output_bad_extension", ("segment", "{ct}", "-o", "{case}/seg.png", "--model", "{bundle}"),
         match="unsupported output format"),
    Case("segment_output_parent_is_file", ("segment", "{ct}", "-o", "{in}/seg.nii.gz", "--model", "{bundle}"),
         lambda c: _text(c / "afile"), match="is a file"),
    Case("segment_labels_csv_is_folder", ("segment", "{ct}", "-o", "{case}/seg.nii.gz", "--model", "{bundle}"),
         lambda c: _mkdir(c / "seg.labels.csv"), match="is a folder"),
    Case("segment_output_folder_read_only", ("segment", "{ct}", "-o", "{in}/seg.nii.gz", "--model", "{bundle}"),
         lambda c: _read_only(c / "ro"), match="not writable", needs_non_root=True),
    Case("classify_output_is_input", ("classify", "{ct}", "-o", "{ct}", "--model", "{bundle}"),
         match="is the input"),
    # item 10: user input, exit 2
    _seg("complex_image", lambda c: complex_image(c / "complex.nii.gz"), "complex numbers"),
    Case("cohort_add_latin1_labels", ("cohort", "add", "{cohort}", "--image", "{ct}", "--label", "{label}",
                                      "--labels", "{in}"), lambda c: latin1_csv(c / "labels.csv"), match="UTF-8"),
    Case("segment_overlap_nan", (*SEG[:1], "{ct}", *SEG[2:], "--overlap", "nan"), match="--overlap"),
    Case("segment_device_tpu", ("segment", "{ct}", "-o", "{case}/s.nii.gz", "--device", "tpu"), match="tpu"),
    Case("finetune_lr_nan", (*FT, "--lr", "nan"), match="--lr"),
    Case("finetune_lr_inf", (*FT, "--lr", "inf"), match="--lr"),
    Case("finetune_device_tpu", (*FT[:-1], "tpu"), match="unknown device"),
    Case("finetune_feature_size_13", (*FT[:4], "scratch", *FT[5:], "--feature-size", "13"), match="multiple of 12"),
    Case("finetune_preprocessing_not_json", (*FT, "--preprocessing", "{spacing: 1"), match="not JSON"),
    Case("finetune_preprocessing_orientation", (*FT, "--preprocessing", '{"orientation": "XYZ"}'),
         match="orientation"),
    Case("finetune_preprocessing_spacing", (*FT, "--preprocessing", '{"spacing": [0, 1, 1]}'), match="spacing"),
    Case("finetune_preprocessing_window", (*FT, "--preprocessing", '{"intensity": {"a_min": 5, "a_max": 1}}'),
         match="a_min < a_max"),
    Case("finetune_preprocessing_typo", (*FT, "--preprocessing", '{"spcing": [1, 1, 1]}'), match="unknown key"),
    Case("finetune_resume_corrupt_state", (*FT, "--resume"), lambda c: resume_state(c / "run", "{not json"),
         match="unreadable run state"),
    Case("finetune_resume_other_init", (*FT, "--resume"),
         lambda c: resume_state(c / "run", '{"init": "scratch", "options": {}}'), match="same --init"),
    Case("finetune_no_cohort", ("finetune", "--cohort", "{case}/nope", "--init", "scratch", "--out", "{case}/run"),
         match="no such cohort"),
    Case("voco_device_tpu", (*VOCO, "--device", "tpu"), match="unknown device"),
    Case("voco_lr_nan", (*VOCO, "--lr", "nan"), match="--lr"),
    Case("voco_depth_too_small", (*VOCO, "--depth", "16"), match="too small for the network"),
    Case("voco_crop_too_small", (*VOCO, "--crop", "16"), match="too small for the network"),
    Case("voco_feature_size_13", (*VOCO, "--feature-size", "13"), match="multiple of 12"),
    Case("voco_window_reversed", (*VOCO, "--window", "250,-175"), match="--window"),
    Case("voco_spacing_nan", (*VOCO, "--spacing", "nan"), match="--spacing"),
    Case("tokenizer_lr_inf", (*TOK, "--lr", "inf"), match="--lr"),
    Case("tokenizer_device_tpu", (*TOK, "--device", "tpu"), match="unknown device"),
    Case("tokenizer_crop_off_stride", (*TOK, "--crop", "7"), match="--crop"),
    Case("mim_lr_nan", (*MIM, "--lr", "nan"), match="--lr"),
    Case("mim_mask_ratio", (*MIM, "--mask-ratio", "1.5"), match="--mask-ratio"),
    Case("serve_device_tpu", ("serve", "--stdio", "--device", "tpu"), match="unknown device"),
    # item 11: job options after the command; argument errors create no run folder
    Case("run_dir_after_command_bad_input", ("segment", "{case}/missing.nii.gz", "-o", "{case}/s.nii.gz",
                                             "--run-dir", "{case}/rd"), match="no such file"),
    Case("run_dir_before_command_bad_lr", ("--run-dir", "{case}/rd", *FT, "--lr", "nan"), match="--lr"),
    # the rest of the sweep: other unusable images, options and command lines
    _seg("not_an_image", lambda c: _text(c / "afile"), "cannot read image"),
    _seg("single_slice", lambda c: _write(ct_volume(shape=(1, 24, 24)), c / "slice.nii.gz"), "expected a 3D image"),
    _seg("nan_voxels", lambda c: _write(_with_nan(ct_volume()), c / "nan.nii.gz"), "NaN or infinite"),
    _seg("vector_image", lambda c: _write(sitk.Compose([ct_volume()] * 3), c / "rgb.nrrd"), "scalar image"),
    Case("dicom_unknown_series", (*SEG, "--series", "9.9.9"), lambda c: _dicom_dir(c / "dcm"), match="no series"),
    Case("segment_truth_missing", (*SEG[:1], "{ct}", *SEG[2:], "--truth", "{case}/nope.nii.gz"), match="--truth"),
    Case("classify_output_txt", ("classify", "{ct}", "--model", "{cls}", "-o", "{case}/p.txt"),
         match="unsupported output format"),
    Case("finetune_steps_zero", (*FT, "--steps", "0"), match="--steps"),
    Case("finetune_confidence_zero", (*FT, "--confidence", "0"), match="--confidence"),
    Case("finetune_semi_start_above_one", (*FT, "--semi-start", "1.5"), match="--semi-start"),
    Case("finetune_roi_not_multiple_of_32", (*FT, "--roi", "30"), match="--roi"),
    Case("finetune_semi_weight_nan", (*FT, "--semi-weight", "nan"), match="--semi-weight"),
    Case("finetune_weight_decay_negative", (*FT, "--weight-decay", "-1"), match="--weight-decay"),
    Case("finetune_cls_weight_decay_nan", (*FT, "--task", "classification", "--weight-decay", "nan"),
         match="--weight-decay"),
    Case("finetune_missing_init", (*FT[:4], "{case}/nope", *FT[5:]), match="nope"),
    Case("voco_grid_zero", (*VOCO, "--grid", "0"), match="--grid"),
    Case("voco_weight_decay_inf", (*VOCO, "--weight-decay", "inf"), match="--weight-decay"),
    Case("serve_without_stdio", ("serve",), match="--stdio"),
    Case("serve_cache_size_zero", ("serve", "--stdio", "--cache-size", "0"), match="--cache-size"),
    Case("run_dir_is_a_file", ("--run-dir", "{in}", "segment", "{ct}", "-o", "{case}/s.nii.gz", "--model",
                               "{bundle}"), lambda c: _text(c / "afile"), match="cannot create the run directory"),
    Case("events_bogus", ("segment", "{ct}", "-o", "{case}/s.nii.gz", "--events", "bogus"), match="--events"),
    Case("unknown_command", ("segmnet", "{ct}"), match="invalid choice"),
    # item 14 and the papercut: runs that succeed, with one warning line for what is not CT
    Case("segment_mr_like_warns", SEG, lambda c: _write(ct_volume(values=(0, 1000)), c / "mr.nii.gz"), code=0,
         match="do not look like CT", may_write=("seg.nii.gz", "seg.labels.csv"), slow=True),
    Case("segment_all_air_warns", SEG, lambda c: _write(ct_volume(values=(-1000, -999)), c / "air.nii.gz"), code=0,
         match="do not look like CT", may_write=("seg.nii.gz", "seg.labels.csv"), slow=True),
    Case("segment_run_dir_after_command", (*SEG[:1], "{ct}", *SEG[2:], "--run-dir", "{case}/rd"), code=0,
         may_write=("seg.nii.gz", "seg.labels.csv", "rd"), slow=True),
]


def _with_nan(img: sitk.Image) -> sitk.Image:
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    arr[3, 4, 5] = np.nan
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    return out


def _dicom_dir(d: Path) -> Path:
    dicom(d)
    return d


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True)
    return p


def _text(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("not an image\n")
    return p if p.name == "afile" else p.parent


def _write(img: sitk.Image, p: Path) -> Path:
    sitk.WriteImage(img, str(p))
    return p


def _read_only(p: Path) -> Path:
    p.mkdir()
    p.chmod(0o555)
    return p


# ---------------------------------------------------------------------------------------------- the driver
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Shared, never-modified inputs: a CT, a tiny segmentation bundle, a cohort with one labelled case."""
    root = tmp_path_factory.mktemp("world")
    (root / "ctdir").mkdir()
    ct = _write(ct_volume(), root / "ctdir" / "ct.nii.gz")
    label = sitk.GetImageFromArray((sitk.GetArrayFromImage(ct_volume()) > 0).astype(np.uint8))
    label.CopyInformation(ct_volume())
    lab = _write(label, root / "label.nii.gz")
    torch.manual_seed(0)
    args = {"size": None, "feature_size": 12, "out_channels": 3}
    meta = new_bundle_meta("tiny-seg", "1.0.0", "segmentation", "swinunetr", args,
                           preprocessing={"orientation": "RAS", "spacing": [3.0, 3.0, 3.0],
                                          "intensity": {"a_min": -1000.0, "a_max": 1000.0, "b_min": 0.0,
                                                        "b_max": 1.0, "clip": True}},
                           inference={"roi_size": [64, 64, 32], "overlap": 0.25, "mode": "gaussian",
                                      "sw_batch_size": 1})
    net = build_swinunetr(None, feature_size=12, out_channels=3)
    bundle = ModelBundle(meta=meta, labels=LABELS).save(root / "bundle", net.state_dict())
    cls_meta = new_bundle_meta("tiny-cls", "1.0.0", "classification", "voco_classifier",
                               {"size": None, "feature_size": 12, "num_classes": 2}, classes=["a", "b"],
                               inference={"input_size": [32, 32, 32]})
    cls = ModelBundle(meta=cls_meta).save(root / "cls", VoCoClassifier(None, feature_size=12,
                                                                       num_classes=2).state_dict())
    cohort = Cohort.init(root / "cohort")
    cohort.add(ct_volume(), label, LABELS, split="train")
    cohort.add(ct_volume(seed=1), label, LABELS, split="val")
    return {"root": str(root), "ct": str(ct), "ctdir": str(root / "ctdir"), "label": str(lab),
            "bundle": str(bundle), "cls": str(cls), "cohort": str(cohort.root)}


def snapshot(*roots: Path) -> dict[str, tuple[bool, int, int]]:
    """Every path below ``roots`` with (is_dir, size, mtime_ns)."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                st = p.lstat()
                out[str(p)] = (p.is_dir(), 0 if p.is_dir() else st.st_size, 0 if p.is_dir() else st.st_mtime_ns)
    return out


def _fill(arg: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        arg = arg.replace("{" + key + "}", value)
    return arg


def run_case(case: Case, world: dict[str, str], case_dir: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Generate the input, run the command, return the result and the paths it changed outside ``may_write``."""
    made = case.make(case_dir) if case.make else case_dir
    values = {**world, "case": str(case_dir), "in": str(made)}
    argv = [_fill(a, values) for a in case.args]
    before = snapshot(case_dir, Path(world["root"]))
    env = {**os.environ, "VOCOSLICER_HOME": str(case_dir / "home"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "vocoslicer", *argv], capture_output=True, text=True, env=env,
                       timeout=300)
    after = snapshot(case_dir, Path(world["root"]))
    allowed = [str(case_dir / w) for w in case.may_write]
    home = str(case_dir / "home")
    # the VoCoSlicer home and its standard folders are created on first use by any command (vocoslicer.paths):
    # empty folders there are not "left behind"; a file there is
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p)
                     and not any(p == a or p.startswith(a + os.sep) for a in allowed)
                     and not ((p == home or p.startswith(home + os.sep)) and after.get(p, (False,))[0]))
    return r, changed


def check_outcome(case: Case, r: subprocess.CompletedProcess, changed: list[str]) -> list[str]:
    """What is wrong with the outcome (empty: the case passes): exit code, the one line, files left behind."""
    problems = []
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    if r.returncode != case.code:
        problems.append(f"exit code {r.returncode}, expected {case.code}")
    if case.code != 0:
        if len(lines) != 1 or not lines[0].startswith("vocoslicer: error: "):
            problems.append(f"stderr is not one error line: {lines[:6]}")
        elif case.match not in lines[0]:
            problems.append(f"the line does not say {case.match!r}: {lines[0]}")
    elif case.match:
        if lines != [ln for ln in lines if ln.startswith("vocoslicer: warning: ")] or len(lines) != 1 \
                or case.match not in lines[0]:
            problems.append(f"expected one warning line saying {case.match!r}: {lines[:6]}")
    elif lines:
        problems.append(f"unexpected stderr: {lines[:6]}")
    if changed:
        problems.append(f"changed or left behind: {changed[:6]}")
    return problems


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.slow else [])
                                  for c in TABLE])
def test_bad_input(case: Case, world: dict[str, str], tmp_path: Path) -> None:
    if case.needs_non_root and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    r, changed = run_case(case, world, tmp_path)
    problems = check_outcome(case, r, changed)
    assert not problems, f"{case.name}: " + "; ".join(problems)
    if case.name == "finetune_malicious_pickle":
        assert not (tmp_path / "PWNED").exists() and "weights_only" not in r.stderr
    if case.name == "segment_run_dir_after_command":
        assert (tmp_path / "rd" / "run.json").is_file() and (tmp_path / "rd" / "events.jsonl").is_file()


def test_the_malicious_pickle_is_live(tmp_path: Path) -> None:
    """Positive control: unpickled unsafely, the checkpoint really writes its marker (so 'not written' above
    means the loader refused it, not that the payload was inert)."""
    evil = evil_checkpoint(tmp_path / "evil.pt")
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(evil)!r}, weights_only=False)"],
                   check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    assert (tmp_path / "PWNED").exists()


def test_library_output_goes_to_the_job_log(world: dict[str, str], tmp_path: Path) -> None:
    """MetaIO's own stderr lines about a header claiming 1200³ voxels: not on the terminal, in the run's log.txt."""
    big = metaimage_claiming_1200(tmp_path / "big.mha")
    env = {**os.environ, "VOCOSLICER_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "vocoslicer", "segment", str(big), "-o", str(tmp_path / "s.nii.gz"),
                        "--model", world["bundle"], "--run-dir", str(tmp_path / "rd")], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    log = (tmp_path / "rd" / "log.txt").read_text()
    assert "M_ReadElementsData: data not read completely" in log and "vocoslicer.lib" in log
