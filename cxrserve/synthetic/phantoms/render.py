"""Rendering a spec into a phantom with its exact masks (and screenshots of films)."""
from __future__ import annotations

import math
from typing import Iterable

import cv2
import numpy as np

from cxrserve.synthetic.phantoms.frontal import (
    _develop,
    _markers,
    _quantise,
    _render_frontal,
)
from cxrserve.synthetic.phantoms.geometry import _u
from cxrserve.synthetic.phantoms.other_kinds import (
    _render_hand,
    _render_knee,
    _render_lateral,
    _render_natural,
    _render_pelvis,
)
from cxrserve.synthetic.phantoms.reports import _report
from cxrserve.synthetic.phantoms.spec import (
    _S_ACQ,
    _S_REPORT,
    _S_SCREEN,
    _S_SURVIVAL,
    Phantom,
    PhantomSpec,
    death_probability,
    extent_score,
)

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
