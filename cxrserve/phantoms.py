"""Deterministic synthetic chest-radiograph phantoms with exact ground truth.

The demo models in the default model store are trained only on these images, and the
fast tests use them, so two properties matter more than photo-realism:

* **Exact truth.** Lung masks, the opacity mask, the per-lung opacified fraction and the
  scores derived from it are computed from the same geometry that is drawn, at the
  output resolution. ``geographic_extent`` is computed *from the achieved fraction*, so
  it always agrees with ``opacity_mask``.
* **Learnable, not trivial.** The cues a model needs (dark lungs with vessels and ribs,
  heart and mediastinum, domed diaphragms, ground-glass versus consolidation, extent)
  are drawn like a radiograph, with per-seed anatomy, pose, exposure, blur and noise.
  Film style (PA / portable AP / screenshot) is only weakly tied to the class, so a
  classifier has to look at the lungs.

How an image is made (kind ``"frontal"``): every pixel is mapped back into "body
coordinates" (x across, y down, the thorax spans about -1..1) through a per-image pose
(scale, shift, rotation). Each structure adds an X-ray attenuation ``A`` there (soft
tissue, spine, ribs, clavicles, heart, vessels, tubes) and the lungs remove some (air).
The film value is ``1 - exp(-A)`` put through a per-image window and gamma, then blurred
and given noise. Opacities replace a fraction of the lung air inside a region obtained by
thresholding a smooth random field restricted to one lung at the quantile that hits the
target fraction.

Randomness: each phantom uses ``np.random.default_rng([seed, stream])`` with separate
streams for anatomy, acquisition, opacity, survival and wording, and no global RNG. All
arithmetic on images is float64 (numpy / OpenCV) and all drawing is integer rasterised,
so the same spec gives the same bytes on any machine: a float64 rounding difference of
one ulp would have to land exactly on a .5 grey boundary to show.

Conventions: images are uint8, MONOCHROME2 (bone bright, air dark); the patient's
right lung is on the image LEFT (radiological convention).

Cost: about 20-30 ms per 384x384 frontal image on one core (smooth structures are
computed at half resolution and interpolated; masks are thresholded from the same
interpolated fields the image is drawn from, so they still match it exactly), so 1000
phantoms take well under a minute.

Survival model (documented so it can be tested): the probability of death is
``sigmoid(-4.0 + 0.30 * geographic_extent + 0.45 * opacity_score + 0.045 * (age - 60))``
(see :func:`death_probability`); ``survival`` is one Bernoulli draw from it.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np

__all__ = [
    "LABELS", "KINDS", "STYLES", "PhantomSpec", "Phantom", "sample_spec", "render",
    "render_many", "write_dataset", "extent_score", "death_probability", "CSV_COLUMNS",
]

LABELS = ("covid19", "normal", "pneumonia")
KINDS = ("frontal", "lateral", "hand", "knee", "pelvis", "natural")
STYLES = ("pa", "ap_portable", "screenshot")

# rng streams: one per concern, so e.g. changing the wording never changes the pixels
_S_ANATOMY, _S_ACQ, _S_OPACITY, _S_SURVIVAL, _S_REPORT, _S_SAMPLE, _S_SCREEN = range(1, 8)

CSV_COLUMNS = (
    "filename", "label", "patient_id", "view", "is_frontal", "kind", "style",
    "geographic_extent_mean", "opacity_mean", "involvement_right", "involvement_left",
    "survival", "mask", "report", "age", "extent_right", "extent_left", "opacity_right",
    "opacity_left", "seed", "anatomy_seed", "width", "height", "mode", "dicom",
    "dicom_syntax", "dicom_photometric", "dicom_bits_stored",
)


@dataclass(frozen=True)
class PhantomSpec:
    """Everything that determines one phantom image; ``render(spec)`` is a pure function.

    ``extent``/``opacity`` are the requested per-lung (right, left) extent band (0-4) and
    opacity grade (0-3); a lung gets an opacity only if both are > 0. The extent actually
    reported comes from the achieved fraction (always inside the requested band).
    ``anatomy_seed`` (extra field, default: ``seed``) lets several studies share one
    patient's anatomy while acquisition and opacities follow ``seed``.
    ``label`` is only meaningful for ``kind == "frontal"``.
    """

    seed: int
    height: int = 384
    width: int = 384
    kind: str = "frontal"
    label: str = "normal"
    extent: tuple[int, int] = (0, 0)
    opacity: tuple[int, int] = (0, 0)
    style: str = "pa"
    patient_id: str = ""
    age: int = 60
    anatomy_seed: int | None = None

    def __post_init__(self):
        # normalise sequences to int tuples so specs hash and compare by value
        object.__setattr__(self, "extent", tuple(int(e) for e in self.extent))
        object.__setattr__(self, "opacity", tuple(int(o) for o in self.opacity))
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, got {self.label!r}")
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {self.style!r}")
        if not (32 <= self.height <= 8192 and 32 <= self.width <= 8192):
            raise ValueError("height and width must be within 32..8192")
        if len(self.extent) != 2 or any(not 0 <= int(e) <= 4 for e in self.extent):
            raise ValueError(f"extent must be two ints in 0..4, got {self.extent!r}")
        if len(self.opacity) != 2 or any(not 0 <= int(o) <= 3 for o in self.opacity):
            raise ValueError(f"opacity must be two ints in 0..3, got {self.opacity!r}")
        if self.anatomy_seed is not None and self.anatomy_seed < 0:
            raise ValueError("anatomy_seed must be non-negative")


@dataclass
class Phantom:
    """One rendered phantom and its exact ground truth.

    ``image``: uint8 HxW, MONOCHROME2 (for screenshots and natural images the grey
    version of ``image_rgb``, via ``cv2.cvtColor(..., COLOR_RGB2GRAY)``). Masks are bool
    HxW; ``lung_mask == right_lung | left_lung`` and excludes the heart; the patient's
    right lung is on the image left. ``involvement[i]`` is exactly
    ``(opacity_mask & lung_i).sum() / lung_i.sum()``; ``geographic_extent`` is the sum of
    :func:`extent_score` over both lungs and ``opacity_score`` the sum of the grades of
    lungs with any opacity. Non-frontal kinds: empty masks, zero scores, ``label`` is
    the kind name and ``survival`` is 1. ``extra`` holds rendering facts (``look``: the
    film style actually drawn, ``devices``, ``markers``, ``zones`` per opacified lung,
    ``p_death``).
    """

    spec: PhantomSpec
    image: np.ndarray
    image_rgb: np.ndarray | None
    lung_mask: np.ndarray
    right_lung: np.ndarray
    left_lung: np.ndarray
    opacity_mask: np.ndarray
    involvement: tuple[float, float]
    geographic_extent: float
    opacity_score: float
    label: str
    survival: int
    report: str
    view: str
    extra: dict = field(default_factory=dict, repr=False)  # devices drawn, opacity zones


# ---------------------------------------------------------------------------- scores

def extent_score(fraction: float) -> int:
    """Per-lung geographic extent score from an opacified fraction (0..1).

    0: no opacity, 1: < 25 %, 2: 25-50 %, 3: 50-75 %, 4: >= 75 % (a fraction exactly on
    a boundary goes to the higher band; :func:`render` keeps fractions away from them).
    """
    if fraction <= 0:
        return 0
    return 1 + min(3, int(fraction / 0.25))


def death_probability(geographic_extent: float, opacity_score: float, age: float) -> float:
    """Logistic mortality risk used to draw ``Phantom.survival`` (module docstring)."""
    z = -4.0 + 0.30 * geographic_extent + 0.45 * opacity_score + 0.045 * (age - 60.0)
    return 1.0 / (1.0 + math.exp(-z))


_BANDS = {1: (0.03, 0.22), 2: (0.28, 0.47), 3: (0.53, 0.72), 4: (0.78, 0.96)}


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


# ---------------------------------------------------------------------------- sampling

def sample_spec(seed: int, *, kind: str = "frontal", label: str | None = None,
                height: int = 384, width: int = 384, min_extent: int = 1) -> PhantomSpec:
    """Draw a spec from class-conditional priors (deterministic in ``seed``).

    normal: no opacity. covid19: bilateral, peripheral/lower-zone ground glass (grade 1,
    sometimes 2), extent 1-4 per lung. pneumonia: mostly unilateral contiguous
    consolidation (grade 2, sometimes 3), extent 1-3 in one lung; about one in eight also
    has a small contralateral opacity. Style is weakly tied to class (normals mostly PA,
    covid mostly portable AP, every class gets every style). ``label=None``: uniform.
    ``min_extent`` raises the extent of every diseased lung to at least that score
    (the demo recipe uses 2: marked disease that a model trained for minutes can learn).
    """
    rng = np.random.default_rng([int(seed), _S_SAMPLE])
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    if label is None:
        label = LABELS[int(rng.integers(3))]
    elif label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}")
    pid = f"PH{int(seed):08d}"
    if kind != "frontal":
        style = "screenshot" if rng.random() < 0.12 else "pa"
        if kind == "natural":
            style = "pa"
        return PhantomSpec(seed=int(seed), height=height, width=width, kind=kind,
                           label="normal", style=style, patient_id=pid,
                           age=int(rng.integers(18, 90)))
    style_p = {"normal": (0.70, 0.22, 0.08), "covid19": (0.32, 0.53, 0.15),
               "pneumonia": (0.45, 0.45, 0.10)}[label]
    style = STYLES[int(rng.choice(3, p=style_p))]
    extent = (0, 0)
    opacity = (0, 0)
    if label == "normal":
        age = int(rng.integers(18, 86))
    elif label == "covid19":
        age = int(np.clip(rng.normal(62, 14), 25, 95))
        er = int(rng.choice([1, 2, 3, 4], p=[0.28, 0.35, 0.23, 0.14]))
        el = int(np.clip(er + rng.choice([-1, 0, 0, 1]), 1, 4))
        gr = 2 if rng.random() < 0.28 else 1
        gl = gr if rng.random() < 0.75 else (3 - gr)
        extent, opacity = (er, el), (gr, gl)
    else:
        age = int(np.clip(rng.normal(58, 18), 18, 95))
        e = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
        g = 3 if rng.random() < 0.2 else 2
        other_e, other_g = 0, 0
        if rng.random() < 0.12:
            other_e, other_g = 1, int(rng.integers(1, 3))
        if rng.random() < 0.6:  # right lung more often (right lower lobe pneumonia)
            extent, opacity = (e, other_e), (g, other_g)
        else:
            extent, opacity = (other_e, e), (other_g, g)
    extent = tuple(max(e, min_extent) if g > 0 else e for e, g in zip(extent, opacity))
    return PhantomSpec(seed=int(seed), height=height, width=width, kind="frontal",
                       label=label, extent=extent, opacity=opacity, style=style,
                       patient_id=pid, age=age)


# ---------------------------------------------------------------------------- frontal

def _anatomy(a: np.random.Generator) -> dict:
    """Per-patient body and lung geometry (body coordinates; the film spans about -1..1)."""
    p = {}
    p["rot"] = _u(a, -4.0, 4.0)
    p["scale"] = _u(a, 0.94, 1.04)
    p["tx"] = _u(a, -0.04, 0.04)
    p["ty"] = _u(a, -0.02, 0.05)
    p["W0"] = _u(a, 0.92, 1.06)          # torso half width
    p["ys0"] = _u(a, -0.98, -0.88)       # top of the shoulders near the neck
    p["slope"] = _u(a, 0.12, 0.28)       # how much the shoulders drop laterally
    p["neck"] = _u(a, 0.16, 0.22)
    p["T"] = _u(a, 1.9, 2.2)             # soft tissue thickness at the midline
    p["L0"] = _u(a, 1.3, 1.55)           # lung air at full depth
    p["female"] = bool(a.random() < 0.45)
    p["breast"] = _u(a, 0.08, 0.2) if p["female"] else 0.0
    lungs = []
    yd_r = _u(a, 0.33, 0.46)
    for side in (-1, 1):  # -1: right lung (image left)
        q = {"side": side}
        q["ya"] = _u(a, -0.82, -0.72)
        q["ua"] = _u(a, 0.26, 0.34)
        q["atop"] = _u(a, 2.0, 3.0)
        q["uL"] = _u(a, 0.74, 0.84) * p["W0"] / 0.99
        q["um"] = _u(a, 0.10, 0.14) if side < 0 else _u(a, 0.08, 0.12)
        q["yd"] = yd_r if side < 0 else yd_r + _u(a, 0.03, 0.07)
        q["kd"] = _u(a, 0.4, 0.7)
        q["uc"] = _u(a, 0.35, 0.5)
        q["knob"] = _u(a, 0.04, 0.08) if side > 0 else 0.0
        lungs.append(q)
    p["lungs"] = lungs
    p["hx"] = _u(a, 0.08, 0.14)
    p["ha"] = _u(a, 0.33, 0.40)
    p["hb"] = _u(a, 0.24, 0.29)
    p["hdrop"] = _u(a, 0.45, 0.65)
    p["htilt"] = _u(a, 20.0, 35.0)
    p["H0"] = _u(a, 0.0, 0.08)
    p["rib0"] = _u(a, -0.86, -0.78)
    p["ribsp"] = _u(a, 0.11, 0.13)
    p["ribamp"] = _u(a, 0.11, 0.17)
    p["riba"] = _u(a, 0.28, 0.4)
    p["ribc"] = _u(a, 0.55, 0.8)
    p["clav_y"] = _u(a, -0.76, -0.68)
    p["clav_rise"] = _u(a, 0.12, 0.2)
    p["carina"] = _u(a, -0.42, -0.32)
    p["ves"] = _u(a, 0.16, 0.24)
    p["bubble"] = bool(a.random() < 0.6)
    p["bubble_x"] = _u(a, 0.25, 0.4)
    p["perturb_seed"] = int(a.integers(2**31))
    p["vessel_seed"] = int(a.integers(2**31))
    p["texture_seed"] = int(a.integers(2**31))
    return p


def _vessel_tree(p: dict, depth: int = 5):
    """Branching vessels from both hila, level by level (vectorised).

    Returns a list per generation of (x0, y0, xm, ym, x1, y1) arrays in body coords
    (xm/ym: a bend point so vessels are not ruler-straight).
    """
    rng = np.random.default_rng(p["vessel_seed"])
    xs, ys, angs, lens, sides = [], [], [], [], []
    for q in p["lungs"]:
        s = q["side"]
        base = np.radians(np.linspace(-72.0, 78.0, 7) + rng.uniform(-9, 9, 7))
        hy = -0.2 + 0.05 * rng.standard_normal()
        xs.append(np.full(7, s * (q["um"] + 0.07)) + rng.uniform(-0.02, 0.02, 7))
        ys.append(hy + 0.12 * np.sin(base) + rng.uniform(-0.02, 0.02, 7))
        angs.append(base)
        lens.append(rng.uniform(0.09, 0.14, 7))
        sides.append(np.full(7, float(s)))
    x0, y0, ang, ln, sd = (np.concatenate(v) for v in (xs, ys, angs, lens, sides))
    levels = []
    for _ in range(depth):
        x1 = x0 + sd * np.cos(ang) * ln
        y1 = y0 + np.sin(ang) * ln
        bend = rng.uniform(-0.18, 0.18, x0.size) * ln
        xm = (x0 + x1) / 2 - sd * np.sin(ang) * bend
        ym = (y0 + y1) / 2 + np.cos(ang) * bend
        levels.append((x0, y0, xm, ym, x1, y1))
        n = x0.size
        spread = np.radians(rng.uniform(12, 30, n))
        tilt = np.radians(rng.uniform(-8, 8, n))
        ang = np.concatenate([ang + spread + tilt, ang - spread + tilt])
        ln = np.concatenate([ln, ln]) * rng.uniform(0.68, 0.86, 2 * n)
        x0, y0, sd = np.concatenate([x1, x1]), np.concatenate([y1, y1]), np.concatenate([sd, sd])
    return levels


def _draw_tree(F, canvas, levels, *, offset=(0.0, 0.0), gens=None, width0=3.6, decay=0.7,
               val0=255, vdecay=0.78):
    for g, (x0, y0, xm, ym, x1, y1) in enumerate(levels):
        if gens is not None and g not in gens:
            continue
        pts = F.pts(np.stack([x0, xm, x1], 1) + offset[0], np.stack([y0, ym, y1], 1) + offset[1])
        th = max(1, int(round(width0 * decay ** g * F.k)))
        cv2.polylines(canvas, list(pts), False, int(val0 * vdecay ** g), th, cv2.LINE_AA, shift=4)


def _lung_fields(F: _Frame, p: dict, heart_f: np.ndarray):
    """Each lung inside its pixel box: signed margin ``mm`` (> 0 inside), mask (heart
    excluded) and lazily the coordinates used by opacities.

    The margin is computed at half resolution and upsampled; the mask is thresholded
    from the *upsampled* margin and the image uses that same margin, so mask and image
    agree exactly while the work is a quarter.
    """
    out = []
    prng = np.random.default_rng(p["perturb_seed"])
    for q in p["lungs"]:
        s = q["side"]
        bb = F.box(min(0.0, s * 1.0), max(0.0, s * 1.0), q["ya"] - 0.06, q["yd"] + q["kd"] * 0.3 + 0.1,
                   pad=int(6 * F.k) + 3)
        if bb is None:
            out.append(None)
            continue
        x, y = F.half_grid(bb)
        u = s * x
        ya, ua, uL = q["ya"], q["ua"], q["uL"]
        m1 = y - (ya + q["atop"] * (u - ua) ** 2)
        dy = np.clip(y - ya, 0.0, None)
        ulat = uL - (uL - ua - 0.04) * np.exp(-dy / 0.28) + 0.03 * dy
        m2 = ulat - u
        umed = q["um"] + q["knob"] * np.exp(-((y + 0.45) / 0.08) ** 2) if q["knob"] else q["um"]
        m3 = u - umed
        m4 = q["yd"] + q["kd"] * (u - q["uc"]) ** 2 - y
        mm = np.minimum(np.minimum(m1, m2), np.minimum(m3, m4))
        mm += 0.014 * _smooth_noise(prng, mm.shape[0], mm.shape[1], 3)  # organic borders
        mm = F.up(mm, bb)
        mask = (mm > 0) & (heart_f[bb] <= 0)
        lung = {"bb": bb, "mm": mm, "mask": mask, "q": q}
        lung["coords"] = (lambda u=u, ulat=ulat, y=y, q=q, bb=bb: {
            "urel": F.up(np.clip(u / ulat, 0.0, 1.2), bb),
            "ynorm": F.up(np.clip((y - q["ya"]) / (q["yd"] + 0.1 - q["ya"]), 0.0, 1.0), bb)})
        out.append(lung)
    return out


def _opacity_region(o_rng, F, lung, band, pneumonia):
    """Threshold a smooth field inside one lung at the quantile that hits ``band``.

    Returns (region inside the lung box, exact fraction). The field is patchy and
    biased peripheral/lower for covid-like disease, and one blob around a centre in a
    chosen zone (lobar, contiguous) for pneumonia. The fraction is computed from the
    region actually returned, so scores derived from it are exact.
    """
    mask = lung["mask"]
    n = int(mask.sum())
    if n == 0:
        return np.zeros_like(mask), 0.0
    target = _u(o_rng, *_BANDS[band])
    co = lung.setdefault("co", lung["coords"]())
    bh, bw = mask.shape
    n1 = _smooth_noise(o_rng, bh, bw, 4)
    n2 = _smooth_noise(o_rng, bh, bw, 9)
    if pneumonia:
        zone = int(o_rng.choice(3, p=[0.2, 0.25, 0.55]))
        lo, hi = ((0.0, 0.4), (0.3, 0.65), (0.55, 1.0))[zone]
        cand = np.flatnonzero(mask & (co["ynorm"] >= lo) & (co["ynorm"] <= hi))
        if cand.size == 0:
            cand = np.flatnonzero(mask)
        r, c = divmod(int(cand[int(o_rng.integers(cand.size))]), bw)
        (cx,), (cy,) = F.px_to_body([c + lung["bb"][1].start], [r + lung["bb"][0].start])
        sx, sy = _u(o_rng, 0.8, 1.3), _u(o_rng, 0.7, 1.2)
        xh, yh = F.half_grid(lung["bb"])
        dist = F.up(np.sqrt(((xh - cx) / sx) ** 2 + ((yh - cy) / sy) ** 2), lung["bb"])
        # multiplicative wobble keeps the blob roughly star-shaped around its centre
        f = -dist / np.clip(1.0 + 0.3 * n1 + 0.12 * n2, 0.4, 2.0)
    else:
        bp, bl = _u(o_rng, 0.8, 2.2), _u(o_rng, 0.5, 1.8)
        f = n1 + 0.6 * n2 + bp * co["urel"] + bl * co["ynorm"]
    vals = f[mask]
    keep = min(max(n - int(round(target * n)), 0), n - 1)  # lung pixels left clear
    if keep > 0:
        thr = np.partition(vals, keep)[keep]
        region = mask & (f >= thr)
    else:
        region = mask.copy()
    if pneumonia:  # one contiguous consolidation: keep the component holding the centre
        ncomp, lab = cv2.connectedComponents(region.astype(np.uint8), connectivity=8)
        if ncomp > 2:
            rr, cc = np.unravel_index(int(np.argmax(np.where(region, f, -np.inf))), f.shape)
            main = lab == lab[rr, cc]
            if extent_score(float(main.sum()) / n) == band:
                region = main
    return region, float(region.sum()) / n


def _draw_devices(F, p, acq, style, canvas):
    """Tubes, lines and ECG leads, drawn into a uint8 canvas. Returns names drawn."""
    k = F.k
    drawn = []
    portable = style == "ap_portable"
    car = p["carina"]

    def poly(xs, ys, val, th):
        cv2.polylines(canvas, [F.pts(xs, ys)], False, int(val), max(1, int(round(th * k))),
                      cv2.LINE_AA, shift=4)

    if acq.random() < (0.55 if portable else 0.03):
        t = np.linspace(0, 1, 24)
        x0, xt = _u(acq, -0.06, 0.06), _u(acq, -0.03, 0.03)
        yt = car - _u(acq, 0.06, 0.2)
        xs = x0 + (xt - x0) * t + _u(acq, -0.06, 0.06) * np.sin(np.pi * t)
        ys = -1.4 + (yt + 1.4) * t
        poly(xs, ys, 140, 4.5)
        poly(xs + 0.006, ys, 255, 1.2)
        drawn.append("endotracheal tube")
    if acq.random() < (0.35 if portable else 0.02):
        yd = p["lungs"][1]["yd"]
        t = np.linspace(0, 1, 30)
        xs = np.where(t < 0.7, 0.02 + 0.03 * t, 0.04 + (t - 0.7) / 0.3 * _u(acq, 0.2, 0.35))
        ys = -1.4 + (yd + 0.22 + 1.4) * np.minimum(t / 0.8, 1.0) + 0.05 * np.maximum(t - 0.8, 0) / 0.2
        poly(xs, ys, 200, 2.2)
        drawn.append("enteric tube")
    if acq.random() < (0.35 if portable else 0.02):
        s = -1 if acq.random() < 0.6 else 1
        xs = np.array([s * 0.62, s * 0.35, s * 0.12, -0.07, -0.08])
        ys = np.array([-0.72, -0.66, -0.56, -0.42, -0.22]) + _u(acq, -0.03, 0.03)
        poly(xs, ys, 230, 2.0)
        drawn.append("central venous catheter")
    n_ecg = int(acq.integers(2, 5)) if acq.random() < (0.75 if portable else 0.06) else 0
    for _ in range(n_ecg):
        s = -1 if acq.random() < 0.5 else 1
        if acq.random() < 0.6:
            ex, ey = s * _u(acq, 0.35, 0.8), _u(acq, -0.85, -0.55)
        else:
            ex, ey = s * _u(acq, 0.55, 0.85), _u(acq, 0.1, 0.55)
        c = F.pt(ex, ey)
        rad = max(2, int(round(F.plen(0.032))))
        cv2.circle(canvas, c, rad * 16, 255, max(1, int(round(1.6 * k))), cv2.LINE_AA, shift=4)
        cv2.circle(canvas, c, max(1, rad // 3) * 16, 255, -1, cv2.LINE_AA, shift=4)
        t = np.linspace(0, 1, 12)
        wx = ex + s * t * _u(acq, 0.3, 0.9) + 0.05 * np.sin(t * _u(acq, 2, 6))
        wy = ey + t * _u(acq, -0.6, 0.6)
        poly(wx, wy, 170, 1.0)
    if n_ecg:
        drawn.append("ECG leads")
    return drawn


def _markers(img, acq, style, k):
    """Burnt-in text markers (drawn after quantisation, like on real films)."""
    h, w = img.shape
    items = []
    if style == "ap_portable" and acq.random() < 0.85:
        items.append(str(acq.choice(["PORTABLE", "PORTABLE AP", "AP SUPINE", "AP", "SEMI-ERECT"])))
    if acq.random() < (0.55 if style == "ap_portable" else 0.45):
        items.append(str(acq.choice(["L", "R"])))
    corners = [(0, 0), (1, 0), (0, 1), (1, 1)]
    order = acq.permutation(4)
    for text, ci in zip(items, order):
        cx, cy = corners[int(ci)]
        fs = k * _u(acq, 0.45, 0.8) * (1.4 if len(text) == 1 else 1.0)
        th = max(1, int(round(k * 1.5)))
        (tw, tht), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, fs, th)
        m = int(round(8 * k))
        x = m if cx == 0 else max(0, w - tw - m)
        y = tht + m if cy == 0 else h - m
        if acq.random() < 0.4:
            cv2.rectangle(img, (x - 3, y - tht - 3), (x + tw + 3, y + 4), 0, -1)
        cv2.putText(img, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, fs, int(acq.integers(215, 256)),
                    th, cv2.LINE_AA)
    return items


_LUT_STEP = 4096.0  # attenuation resolution of the film-response lookup table
_LUT_N = 6 * 4096   # attenuations above 6 are all "white"


def _develop(F, A, acq, look):
    """Attenuation -> film grey (float 0..255): response curve, blur, noise.

    The response ``bg + (252-bg) * clip((1-exp(-k*A) - lo) / (hi - lo), 0, 1) ** gamma``
    is evaluated once on a fine grid of A and looked up (cheaper than per pixel).
    """
    k = F.k
    if look == "ap_portable":
        kexp, wlo, whi, gamma = _u(acq, 0.8, 1.0), _u(acq, -0.15, 0.0), _u(acq, 0.95, 1.05), _u(acq, 1.0, 1.4)
        sig, nstd, bg = _u(acq, 0.9, 1.6), _u(acq, 3.0, 6.0), _u(acq, 8, 35)
    else:
        kexp, wlo, whi, gamma = _u(acq, 0.9, 1.1), _u(acq, -0.02, 0.1), _u(acq, 0.9, 0.98), _u(acq, 1.3, 1.9)
        sig, nstd, bg = _u(acq, 0.5, 0.9), _u(acq, 1.5, 3.5), _u(acq, 0, 20)
    grid = np.arange(_LUT_N, dtype=np.float64) * (1.0 / _LUT_STEP)
    lut = bg + (252.0 - bg) * np.clip(((1.0 - np.exp(-kexp * grid)) - wlo) / (whi - wlo), 0.0, 1.0) ** gamma
    A *= _LUT_STEP
    np.clip(A, 0.0, _LUT_N - 1.0, out=A)
    g = lut.take(A.astype(np.intp))  # truncation: A resolution 1/4096 is far below a grey level
    g = _blur(g, sig * k)
    # quantum noise (white; triangular from two byte draws: cheap, near-Gaussian, std 1)
    # plus film grain (half-resolution Gaussian noise, interpolated)
    hw_ = F.h * F.w
    raw = np.frombuffer(acq.bytes(2 * hw_), dtype=np.uint8)
    noise = raw[:hw_].astype(np.float64)
    noise += raw[hw_:]
    noise -= 255.0
    noise *= 0.6 / 104.5
    noise = noise.reshape(F.h, F.w)
    gh, gw = (F.h + 1) // 2, (F.w + 1) // 2
    noise += cv2.resize(acq.standard_normal((gh, gw)), (2 * gw, 2 * gh), interpolation=cv2.INTER_LINEAR)[:F.h, :F.w]
    noise *= 1.15 - g * (0.5 / 255.0)  # a little less noise in the bright parts
    noise *= nstd
    g += noise
    return g


def _quantise(g):
    np.clip(g, 0.0, 255.0, out=g)
    np.rint(g, out=g)
    return g.astype(np.uint8)


def _union_box(boxes):
    if not boxes:
        return None
    return (slice(min(b[0].start for b in boxes), max(b[0].stop for b in boxes)),
            slice(min(b[1].start for b in boxes), max(b[1].stop for b in boxes)))


def _u8blur(canvas, sigma):
    """Blur a uint8 drawing (OpenCV's 8-bit Gaussian is fixed-point, bit-exact) -> float 0..1."""
    if sigma > 2.5:  # two box passes ~ a Gaussian of this sigma, at constant cost
        n = int(round(math.sqrt(6.0 * sigma * sigma + 1.0))) | 1
        canvas = cv2.blur(cv2.blur(canvas, (n, n)), (n, n))
    elif sigma > 0.3:
        canvas = cv2.GaussianBlur(canvas, (0, 0), sigma)
    return canvas * (1.0 / 255.0)


def _render_frontal(spec: PhantomSpec, h: int, w: int, look: str):
    a = np.random.default_rng([int(spec.anatomy_seed if spec.anatomy_seed is not None else spec.seed), _S_ANATOMY])
    acq = np.random.default_rng([int(spec.seed), _S_ACQ])
    o_rng = np.random.default_rng([int(spec.seed), _S_OPACITY])
    p = _anatomy(a)
    if look == "ap_portable":  # supine/portable: magnified heart, smaller lung volumes
        mag = _u(acq, 1.1, 1.22)
        p["ha"] *= mag
        p["hb"] *= mag
        lift = _u(acq, 0.04, 0.1)
        for q in p["lungs"]:
            q["yd"] -= lift
            q["ya"] += 0.02
    F = _Frame(h, w, p["rot"] + _u(acq, -1.0, 1.0), p["scale"] * _u(acq, 0.98, 1.02),
               p["tx"] + _u(acq, -0.01, 0.01), p["ty"] + _u(acq, -0.01, 0.01))
    k = F.k
    W0 = p["W0"]

    # soft tissue (half resolution): flattened elliptical cross-section, sloping
    # shoulders, neck
    full_bb = (slice(0, h), slice(0, w))
    xh, yh = F.half_grid(full_bb)
    axh = np.abs(xh)
    wy = W0 - 0.08 * np.clip(yh - 0.4, 0.0, None)
    torso = np.sqrt(np.sqrt(np.clip(1.0 - (axh / wy) ** 2, 0.0, 1.0)))
    torso *= _smoothstep((yh - (p["ys0"] + p["slope"] * (axh / W0) ** 2)) * 10.0)
    neck = 0.8 * np.sqrt(np.clip(1.0 - (axh / p["neck"]) ** 2, 0.0, 1.0))
    A = F.up(np.maximum(torso, neck) * p["T"], full_bb)

    # heart: tilted ellipse sitting on the left hemidiaphragm
    hy = p["lungs"][1]["yd"] - p["hdrop"] * p["hb"]
    heart_f = np.full((h, w), -1.0)
    bb = F.box(p["hx"] - 0.55, p["hx"] + 0.55, hy - 0.45, hy + 0.45)
    tc, ts = math.cos(math.radians(p["htilt"])), math.sin(math.radians(p["htilt"]))
    if bb is not None:
        xs_, ys_ = F.half_grid(bb)
        dx, dy = xs_ - p["hx"], ys_ - hy
        hf = 1.0 - ((tc * dx + ts * dy) / p["ha"]) ** 2 - ((-ts * dx + tc * dy) / p["hb"]) ** 2
        hf = F.up(hf, bb)
        heart_f[bb] = hf
        A[bb] += p["H0"] * np.clip(hf * 4.0, 0.0, 1.0)

    # lungs: air inside each lung box; opacities replace part of that air
    lungs = _lung_fields(F, p, heart_f)
    trng = np.random.default_rng(p["texture_seed"])
    pneumonia = spec.label == "pneumonia"
    opacity_mask = np.zeros((h, w), dtype=bool)
    involvement, grades, zones = [0.0, 0.0], [0, 0], []
    consol = None
    lung_soft = np.zeros((h, w))
    masks = []
    # in-place arithmetic below: fresh large temporaries cost page faults that dominate
    for i, lung in enumerate(lungs):
        full = np.zeros((h, w), dtype=bool)
        masks.append(full)
        if lung is None:
            continue
        bb = lung["bb"]
        full[bb] = lung["mask"]
        depth = lung["mm"] * 10.0
        np.clip(depth, 0.0, 1.0, out=depth)
        hide = heart_f[bb] * 12.0  # retro-cardiac lung mostly hidden
        np.clip(hide, 0.0, 1.0, out=hide)
        hide *= -0.65
        hide += 1.0
        air = np.sqrt(depth)
        air *= hide
        air *= p["L0"]
        soft_l = depth
        soft_l *= 3.0
        np.clip(soft_l, 0.0, 1.0, out=soft_l)
        soft_l *= hide
        np.maximum(lung_soft[bb], soft_l, out=lung_soft[bb])
        bh, bw = soft_l.shape
        tex = cv2.resize(trng.standard_normal((max(2, bh // 8), max(2, bw // 8))), (bw, bh),
                         interpolation=cv2.INTER_LINEAR)  # parenchymal texture
        tex *= soft_l
        tex *= 0.05
        A[bb] += tex
        e, g = int(spec.extent[i]), int(spec.opacity[i])
        if e > 0 and g > 0:
            region, frac = _opacity_region(o_rng, F, lung, e, pneumonia)
            if frac > 0:
                opacity_mask[bb] |= region
                involvement[i], grades[i] = frac, g
                strength = {1: _u(o_rng, 0.19, 0.26), 2: _u(o_rng, 0.5, 0.6), 3: _u(o_rng, 0.9, 0.97)}[g]
                sig = (3.5 if g == 1 else 2.2) * k
                soft = _u8blur(region.astype(np.uint8) * np.uint8(255), sig)
                tex = np.clip(0.78 + 0.3 * _smooth_noise(o_rng, bh, bw, 16), 0.35, 1.3)
                if g > 1:
                    tex = 0.85 + 0.15 * tex
                    if consol is None:
                        consol = np.zeros((h, w))
                    np.maximum(consol[bb], soft, out=consol[bb])
                red = strength * soft * tex
                air = np.clip(air - red * np.maximum(air, 0.6 * p["L0"]), 0.0, None)
                ys_, xs_ = np.nonzero(region)
                co = lung["co"]
                zones.append({"lung": i, "grade": g, "frac": frac,
                              "ynorm": float(co["ynorm"][ys_, xs_].mean()),
                              "periph": float((co["urel"][ys_, xs_] > 0.6).mean()),
                              "lower": float((co["ynorm"][ys_, xs_] > 0.5).mean()),
                              "centroid": (float(xs_.mean() + bb[1].start), float(ys_.mean() + bb[0].start))})
        A[bb] -= air

    # vessels radiating from the hila; air bronchograms inside consolidation
    levels = _vessel_tree(p)
    canvas = np.zeros((h, w), np.uint8)
    _draw_tree(F, canvas, levels)
    lb = _union_box([lu["bb"] for lu in lungs if lu is not None])
    if lb is not None:
        ves = _u8blur(canvas[lb], 0.6 * k)
        ves *= lung_soft[lb]
        ves *= p["ves"]
        A[lb] += ves
        if consol is not None:
            canvas[...] = 0
            _draw_tree(F, canvas, levels, offset=(0.01, 0.012), gens=(1, 2, 3), width0=2.2, decay=0.75, vdecay=0.9)
            bro = _u8blur(canvas[lb], 0.5 * k)
            bro *= consol[lb]
            bro *= lung_soft[lb]
            bro *= 0.45
            A[lb] -= bro

    # trachea and main bronchi
    canvas[...] = 0
    car = p["carina"]
    tw = max(2, int(round(F.plen(0.055))))
    cv2.line(canvas, F.pt(0.0, -1.4), F.pt(0.01, car), 255, tw, cv2.LINE_AA, shift=4)
    for q in p["lungs"]:
        cv2.line(canvas, F.pt(0.01, car), F.pt(q["side"] * (q["um"] + 0.05), car + 0.15),
                 255, max(1, int(round(tw * 0.65))), cv2.LINE_AA, shift=4)
    A -= 0.3 * _u8blur(canvas, 1.0 * k)

    # bones over the thorax, computed at half resolution (smooth at the film's blur):
    # posterior ribs as one periodic field in a curved coordinate, fainter anterior
    # ribs sloping the other way, a faint spine, clavicles, humeral heads, breasts
    bb = F.box(-1.2, 1.2, -1.3, 0.95)
    if bb is not None:
        xs_, ys_ = F.half_grid(bb)
        s_ = np.abs(xs_)
        t = (ys_ - p["rib0"] + p["riba"] * s_ - p["ribc"] * s_ ** 3) / (p["ribsp"] * (1.0 + 0.25 * s_))
        ph = t - np.floor(t)
        wr = 0.42 + 0.12 * s_
        prof = np.clip((wr * 0.5 - np.abs(ph - wr * 0.5)) * 12.0, 0.0, 1.0)
        prof += 0.3 * np.clip(1.0 - np.abs(ph - wr + 0.03) * 20.0, 0.0, None)  # inferior cortex
        rib = prof * ((t >= 0) & (t < 9.5))
        ta = (ys_ - p["rib0"] - 0.35 - 0.42 * (0.9 - s_)) / (p["ribsp"] * 1.2)
        pa_ = ta - np.floor(ta)
        profa = np.clip((0.17 - np.abs(pa_ - 0.17)) * 14.0, 0.0, 1.0)
        rib += 0.35 * profa * np.clip((s_ - 0.3) * 8.0, 0.0, 1.0) * ((ta >= 0) & (ta < 6))
        rib *= np.clip((s_ - 0.05) * 12.0, 0.0, 1.0) * np.clip((W0 - 0.02 - s_) * 15.0, 0.0, 1.0)
        rib = _Frame.up(rib, bb)
        A[bb] += p["ribamp"] * rib * (0.35 + 0.65 * lung_soft[bb])
        # spine: vertebral bodies (a triangle wave in y stands in for body/disc)
        tri = np.abs((ys_ * 10.0) % 2.0 - 1.0)
        bone = np.sqrt(np.clip(1.0 - (xs_ * (1 / 0.07)) ** 2, 0.0, 1.0)) * (0.11 + 0.05 * tri)
        if p["breast"] > 0:
            bd = ((s_ - 0.5) / 0.38) ** 2 + ((ys_ - 0.32) / 0.32) ** 2
            bone += p["breast"] * np.sqrt(np.clip(1 - bd, 0, 1)) * np.clip((ys_ - 0.05) * 5, 0, 1)
        A[bb] += _Frame.up(bone, bb)
    # clavicles (S-shaped bands rising laterally) and humeral heads, top of the film
    bb = F.box(-1.2, 1.2, -1.3, p["clav_y"] + 0.12)
    if bb is not None:
        xs_, ys_ = F.half_grid(bb)
        s_ = np.abs(xs_)
        tt = (s_ - 0.05) * (1 / 0.65)
        yc = p["clav_y"] - p["clav_rise"] * tt + 0.08 * tt * (tt - 0.5) * (tt - 1.0)
        d = (ys_ - yc) / (0.034 + 0.012 * tt)
        cl = np.sqrt(np.clip(1 - d * d, 0, 1)) * np.clip(tt * 20, 0, 1) * np.clip((1 - tt) * 20, 0, 1)
        hd = ((s_ - (W0 + 0.03)) ** 2 + (ys_ - (p["ys0"] + p["slope"] + 0.12)) ** 2) * (1 / 0.15 ** 2)
        cl *= 0.35
        cl += 0.4 * np.sqrt(np.clip(1 - hd, 0, 1))
        A[bb] += _Frame.up(cl, bb)

    if p["bubble"]:  # gastric air under the left hemidiaphragm, with a fluid level
        ql = p["lungs"][1]
        cxb = p["bubble_x"]
        cyb = ql["yd"] + ql["kd"] * (cxb - ql["uc"]) ** 2 + 0.1
        bb = F.box(cxb - 0.15, cxb + 0.15, cyb - 0.1, cyb + 0.1)
        if bb is not None:
            xb_, yb_ = F.half_grid(bb)
            bd = ((xb_ - cxb) / 0.1) ** 2 + ((yb_ - cyb) / 0.055) ** 2
            A[bb] -= F.up(0.45 * np.sqrt(np.clip(1 - bd, 0, 1)) * np.clip((cyb + 0.01 - yb_) * 200, 0, 1), bb)

    canvas[...] = 0
    devices = _draw_devices(F, p, acq, look, canvas)
    if devices:
        A += 1.2 * _u8blur(canvas, 0.5 * k)

    img = _quantise(_develop(F, A, acq, look))
    markers = _markers(img, acq, look, k)
    return {"image": img, "right": masks[0], "left": masks[1], "opacity": opacity_mask,
            "involvement": tuple(involvement), "grades": tuple(grades), "zones": zones,
            "devices": devices, "markers": markers}


# ---------------------------------------------------------------------------- other kinds

def _draw(canvas, F, kind, *args, val=255, th=0.0):
    """Primitive drawing in body coordinates onto a uint8 canvas (anti-aliased)."""
    t = max(1, int(round(F.plen(th)))) if th > 0 else -1
    if kind == "line":
        x0, y0, x1, y1 = args
        cv2.line(canvas, F.pt(x0, y0), F.pt(x1, y1), int(val), t, cv2.LINE_AA, shift=4)
    elif kind == "ellipse":
        cx, cy, rx, ry, ang = args
        angs = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        ca, sa = math.cos(math.radians(ang)), math.sin(math.radians(ang))
        ex, ey = rx * np.cos(angs), ry * np.sin(angs)
        xs, ys = cx + ca * ex - sa * ey, cy + sa * ex + ca * ey
        if t < 0:
            cv2.fillPoly(canvas, [F.pts(xs, ys)], int(val), cv2.LINE_AA, shift=4)
        else:
            cv2.polylines(canvas, [F.pts(xs, ys)], True, int(val), t, cv2.LINE_AA, shift=4)
    elif kind == "poly":
        xs, ys = args
        cv2.fillPoly(canvas, [F.pts(xs, ys)], int(val), cv2.LINE_AA, shift=4)


def _bone(canvas, F, x0, y0, x1, y1, width, medulla=0.55):
    """A long bone: bright cortex with a less dense medullary cavity."""
    _draw(canvas, F, "line", x0, y0, x1, y1, val=255, th=width)
    if width > 0.035:
        _draw(canvas, F, "line", x0, y0, x1, y1, val=int(255 * medulla), th=width * 0.5)


def _finish_kind(F, soft, bone, acq, extra=None, soft_amp=1.3, bone_amp=1.1):
    """Soft tissue (well blurred: rounded limbs) + bone with a trabecular texture."""
    k = F.k
    A = _u8blur(soft, 3.0 * k)
    A *= soft_amp
    b = _u8blur(bone, 0.9 * k)
    b *= 0.85 + 0.15 * _smooth_noise(acq, F.h, F.w, 48)
    b *= bone_amp
    A += b
    if extra is not None:
        A += extra
    return A


def _render_hand(spec, h, w, acq):
    mirror = -1.0 if acq.random() < 0.5 else 1.0
    F = _Frame(h, w, _u(acq, -15, 15), _u(acq, 0.85, 1.05), _u(acq, -0.08, 0.08), _u(acq, -0.05, 0.05))
    soft = np.zeros((h, w), np.uint8)
    bone = np.zeros((h, w), np.uint8)
    _draw(soft, F, "line", 0.0, 1.6, 0.0, 0.6, th=0.62)
    _draw(soft, F, "ellipse", 0.0, 0.28, 0.37, 0.36, 0.0)
    lengths = [0.62, 0.72, 0.68, 0.52]
    spread = _u(acq, 3, 9)
    for i in range(4):
        bx = mirror * (-0.24 + 0.16 * i)
        by = 0.02 + 0.03 * abs(i - 1.2)
        ang = math.radians(-90 + mirror * (i - 1.5) * spread)
        L = lengths[i] * _u(acq, 0.92, 1.08)
        dx, dy = math.cos(ang), math.sin(ang)
        _draw(soft, F, "line", bx, by + 0.1, bx + dx * (L + 0.04), by + dy * (L + 0.04), th=0.14)
        # metacarpal from the carpus to the knuckle
        cx0 = mirror * (-0.1 + 0.065 * i)
        _bone(bone, F, cx0, 0.55, bx, by + 0.03, 0.06)
        pos = 0.0
        for frac, wid in ((0.45, 0.055), (0.3, 0.047), (0.25, 0.04)):
            seg = L * frac
            _bone(bone, F, bx + dx * (pos + 0.03), by + dy * (pos + 0.03),
                  bx + dx * (pos + seg - 0.02), by + dy * (pos + seg - 0.02), wid)
            pos += seg
    # thumb
    tx0, ty0 = mirror * -0.3, 0.42
    ang = math.radians(-90 - mirror * _u(acq, 35, 55))
    dx, dy = math.cos(ang), math.sin(ang)
    _draw(soft, F, "line", tx0, ty0, tx0 + dx * 0.62, ty0 + dy * 0.62, th=0.17)
    pos = 0.0
    for seg, wid in ((0.26, 0.065), (0.2, 0.055), (0.16, 0.045)):
        _bone(bone, F, tx0 + dx * (pos + 0.02), ty0 + dy * (pos + 0.02),
              tx0 + dx * (pos + seg - 0.02), ty0 + dy * (pos + seg - 0.02), wid)
        pos += seg
    for j in range(8):  # carpal bones
        cx = mirror * (-0.15 + 0.1 * (j % 4)) + _u(acq, -0.01, 0.01)
        cy = 0.6 + 0.1 * (j // 4)
        _draw(bone, F, "ellipse", cx, cy, 0.05, 0.042, _u(acq, 0, 180), val=210)
    _bone(bone, F, mirror * -0.1, 0.78, mirror * -0.1, 1.6, 0.16)   # radius
    _bone(bone, F, mirror * 0.13, 0.8, mirror * 0.14, 1.6, 0.1)     # ulna
    return F, _finish_kind(F, soft, bone, acq)


def _render_knee(spec, h, w, acq):
    F = _Frame(h, w, _u(acq, -6, 6), _u(acq, 0.85, 1.05), _u(acq, -0.06, 0.06), _u(acq, -0.08, 0.08))
    soft = np.zeros((h, w), np.uint8)
    bone = np.zeros((h, w), np.uint8)
    lw = _u(acq, 0.55, 0.7)
    _draw(soft, F, "poly", np.array([-lw - 0.1, lw + 0.1, lw, -lw]), np.array([-1.5, -1.5, 1.5, 1.5]))
    _bone(bone, F, 0.0, -1.6, 0.0, -0.3, 0.32)                       # femoral shaft
    _draw(bone, F, "poly", np.array([-0.16, 0.16, 0.36, -0.36]), np.array([-0.55, -0.55, -0.12, -0.12]))
    for s in (-1, 1):
        _draw(bone, F, "ellipse", s * 0.18, -0.1, 0.19, 0.15, 0.0)  # condyles
    _draw(bone, F, "ellipse", 0.0, -0.02, 0.05, 0.05, 0.0, val=120)  # intercondylar notch
    _draw(bone, F, "poly", np.array([-0.4, 0.4, 0.38, 0.16, -0.16, -0.38]),
          np.array([0.12, 0.12, 0.22, 0.5, 0.5, 0.22]))               # tibial plateau
    _bone(bone, F, 0.0, 0.4, 0.0, 1.6, 0.3)                          # tibial shaft
    _draw(bone, F, "ellipse", 0.37, 0.3, 0.07, 0.06, 0.0, val=230)   # fibular head
    _bone(bone, F, 0.36, 0.35, 0.33, 1.6, 0.07)
    patella = np.zeros((h, w), np.uint8)
    _draw(patella, F, "ellipse", _u(acq, -0.04, 0.04), -0.2, 0.14, 0.17, 0.0)
    extra = 0.35 * _blur(patella.astype(np.float64) / 255.0, 1.5 * F.k)
    return F, _finish_kind(F, soft, bone, acq, extra=extra)


def _render_pelvis(spec, h, w, acq):
    F = _Frame(h, w, _u(acq, -4, 4), _u(acq, 0.85, 1.0), _u(acq, -0.04, 0.04), _u(acq, -0.05, 0.05))
    soft = np.zeros((h, w), np.uint8)
    bone = np.zeros((h, w), np.uint8)
    bw = _u(acq, 1.05, 1.25)
    _draw(soft, F, "poly", np.array([-bw, bw, bw * 0.95, -bw * 0.95]), np.array([-1.5, -1.5, 1.5, 1.5]))
    for s in (-1, 1):
        # iliac wing: a fan with a bright crest and the arcuate line
        wx = np.array([0.16, 0.2, 0.45, 0.72, 0.86, 0.88, 0.78, 0.62, 0.45, 0.25])
        wy = np.array([-0.42, -0.7, -0.82, -0.75, -0.55, -0.3, -0.15, 0.05, 0.05, -0.1])
        _draw(bone, F, "poly", s * wx, wy, val=140)
        cv2.polylines(bone, [F.pts(s * wx[1:6], wy[1:6])], False, 255, max(1, int(round(F.plen(0.05)))),
                      cv2.LINE_AA, shift=4)
        cv2.polylines(bone, [F.pts(s * np.array([0.17, 0.3, 0.45, 0.52]), np.array([-0.3, -0.1, 0.05, 0.15]))],
                      False, 230, max(1, int(round(F.plen(0.02)))), cv2.LINE_AA, shift=4)
        _draw(bone, F, "ellipse", s * 0.32, 0.48, 0.2, 0.14, 0.0, val=255, th=0.07)   # pubic ring
        _draw(bone, F, "ellipse", s * 0.6, 0.2, 0.16, 0.16, 0.0, val=240)              # femoral head
        _bone(bone, F, s * 0.6, 0.22, s * 0.78, 0.48, 0.14)                            # neck
        _draw(bone, F, "ellipse", s * 0.83, 0.42, 0.1, 0.12, 0.0, val=220)             # trochanter
        _bone(bone, F, s * 0.78, 0.45, s * 0.7, 1.6, 0.24)                             # shaft
    _draw(bone, F, "poly", np.array([-0.2, 0.2, 0.05, -0.05]), np.array([-0.5, -0.5, 0.15, 0.15]), val=200)  # sacrum
    for j in range(4):
        for s in (-1, 1):
            _draw(bone, F, "ellipse", s * (0.1 - 0.015 * j), -0.38 + 0.13 * j, 0.025, 0.025, 0.0, val=120)
    for j in range(2):  # lumbar vertebrae
        _draw(bone, F, "poly", np.array([-0.16, 0.16, 0.16, -0.16]),
              np.array([-1.0 + 0.24 * j, -1.0 + 0.24 * j, -0.82 + 0.24 * j, -0.82 + 0.24 * j]), val=220)
    _draw(bone, F, "line", 0.0, 0.38, 0.0, 0.58, val=0, th=0.02)      # symphysis gap
    gas = np.clip(_smooth_noise(acq, h, w, 14) - 1.0, 0, None)
    gas *= (np.abs(F.y + 0.2) < 0.5)
    return F, _finish_kind(F, soft, bone, acq, extra=-0.5 * gas)


def _render_lateral(spec, h, w, acq):
    """Lateral chest film: patient facing image left; one lung field (both lungs
    superimposed), heart anterior-inferior, vertebral bodies posterior, sternum in front."""
    a = acq
    F = _Frame(h, w, _u(a, -5, 5), _u(a, 0.93, 1.05), _u(a, -0.05, 0.05), _u(a, -0.03, 0.05))
    k = F.k
    full_bb = (slice(0, h), slice(0, w))
    x, y = F.half_grid(full_bb)
    front, back = _u(a, -0.86, -0.74), _u(a, 0.78, 0.9)
    mid, half = (front + back) / 2, (back - front) / 2
    A = _u(a, 2.0, 2.3) * np.sqrt(np.sqrt(np.clip(1 - ((x - mid) / half) ** 2, 0, 1)))
    A *= np.clip((y + 1.05) * 6.0, 0, 1)
    ya, yb = _u(a, -0.84, -0.74), _u(a, 0.3, 0.42)
    ant, post = front + _u(a, 0.08, 0.14), back - _u(a, 0.12, 0.2)
    m1 = y - (ya + 1.6 * (x - 0.0) ** 2)
    m2 = x - (ant + 0.12 * np.clip(-y - 0.2, 0, None) ** 2)
    m3 = post - x
    m4 = (yb + 0.25 * (x - ant) / (post - ant) + 0.1 * ((x - 0.1) / 0.6) ** 2) - y
    mm = np.minimum(np.minimum(m1, m2), np.minimum(m3, m4))
    mm += 0.012 * _smooth_noise(a, mm.shape[0], mm.shape[1], 3)
    depth = np.clip(mm * 8.0, 0, 1)
    air = _u(a, 1.2, 1.45) * np.sqrt(depth)
    # the other hemidiaphragm, a little higher: a faint second dome
    air *= 1.0 - 0.2 * (y > yb - 0.07 + 0.25 * (x - ant) / (post - ant) + 0.1 * ((x - 0.1) / 0.6) ** 2)
    hcx, hcy = ant + _u(a, 0.3, 0.4), yb - _u(a, 0.12, 0.2)
    hf = 1 - ((x - hcx) / _u(a, 0.3, 0.38)) ** 2 - ((y - hcy) / _u(a, 0.26, 0.32)) ** 2
    air *= 1 - 0.7 * np.clip(hf * 10, 0, 1)
    A -= air
    # vertebral bodies (blocks with disc spaces), posterior elements, sternum
    vx0 = post - _u(a, 0.05, 0.12)
    vb = np.clip((x - vx0) * 30, 0, 1) * np.clip((vx0 + 0.2 - x) * 30, 0, 1)
    disc = np.clip(np.abs((y * (1 / 0.11)) % 1.0 - 0.5) * 8 - 2.6, 0, 1)  # ~0 inside a body
    A += (0.3 * vb * (1 - disc) + 0.15 * np.clip((x - vx0 - 0.22) * 30, 0, 1)) * (y > -0.9)
    A += 0.3 * np.clip(1 - np.abs(x - (front + 0.05)) * 40, 0, 1) * (y > -0.6) * (y < 0.25)
    A = F.up(A, full_bb)
    canvas = np.zeros((h, w), np.uint8)
    for j in range(9):  # posterior ribs, faint oblique arcs
        y0 = -0.65 + 0.12 * j
        xs_ = np.linspace(post + 0.05, ant + 0.25, 8)
        ys_ = y0 + 0.35 * (xs_ - post) / (ant - post) + 0.04 * np.sin(np.linspace(0, np.pi, 8))
        cv2.polylines(canvas, [F.pts(xs_, ys_)], False, 255, max(1, int(round(F.plen(0.03)))), cv2.LINE_AA, shift=4)
    A += 0.12 * _u8blur(canvas, 1.0 * k) * F.up(depth, full_bb)
    canvas[...] = 0
    _draw(canvas, F, "line", 0.2, -1.5, -0.3, -0.5, th=0.3)   # raised arms
    arm = _u8blur(canvas, 3.0 * k)
    canvas[...] = 0
    _bone(canvas, F, 0.2, -1.5, -0.27, -0.6, 0.1)
    arm *= 0.45
    arm += 0.5 * _u8blur(canvas, 0.8 * k)
    A += arm
    canvas[...] = 0
    _draw(canvas, F, "line", -0.05, -1.3, 0.08, -0.3, th=0.06)  # trachea
    A -= 0.3 * _u8blur(canvas, 1.0 * k)
    return F, A


def _render_natural(spec, h, w, acq):
    """Not a radiograph: gradient, coloured shapes and text strokes (RGB)."""
    c0, c1 = acq.uniform(0, 255, 3), acq.uniform(0, 255, 3)
    ang = _u(acq, 0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w]
    t = (math.cos(ang) * xx / w + math.sin(ang) * yy / h)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    img += 18.0 * _smooth_noise(acq, h, w, 8)[..., None]
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    m = min(h, w)
    for _ in range(int(acq.integers(4, 12))):
        col = tuple(int(v) for v in acq.integers(0, 256, 3))
        kind = int(acq.integers(4))
        cx, cy = int(acq.integers(0, w)), int(acq.integers(0, h))
        r = int(m * _u(acq, 0.04, 0.25))
        if kind == 0:
            cv2.circle(img, (cx, cy), r, col, -1, cv2.LINE_AA)
        elif kind == 1:
            cv2.rectangle(img, (cx - r, cy - r // 2), (cx + r, cy + r), col, -1)
        elif kind == 2:
            pts = np.stack([cx + acq.integers(-r, r + 1, 5), cy + acq.integers(-r, r + 1, 5)], -1).astype(np.int32)
            cv2.fillPoly(img, [pts], col, cv2.LINE_AA)
        else:
            cv2.line(img, (cx, cy), (int(acq.integers(0, w)), int(acq.integers(0, h))), col,
                     max(1, int(m * 0.01)), cv2.LINE_AA)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 "
    for _ in range(int(acq.integers(1, 4))):
        text = "".join(letters[int(i)] for i in acq.integers(0, len(letters), int(acq.integers(4, 14))))
        col = tuple(int(v) for v in acq.integers(0, 256, 3))
        cv2.putText(img, text, (int(acq.integers(0, max(1, w // 2))), int(acq.integers(m // 10, h))),
                    int(acq.choice([cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX])),
                    m / 384 * _u(acq, 0.6, 1.6), col, max(1, int(m / 192)), cv2.LINE_AA)
    return img


# ---------------------------------------------------------------------------- reports

_SIDE = ("right", "left")


def _zone_word(z):
    yn = z["ynorm"]
    return "upper" if yn < 0.38 else ("mid" if yn < 0.6 else "lower")


def _report(spec, kind, zones, devices, look, rr):
    if kind != "frontal":
        return {
            "lateral": ["Lateral view.", "Lateral view of the chest.", "Lateral chest radiograph."],
            "hand": ["Radiograph of the hand.", "PA view of the hand."],
            "knee": ["Frontal view of the knee.", "AP radiograph of the knee."],
            "pelvis": ["AP view of the pelvis.", "Pelvic radiograph."],
            "natural": ["Not a radiograph.", "Non-medical photograph."],
        }[kind][int(rr.integers(2 if kind != "lateral" else 3))]
    parts = []
    if not zones:
        parts.append(str(rr.choice([
            "No acute cardiopulmonary abnormality. Lungs are clear.",
            "The lungs are clear. No focal consolidation, effusion or pneumothorax.",
            "Normal chest radiograph.",
            "Clear lungs. Heart size is normal.",
            "No focal airspace opacity. Cardiomediastinal silhouette within normal limits.",
        ])))
    else:
        grades = {z["grade"] for z in zones}
        sides = sorted({z["lung"] for z in zones})
        total = sum(z["frac"] for z in zones) / 2.0
        if 3 in grades and len(zones) == 1:
            z = zones[0]
            side = _SIDE[z["lung"]]
            if z["frac"] >= 0.75:
                parts.append(str(rr.choice([f"Complete opacification (white-out) of the {side} hemithorax.",
                                            f"Extensive opacification of the {side} hemithorax."])))
            else:
                parts.append(str(rr.choice([
                    f"Dense {side} {_zone_word(z)} zone consolidation with near white-out.",
                    f"Dense opacification of the {side} {_zone_word(z)} zone.",
                ])))
        elif len(sides) == 2 and all(z["grade"] == 1 for z in zones):
            extent = "Extensive bilateral" if total > 0.5 else ("Bilateral" if total > 0.2 else "Mild bilateral")
            where = []
            if np.mean([z["periph"] for z in zones]) > 0.55:
                where.append("predominantly peripheral")
            if np.mean([z["lower"] for z in zones]) > 0.55:
                where.append("in the lower zones")
            tail = (", " + " and ".join(where)) if where else ""
            noun = str(rr.choice(["patchy ground-glass opacities", "hazy ground-glass opacities",
                                  "ground-glass opacities"]))
            parts.append(f"{extent} {noun}{tail}.")
        elif len(sides) == 2:
            extent = "Extensive bilateral" if total > 0.5 else "Bilateral"
            parts.append(str(rr.choice([f"{extent} mixed ground-glass and consolidative opacities.",
                                        f"{extent} airspace opacities with areas of consolidation."])))
        else:
            for z in zones:
                if z["grade"] == 1:
                    parts.append(f"Ground-glass opacity in the {_SIDE[z['lung']]} {_zone_word(z)} zone.")
                else:
                    lobe = {"upper": "upper lobe", "mid": ("middle lobe" if z["lung"] == 0 else "lingula"),
                            "lower": "lower lobe"}[_zone_word(z)]
                    parts.append(str(rr.choice([
                        f"{_SIDE[z['lung']].capitalize()} {lobe} consolidation.",
                        f"Consolidation in the {_SIDE[z['lung']]} {lobe}, consistent with pneumonia.",
                        f"Focal {_SIDE[z['lung']]} {_zone_word(z)} zone airspace consolidation.",
                    ])))
    if devices and rr.random() < 0.8:
        parts.append(" ".join(f"{d[0].upper()}{d[1:]} in place." for d in devices[:2]))
    if look == "ap_portable" and rr.random() < 0.3:
        parts.insert(0, "Portable AP view.")
    return " ".join(parts)


# ---------------------------------------------------------------------------- render

def _screenshot(spec, core_fn):
    """Radiograph shown on a page with a coloured arrow; returns rgb, inner box, core result."""
    sr = np.random.default_rng([int(spec.seed), _S_SCREEN])
    H, W = spec.height, spec.width
    f = _u(sr, 0.68, 0.88)
    ih, iw = max(32, int(H * f)), max(32, int(W * f))
    oy = int(sr.integers(int(0.03 * H), max(int(0.03 * H) + 1, H - ih - int(0.02 * H))))
    ox = int(sr.integers(0, max(1, W - iw + 1)))
    res = core_fn(ih, iw, sr)
    page = np.full((H, W, 3), int(sr.integers(200, 256)), np.uint8)
    if sr.random() < 0.3:
        page[...] = int(sr.integers(20, 60))  # dark viewer background
    inner = np.repeat(res["image"][..., None], 3, axis=2)
    page[oy:oy + ih, ox:ox + iw] = inner
    k = min(H, W) / 384.0
    colours = [(230, 30, 30), (250, 215, 0), (20, 200, 40), (40, 90, 255), (255, 255, 255)]
    col = colours[int(sr.integers(len(colours)))]
    if res.get("zones"):
        tx, ty = res["zones"][0]["centroid"]
    else:
        tx, ty = iw * _u(sr, 0.25, 0.75), ih * _u(sr, 0.3, 0.7)
    tx, ty = tx + ox, ty + oy
    ang = _u(sr, 0, 2 * np.pi)
    L = 60 * k
    start = (int(tx + L * math.cos(ang)), int(ty + L * math.sin(ang)))
    cv2.arrowedLine(page, start, (int(tx), int(ty)), col, max(2, int(round(3 * k))), cv2.LINE_AA, tipLength=0.3)
    cv2.putText(page, str(sr.choice(["A", "B", "C", "Fig. 1", "Figure 2"])),
                (ox + int(6 * k), oy + int(24 * k)), cv2.FONT_HERSHEY_SIMPLEX, 0.7 * k,
                (255, 255, 255), max(1, int(round(2 * k))), cv2.LINE_AA)
    if H - (oy + ih) > 16 * k:
        cv2.putText(page, "Chest radiograph, day " + str(int(sr.integers(1, 15))),
                    (ox, min(H - 4, oy + ih + int(14 * k))), cv2.FONT_HERSHEY_SIMPLEX, 0.45 * k,
                    (40, 40, 40) if page[0, 0, 0] > 128 else (220, 220, 220), 1, cv2.LINE_AA)
    return page, (oy, ox, ih, iw), res


def _paste(mask_small, box, H, W):
    oy, ox, ih, iw = box
    out = np.zeros((H, W), dtype=bool)
    out[oy:oy + ih, ox:ox + iw] = mask_small
    return out


def render(spec: PhantomSpec) -> Phantom:
    """Render one phantom; a pure, deterministic function of ``spec``."""
    H, W = spec.height, spec.width
    kind = spec.kind
    rr = np.random.default_rng([int(spec.seed), _S_REPORT])
    image_rgb = None
    zones, devices = [], []
    look = spec.style
    if kind == "frontal":
        if spec.style == "screenshot":
            look = "ap_portable" if np.random.default_rng([int(spec.seed), _S_SCREEN, 1]).random() < 0.5 else "pa"

            def core(ih, iw, sr):
                return _render_frontal(spec, ih, iw, look)
            image_rgb, box, res = _screenshot(spec, core)
            right, left = _paste(res["right"], box, H, W), _paste(res["left"], box, H, W)
            opac = _paste(res["opacity"], box, H, W)
        else:
            res = _render_frontal(spec, H, W, look)
            right, left, opac = res["right"], res["left"], res["opacity"]
        zones, devices = res["zones"], res["devices"]
        inv = res["involvement"]
        grades = res["grades"]
        ge = float(extent_score(inv[0]) + extent_score(inv[1]))
        osc = float(sum(g for g, f in zip(grades, inv) if f > 0))
        label = spec.label
        view = "AP" if look == "ap_portable" else "PA"
        p_death = death_probability(ge, osc, spec.age)
        survival = int(np.random.default_rng([int(spec.seed), _S_SURVIVAL]).random() >= p_death)
        extra = {"markers": res["markers"], "look": look, "p_death": p_death}
    else:
        def core(ih, iw, sr):
            acq = np.random.default_rng([int(spec.seed), _S_ACQ])
            if kind == "natural":
                rgb = _render_natural(spec, ih, iw, acq)
                return {"image": cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), "rgb": rgb}
            F, A = {"lateral": _render_lateral, "hand": _render_hand, "knee": _render_knee,
                    "pelvis": _render_pelvis}[kind](spec, ih, iw, acq)
            img = _quantise(_develop(F, A, acq, "pa"))
            _markers(img, acq, "pa", F.k)
            return {"image": img}
        if spec.style == "screenshot" and kind != "natural":
            image_rgb, box, res = _screenshot(spec, core)
        else:
            res = core(H, W, None)
            image_rgb = res.get("rgb")
        right, left, opac = (np.zeros((H, W), dtype=bool) for _ in range(3))
        inv, ge, osc = (0.0, 0.0), 0.0, 0.0
        label = kind
        view = "LATERAL" if kind == "lateral" else ""
        survival = 1  # no risk model outside frontal chest films
        extra = {"look": look}
    if image_rgb is not None:
        image = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY)
    else:
        image = res["image"]
    extra.update({"zones": zones, "devices": devices})
    report = _report(spec, kind, zones, devices, look, rr)
    return Phantom(spec=spec, image=image, image_rgb=image_rgb, lung_mask=right | left,
                   right_lung=right, left_lung=left, opacity_mask=opac,
                   involvement=(float(inv[0]), float(inv[1])), geographic_extent=ge,
                   opacity_score=osc, label=label, survival=survival, report=report,
                   view=view, extra=extra)


def render_many(specs: Iterable[PhantomSpec]) -> list[Phantom]:
    return [render(s) for s in specs]


# ---------------------------------------------------------------------------- dataset

_DICOM_VARIANTS = (
    {"transfer_syntax": "explicit_le"},
    {"transfer_syntax": "implicit_le"},
    {"transfer_syntax": "rle"},
    {"transfer_syntax": "jpeg_lossless"},
    {"transfer_syntax": "explicit_le", "photometric": "MONOCHROME1"},
    {"transfer_syntax": "j2k_lossless", "bits_stored": 12},
    {"transfer_syntax": "deflated", "bits_stored": 10},
    {"transfer_syntax": "jpeg_baseline"},
    {"transfer_syntax": "explicit_le", "bits_stored": 16, "sop_class": "cr"},
    {"transfer_syntax": "j2k"},
)


def write_dataset(root, n: int, *, seed: int = 0, kinds: Sequence[str] = ("frontal",),
                  label_mix=None, height: int = 384, width: int = 384,
                  studies_per_patient: int = 1, dicom_every: int = 0,
                  min_extent: int = 1, progress: bool = False) -> Path:
    """Write ``n`` phantoms in the layout of ``/work/shared/data/<source>/``.

    ``root/labels.csv`` (columns :data:`CSV_COLUMNS`), ``root/images/NNNNNN.png`` (grey,
    or RGB for screenshots and natural images), ``root/masks/NNNNNN.png`` (lung mask,
    0/255, frontal only) and, with ``dicom_every=k``, every k-th image (index % k == 0)
    also as ``root/dicom/NNNNNN.dcm`` in a rotating set of DICOM variants (column
    ``dicom`` plus the syntax / photometric / bits stored used).

    Kinds cycle per patient through ``kinds``. ``label_mix``: ``None`` (uniform), a dict
    ``{label: weight}`` or a sequence of labels to draw from. With
    ``studies_per_patient > 1``, consecutive studies of one patient share ``anatomy_seed``,
    label, style and age, and draw new opacities (a PXS "change" pair). Severity columns
    are blank for non-frontal rows and ``label`` is the kind name there.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    if dicom_every:
        (root / "dicom").mkdir(parents=True, exist_ok=True)
        from cxrserve import dicomwrite  # imported lazily: pydicom is only needed here
    for kd in kinds:
        if kd not in KINDS:
            raise ValueError(f"unknown kind {kd!r}")
    if label_mix is None:
        labs, weights = list(LABELS), np.ones(len(LABELS))
    elif isinstance(label_mix, dict):
        labs, weights = list(label_mix), np.array([float(label_mix[k]) for k in label_mix])
    else:
        labs, weights = list(label_mix), np.ones(len(label_mix))
    for lb in labs:
        if lb not in LABELS:
            raise ValueError(f"unknown label {lb!r}")
    weights = weights / weights.sum()
    spp = max(1, int(studies_per_patient))
    it = range(n)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, total=n, desc="phantoms")
    rows = []
    base = None
    for i in it:
        pi, j = divmod(i, spp)
        study_seed = int(seed) * 1_000_000 + i
        if j == 0:
            prng = np.random.default_rng([int(seed), pi, 11])
            kind = kinds[pi % len(kinds)]
            label = labs[int(prng.choice(len(labs), p=weights))]
            base = sample_spec(study_seed, kind=kind, label=label, height=height, width=width,
                               min_extent=min_extent)
            base = replace(base, anatomy_seed=study_seed, patient_id=f"PH{int(seed):03d}{pi:07d}")
            spec = base
        else:
            s2 = sample_spec(study_seed, kind=base.kind, label=base.label, height=height, width=width,
                             min_extent=min_extent)
            spec = replace(base, seed=study_seed, extent=s2.extent, opacity=s2.opacity)
        ph = render(spec)
        stem = f"{i:06d}"
        img_rel = f"images/{stem}.png"
        if ph.image_rgb is not None:
            _imwrite(root / img_rel, cv2.cvtColor(ph.image_rgb, cv2.COLOR_RGB2BGR))
            mode = "RGB"
        else:
            _imwrite(root / img_rel, ph.image)
            mode = "L"
        frontal = spec.kind == "frontal"
        mask_rel = ""
        if frontal:
            mask_rel = f"masks/{stem}.png"
            _imwrite(root / mask_rel, ph.lung_mask.astype(np.uint8) * 255)
        row = {
            "filename": img_rel, "label": ph.label, "patient_id": spec.patient_id,
            "view": ph.view, "is_frontal": int(frontal), "kind": spec.kind, "style": spec.style,
            "geographic_extent_mean": f"{ph.geographic_extent:g}" if frontal else "",
            "opacity_mean": f"{ph.opacity_score:g}" if frontal else "",
            "involvement_right": f"{ph.involvement[0]:.6f}" if frontal else "",
            "involvement_left": f"{ph.involvement[1]:.6f}" if frontal else "",
            "survival": ph.survival if frontal else "", "mask": mask_rel, "report": ph.report,
            "age": spec.age, "extent_right": extent_score(ph.involvement[0]) if frontal else "",
            "extent_left": extent_score(ph.involvement[1]) if frontal else "",
            "opacity_right": (spec.opacity[0] if ph.involvement[0] > 0 else 0) if frontal else "",
            "opacity_left": (spec.opacity[1] if ph.involvement[1] > 0 else 0) if frontal else "",
            "seed": spec.seed, "anatomy_seed": spec.anatomy_seed if spec.anatomy_seed is not None else spec.seed,
            "width": width, "height": height, "mode": mode,
            "dicom": "", "dicom_syntax": "", "dicom_photometric": "", "dicom_bits_stored": "",
        }
        if dicom_every and i % int(dicom_every) == 0:
            var = dict(_DICOM_VARIANTS[(i // int(dicom_every)) % len(_DICOM_VARIANTS)])
            dcm_rel = f"dicom/{stem}.dcm"
            vp = ph.view if ph.view in ("PA", "AP", "LATERAL") else ""
            body = "CHEST" if spec.kind in ("frontal", "lateral") else spec.kind.upper()
            if spec.kind == "natural":
                body = ""
            data = dicomwrite.to_dicom(ph.image, view_position=vp, body_part=body,
                                       patient_id=spec.patient_id, **var)
            (root / dcm_rel).write_bytes(data)
            row.update({"dicom": dcm_rel, "dicom_syntax": var["transfer_syntax"],
                        "dicom_photometric": var.get("photometric", "MONOCHROME2"),
                        "dicom_bits_stored": var.get("bits_stored", 8)})
        rows.append(row)
    with open(root / "labels.csv", "w", newline="", encoding="utf-8") as fh:
        wr = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
        wr.writeheader()
        wr.writerows(rows)
    return root


def _imwrite(path: Path, img: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise OSError(f"could not encode {path}")
    Path(path).write_bytes(buf.tobytes())
