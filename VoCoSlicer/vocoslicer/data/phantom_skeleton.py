"""The skeleton of the CT phantom: lumbar/lower thoracic vertebrae (labelled) and ribs (unlabelled context).

Bone is the brightest thing in the phantom, so the vertebrae are easy by intensity alone; the ribs are there so
that a model must also use shape and place (midline, posterior) to call bone "vertebrae", as in real CT.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vocoslicer.data.phantom_shapes import VERTEBRAE, Canvas, ellipse2d, ramp

if TYPE_CHECKING:
    from vocoslicer.data.phantom_anatomy import Body


def paint_spine(cv: Canvas, rng: np.random.Generator, yv: float) -> tuple[float, float]:
    """Vertebrae (body, ring-shaped arch, spinous and transverse processes) stacked with discs and a canal.

    Returns the vertebral period and phase along z (the ribs hang on the same levels).
    """
    period, disc = rng.uniform(30, 36), rng.uniform(6, 9)
    phase = rng.uniform(0, period)
    fv = rng.uniform(0.9, 1.1)
    canc, cort = rng.uniform(230, 330), rng.uniform(700, 1000)
    a0, b0, rc = 21 * fv, 16 * fv, 8.0 * fv
    shifts = rng.uniform(-2, 2, (17, 2))
    # column of disc material and the spinal canal behind it (unlabelled), later covered by the vertebrae
    cy_canal = yv + b0 + rc + 1
    box = cv.box((-a0 - 4, yv - b0 - 4, -1e4), (a0 + 4, cy_canal + rc + 4, 1e4))
    if box is None:
        return period, phase
    x, y, _ = cv.coords(box)
    cv.paint(box, ellipse2d(x, y, 0, yv, a0 + 1, b0 + 1), 90.0, 0)
    cv.paint(box, ellipse2d(x, y, 0, cy_canal, rc, rc), 15.0, 0)
    for k in range(-8, 9):
        zk = phase + k * period
        sx, sy = shifts[k + 8]
        yk = yv + sy
        box = cv.box((-a0 - 40, yk - b0 - 2, zk - period / 2), (a0 + 40, yk + b0 + 2 * rc + 45, zk + period / 2))
        if box is None:
            continue
        x, y, z = cv.coords(box)
        a = a0 * (1 - 0.01 * k)
        cc = yk + b0 + rc + 1
        d2 = ellipse2d(x, y, sx, yk, a, b0)
        r = np.sqrt((x - np.float32(sx)) ** 2 + (y - np.float32(cc)) ** 2)
        d2 = np.minimum(d2, np.abs(r - np.float32(rc + 2.5)) - np.float32(2.5))
        d2 = np.minimum(d2, ellipse2d(x, y, sx, cc + rc + 18, 4, 16))
        for sgn in (-1, 1):
            d2 = np.minimum(d2, ellipse2d(x, y, sx + sgn * (rc + 14), cc - 3, 14, 5))
        d2 = np.maximum(d2, rc - r)
        dz = np.abs(z - np.float32(zk)) - np.float32((period - disc) / 2)
        d = np.maximum(d2, dz)
        shade = np.float32(canc) + ramp(d + 1.5, cv.width) * np.float32(cort - canc)
        cv.paint(box, d, shade, VERTEBRAE)
    return period, phase


def paint_ribs(cv: Canvas, body: Body, period: float, phase: float, z_low: float, slope: float, hu: float) -> None:
    """Ribs in the muscle wall above ``z_low``: one per vertebral level, descending towards the front.

    A rib is a band 7 mm thick in the middle of the wall, 10 mm high, whose height falls by ``slope`` mm per mm
    towards anterior; an axial slice therefore cuts each rib as an arc on both sides, as in real CT. Only the
    wall pixels (about a tenth of a slice) are evaluated, gathered per body-outline level.
    """
    k_first = int(np.ceil((z_low - phase) / period))
    ks = np.flatnonzero(cv.z >= z_low - 10 - slope * 200)
    if len(ks) == 0:
        return
    w = cv.width
    y_back = body.inner_y
    zi = body.zidx
    flat = cv.img.reshape(len(cv.z), -1)
    for level in np.unique(zi[ks]):
        rows = ks[zi[ks] == level]
        mid = body.skin + body.fat + body.wall / 2
        d_xy = np.abs(body.depth[level] - np.float32(mid)) - np.float32(3.5)
        band = (d_xy < w) & (np.abs(cv.x)[None, :] > 40) & (cv.y[:, None] > -0.45 * body.b)
        idx = np.flatnonzero(band)
        if len(idx) == 0:
            continue
        yb = np.broadcast_to(cv.y[:, None], band.shape).ravel()[idx]
        # rib coordinate: which level a point belongs to once the anterior descent is undone
        u = (cv.z[rows][:, None] + np.float32(slope) * (y_back - yb)[None, :] - np.float32(phase)) / np.float32(period)
        k = np.rint(u)
        d_z = np.abs(u - k) * np.float32(period) - np.float32(5.0)
        d = np.maximum(d_z, d_xy.ravel()[idx][None, :])
        d[k < k_first] = 1e3
        occ = cv.occupancy(d)
        sub = flat[rows[:, None], idx[None, :]]
        sub += occ * (np.float32(hu) - sub)
        flat[rows[:, None], idx[None, :]] = sub
