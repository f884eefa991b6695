"""Preprocessing cache: RAS/spacing/window, reuse across runs, bad volumes, LRU limit and streaming, memmap crops."""

from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk
import torch

from vocoslicer.data.cache import PreprocessConfig, VolumeCache, find_sources, preprocess
from vocoslicer.data.phantom import generate_phantom, write_phantom
from vocoslicer.data.ssl_dataset import VoCoCropDataset, read_region, voco_loader
from vocoslicer.ssl.voco import VoCoGeometry


def _volume(path, size=(40, 36, 20), spacing=(1.0, 1.0, 2.5), value=40):
    arr = np.full(size[::-1], -1000, dtype=np.int16)  # (z, y, x)
    arr[2:-2, 4:-4, 5:-5] = value
    arr[:, :, 5] = 200  # a bright plane at x index 5, to check the orientation
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))
    return path


def test_preprocess_orientation_spacing_window(tmp_path):
    src = find_sources([_volume(tmp_path / "a.nii.gz")])[0]
    cfg = PreprocessConfig(spacing=(2.0, 2.0, 2.5), crop_foreground=False, min_size=4)
    arr, meta = preprocess(src, cfg)
    assert arr.dtype == np.int16 and arr.shape == (20, 18, 20)  # (x,y,z) at 2 mm in-plane
    assert arr.min() == -175 and arr.max() == 200
    # RAS flips the LPS x axis: the plane at x index 5 (of 40) lands near index (39 - 5) / 2 = 17
    assert int(np.argmax(arr[:, 9, 10])) in (16, 17)
    unit = cfg.to_unit(np.array([-175, 250], dtype=np.int16))
    np.testing.assert_allclose(unit, [0.0, 1.0])
    u8 = PreprocessConfig(spacing=None, dtype="uint8", min_size=4)
    arr8, _ = preprocess(src, u8)
    assert arr8.dtype == np.uint8 and arr8.shape == (30, 36, 20)  # x: plane..box
    np.testing.assert_allclose(u8.to_unit(arr8).max(), 375 / 425, atol=1 / 255)  # 200 HU


def test_find_sources_skips_label_maps(tmp_path):
    ph = generate_phantom(1, spacing=(6, 6, 6), size=(32, 32, 16))
    write_phantom(ph, tmp_path / "d")
    (tmp_path / "d" / "labelsTr").mkdir()
    _volume(tmp_path / "d" / "labelsTr" / "x.nii.gz")
    names = [s.path.rsplit("/", 1)[-1] for s in find_sources([tmp_path / "d"])]
    assert names == ["phantom_1_ct.nii.gz"]


def test_reuse_bad_volumes_and_limit(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    a = _volume(d / "a.nii.gz")
    b = _volume(d / "b.nrrd", size=(44, 40, 24))
    (d / "broken.nii.gz").write_bytes(b"not an image at all" * 10)
    _volume(d / "tiny.mha", size=(6, 6, 6))
    flat = np.zeros((1, 30, 30), dtype=np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(flat), str(d / "flat.nii.gz"))
    cfg = PreprocessConfig(spacing=None, min_size=8)
    warnings: list[str] = []
    cache = VolumeCache(tmp_path / "cache", cfg)
    entries, bad = cache.prepare(find_sources([d]), on_warning=warnings.append)
    assert sorted(e.source.path.rsplit("/", 1)[-1] for e in entries) == ["a.nii.gz", "b.nrrd"]
    assert sorted(s.rsplit("/", 1)[-1] for s, _ in bad) == ["broken.nii.gz", "flat.nii.gz", "tiny.mha"]
    assert len(warnings) == 3 and all(e.cached for e in entries)
    sizes = {e.source.path.rsplit("/", 1)[-1]: e.nbytes for e in entries}
    assert cache.size_bytes() == sum(sizes.values())  # the cache is exactly the int16 arrays
    npy = sorted((tmp_path / "cache" / "volumes").glob("*.npy"))
    mtimes = [p.stat().st_mtime_ns for p in npy]

    # second run: everything reused, bad volumes remembered (not re-read)
    again, bad2 = VolumeCache(tmp_path / "cache", cfg).prepare(find_sources([d]))
    assert [e.key for e in again] == [e.key for e in entries] and len(bad2) == 3
    assert [p.stat().st_mtime_ns for p in npy] == mtimes

    # a run over b only, with room for b alone: a (not needed by this run) is evicted
    small = VolumeCache(tmp_path / "cache", cfg, limit_bytes=sizes["b.nrrd"] + 10)
    only_b, _ = small.prepare(find_sources([b]))
    assert only_b[0].cached and small.size_bytes() == sizes["b.nrrd"]
    # now both are needed but only one fits: a is streamed, never written
    both, _ = small.prepare(find_sources([a, b]))
    streamed = [e for e in both if not e.cached]
    assert [e.source.path for e in streamed] == [str(a)] and small.size_bytes() <= sizes["b.nrrd"] + 10
    assert small.open(streamed[0]).shape == streamed[0].shape
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert len(index["entries"]) == 1 and len(index["bad"]) == 3

    # changing the file makes a new entry (key includes mtime and size)
    _volume(a, value=60)
    assert VolumeCache(tmp_path / "cache", cfg).key(find_sources([a])[0]) != both[0].key


def test_region_padding_and_dataset_items(tmp_path):
    rng = np.random.default_rng(0)
    arr = np.arange(5 * 12 * 7).reshape(5, 12, 7)
    vals, dst = read_region(arr, (8, 6, 7), rng)
    assert vals.shape == (5, 6, 7) and dst[0] == slice(1, 6) and dst[2] == slice(0, 7)
    ph = generate_phantom(2, spacing=(5, 5, 5), size=(64, 56, 40))
    write_phantom(ph, tmp_path / "p")
    cache = VolumeCache(tmp_path / "c", PreprocessConfig(spacing=(6.0, 6.0, 6.0)))
    entries, bad = cache.prepare(find_sources([tmp_path / "p"]))
    assert len(entries) == 1 and not bad
    geo = VoCoGeometry(roi=16, n=3, sw=2, depth=8)
    ds = VoCoCropDataset(cache, entries, geo, length=4)
    assert isinstance(ds._array(entries[0]), np.memmap)  # crops come from the memory map
    torch.manual_seed(0)
    batch = next(iter(voco_loader(ds, batch=2, workers=0)))
    assert batch["random"].shape == (2, 2, 1, 16, 16, 8) and batch["base"].shape == (2, 9, 1, 16, 16, 8)
    assert batch["labels"].shape == (2, 2, 9)
    torch.testing.assert_close(batch["labels"].sum(-1), torch.ones(2, 2))
    assert batch["base"].min() >= -0.11 and batch["base"].max() <= 1.11 and batch["base"].std() > 0.01
    # the same torch seed gives the same item (the loop restores the RNG on resume)
    torch.manual_seed(5)
    x = ds[0]["base"]
    torch.manual_seed(5)
    torch.testing.assert_close(ds[0]["base"], x)


def test_mapped_arrays_bound_open_descriptors_and_are_not_pickled(tmp_path):
    import os
    import pickle

    from vocoslicer.data.cache import MappedArrays

    paths = []
    for i in range(40):
        paths.append(tmp_path / f"{i}.npy")
        np.save(paths[-1], np.full((4, 4, 4), i, np.int16))
    maps = MappedArrays(limit=4)
    fd_dir = "/proc/self/fd"
    before = len(os.listdir(fd_dir)) if os.path.isdir(fd_dir) else None
    for p in paths * 2:
        assert int(maps.get(p)[0, 0, 0]) == int(p.stem)
    assert len(maps) == 4
    if before is not None:  # each open map holds a descriptor: one per volume would be 40 here
        assert len(os.listdir(fd_dir)) - before <= 4
    clone = pickle.loads(pickle.dumps(maps))  # DataLoader workers start with no maps of the parent
    assert len(clone) == 0 and clone.limit == 4 and len(pickle.dumps(maps)) < 200
