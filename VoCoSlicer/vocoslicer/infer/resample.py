"""Model grid → input grid: label maps (nearest neighbour) and class scores (trilinear, then argmax).

The model sees the input reoriented and resampled (:mod:`vocoslicer.infer.preprocess`); the answer must come back
on the input's exact grid. Labels go back with SimpleITK's nearest-neighbour resampler (the official
``Invertd(nearest_interp=True)``); scores go back on the device they were computed on, by separable 1-D
interpolations when the two grids differ by an axis permutation/flip and a spacing change (the usual case), or by
``grid_sample`` for an oblique map, so that only uint8 labels ever reach the host.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F


def labels_to_reference(labels: np.ndarray, grid: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Nearest-neighbour resampling of a model-grid label map (X, Y, Z array) onto ``reference``'s exact grid.

    The fast path's way back (what the official pipeline does with ``Invertd(nearest_interp=True)``): only one
    byte per voxel ever exists at the input resolution. Voxels outside the model grid become background.
    """
    arr = np.ascontiguousarray(np.asarray(labels).transpose(2, 1, 0))  # (X, Y, Z) -> SimpleITK's (Z, Y, X)
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(grid)
    out = sitk.Resample(img, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, img.GetPixelID())
    out.CopyInformation(reference)
    return out


def _index_map(grid: sitk.Image, reference: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) with model-grid continuous index = A @ reference index + b (both in SimpleITK x, y, z order)."""
    d_r = np.asarray(reference.GetDirection(), dtype=np.float64).reshape(3, 3)
    d_g = np.asarray(grid.GetDirection(), dtype=np.float64).reshape(3, 3)
    s_r = np.diag(reference.GetSpacing())
    inv_s_g = np.diag(1.0 / np.asarray(grid.GetSpacing(), dtype=np.float64))
    a = inv_s_g @ d_g.T @ d_r @ s_r
    b = inv_s_g @ d_g.T @ (np.asarray(reference.GetOrigin()) - np.asarray(grid.GetOrigin()))
    return a, b


def _axis_map(a: np.ndarray, tol: float = 1e-4) -> list[int] | None:
    """Reference axis feeding each model axis when ``a`` is a scaled signed permutation (else None)."""
    perm = [int(np.argmax(np.abs(row))) for row in a]
    if sorted(perm) != [0, 1, 2]:
        return None
    for m, r in enumerate(perm):
        off = np.abs(np.delete(a[m], r)).max()
        if off > tol * max(abs(a[m, r]), 1e-12):
            return None
    return perm


def _lerp_axis(t: torch.Tensor, dim: int, q: torch.Tensor, size: int) -> torch.Tensor:
    """Linear interpolation of ``t`` along ``dim`` at continuous indices ``q`` (edge values up to half a voxel
    outside, like ITK's buffer test; zero beyond, which the argmax reads as background)."""
    qc = torch.clamp(q, 0, size - 1)
    i0 = torch.floor(qc)
    w = (qc - i0).to(t.dtype)
    i0 = i0.long()
    valid = ((q >= -0.5) & (q < size - 0.5)).to(t.dtype)
    lo = torch.clamp(i0, 0, size - 1)
    hi = torch.clamp(i0 + 1, 0, size - 1)
    # gathers along a middle dimension are slow on the CPU: move the axis to the front (one contiguous copy)
    front = t.transpose(0, dim).contiguous()
    v0 = front[lo]  # advanced indexing: much faster than index_select on the CPU
    v1 = front[hi]
    shape = [-1] + [1] * (t.dim() - 1)
    v1.sub_(v0).mul_(w.view(shape)).add_(v0).mul_(valid.view(shape))
    return v1.transpose(0, dim)


def _argmax_channels(block: torch.Tensor) -> torch.Tensor:
    """argmax over dim 0 as a running maximum (fast on any memory layout, no int64 index tensor per channel)."""
    best = block[0].clone()
    idx = torch.zeros(best.shape, dtype=torch.uint8, device=block.device)
    for ch in range(1, block.shape[0]):
        better = block[ch] > best
        best = torch.where(better, block[ch], best)
        idx[better] = ch
    return idx


def scores_to_reference_torch(scores: torch.Tensor, grid: sitk.Image, reference: sitk.Image,
                              channel_values: list[int], slab: int = 16) -> sitk.Image:
    """Trilinear resampling of class scores (C, X, Y, Z) onto ``reference``'s grid + argmax, on the scores' device.

    The model grid comes from the input by an axis permutation/flip (``DICOMOrient``) and a spacing change, so
    the map between the two index spaces is a scaled signed permutation and trilinear interpolation separates
    into three 1-D interpolations (gathers + lerps): about ``C`` operations per output voxel instead of the 8-corner
    gathers of a general resampler. Only a ``C × slab`` block of interpolated scores exists at a time (on the GPU
    when the scores are there) and only uint8 labels come back to the host. Voxels outside the model grid are
    background. A general oblique map falls back to ``grid_sample``.
    """
    c, *gsize = scores.shape
    if c != len(channel_values):
        from vocoslicer.errors import UserError

        raise UserError(f"the model produced {c} channels but its bundle lists {len(channel_values)} channel values")
    dev = scores.device
    work = scores if dev.type == "cuda" else scores.float()
    a, b = _index_map(grid, reference)
    perm = _axis_map(a)
    lut = torch.as_tensor(channel_values, device=dev).to(torch.int32)
    nx, ny, nz = reference.GetSize()
    out = np.zeros((nz, ny, nx), dtype=np.uint16 if max(channel_values) > 255 else np.uint8)
    for k0 in range(0, nz, slab):
        k1 = min(nz, k0 + slab)
        if perm is None:
            block = _grid_sample_block(work, a, b, (nx, ny), k0, k1)  # (C, nk, ny, nx)
        else:
            t = work
            ranges = {0: (0, nx), 1: (0, ny), 2: (k0, k1)}
            # the reference-z axis first: it shrinks the tensor to the slab before the two big upsamplings
            for m in sorted(range(3), key=lambda m: perm[m] != 2):
                r = perm[m]
                lo, hi = ranges[r]
                idx = torch.arange(lo, hi, device=dev, dtype=torch.float64)
                q = (a[m, r] * idx + b[m]).to(torch.float32)
                t = _lerp_axis(t, 1 + m, q, gsize[m])
            # dims 1..3 hold model axes 0..2, now sampled at reference axes perm[0..2]; order them as (z, y, x)
            block = t.permute(0, *[1 + perm.index(r) for r in (2, 1, 0)])
        labels = lut[_argmax_channels(block).long()]
        out[k0:k1] = labels.cpu().numpy().astype(out.dtype)
        del block, labels
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(reference)
    return img


def _grid_sample_block(vol: torch.Tensor, a: np.ndarray, b: np.ndarray, plane: tuple[int, int], k0: int,
                       k1: int) -> torch.Tensor:
    """Scores (C, nk, ny, nx) of reference slices k0..k1 by general trilinear ``grid_sample`` (oblique maps)."""
    dev = vol.device
    nx, ny = plane
    sizes = torch.tensor(vol.shape[1:], dtype=torch.float32, device=dev)
    scale = 2.0 / torch.clamp(sizes - 1, min=1.0)
    kk, jj, ii = torch.meshgrid(torch.arange(k0, k1, device=dev, dtype=torch.float32),
                                torch.arange(ny, device=dev, dtype=torch.float32),
                                torch.arange(nx, device=dev, dtype=torch.float32), indexing="ij")
    idx = torch.stack([ii, jj, kk], dim=-1)  # reference indices (i, j, k)
    q = idx @ torch.as_tensor(a, dtype=torch.float32, device=dev).T + torch.as_tensor(b, dtype=torch.float32,
                                                                                        device=dev)
    norm = (q * scale - 1.0).flip(-1)  # grid_sample wants (W, H, D) = (z, y, x), in [-1, 1]
    sampled = F.grid_sample(vol[None], norm[None].to(vol.dtype), mode="bilinear", padding_mode="border",
                            align_corners=True)[0]
    valid = ((q >= -0.5) & (q < sizes - 0.5)).all(dim=-1)  # same half-voxel rule as the separable path
    return sampled * valid.to(sampled.dtype)
