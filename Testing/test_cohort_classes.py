"""Case-level classes in the cohort: add --class / set-class with versions and provenance, classes.csv, list, splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from vocoslicer.cli import main
from vocoslicer.data.cohort import Cohort
from vocoslicer.data.cohort_classes import (
    CohortClass,
    class_counts,
    define_classes,
    labelled_cases,
    read_classes_csv,
    set_classes,
)
from vocoslicer.errors import UserError


def image(tmp: Path, seed: int) -> Path:
    arr = np.random.default_rng(seed).normal(size=(8, 8, 8)).astype(np.float32)
    path = tmp / f"img{seed}.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    return path


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_add_set_class_list_and_versions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = str(tmp_path / "c")
    assert main(["cohort", "init", c, "--val-ratio", "0.5"]) == 0
    rc, out, _ = run(["cohort", "add", c, "--image", str(image(tmp_path, 1)), "--class", "normal", "--new-class"],
                     capsys)
    assert rc == 0 and json.loads(out)["class_version"] == 1
    rc, out, _ = run(["cohort", "add", c, "--image", str(image(tmp_path, 2)), "--class", "Splenomegaly",
                      "--class", "liver lesion", "--new-class", "--by", "ann"], capsys)
    case2 = json.loads(out)["case"]
    assert rc == 0
    # a known name in another case: no --new-class needed, matched case-insensitively
    rc, out, _ = run(["cohort", "set-class", c, case2, "splenomegaly", "--by", "bob", "--note", "re-read"], capsys)
    assert rc == 0 and json.loads(out) == {"case": case2, "class_version": 2, "classes": ["Splenomegaly"],
                                           "cohort_version": json.loads(out)["cohort_version"]}
    rows = (tmp_path / "c" / "classes.csv").read_text().splitlines()
    assert rows == ["value,name,snomed", "0,normal,", "1,Splenomegaly,", "2,liver lesion,"]
    rc, out, _ = run(["cohort", "list", c, "--json"], capsys)
    data = json.loads(out)
    assert data["class_counts"] == {"normal": 1, "Splenomegaly": 1, "liver lesion": 0}
    case = next(x for x in data["cases"] if x["id"] == case2)
    assert case["classes"] == ["Splenomegaly"]
    hist = case["class_versions"]
    assert [v["classes"] for v in hist] == [["Splenomegaly", "liver lesion"], ["Splenomegaly"]]
    assert [v["provenance"]["by"] for v in hist] == ["ann", "bob"] and hist[1]["provenance"]["note"] == "re-read"
    assert all(v["provenance"]["time"] > 0 for v in hist)
    rc, out, _ = run(["cohort", "list", c], capsys)
    assert "classes: normal 1, Splenomegaly 1, liver lesion 0" in out and "class Splenomegaly (v2 by bob" in out
    rc, out, _ = run(["cohort", "classes", c, "--add", "splenomegaly", "--snomed", "16294009"], capsys)
    assert rc == 0 and "1,Splenomegaly,16294009" in (tmp_path / "c" / "classes.csv").read_text()


def test_unknown_class_is_refused_and_nothing_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = tmp_path / "c"
    Cohort.init(c)
    before = sorted(p.name for p in c.rglob("*"))
    version = Cohort(c).version
    rc, _, err = run(["cohort", "add", str(c), "--image", str(image(tmp_path, 1)), "--class", "splenomegaly"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "unknown class 'splenomegaly'" in err and "--new-class" in err
    assert sorted(p.name for p in c.rglob("*")) == before and Cohort(c).version == version  # no image stored
    Cohort(c).add(image(tmp_path, 2))
    rc, _, err = run(["cohort", "set-class", str(c), "case0001", "typo"], capsys)
    assert rc == 2 and "unknown class" in err
    rc, _, err = run(["cohort", "set-class", str(c), "case0009", "x", "--new-class"], capsys)
    assert rc == 2 and "no case 'case0009'" in err
    assert not (c / "classes.csv").exists()


def test_stratified_split_is_stable_and_cases_keep_label_maps_apart(tmp_path: Path) -> None:
    c = Cohort.init(tmp_path / "c", val_ratio=0.25)
    for seed in range(8):
        cid = c.add(image(tmp_path, seed)).case_id
        set_classes(c, cid, ["normal" if seed % 2 else "splenomegaly"], allow_new=True)
    cases = labelled_cases(c)
    val = {x.classes[0] for x in cases if x.split == "val"}
    assert val == {"normal", "splenomegaly"} and sum(x.split == "val" for x in cases) == 2  # one val case per class
    splits = {x.id: x.split for x in cases}
    set_classes(c, "case0001", ["normal"])  # re-classify: assignments never move
    assert {x.id: x.split for x in labelled_cases(c)} == splits
    assert class_counts(c.manifest) == {"splenomegaly": 3, "normal": 5}
    assert not any(case.labelled for case in c.cases())  # classes are not label maps


def test_classes_csv_and_define(tmp_path: Path) -> None:
    csv = tmp_path / "classes.csv"
    csv.write_text("value,name,snomed\n0,normal,\n1,splenomegaly,16294009\n")
    table = read_classes_csv(csv)
    assert table == [CohortClass(0, "normal"), CohortClass(1, "splenomegaly", "16294009")]
    c = Cohort.init(tmp_path / "c")
    define_classes(c, table)
    with pytest.raises(UserError, match="class value 1 is 'splenomegaly'"):
        define_classes(c, [CohortClass(1, "pneumonia")])
    csv.write_text("0,a\n0,b\n")
    with pytest.raises(UserError, match="unique"):
        read_classes_csv(csv)
    with pytest.raises(UserError, match="no comma"):
        set_classes(c, c.add(image(tmp_path, 0)).case_id, ['a"b'], allow_new=True)
