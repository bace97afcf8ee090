"""Phantoms that are not frontal chest films (for the input gate): hand, knee, pelvis, lateral, photographs."""
from __future__ import annotations

import math

import cv2
import numpy as np

from cxrserve.synthetic.phantoms.frontal import _u8blur
from cxrserve.synthetic.phantoms.geometry import _blur, _Frame, _smooth_noise, _u

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
