"""Body coordinates and smooth random fields: the drawing primitives of every phantom."""
from __future__ import annotations

import math

import cv2
import numpy as np

# ---------------------------------------------------------------------------- geometry

class _Frame:
    """Pixel grid <-> body coordinates under a pose (scale, rotation, shift).

    Normalised image coords run -1..1 over the shorter side; body coords are those
    un-rotated and un-scaled, so anatomy is defined once and the pose varies per image.
    """

    def __init__(self, h: int, w: int, theta_deg: float, scale: float, tx: float, ty: float):
        self.h, self.w = h, w
        self.half = min(h, w) / 2.0
        self.k = min(h, w) / 384.0  # pixel sizes below are tuned at 384 px
        th = math.radians(theta_deg)
        self.c, self.s = math.cos(th), math.sin(th)
        self.scale, self.tx, self.ty = scale, tx, ty
        self._xy = None

    @property
    def x(self):
        """Full-resolution body x of every pixel (computed on first use)."""
        if self._xy is None:
            self._xy = self.coords(np.arange(self.h), np.arange(self.w))
        return self._xy[0]

    @property
    def y(self):
        if self._xy is None:
            self._xy = self.coords(np.arange(self.h), np.arange(self.w))
        return self._xy[1]

    def px(self, xb, yb):
        """Body coordinates -> (col, row) pixel coordinates (floats, OpenCV centres)."""
        xb = np.asarray(xb, dtype=np.float64)
        yb = np.asarray(yb, dtype=np.float64)
        X = self.scale * (self.c * xb - self.s * yb) + self.tx
        Y = self.scale * (self.s * xb + self.c * yb) + self.ty
        return X * self.half + self.w / 2.0 - 0.5, Y * self.half + self.h / 2.0 - 0.5

    def px_to_body(self, cols, rows):
        """Pixel (col, row) -> body coordinates (inverse of :meth:`px`)."""
        X0 = (np.asarray(cols, dtype=np.float64) + 0.5 - self.w / 2.0) / self.half - self.tx
        Y0 = (np.asarray(rows, dtype=np.float64) + 0.5 - self.h / 2.0) / self.half - self.ty
        return (self.c * X0 + self.s * Y0) / self.scale, (-self.s * X0 + self.c * Y0) / self.scale

    def plen(self, length: float) -> float:
        """A body-coordinate length in pixels."""
        return length * self.scale * self.half

    def box(self, x0, x1, y0, y1, pad=3):
        """Pixel slices covering a body-coordinate rectangle (after rotation)."""
        cs, rs = self.px([x0, x1, x0, x1], [y0, y0, y1, y1])
        r0 = max(0, int(math.floor(rs.min())) - pad)
        r1 = min(self.h, int(math.ceil(rs.max())) + pad + 1)
        c0 = max(0, int(math.floor(cs.min())) - pad)
        c1 = min(self.w, int(math.ceil(cs.max())) + pad + 1)
        if r1 <= r0 or c1 <= c0:
            return None
        return (slice(r0, r1), slice(c0, c1))

    def coords(self, rows, cols):
        """Body coordinates at fractional pixel positions (1-D rows x 1-D cols)."""
        X0 = (np.asarray(cols, dtype=np.float64) + 0.5 - self.w / 2.0) / self.half - self.tx
        Y0 = (np.asarray(rows, dtype=np.float64) + 0.5 - self.h / 2.0) / self.half - self.ty
        x = (self.c * X0[None, :] + self.s * Y0[:, None]) / self.scale
        y = (-self.s * X0[None, :] + self.c * Y0[:, None]) / self.scale
        return x, y

    def half_grid(self, bb):
        """Half-resolution body coordinates over a pixel box: half-res pixel (i, j) sits
        at the centre of full-res pixels 2i..2i+1, 2j..2j+1, so :meth:`up` is unshifted.
        Smooth structures (ribs, clavicles, spine) are computed there: 4x fewer pixels."""
        r0, r1, c0, c1 = bb[0].start, bb[0].stop, bb[1].start, bb[1].stop
        hh, hw = (r1 - r0 + 1) // 2, (c1 - c0 + 1) // 2
        return self.coords(r0 + 0.5 + 2 * np.arange(hh), c0 + 0.5 + 2 * np.arange(hw))

    @staticmethod
    def up(field, bb):
        bh, bw = bb[0].stop - bb[0].start, bb[1].stop - bb[1].start
        hh, hw = field.shape
        return cv2.resize(field, (2 * hw, 2 * hh), interpolation=cv2.INTER_LINEAR)[:bh, :bw]

    def pt(self, xb, yb):
        """One body point -> an (int, int) cv2 point with 4 fractional bits."""
        c, r = self.px(xb, yb)
        return (int(round(float(c) * 16)), int(round(float(r) * 16)))

    def pts(self, xs, ys):
        """Body polyline -> int32 points with 4 fractional bits for cv2 (shift=4)."""
        c, r = self.px(xs, ys)
        return np.stack([np.rint(c * 16), np.rint(r * 16)], axis=-1).astype(np.int32)


def _smoothstep(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _smooth_noise(rng, h, w, cells):
    """Unit-ish smooth random field: a coarse normal grid upsampled bicubically."""
    m = min(h, w)
    gh = max(2, int(round(cells * h / m)))
    gw = max(2, int(round(cells * w / m)))
    g = rng.standard_normal((gh + 2, gw + 2))
    big = cv2.resize(g, (w + 2 * w // gw, h + 2 * h // gh), interpolation=cv2.INTER_CUBIC)
    oy, ox = h // gh, w // gw  # crop off the border cells (cubic edge effects)
    return big[oy:oy + h, ox:ox + w]


def _blur(img, sigma):
    if sigma <= 0.05:
        return img
    return cv2.GaussianBlur(img, (0, 0), sigmaX=sigma, sigmaY=sigma,
                            borderType=cv2.BORDER_REFLECT)


def _u(rng, lo, hi):
    return float(rng.uniform(lo, hi))
