"""Optional clean-up of label maps: keep only the largest connected component of each label.

Organ models produce small false-positive islands far from the organ; for structures that are one connected
piece (liver, spleen, kidneys, aorta, ...) keeping the largest 3-D component removes them. Off by default, as in
the official VoCo inference, because it is wrong for multi-part structures (tumours, lesions).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F


def keep_largest_component(labels: np.ndarray, values: Iterable[int] | None = None,
                           fully_connected: bool = True) -> np.ndarray:
    """Return a copy of ``labels`` where each listed value (default: all non-zero) keeps its largest component.

    Removed voxels become background (0). Works on the bounding box of each label, so the cost scales with the
    structures, not the volume.
    """
    out = np.array(labels, copy=True)
    present = np.unique(out)
    todo = [int(v) for v in (values if values is not None else present) if int(v) != 0 and int(v) in present]
    for value in todo:
        mask = out == value
        coords = np.nonzero(mask)
        box = tuple(slice(int(c.min()), int(c.max()) + 1) for c in coords)
        crop = mask[box]
        cc = sitk.ConnectedComponent(sitk.GetImageFromArray(crop.astype(np.uint8)), fully_connected)
        ranked = sitk.GetArrayViewFromImage(sitk.RelabelComponent(cc, sortByObjectSize=True))
        sub = out[box]
        sub[crop & (ranked != 1)] = 0
    return out


def keep_largest_component_image(label: sitk.Image, values: Iterable[int] | None = None) -> sitk.Image:
    """Image form of :func:`keep_largest_component` (geometry preserved)."""
    arr = keep_largest_component(sitk.GetArrayViewFromImage(label), values)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(label)
    return out


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


def scores_to_reference_torch(scores: torch.Tensor, grid: sitk.Image, reference: sitk.Image,
                              channel_values: list[int], slab: int = 32) -> sitk.Image:
    """Trilinear resampling of class scores (C, X, Y, Z) onto ``reference``'s grid + argmax, on the scores' device.

    Same result as resampling the scores with SimpleITK and taking the argmax, but on the GPU when the scores
    are there: only a ``C × slab`` block of interpolated scores exists at a time and only the uint8 labels come
    back to the host. Voxels outside the model grid are background.
    """
    c, nx_g, ny_g, nz_g = scores.shape
    if c != len(channel_values):
        from vocoslicer.errors import UserError

        raise UserError(f"the model produced {c} channels but its bundle lists {len(channel_values)} channel values")
    dev = scores.device
    work = scores if dev.type == "cuda" else scores.float()
    vol = work[None]  # (1, C, X, Y, Z): grid_sample's (D, H, W) = (X, Y, Z)
    a, b = _index_map(grid, reference)
    a_t = torch.as_tensor(a, dtype=torch.float32, device=dev)
    b_t = torch.as_tensor(b, dtype=torch.float32, device=dev)
    sizes = torch.tensor([nx_g, ny_g, nz_g], dtype=torch.float32, device=dev)
    scale = 2.0 / torch.clamp(sizes - 1, min=1.0)
    lut = torch.as_tensor(channel_values, device=dev).to(torch.int32)
    nx, ny, nz = reference.GetSize()
    out = np.zeros((nz, ny, nx), dtype=np.uint16 if max(channel_values) > 255 else np.uint8)
    jj, ii = torch.meshgrid(torch.arange(ny, device=dev, dtype=torch.float32),
                            torch.arange(nx, device=dev, dtype=torch.float32), indexing="ij")
    plane = torch.stack([ii, jj], dim=-1)  # (ny, nx, 2): reference (i, j) of one slice
    for k0 in range(0, nz, slab):
        k1 = min(nz, k0 + slab)
        kk = torch.arange(k0, k1, device=dev, dtype=torch.float32)
        idx = torch.cat([plane.expand(k1 - k0, ny, nx, 2), kk[:, None, None, None].expand(k1 - k0, ny, nx, 1)],
                        dim=-1)  # (nk, ny, nx, 3) reference indices (i, j, k)
        q = idx @ a_t.T + b_t  # model-grid indices (x, y, z)
        norm = (q * scale - 1.0).flip(-1)  # grid_sample wants (W, H, D) = (z, y, x), in [-1, 1]
        sampled = F.grid_sample(vol, norm[None].to(vol.dtype), mode="bilinear", padding_mode="zeros",
                                align_corners=True)  # (1, C, nk, ny, nx)
        labels = lut[sampled[0].argmax(dim=0)]
        out[k0:k1] = labels.to(torch.int32).cpu().numpy().astype(out.dtype)
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(reference)
    return img
