"""VoCo crop geometry, position labels and losses as pure functions (voco_spec.md §1, §3).

The official code computes the losses with Python loops over volumes, random crops and base-crop pairs. Here
every term is one batched cosine-similarity matrix and masked sums, so a step issues a handful of kernels
instead of hundreds; ``Testing/test_voco_losses.py`` checks equality against a straightforward loop version.

Geometry (v2 default): a volume region of ``n·r × n·r × r`` voxels (192×192×64 for ``r=64, n=3``) is split into
``n²`` base crops on the first two axes (order ``k = i·n + j``, ``i`` along axis 0); ``sw`` random ``r³`` crops
have centres drawn from ``randint(r/2, n·r − r/2)``; a random crop's label for base ``k`` is the fraction of its
axial area that overlaps base ``k``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

EPS = 1e-6


@dataclass(frozen=True)
class VoCoGeometry:
    """Crop size ``roi`` (r), grid ``n`` (n×n base crops), ``sw`` random crops per volume, region ``depth``.

    Crops are ``r × r × depth``; ``depth`` defaults to ``r`` (official: 64³ crops of a 192×192×64 region).
    """

    roi: int = 64
    n: int = 3
    sw: int = 2
    depth: int | None = None

    def __post_init__(self) -> None:
        if self.roi < 2 or self.roi % 2 or self.n < 1 or self.sw < 1 or (self.depth is not None and self.depth < 1):
            raise ValueError(f"VoCo geometry: roi must be even >= 2, n >= 1, sw >= 1 (got {self})")

    @property
    def region(self) -> tuple[int, int, int]:
        """The volume region the crops are cut from: (n·r, n·r, depth) (192×192×64 officially)."""
        return (self.n * self.roi, self.n * self.roi, self.depth or self.roi)

    @property
    def crop_shape(self) -> tuple[int, int, int]:
        """Shape of every random and base crop: (r, r, depth)."""
        return (self.roi, self.roi, self.depth or self.roi)

    @property
    def n_base(self) -> int:
        """Number of base crops (n²)."""
        return self.n * self.n


def base_crop_origins(n: int, roi: int) -> np.ndarray:
    """Lower corners (x, y) of the n² base crops, order ``k = i·n + j`` (i along axis 0). Shape (n², 2)."""
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return np.stack([i.ravel() * roi, j.ravel() * roi], axis=1)


def sample_random_centres(rng: np.random.Generator, sw: int, n: int, roi: int) -> np.ndarray:
    """Centres (x, y) of ``sw`` random crops, each coordinate uniform in [r/2, n·r − r/2) like the official code."""
    lo, hi = roi // 2, n * roi - roi // 2
    return rng.integers(lo, max(hi, lo + 1), size=(sw, 2))  # n = 1 (tiny tests): the one centred crop


def position_labels(centres: np.ndarray, n: int, roi: int) -> np.ndarray:
    """Overlap-area fraction of each random crop (rows) with each base crop (columns): shape (sw, n²), float64."""
    c = np.asarray(centres, dtype=np.float64).reshape(-1, 1, 2)
    lo = base_crop_origins(n, roi).astype(np.float64)[None]  # (1, n², 2)
    d = np.minimum(lo + roi, c + roi / 2) - np.maximum(lo, c - roi / 2)  # (sw, n², 2) overlap per axis
    d = np.where(d > 0, d, 0.0)
    return d[..., 0] * d[..., 1] / float(roi * roi)


def cut_crops(region: np.ndarray, centres: np.ndarray, n: int, roi: int) -> tuple[np.ndarray, np.ndarray]:
    """Random crops at ``centres`` and the n² base crops of a (..., n·r, n·r, Z) region (Z = r officially).

    Returns arrays of shape (sw, ..., r, r, Z) and (n², ..., r, r, Z); views are copied so callers may modify them.
    """
    h = roi // 2
    rand = np.stack([region[..., cx - h:cx + h, cy - h:cy + h, :] for cx, cy in np.asarray(centres)])
    base = np.stack([region[..., x:x + roi, y:y + roi, :] for x, y in base_crop_origins(n, roi)])
    return rand.copy(), base.copy()


def augment_crop(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The official per-crop augmentation: flips p=0.2 per axis, rot90 (k∈1..3) p=0.2 in axes (0,1), shift ±0.1 p=0.5.

    ``crop`` is (C, X, Y, Z) or (X, Y, Z); labels are computed before augmentation, as in the official code.
    """
    sp = crop.ndim - 3
    for ax in range(3):
        if rng.random() < 0.2:
            crop = np.flip(crop, axis=sp + ax)
    if rng.random() < 0.2:
        crop = np.rot90(crop, k=int(rng.integers(1, 4)), axes=(sp, sp + 1))
    if rng.random() < 0.5:
        crop = crop + np.float32(rng.uniform(-0.1, 0.1))
    return np.ascontiguousarray(crop, dtype=np.float32)


# ---------------------------------------------------------------------------------------------------- losses
def relu_cos_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``ReLU(cos(a_p, b_q))`` for every pair: a (..., P, D), b (..., Q, D) → (..., P, Q), computed in float32."""
    a = F.normalize(a.float(), dim=-1, eps=1e-8)
    b = F.normalize(b.float(), dim=-1, eps=1e-8)
    return F.relu(a @ b.transpose(-1, -2))


def prediction_loss(y: torch.Tensor, s: torch.Tensor, version: int = 2) -> torch.Tensor:
    """Official ``ce_loss`` per volume: y, s (B, sw, n²) → (B,). Sums run over each volume's sw×n² entries.

    v2: ``Σ −y·log(1−|y−s|+ε)/(Σy+ε) + Σ −[y=0]·log(1−s+ε)/(Σ[y=0]+ε)``; v1 uses ``Σ[y=0]·s²`` as negative term.
    """
    y, s = y.float(), s.float()
    dims = tuple(range(1, y.dim()))
    pos = (-y * torch.log(1 - (y - s).abs() + EPS)).sum(dims) / (y.sum(dims) + EPS)
    neg_mask = (y == 0).float()
    neg_term = -torch.log(1 - s + EPS) if version == 2 else s * s
    neg = (neg_mask * neg_term).sum(dims) / (neg_mask.sum(dims) + EPS)
    return pos + neg


def regularization_loss(z: torch.Tensor) -> torch.Tensor:
    """Official ``regularization_loss`` per volume: z (B, n², D) → (B,) = mean_{k<l} ReLU(cos(z_k, sg(z_l)))²."""
    k = z.shape[-2]
    if k < 2:  # a single base crop has no pairs (n = 1 grids, used only in tiny tests)
        return z.sum(dim=(-1, -2)) * 0.0
    m = relu_cos_matrix(z, z.detach())
    iu = torch.triu_indices(k, k, offset=1, device=z.device)
    pairs = m[..., iu[0], iu[1]]
    return (pairs * pairs).mean(-1)


def voco_v2_loss(s_rand: torch.Tensor, s_base: torch.Tensor, t_rand: torch.Tensor, t_base: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """VoCo v2 loss from projected embeddings, all volumes at once.

    ``s_*`` student projections (dropped embeddings), ``t_*`` teacher projections; ``*_rand`` (B, sw, D),
    ``*_base`` (B, n², D), ``labels`` (B, sw, n²). intra: student crops vs teacher bases of the same volume;
    inter: student crops vs student bases of volume (i+1) mod B against the teacher's similarities as soft target;
    reg: student bases. Returns (intra + inter + reg averaged over volumes, parts).
    """
    intra = prediction_loss(labels, relu_cos_matrix(s_rand, t_base))
    nxt = torch.roll(torch.arange(s_rand.shape[0], device=s_rand.device), -1)  # j = (i + 1) mod B
    with torch.no_grad():
        target = relu_cos_matrix(t_rand, t_base[nxt])
    inter = prediction_loss(target, relu_cos_matrix(s_rand, s_base[nxt]))
    reg = regularization_loss(s_base)
    parts = {"intra": intra.mean(), "inter": inter.mean(), "reg": reg.mean()}
    return parts["intra"] + parts["inter"] + parts["reg"], parts
