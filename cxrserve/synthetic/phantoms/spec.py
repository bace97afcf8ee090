"""Phantom specifications and their documented scores: what a phantom is, drawn from a seed."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

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
