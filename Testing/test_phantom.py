"""Synthetic CT phantom: determinism, labels, grid, anatomy in physical space, orientation, files and CLI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from vocoslicer.data.phantom import PHANTOM_LABELS, SLICE_SPACINGS, generate_phantom, write_phantom
from vocoslicer.errors import UserError
from vocoslicer.io.volume import read_image, same_grid
from vocoslicer.labels import LabelTable

SMALL = (4.0, 4.0, 4.0)


def _arrays(ph):
    return sitk.GetArrayFromImage(ph.image), sitk.GetArrayFromImage(ph.label)


def _centroids(label: sitk.Image) -> dict[int, np.ndarray]:
    """Physical (LPS, mm) centroid of every label value."""
    arr = sitk.GetArrayViewFromImage(label)
    out = {}
    for v in range(1, 9):
        idx = np.argwhere(arr == v)[:, ::-1].mean(axis=0)  # (x, y, z) continuous index
        out[v] = np.array(label.TransformContinuousIndexToPhysicalPoint(idx.tolist()))
    return out


def test_labels_table():
    assert PHANTOM_LABELS.values == list(range(1, 9))
    names = [lb.name for lb in PHANTOM_LABELS]
    assert names == ["liver", "spleen", "kidney_right", "kidney_left", "aorta", "vertebrae", "stomach", "lungs"]
    assert len({lb.rgb for lb in PHANTOM_LABELS}) == 8
    assert PHANTOM_LABELS.by_name("liver").type_code == "SCT^10200004"
    assert PHANTOM_LABELS.by_name("kidney_left").type_code == "SCT^18639004"


def test_deterministic_by_seed():
    a, b, c = (generate_phantom(s, spacing=SMALL) for s in (5, 5, 6))
    ia, la = _arrays(a)
    ib, lb = _arrays(b)
    ic, _ = _arrays(c)
    assert np.array_equal(ia, ib) and np.array_equal(la, lb)
    assert same_grid(a.image, b.image, tol=0)
    assert ia.shape != ic.shape or not np.array_equal(ia, ic)
    r1, r2 = (generate_phantom(9, spacing=SMALL, random_orientation=True) for _ in range(2))
    assert np.array_equal(_arrays(r1)[0], _arrays(r2)[0]) and same_grid(r1.image, r2.image, tol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_label_present_with_plausible_volume_and_hu(seed):
    ph = generate_phantom(seed, spacing=SMALL)
    img, lab = _arrays(ph)
    assert img.dtype == np.int16 and lab.dtype == np.uint8
    assert set(np.unique(lab).tolist()) == set(range(0, 9))
    ml = {v: np.count_nonzero(lab == v) * 64 / 1000 for v in range(1, 9)}
    hu = {v: float(img[lab == v].mean()) for v in range(1, 9)}
    volume_ranges = {1: (500, 3500), 2: (40, 600), 3: (50, 350), 4: (50, 350), 5: (40, 250), 6: (150, 900),
                     7: (50, 600), 8: (100, 4000)}
    for v, (lo, hi) in volume_ranges.items():
        assert lo < ml[v] < hi, (PHANTOM_LABELS.by_value(v).name, ml[v])
    assert 35 < hu[1] < 85
    assert 35 < float(np.median(img[lab == 2])) < 70  # median: thin spleen edges may touch bowel gas
    assert hu[8] < -600
    assert hu[6] > 250
    assert hu[3] > hu[1] + 40 and hu[4] > hu[1] + 40
    assert hu[5] > 120
    assert img.min() >= -1024 and img.max() <= 3071
    assert np.all(img[0, :3, :3] < -900)  # corner of the field of view is air


def test_grid_overrides_and_default_spacing():
    ph = generate_phantom(3, spacing=(2.0, 2.5, 3.0), size=(40, 36, 20))
    assert ph.image.GetSize() == (40, 36, 20) and ph.image.GetSpacing() == (2.0, 2.5, 3.0)
    assert same_grid(ph.image, ph.label, tol=0)
    # grid centred on the body: the middle of the field of view is at the body centre (x = 0 midline)
    centre = ph.image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in ph.image.GetSize()])
    assert np.allclose(centre, 0.0, atol=1e-6)
    for seed in range(4):  # default spacing: random in-plane 0.6-1.0 mm, anisotropic slices from the list
        sp = generate_phantom(seed, size=(16, 16, 16)).image.GetSpacing()
        assert 0.6 <= sp[0] == sp[1] <= 1.0 and sp[2] in SLICE_SPACINGS
    # the same seed is the same patient at another spacing: organ volumes agree
    fine = generate_phantom(4, spacing=(2.0, 2.0, 2.0))
    coarse = generate_phantom(4, spacing=SMALL)
    v_f = np.count_nonzero(sitk.GetArrayViewFromImage(fine.label) == 1) * 8
    v_c = np.count_nonzero(sitk.GetArrayViewFromImage(coarse.label) == 1) * 64
    assert abs(v_f - v_c) / v_f < 0.05


def test_partial_volume_edges_are_not_binary():
    ph = generate_phantom(2, spacing=SMALL, noise_hu=0)
    img, lab = _arrays(ph)
    liver_core = img[lab == 1]
    # with no noise, voxels at the liver edge mix liver and fat: values strictly between the two
    between = np.count_nonzero((img > -60) & (img < 20) & ((lab == 1) | (lab == 0)))
    assert between > 50
    assert np.percentile(liver_core, 90) - np.percentile(liver_core, 10) < 60


@pytest.mark.parametrize("seed", [0, 3, 7])
def test_anatomy_in_physical_space(seed):
    c = _centroids(generate_phantom(seed, spacing=SMALL).label)
    liver, spleen, k_r, k_l, aorta, vert, stomach, lungs = (c[v] for v in range(1, 9))
    assert liver[0] < 0 < spleen[0]  # liver on the patient's right (LPS: -x), spleen left
    assert k_r[0] < vert[0] < k_l[0]
    assert k_r[2] < k_l[2]  # right kidney slightly lower
    assert lungs[2] > k_r[2] + 50 and lungs[2] > k_l[2] + 50
    assert vert[1] > aorta[1]  # LPS: +y is posterior
    assert aorta[0] > vert[0]  # aorta left of the midline
    assert stomach[0] > 0 and stomach[1] < vert[1]
    assert spleen[1] > stomach[1]  # spleen posterior to stomach


def test_random_orientation_keeps_physical_anatomy():
    directions = set()
    for seed in range(4):
        plain = generate_phantom(seed, spacing=SMALL)
        moved = generate_phantom(seed, spacing=SMALL, random_orientation=True)
        directions.add(moved.image.GetDirection())
        assert same_grid(moved.image, moved.label, tol=0)
        d = np.array(moved.image.GetDirection()).reshape(3, 3)
        assert np.allclose(np.abs(d).sum(axis=0), 1) and np.allclose(d @ d.T, np.eye(3))
        cp, cm = _centroids(plain.label), _centroids(moved.label)
        assert cm[1][0] < cm[2][0] and cm[6][1] > cm[5][1] and cm[8][2] > cm[3][2]
        # only a rigid translation separates the two: resampling one onto the other is exact
        shift = cm[6] - cp[6]
        for v in range(1, 9):
            assert np.allclose(cm[v] - cp[v], shift, atol=1e-3)
        back = sitk.Resample(moved.label, plain.label, sitk.TranslationTransform(3, shift.tolist()),
                             sitk.sitkNearestNeighbor)
        assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(plain.label))
    assert len(directions) > 1 and any(dr != (1, 0, 0, 0, 1, 0, 0, 0, 1) for dr in directions)


@pytest.mark.parametrize("bad", [dict(spacing=(0, 1, 1)), dict(spacing=(1, float("nan"), 1)), dict(size=(8, 32, 32)),
                                 dict(spacing=(1, 1)), dict(noise_hu=-1.0)])
def test_bad_arguments_raise_user_error(bad):
    with pytest.raises(UserError):
        generate_phantom(0, **bad)


def test_write_phantom(tmp_path):
    ph = generate_phantom(11, spacing=SMALL, random_orientation=True)
    paths = write_phantom(ph, tmp_path / "out", ".nrrd")
    assert set(paths) == {"image", "label", "labels"}
    assert paths["image"].name == "phantom_11_ct.nrrd" and paths["label"].name == "phantom_11_truth.nrrd"
    img, lab = read_image(paths["image"]), read_image(paths["label"])
    assert same_grid(img, ph.image) and same_grid(lab, ph.image)
    assert np.array_equal(sitk.GetArrayViewFromImage(lab), sitk.GetArrayViewFromImage(ph.label))
    assert LabelTable.read_csv(paths["labels"]) == PHANTOM_LABELS
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files left


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "vocoslicer", "phantom", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_writes_readable_files(tmp_path):
    out = tmp_path / "ph"
    r = _cli("--seed", "3", "--count", "2", "-o", str(out), "--spacing", "4", "4", "4", "--format", ".mha",
             "--random-orientation")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    names = ("phantom_3_ct.mha", "phantom_3_truth.mha", "phantom_labels.csv", "phantom_4_ct.mha", "phantom_4_truth.mha")
    assert sorted(lines) == sorted(str(out / n) for n in names)
    for seed in (3, 4):
        img = read_image(out / f"phantom_{seed}_ct.mha")
        lab = read_image(out / f"phantom_{seed}_truth.mha")
        assert same_grid(img, lab) and img.GetSpacing() == (4.0, 4.0, 4.0)
        ref = generate_phantom(seed, spacing=SMALL, random_orientation=True)
        assert np.array_equal(sitk.GetArrayViewFromImage(img), sitk.GetArrayViewFromImage(ref.image))
    assert LabelTable.read_csv(out / "phantom_labels.csv") == PHANTOM_LABELS


@pytest.mark.parametrize("bad", [["--spacing", "0", "4", "4"], ["--spacing", "-1", "4", "4"],
                                 ["--size", "8", "40", "40"], ["--count", "0"]])
def test_cli_bad_options_exit_2_and_write_nothing(tmp_path, bad):
    out = tmp_path / "ph"
    r = _cli("-o", str(out), *bad)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.strip()
    assert r.stderr.strip().splitlines()[0].startswith("vocoslicer: error:")
    assert not out.exists() or not any(out.iterdir())
