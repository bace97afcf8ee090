"""Frontal chest phantoms: anatomy, lungs, opacities, devices, film development."""
from __future__ import annotations

import math

import cv2
import numpy as np

from cxrserve.synthetic.phantoms.geometry import (
    _blur,
    _Frame,
    _smooth_noise,
    _smoothstep,
    _u,
)
from cxrserve.synthetic.phantoms.spec import (
    _BANDS,
    _S_ACQ,
    _S_ANATOMY,
    _S_OPACITY,
    PhantomSpec,
    extent_score,
)

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
