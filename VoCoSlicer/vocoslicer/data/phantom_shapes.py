"""Drawing primitives of the CT phantom: an axis-aligned canvas in millimetres and signed distances.

Each structure is described by an approximate signed distance ``d`` in mm (negative inside) evaluated only inside
its bounding box, so a whole abdomen costs a few passes over the volume. Partial volume comes from the distance
itself (a voxel whose centre lies within half a voxel of a surface gets a proportional mix of both sides), which
is much cheaper than blurring the volume and keeps "label = structure at the voxel centre" exact. Shapes are made
separable where possible (in-plane 2D terms + a 1D z term, broadcast), which is why rotations are about z only and
the remaining variation comes from a smooth random displacement of the surface.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# label values of PHANTOM_LABELS (vocoslicer.data.phantom)
LIVER, SPLEEN, KIDNEY_R, KIDNEY_L, AORTA, VERTEBRAE, STOMACH, LUNGS = range(1, 9)
Box = tuple[slice, slice, slice]  # numpy order (z, y, x)
_SLAB = 1 << 18  # voxels per slab in paint(): ~1 MB float32 temporaries


class Canvas:
    """A float32 HU volume and a uint8 label volume on an axis-aligned grid, coordinates in mm (x=L, y=P, z=S)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, spacing: Sequence[float]) -> None:
        self.x = x.astype(np.float32)
        self.y = y.astype(np.float32)
        self.z = z.astype(np.float32)
        shape = (len(z), len(y), len(x))
        self.img = np.empty(shape, dtype=np.float32)  # the first painter (the body) fills every voxel
        self.lab = np.zeros(shape, dtype=np.uint8)
        # transition width of partial volume: the rms voxel extent (thick slices blur more than fine pixels)
        self.width = float(np.sqrt(np.mean(np.square(np.asarray(spacing, dtype=float)))))

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> Box | None:
        """Index box covering the physical box [lo, hi] (x, y, z in mm) plus the blur margin; None if empty."""
        m = self.width
        out = []
        for c, a, b in zip((self.z, self.y, self.x), lo[::-1], hi[::-1], strict=True):
            i0 = int(np.searchsorted(c, a - m, side="left"))
            i1 = int(np.searchsorted(c, b + m, side="right"))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return out[0], out[1], out[2]

    def coords(self, box: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable coordinates of a box: x (1,1,nx), y (1,ny,1), z (nz,1,1)."""
        return (self.x[box[2]][None, None, :], self.y[box[1]][None, :, None], self.z[box[0]][:, None, None])

    def occupancy(self, d: np.ndarray) -> np.ndarray:
        """Fraction of a voxel inside the surface d=0 (linear ramp one voxel wide)."""
        occ = np.multiply(d, -1.0 / self.width, dtype=np.float32)
        occ += 0.5
        np.clip(occ, 0.0, 1.0, out=occ)
        return occ

    def paint(self, box: Box, d: np.ndarray, hu: float | np.ndarray, value: int | None) -> None:
        """Mix ``hu`` into the box by occupancy; set the label where the voxel centre is inside (d < 0).

        ``value`` None leaves labels alone (texture inside a structure); 0 makes an unlabelled structure that
        hides whatever was painted before it. Works in slabs of a few slices so temporaries stay in cache.
        """
        region = self.img[box]
        labels = self.lab[box]
        nz = region.shape[0]
        d = np.broadcast_to(d, region.shape)
        hu_arr = np.broadcast_to(np.asarray(hu, dtype=np.float32), region.shape)
        step = max(1, _SLAB // max(1, region.shape[1] * region.shape[2]))
        for k0 in range(0, nz, step):
            k1 = min(nz, k0 + step)
            dk, rk = d[k0:k1], region[k0:k1]
            occ = self.occupancy(dk)
            delta = np.subtract(hu_arr[k0:k1], rk, dtype=np.float32)
            delta *= occ
            rk += delta
            if value is not None:
                np.copyto(labels[k0:k1], np.uint8(value), where=dk < 0)


def ramp(t: np.ndarray, width: float) -> np.ndarray:
    """0 → 1 across t = -width/2 .. +width/2 (a soft step used to blend two intensities)."""
    r = np.multiply(t, 1.0 / width, dtype=np.float32)
    r += 0.5
    return np.clip(r, 0.0, 1.0, out=r)


def ellipse2d(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float, theta: float = 0.0
              ) -> np.ndarray:
    """Approximate signed distance (mm) to an ellipse rotated by ``theta`` about z (2D broadcast of x and y)."""
    dx = x - np.float32(cx)
    dy = y - np.float32(cy)
    c, s = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    u = (c * dx + s * dy) / np.float32(a)
    v = (c * dy - s * dx) / np.float32(b)
    q = np.sqrt(u * u + v * v)
    return (q - 1.0) * np.float32(np.sqrt(a * b))


def ellipsoid(cv: Canvas, box: Box, center: Sequence[float], axes: Sequence[float], theta: float = 0.0
              ) -> np.ndarray:
    """Signed distance to an ellipsoid with axes (a, b, c) rotated by ``theta`` about z, over ``box``."""
    x, y, z = cv.coords(box)
    dx = x - np.float32(center[0])
    dy = y - np.float32(center[1])
    c, s = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    u = (c * dx + s * dy) / np.float32(axes[0])
    v = (c * dy - s * dx) / np.float32(axes[1])
    w = (z - np.float32(center[2])) / np.float32(axes[2])
    q = u * u + v * v  # (1, ny, nx)
    q = q + w * w  # (nz, ny, nx)
    np.sqrt(q, out=q)
    q -= 1.0
    q *= np.float32((axes[0] * axes[1] * axes[2]) ** (1.0 / 3.0))
    return q


def ellipsoid_box(cv: Canvas, center: Sequence[float], axes: Sequence[float], margin: float) -> Box | None:
    """Box of an ellipsoid rotated about z (in-plane extent = its largest in-plane axis)."""
    r = max(axes[0], axes[1]) + margin
    rz = axes[2] + margin
    return cv.box((center[0] - r, center[1] - r, center[2] - rz), (center[0] + r, center[1] + r, center[2] + rz))


def smooth_field(cv: Canvas, box: Box, lo: Sequence[float], hi: Sequence[float], values: np.ndarray) -> np.ndarray:
    """Smooth random field over ``box``: Gaussian-RBF interpolation of a coarse grid of ``values`` (z, y, x).

    The coarse grid spans the physical box [lo, hi], so the field is the same surface deformation at any voxel
    spacing (the phantom of a seed is the same "patient" at 4 mm and at 0.7 mm). Separable, so the cost is
    one small matrix product per voxel row.
    """
    mats = []
    for axis, c in enumerate((cv.x[box[2]], cv.y[box[1]], cv.z[box[0]])):
        n = values.shape[2 - axis]
        nodes = np.linspace(lo[axis], hi[axis], n, dtype=np.float32)
        sig = max((hi[axis] - lo[axis]) / max(n - 1, 1) * 0.6, 1e-3)
        w = np.exp(-0.5 * np.square((c[:, None] - nodes[None, :]) / np.float32(sig)))
        w /= w.sum(axis=1, keepdims=True) + np.float32(1e-12)
        mats.append(w.astype(np.float32))
    wx, wy, wz = mats
    t = values.astype(np.float32) @ wx.T  # (cz, cy, nx)
    t = np.einsum("yb,cbx->cyx", wy, t)  # (cz, ny, nx)
    nz = wz.shape[0]
    return (wz @ t.reshape(t.shape[0], -1)).reshape(nz, t.shape[1], t.shape[2])


def tube(cv: Canvas, box: Box, cx: np.ndarray, cy: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Signed distance to a tube along z with elliptic cross-section; centre/axes given per slice of the box."""
    x, y, _ = cv.coords(box)
    u = (x - cx[:, None, None]) / a[:, None, None]
    v = (y - cy[:, None, None]) / b[:, None, None]
    q = u * u
    q = q + v * v
    np.sqrt(q, out=q)
    q -= 1.0
    q *= np.sqrt(a * b)[:, None, None]
    return q
