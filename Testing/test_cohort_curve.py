"""What each correction bought: finetunes record labelled-case count and Dice on a frozen validation split;
``cohort curve`` reads those real versions back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vocoslicer.data.cohort import Cohort
from vocoslicer.data.cohort_curve import EVAL_SPLIT, cohort_curve, curve_csv
from vocoslicer.data.phantom import PHANTOM_LABELS, generate_phantom
from vocoslicer.errors import UserError
from vocoslicer.models.bundle import ModelBundle, new_bundle_meta
from vocoslicer.models.factory import build_model
from vocoslicer.train.finetune import FinetuneOptions, run_finetune

PRE = {"orientation": "RAS", "spacing": [8.0, 8.0, 8.0], "pad_value": -1024,
       "intensity": {"a_min": -1000.0, "a_max": 1000.0, "b_min": 0.0, "b_max": 1.0, "clip": True}}
UNET = {"in_channels": 1, "out_channels": 9, "channels": [8, 16], "strides": [2], "num_res_units": 0}


def test_two_finetunes_make_a_curve_on_a_fixed_split(tmp_path: Path, home: Path) -> None:
    torch.manual_seed(0)
    meta = new_bundle_meta("tiny-curve", "1.0.0", "segmentation", "unet", UNET, preprocessing=PRE,
                           inference={"roi_size": [32, 32, 32], "overlap": 0.25, "mode": "gaussian",
                                      "sw_batch_size": 2}, channel_values=[0, *PHANTOM_LABELS.values])
    start = ModelBundle(meta=meta, labels=PHANTOM_LABELS).save(tmp_path / "start",
                                                              build_model("unet", UNET).state_dict())
    cohort = Cohort.init(tmp_path / "cohort")
    phs = [generate_phantom(s, spacing=(8, 8, 8)) for s in range(4)]
    cohort.add(phs[0].image, phs[0].label, PHANTOM_LABELS, split="val", case_id="v0")
    cohort.add(phs[1].image, phs[1].label, PHANTOM_LABELS, split="train", case_id="t1")
    with pytest.raises(UserError, match="no finetuned version"):
        cohort_curve(cohort.root)

    def finetune(init: str, out: str) -> dict:
        return run_finetune(FinetuneOptions(cohort.root, init, tmp_path / out, steps=6, lr=1e-2, batch=1,
                                            semi=False, eval_every=3, device="cpu", amp="off"))

    s1 = finetune(str(start), "r1")
    split = json.loads((cohort.root / EVAL_SPLIT).read_text())
    assert split["cases"] == ["v0"]
    # more corrections: one more training case, and one more validation case the frozen split must ignore
    cohort.add(phs[2].image, phs[2].label, PHANTOM_LABELS, split="train", case_id="t2")
    cohort.add(phs[3].image, phs[3].label, PHANTOM_LABELS, split="val", case_id="v3")
    s2 = finetune(s1["id"], "r2")
    assert json.loads((cohort.root / EVAL_SPLIT).read_text())["cases"] == ["v0"]
    tr = ModelBundle.load(s2["installed"]).meta["training"]
    assert tr["n_labelled"] == 2 and tr["fixed_val"]["cases"] == ["v0"] and tr["n_val"] == 2
    assert set(tr["fixed_val"]["structures"]) <= {lb.name for lb in PHANTOM_LABELS}
    rows = cohort_curve(cohort.root)
    assert [(r["n_labelled"], r["version"]) for r in rows] == [(1, s1["version"]), (2, s2["version"])]
    assert rows[1]["val_dice"] == tr["fixed_val"]["val_dice"] and rows[1]["source"] == s2["installed"]
    assert curve_csv(rows).splitlines()[0].startswith("id,version,n_labelled,n_val,val_dice,dice_")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VOCOSLICER_HOME": str(home)}
    r = subprocess.run([sys.executable, "-m", "vocoslicer", "cohort", "curve", str(cohort.root)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (cohort.root / "curve" / "curve.csv").read_text() == curve_csv(rows)
    assert (cohort.root / "curve" / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{s2['id']}@{s2['version']}" in r.stdout
