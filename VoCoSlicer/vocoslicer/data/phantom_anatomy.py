"""The anatomy of the CT phantom: where each structure sits, in mm around the body centre (x=L, y=P, z=S).

Positions are fixed relative to the body (scaled with its size) and then jittered per seed, so organs keep the
relative places VoCo's geometric-context prior relies on (liver right, spleen left-posterior, spine posterior
midline, lung bases on top). Every random number is drawn in a fixed order and count, independent of the voxel
grid: a seed is the same "patient" at any spacing, size or orientation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vocoslicer.data.phantom_finding import Finding, lesion_ellipsoids, spleen_geometry
from vocoslicer.data.phantom_shapes import (
    AORTA,
    KIDNEY_L,
    KIDNEY_R,
    LIVER,
    LUNGS,
    SPLEEN,
    STOMACH,
    Box,
    Canvas,
    ellipse2d,
    ellipsoid,
    ellipsoid_box,
    ramp,
    smooth_field,
    tube,
)
from vocoslicer.data.phantom_skeleton import paint_ribs, paint_spine

_A0, _B0 = 157.0, 117.0  # reference body semi-axes (x, y) in mm
_LAYERS = 30.5  # reference skin + subcutaneous fat + muscle wall thickness (mm)
_LEVELS = 8  # body cross-sections quantised to this many scales along z (cheap 2D work, smooth enough)


@dataclass
class Body:
    """Body outline and wall layers; its 2D cross-section scales smoothly along z."""

    a: float
    b: float
    skin: float
    fat: float
    wall: float
    zidx: np.ndarray  # (nz,) index into the per-level arrays
    profile: np.ndarray  # (levels, ny, nx) HU of body wall/fat/air
    cavity: np.ndarray  # (levels, ny, nx) signed distance to the abdominal cavity (negative inside)
    depth: np.ndarray  # (levels, ny, nx) depth below the skin (mm)

    @property
    def sx(self) -> float:
        """Left-right scale of the abdominal cavity (organs live in it, whatever the wall thickness)."""
        return (self.a - self.skin - self.fat - self.wall) / (_A0 - _LAYERS)

    @property
    def sy(self) -> float:
        """Antero-posterior scale of the abdominal cavity."""
        return (self.b - self.skin - self.fat - self.wall) / (_B0 - _LAYERS)

    @property
    def cavity_a(self) -> float:
        return self.a - self.skin - self.fat - self.wall

    @property
    def cavity_b(self) -> float:
        return self.b - self.skin - self.fat - self.wall

    @property
    def inner_y(self) -> float:
        """y of the inner posterior wall at the midline."""
        return self.b - self.skin - self.fat - self.wall

    def clip(self, d: np.ndarray, box: Box) -> None:
        """Clip a structure's distance ``d`` (over ``box``) to the abdominal cavity, in place."""
        zi = self.zidx[box[0]]
        starts = np.flatnonzero(np.r_[True, zi[1:] != zi[:-1]])
        ends = np.r_[starts[1:], len(zi)]
        for k0, k1 in zip(starts, ends, strict=True):
            np.maximum(d[k0:k1], self.cavity[zi[k0], box[1], box[2]][None], out=d[k0:k1])


def _depth(x: np.ndarray, y: np.ndarray, a: float, b: float) -> np.ndarray:
    """Approximate depth (mm) below the surface of ellipse (a, b), positive inside."""
    q = np.sqrt((x / a) ** 2 + (y / b) ** 2) + np.float32(1e-6)
    g = np.sqrt((x / a**2) ** 2 + (y / b**2) ** 2) / q + np.float32(1e-9)
    return (1.0 - q) / g


def make_body(cv: Canvas, rng: np.random.Generator) -> Body:
    """Draw the body and paint its wall (skin, subcutaneous fat, muscle) and paraspinal muscles."""
    a = _A0 * rng.uniform(0.88, 1.05)
    b = _B0 * rng.uniform(0.88, 1.05)
    skin, fat, wall = 2.0, rng.uniform(8.0, 22.0), rng.uniform(9.0, 15.0)
    hu_skin, hu_fat, hu_muscle, hu_visc = 30.0, rng.uniform(-115, -90), rng.uniform(45, 60), rng.uniform(-100, -75)
    taper, phase = rng.uniform(0.02, 0.05), rng.uniform(0, 2 * np.pi)
    para_x, para_a, para_b = rng.uniform(34, 42), rng.uniform(22, 30), rng.uniform(16, 22)

    scales = 1.0 + taper * np.sin(cv.z.astype(np.float64) / 120.0 + phase)
    lv = np.linspace(scales.min(), scales.max() + 1e-9, _LEVELS)
    zidx = np.abs(scales[:, None] - lv[None, :]).argmin(axis=1)
    x, y = cv.x[None, :], cv.y[:, None]
    w = cv.width
    prof = np.empty((_LEVELS, len(cv.y), len(cv.x)), dtype=np.float32)
    cav = np.empty_like(prof)
    depth = np.empty_like(prof)
    for i, s in enumerate(lv):
        t = _depth(x, y, a * s, b * s)
        p = np.full(t.shape, -1000.0, dtype=np.float32)
        for thick, hu in ((0.0, hu_skin), (skin, hu_fat), (skin + fat, hu_muscle), (skin + fat + wall, hu_visc)):
            p += ramp(t - thick, w) * (hu - p)
        c = (skin + fat + wall) - t
        for sgn in (-1, 1):
            dp = ellipse2d(x, y, sgn * para_x * a / _A0, b * s - skin - fat - wall - para_b + 4, para_a, para_b)
            p += ramp(-dp, w) * (hu_muscle - p)
            c = np.maximum(c, -dp)
        prof[i], cav[i], depth[i] = p, c, t
    for k, level in enumerate(zidx):
        cv.img[k] = prof[level]
    return Body(a, b, skin, fat, wall, zidx, prof, cav, depth)


def _deform(rng: np.random.Generator, amp: float) -> np.ndarray:
    """Coarse 4x4x4 surface displacements (mm), zero-mean so that shape and size vary independently."""
    v = rng.standard_normal((4, 4, 4))
    return (v - v.mean()) * amp * 1.5


def organ(cv: Canvas, body: Body, center: Sequence[float], axes: Sequence[float], theta: float,
          hu: float, value: int, tex: float, field_values: np.ndarray, amp: float,
          carve: Sequence[tuple[Sequence[float], Sequence[float], float]] = (), inner: float = 0.0,
          hu_inner: float = 0.0) -> None:
    """Paint a deformed ellipsoid clipped to the abdominal cavity, with optional carved-out ellipsoids.

    ``inner`` > 0 gives a core (``hu_inner``) deeper than ``inner`` mm (kidney medulla).
    """
    margin = 3.0 * amp
    box = ellipsoid_box(cv, center, axes, margin)
    if box is None:
        return
    d = ellipsoid(cv, box, center, axes, theta)
    lo = [center[i] - max(axes) - margin for i in range(2)] + [center[2] - axes[2] - margin]
    hi = [center[i] + max(axes) + margin for i in range(2)] + [center[2] + axes[2] + margin]
    f = smooth_field(cv, box, lo, hi, field_values)
    d += f
    for c2, ax2, th2 in carve:
        np.maximum(d, -ellipsoid(cv, box, c2, ax2, th2), out=d)
    body.clip(d, box)
    shade = f * np.float32(tex / max(amp, 1e-3))
    shade += np.float32(hu)
    if inner > 0:
        shade += ramp(-(d + inner), cv.width) * np.float32(hu_inner - hu)
    cv.paint(box, d, shade, value)


def paint_anatomy(cv: Canvas, rng: np.random.Generator, finding: Finding | None = None) -> None:
    """Draw one patient from ``rng`` and paint it on ``cv`` (background context first, labelled organs last).

    ``finding`` (see :mod:`vocoslicer.data.phantom_finding`) enlarges the spleen or adds liver lesions; it takes no
    number from ``rng``, so the rest of the patient is the same with or without it.
    """
    body = make_body(cv, rng)
    sx, sy = body.sx, body.sy
    g = float((sx * sy) ** 0.25)  # organ size follows the cavity only weakly (fat patients have normal livers)
    dz = rng.uniform(-10, 10)  # cranio-caudal position of the patient in the scanner
    yv = body.inner_y - rng.uniform(44, 52)  # vertebral body centre (y)
    paint_ribs(cv, body, rng.uniform(30, 36), rng.uniform(0, 30), rng.uniform(-30, -10) + dz, rng.uniform(0.45, 0.65),
          rng.uniform(350, 500))

    def jit(n: int = 3, mm: float = 10.0) -> np.ndarray:
        return rng.uniform(-mm, mm, n)

    def size() -> float:
        return g * rng.uniform(0.85, 1.15)

    # --- unlabelled context: bowel loops, colon, psoas, heart ------------------------------------------
    for _ in range(9):
        c = (rng.uniform(-95, 95) * sx, rng.uniform(-80, 5) * sy, rng.uniform(-120, 10) + dz)
        ax = rng.uniform(10, 22, 3)
        th = rng.uniform(0, np.pi)
        content = rng.choice([-1000.0, 15.0, -300.0])
        level = rng.uniform(-0.5, 0.5)
        _loop(cv, c, ax, th, content, level)
    for sgn in (-1, 1):
        x0, r, top = sgn * rng.uniform(95, 105) * sx, rng.uniform(14, 20), rng.uniform(-20, 10) + dz
        _colon(cv, x0, -5.0 * sy, r, top, rng.uniform(-600, -200))
    for sgn in (-1, 1):
        _psoas(cv, sgn, yv, rng.uniform(0.8, 1.2), rng.uniform(45, 58))
    heart_c = (25 * sx + rng.uniform(-8, 8), -50 * sy + rng.uniform(-8, 8), 125 + dz + rng.uniform(-10, 10))
    heart_hu = rng.uniform(35, 50)

    # --- lungs (bases): above two diaphragm domes, posterior, not in the mediastinum; painted after the upper
    # abdominal organs so that the domes cap liver, spleen and stomach, and before the kidneys ---------------
    z_r = rng.uniform(78, 95) + dz
    z_l = z_r - rng.uniform(5, 15)
    lung_hu, lung_tex = rng.uniform(-880, -820), _deform(rng, 1.0)
    heart_ax = (60 * g, 50 * g, 55.0)
    hb = ellipsoid_box(cv, heart_c, heart_ax, 2)
    if hb is not None:
        cv.paint(hb, ellipsoid(cv, hb, heart_c, heart_ax), heart_hu, 0)

    # --- labelled organs ---------------------------------------------------------------------------
    amp = rng.uniform(3, 6)
    liver_hu = rng.uniform(52, 68)
    s = size()
    c_r = np.array([-62 * sx, -8 * sy, 28 + dz]) + jit()
    lobe_axes = (70 * s, 82 * s, 72 * s)
    organ(cv, body, c_r, lobe_axes, rng.uniform(-0.1, 0.1), liver_hu, LIVER, 4.0, _deform(rng, amp), amp)
    for lc, lax, lhu in lesion_ellipsoids(c_r, lobe_axes, liver_hu, finding):
        lb = ellipsoid_box(cv, lc, lax, 2)
        if lb is not None:  # texture inside the liver: the label map keeps calling it liver
            cv.paint(lb, ellipsoid(cv, lb, lc, lax), lhu, None)
    c_l = c_r + np.array([57 * sx, -44 * sy, 20]) + jit(3, 6)
    organ(cv, body, c_l, (48 * s, 28 * s, 36 * s), 0.2 + rng.uniform(-0.1, 0.1), liver_hu, LIVER, 4.0,
          _deform(rng, amp), amp)

    c = np.array([88 * sx, 38 * sy, 46 + dz]) + jit()
    th = float(np.arctan2(c[1] / body.b**2, c[0] / body.a**2)) + rng.uniform(-0.1, 0.1)
    s = size()
    notch = c + 36 * s * np.array([-np.cos(th), -np.sin(th), 0.0])
    c_s, ax_s = spleen_geometry(c, (27 * s, 55 * s, 48 * s), finding)
    k = finding.spleen_scale if finding is not None else 1.0
    if k != 1.0:  # the hilum notch moves and grows with the spleen
        notch = c_s + k * (notch - c)
    organ(cv, body, c_s, ax_s, th, rng.uniform(45, 55), SPLEEN, 4.0, _deform(rng, amp), amp,
          carve=[(notch, (16 * s * k, 32 * s * k, 30 * s * k), th)])

    s = size()
    c = np.array([55 * sx, -38 * sy, 52 + dz]) + jit()
    _stomach(cv, body, c, (38 * s, 32 * s, 42 * s), rng.uniform(-0.4, 0.4), rng.uniform(0.1, 0.7),
             rng.uniform(5, 25), _deform(rng, amp), amp)
    _lungs(cv, body, sx, sy, yv, z_r, z_l, lung_hu, lung_tex)

    dz_kidneys = rng.uniform(-10, 10)  # shared, so the right kidney stays the lower one
    for sgn, value, zc in ((-1, KIDNEY_R, -36.0), (1, KIDNEY_L, -16.0)):
        s = size()
        xk = sgn * 74 * g
        # just in front of the posterior cavity wall at that x (retroperitoneum), not behind it
        y_wall = body.cavity_b * np.sqrt(max(0.1, 1 - (xk / body.cavity_a) ** 2))
        c = np.array([xk, min(yv + 8, y_wall - 20 * s), zc + dz + dz_kidneys]) + jit() * np.array([1.0, 1.0, 0.3])
        th = -sgn * (0.45 + rng.uniform(-0.15, 0.15))
        hilum = c + np.array([-sgn * 24 * s, -10 * s, 0.0])
        organ(cv, body, c, (27 * s, 22 * s, 55 * s), th, rng.uniform(150, 180), value, 5.0, _deform(rng, 0.6 * amp),
              0.6 * amp, carve=[(hilum, (10 * s, 9 * s, 14 * s), 0.0)], inner=7.0 * s, hu_inner=rng.uniform(100, 125))

    # --- vessels and spine ----------------------------------------------------------------------------
    ivc = (-20 * sx + rng.uniform(-3, 3), yv - 24, rng.uniform(11, 15), rng.uniform(8, 11), rng.uniform(100, 140))
    _vessel(cv, ivc[0], ivc[1], ivc[2], ivc[3], ivc[4], 0, rng.uniform(0, 6.3))
    r = rng.uniform(10, 13)
    _vessel(cv, 15 * sx + rng.uniform(-3, 3), yv - 16 - r - 3, r, r, rng.uniform(170, 230), AORTA,
            rng.uniform(0, 6.3))
    paint_spine(cv, rng, yv)


def _loop(cv: Canvas, c: Sequence[float], ax: np.ndarray, th: float, content: float, level: float) -> None:
    """A bowel loop: 35 HU wall around gas, fluid or faeces (gas floats anteriorly, i.e. to -y)."""
    box = ellipsoid_box(cv, c, ax, 1)
    if box is None:
        return
    d = ellipsoid(cv, box, c, ax, th)
    y = cv.coords(box)[1]
    hu = np.where(y < c[1] + level * ax[1], np.float32(-1000.0), np.float32(15.0)) if content == -300.0 else content
    shade = hu + ramp(d + 3.0, cv.width) * (np.float32(35.0) - hu)
    cv.paint(box, d, shade, 0)


def _colon(cv: Canvas, x0: float, y0: float, r: float, top: float, hu: float) -> None:
    box = cv.box((x0 - r, y0 - r, -1e4), (x0 + r, y0 + r, top))
    if box is None:
        return
    n = box[0].stop - box[0].start
    d = tube(cv, box, np.full(n, x0, np.float32), np.full(n, y0, np.float32), np.full(n, r, np.float32),
             np.full(n, r, np.float32))
    np.maximum(d, cv.coords(box)[2] - np.float32(top), out=d)
    cv.paint(box, d, np.float32(hu) + ramp(d + 3.0, cv.width) * np.float32(35.0 - hu), 0)


def _psoas(cv: Canvas, sgn: int, yv: float, s: float, hu: float) -> None:
    """Psoas muscle: starts thin beside the upper lumbar spine, widens and moves laterally going down."""
    box = cv.box((-200 if sgn < 0 else 0, yv - 40, -1e4), (0 if sgn < 0 else 200, yv + 30, 40))
    if box is None:
        return
    z = cv.z[box[0]]
    a = (np.clip(6 + (40 - z) * 0.1, 6, 24) * s).astype(np.float32)
    d = tube(cv, box, sgn * (26 + (40 - z) * 0.08 + a * 0.6), np.full_like(z, yv - 2), a, a * 0.85)
    cv.paint(box, d, hu, 0)


def _lungs(cv: Canvas, body: Body, sx: float, sy: float, yv: float, z_r: float, z_l: float, hu: float,
           tex: np.ndarray) -> None:
    zmin = min(z_r, z_l) - 70
    x2, y2 = cv.x[None, :], cv.y[:, None]
    # each hemidiaphragm: highest over the middle of its side, falling laterally and steeply posteriorly (the
    # posterior costophrenic recess), rising anteriorly (heart and liver fill the front)
    yc = np.float32(10 * sy)
    front = np.maximum(yc - y2, 0)
    back = np.maximum(y2 - yc, 0)
    shape_y = -35 * (back / 80) ** 2 + 1.0 * front
    dome = np.where(x2 < 0, z_r - 30 * ((x2 + 70 * sx) / 65) ** 2, z_l - 30 * ((x2 - 70 * sx) / 65) ** 2) + shape_y
    np.maximum(dome, np.float32(zmin), out=dome)
    mediastinum = np.maximum(np.abs(x2) - np.float32(30 * sx), y2 - np.float32(yv + 10))
    # tight box: columns where some lung can exist below the top of the grid
    w = cv.width
    possible = (dome < cv.z[-1] + w) & (mediastinum > -w) & (body.cavity.min(axis=0) < w)
    if not possible.any():
        return
    ys, xs = np.flatnonzero(possible.any(axis=1)), np.flatnonzero(possible.any(axis=0))
    box = cv.box((cv.x[xs[0]], cv.y[ys[0]], float(dome[possible].min())), (cv.x[xs[-1]], cv.y[ys[-1]], 1e4))
    if box is None:
        return
    z = cv.coords(box)[2]
    d = dome[box[1], box[2]][None] - z  # (nz, ny, nx): distance along z below the dome is positive
    np.maximum(d, -mediastinum[box[1], box[2]][None], out=d)
    body.clip(d, box)
    shade = smooth_field(cv, box, (-200, -150, zmin), (200, 150, zmin + 160), tex) * np.float32(25.0)
    shade += np.float32(hu)
    cv.paint(box, d, shade, LUNGS)


def _stomach(cv: Canvas, body: Body, c: np.ndarray, ax: Sequence[float], th: float, gas: float, fluid_hu: float,
             field_values: np.ndarray, amp: float) -> None:
    box = ellipsoid_box(cv, c, ax, 3 * amp)
    if box is None:
        return
    d = ellipsoid(cv, box, c, ax, th)
    m = 3 * amp
    d += smooth_field(cv, box, (c[0] - ax[0] - m, c[1] - ax[0] - m, c[2] - ax[2] - m),
                      (c[0] + ax[0] + m, c[1] + ax[0] + m, c[2] + ax[2] + m), field_values)
    body.clip(d, box)
    y = cv.coords(box)[1]
    level = c[1] - ax[1] + 2 * gas * ax[1]
    content = ramp(y - np.float32(level), cv.width) * np.float32(fluid_hu + 1000.0) - np.float32(1000.0)
    shade = content + ramp(d + 4.0, cv.width) * (np.float32(40.0) - content)
    cv.paint(box, d, shade, STOMACH)


def _vessel(cv: Canvas, x0: float, y0: float, a: float, b: float, hu: float, value: int, phase: float) -> None:
    box = cv.box((x0 - a - 5, y0 - b - 5, -1e4), (x0 + a + 5, y0 + b + 5, 1e4))
    if box is None:
        return
    z = cv.z[box[0]]
    cx = (x0 + 3.0 * np.sin(z / 90.0 + phase)).astype(np.float32)
    cy = (y0 + 2.0 * np.cos(z / 110.0 + phase)).astype(np.float32)
    d = tube(cv, box, cx, cy, np.full_like(z, a), np.full_like(z, b))
    cv.paint(box, d, hu, value)
