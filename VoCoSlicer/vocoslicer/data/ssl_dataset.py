"""VoCo crops from the preprocessing cache: a region per volume, random + base crops, labels, augmentation.

Each item reads one ``n·r × n·r × depth`` region straight from the memory-mapped array (only those voxels are
touched), zero-padding volumes that are smaller (as SpatialPadd + RandSpatialCropd do in the official pipeline),
then cuts the crops and computes the position labels before augmenting every crop independently.

Randomness comes from the torch RNG of the process: the DataLoader seeds each worker from it, and the training
loop seeds/restores it per rank, so runs are reproducible and resumable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torch.utils.data.distributed import DistributedSampler

from vocoslicer.data.cache import Entry, MappedArrays, VolumeCache
from vocoslicer.ssl.voco import VoCoGeometry, augment_crop, cut_crops, position_labels, sample_random_centres


def read_region(arr: np.ndarray, size: Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, tuple]:
    """A random ``size`` window of ``arr`` (centred zero padding where ``arr`` is smaller): (values, slices)."""
    src, dst = [], []
    for dim, want in zip(arr.shape, size, strict=True):
        if dim >= want:
            start = int(rng.integers(0, dim - want + 1))
            src.append(slice(start, start + want))
            dst.append(slice(0, want))
        else:
            off = (want - dim) // 2
            src.append(slice(0, dim))
            dst.append(slice(off, off + dim))
    return np.asarray(arr[tuple(src)]), tuple(dst)


class VoCoCropDataset(Dataset):
    """Item = ``{"random": (sw,1,r,r,d), "base": (n²,1,r,r,d), "labels": (sw,n²)}`` float32 tensors."""

    def __init__(self, cache: VolumeCache, entries: Sequence[Entry], geometry: VoCoGeometry,
                 length: int | None = None, augment: bool = True) -> None:
        if not entries:
            raise ValueError("VoCoCropDataset needs at least one volume")
        self.cache, self.entries, self.geometry = cache, list(entries), geometry
        self.length = int(length) if length else len(self.entries)
        self.augment = augment
        self._maps = MappedArrays()  # per process (workers open their own memory maps)

    def __len__(self) -> int:
        return self.length

    def _array(self, entry: Entry) -> np.ndarray:
        if not entry.cached:
            return self.cache.open(entry)  # streamed: preprocessed now, not kept
        return self._maps.get(self.cache.root / str(entry.file))

    def __getitem__(self, idx: int) -> dict[str, Any]:
        g = self.geometry
        entry = self.entries[idx % len(self.entries)]
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        values, dst = read_region(self._array(entry), g.region, rng)
        return voco_sample(self.cache.cfg.to_unit(values), dst, g, rng, self.augment)


def voco_sample(values: np.ndarray, dst: tuple, g: VoCoGeometry, rng: np.random.Generator,
                augment: bool = True) -> dict[str, torch.Tensor]:
    """Random + base crops and position labels of one region (``values`` in 0..1, placed at ``dst`` of it).

    Shared by pretraining and by finetuning's VoCo loss term so that both see exactly the same crops.
    """
    region = np.zeros((1, *g.region), dtype=np.float32)  # 0 = the bottom of the intensity window
    region[(0, *dst)] = values
    centres = sample_random_centres(rng, g.sw, g.n, g.roi)
    labels = position_labels(centres, g.n, g.roi)
    rand, base = cut_crops(region, centres, g.n, g.roi)
    if augment:
        rand = np.stack([augment_crop(c, rng) for c in rand])
        base = np.stack([augment_crop(c, rng) for c in base])
    return {"random": torch.from_numpy(rand), "base": torch.from_numpy(base),
            "labels": torch.from_numpy(labels.astype(np.float32))}


def voco_loader(dataset: Dataset, batch: int, workers: int = 0, world_size: int = 1, rank: int = 0,
                seed: int = 0, pin_memory: bool = False, prefetch: int = 4) -> DataLoader:
    """Batches of ``batch`` volumes per rank; a DistributedSampler splits the volumes when world_size > 1."""
    if world_size > 1:
        sampler: Any = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                          drop_last=True)
    else:
        sampler = RandomSampler(dataset)
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=prefetch)
    return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True,
                      pin_memory=pin_memory, **kwargs)


def voco_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Training-loop step: flatten crops sample-major (official batch layout) and return the VoCo loss + parts."""
    return model(batch["random"].flatten(0, 1), batch["base"].flatten(0, 1), batch["labels"])
