"""The bundled demo model: it loads, and it segments held-out phantoms well through the real pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from helpers_io import run_cli

from vocoslicer.data.phantom import PHANTOM_LABELS, generate_phantom
from vocoslicer.infer.segment import segment_image
from vocoslicer.io import read_image, same_grid
from vocoslicer.metrics import dice_per_label
from vocoslicer.models.installed import DEMO_MODEL_ID, demo_bundle_path, resolve

HELD_OUT = (1000, 1001, 1002)  # never used in training or model selection (see the bundle's README.md)
MIN_MEAN_DICE = 0.85  # issue 2; the bundled v1.1.0 measures 0.956 at full resolution (its README.md)
MIN_LABEL_DICE = 0.5  # every structure is found (v1.0.0 had a 0.80 mean with the stomach at Dice 0)

pytestmark = pytest.mark.skipif(not (demo_bundle_path() / "model.json").is_file(), reason="demo model not bundled")


def test_demo_bundle_is_complete_and_small():
    bundle = resolve(None)
    assert bundle.id == DEMO_MODEL_ID and bundle.task == "segmentation"
    assert [lb.name for lb in bundle.labels] == [lb.name for lb in PHANTOM_LABELS]
    size = sum(p.stat().st_size for p in demo_bundle_path().iterdir())
    assert size <= 25 * 1024 * 1024
    assert (demo_bundle_path() / "README.md").is_file()
    bundle.build_model()  # weights match the architecture, sha256 verified


@pytest.mark.slow  # ~50 s on one CPU core: three full phantoms through sliding-window inference
def test_demo_model_dice_on_held_out_phantoms():
    bundle = resolve(None)
    model = bundle.build_model().eval()
    means = []
    for seed in HELD_OUT:
        # a 2 mm grid keeps the test quick; the anatomy of a seed does not depend on the grid
        ph = generate_phantom(seed, spacing=(2.0, 2.0, 2.0), random_orientation=True)
        pred = segment_image(ph.image, bundle, model=model, device="cpu")
        assert same_grid(pred, ph.image)
        scores = dice_per_label(sitk.GetArrayViewFromImage(pred), sitk.GetArrayViewFromImage(ph.label),
                                PHANTOM_LABELS.values)
        means.append(np.nanmean(list(scores.values())))
        assert np.nanmin(list(scores.values())) >= MIN_LABEL_DICE, (seed, scores)
    assert np.mean(means) >= MIN_MEAN_DICE, means


@pytest.mark.slow  # ~27 s on one CPU core: a child process loads torch, MONAI and the model
def test_segment_cli_with_default_model(tmp_path):
    ph = generate_phantom(1003, spacing=(4.0, 4.0, 4.0))
    from vocoslicer.data.phantom import write_phantom

    files = write_phantom(ph, tmp_path)
    out = tmp_path / "seg.nii.gz"
    r = run_cli("segment", str(files["image"]), "-o", str(out), "--truth", str(files["label"]))
    assert r.returncode == 0, r.stderr
    assert "mean" in r.stdout and (tmp_path / "seg.labels.csv").is_file()
    assert same_grid(read_image(out), ph.image)
