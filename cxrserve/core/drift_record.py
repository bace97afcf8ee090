"""What the drift monitor keeps of one study (:class:`Record`): no identifiers, only the DICOM
header mix, image statistics, a compact image embedding, headline scores, label and status, and
a keyed hash for matching returned labels (:func:`study_key`). Read by the observer
(:mod:`cxrserve.core.monitor`) and by the statistics it is judged with (:mod:`cxrserve.core.drift`).
Only numpy and the standard library (core layer).
"""
from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass, field

import numpy as np

from cxrserve.core.drift_embedding import THUMBNAIL, apply_embeddings, pending_embeddings

#: Site of studies that name none.
DEFAULT_SITE = "default"
#: Header facts whose mix is watched (``XRay`` attributes; ``size`` is a bin of the longer side).
HEADER_FIELDS = ("format", "modality", "photometric", "view", "bits", "size", "manufacturer", "device_model",
                 "spacing")
#: Image statistics (of the strided uint8 copy, 0..1): mean, spread, 5th/95th percentiles, aspect.
IMAGE_STATS = ("mean", "std", "p05", "p95", "aspect")
#: Side of the block-mean thumbnail the embedding is made from (EMBED_SIDE² values).
EMBED_SIDE = 8
#: PCA dimensions the embedding is compared in.
EMBED_DIMS = 8
#: Headline scores kept per study (the first ones a response lists).
MAX_SCORES = 16
_STRIDE_SIDE = 128



def _spacing_bin(mm: float) -> str:
    """Pixel spacing in coarse bins (detectors differ in steps of ~0.05 mm): a new detector moves bins."""
    if not mm:
        return "-"
    for edge in (0.1, 0.125, 0.15, 0.175, 0.2, 0.3):
        if mm < edge:
            return f"<{edge:g}"
    return ">=0.3"


def _size_bin(longer: int) -> str:
    for edge in (512, 1024, 2048, 4096):
        if longer <= edge:
            return f"<={edge}"
    return ">4096"


# --------------------------------------------------------------------------- records
@dataclass
class Record:
    """What the monitor keeps of one study: technical facts and scores, never identifiers."""

    site: str
    model: str
    version: str
    status: str  # "200" or the 4xx/5xx code
    header: dict[str, str] = field(default_factory=dict)
    stats: list[float] | None = None
    embedding: list[float] | None = None
    gate: float | None = None
    scores: dict[str, float] = field(default_factory=dict)
    label: str | None = None
    probs: dict[str, float] = field(default_factory=dict)  # the first score map, for the estimate
    key: str = ""  # keyed hash of the SOP Instance UID hash (DICOM) or of the strided pixels
    t: float = 0.0
    #: what made ``embedding``: ``gate:<weights digest>`` (cxrserve.core.drift_embedding) or ``thumbnail``
    embedding_source: str = ""

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Record":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def image_features(xray) -> tuple[dict[str, str], list[float], list[float], bytes]:
    """(header mix, image statistics, embedding, pixel digest) of one decoded image."""
    img = xray.uint8
    h, w = img.shape[:2]
    stride = max(1, min(h, w) // _STRIDE_SIDE)
    small = np.asarray(img[::stride, ::stride], dtype=np.float32) / 255.0
    full = getattr(xray, "full_size", (w, h))
    header = {"format": str(xray.format), "modality": str(xray.modality or "-"),
              "photometric": str(xray.photometric or "-"), "view": str(xray.view or "-"),
              "bits": str(int(xray.bits_stored)), "size": _size_bin(max(full)),
              "manufacturer": str(getattr(xray, "manufacturer", "") or "-")[:64],
              "device_model": str(getattr(xray, "device_model", "") or "-")[:64],
              "spacing": _spacing_bin(float(getattr(xray, "pixel_spacing_mm", 0.0) or 0.0))}
    q = np.percentile(small, (5, 95))
    stats = [float(small.mean()), float(small.std()), float(q[0]), float(q[1]),
             float(min(full) / max(1, max(full)))]
    sh, sw = (small.shape[0] // EMBED_SIDE) * EMBED_SIDE, (small.shape[1] // EMBED_SIDE) * EMBED_SIDE
    if sh and sw:
        blocks = small[:sh, :sw].reshape(EMBED_SIDE, sh // EMBED_SIDE, EMBED_SIDE, sw // EMBED_SIDE).mean(axis=(1, 3))
        emb = (blocks - blocks.mean()) / (blocks.std() + 1e-6)
    else:
        emb = np.zeros((EMBED_SIDE, EMBED_SIDE), np.float32)
    digest = hashlib.sha256(np.ascontiguousarray(small[: min(64, small.shape[0]), : min(64, small.shape[1])]
                                                 * 255).astype(np.uint8).tobytes()).digest()
    return header, stats, [round(float(v), 4) for v in emb.ravel()], digest


def _flat_scores(result: dict, score_maps: tuple[str, ...]) -> dict[str, float]:
    from cxrserve.core.servemetrics import _scores

    out: dict[str, float] = {}
    for key, value in _scores(result, score_maps):
        if len(out) >= MAX_SCORES:
            break
        out[key] = float(value)
    return out


def _first_map(result: dict, score_maps: tuple[str, ...]) -> dict[str, float]:
    """The answer's first ``{label: probability}`` map; a composed answer's (``results``: one
    section per model) is its first section's that has one, labels prefixed ``<section>.``."""
    for name in score_maps:
        value = result.get(name)
        if isinstance(value, dict) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                     for v in value.values()):
            return {str(k): float(v) for k, v in value.items()}
    sections = result.get("results")
    if isinstance(sections, dict):
        for key, section in sections.items():
            found = _first_map(section, score_maps) if isinstance(section, dict) and "results" not in section else {}
            if found:
                return {f"{key}.{k}": v for k, v in found.items()}
    return {}


def study_key(secret: bytes, xray=None, *, instance_hash: str = "", pixel_digest: bytes = b"") -> str:
    """Keyed hash a returned label is matched by: of the SOP Instance UID's hash (DICOM), else of
    the strided pixels. ``secret`` stays in the monitor's folder; the key alone names nobody."""
    if xray is not None:
        instance_hash = getattr(xray, "instance_hash", "") or ""
    material = ("uid:" + instance_hash).encode() if instance_hash else b"px:" + pixel_digest
    return hmac.new(secret, material, hashlib.sha256).hexdigest()[:24]


def make_records(pipeline, items: list, results: list, secret: bytes = b"", *, embed: bool = True) -> list[Record]:
    """One record per study of a scored batch (``items`` and ``results`` aligned).

    ``embed``: replace each image's thumbnail embedding by the gate's features now (references,
    tools); the observer leaves that to the monitor's thread (:mod:`cxrserve.core.drift_embedding`).
    """
    from cxrserve.core.errors import CXRInputError

    model = str(getattr(pipeline, "name", "") or "unknown")
    try:
        version = str(pipeline.version)
    except Exception:
        version = "unknown"
    maps = tuple(getattr(pipeline, "score_maps", ()) or ())
    now = time.time()
    out = []
    for item, result in zip(items, results):
        site_obj = getattr(item, "site", None)
        site = str(getattr(site_obj, "name", None) or (site_obj if isinstance(site_obj, str) else "") or DEFAULT_SITE)
        status = str(result.status) if isinstance(result, CXRInputError) else (
            "200" if isinstance(result, dict) else "500")
        rec = Record(site=site, model=model, version=version, status=status, t=now)
        xray = getattr(item, "xray", None)
        if xray is not None:
            rec.header, rec.stats, rec.embedding, digest = image_features(xray)
            rec.embedding_source = THUMBNAIL
            rec.key = study_key(secret, xray, pixel_digest=digest)
            gate = getattr(item, "gate", None)
            if isinstance(gate, dict) and "score" in gate:
                rec.gate = float(gate["score"])
        if isinstance(result, CXRInputError):
            gate = (result.detail or {}).get("input_gate") if isinstance(result.detail, dict) else None
            if isinstance(gate, dict) and "score" in gate:
                rec.gate = float(gate["score"])
        elif isinstance(result, dict):
            rec.scores = _flat_scores(result, maps)
            rec.probs = _first_map(result, maps)
            if rec.probs:
                rec.label = max(rec.probs, key=rec.probs.get)
        out.append(rec)
    if embed:
        apply_embeddings(out, *pending_embeddings(pipeline, items, out))
    return out


