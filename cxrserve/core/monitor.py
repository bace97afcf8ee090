"""Drift and performance monitoring behind every entry point (issue 23).

One :class:`Monitor` per process watches what a :class:`~cxrserve.core.pipeline.Pipeline`
takes in and gives out: attached as a pipeline observer (``observer(pipeline, items,
results)``, called after scoring), it turns each study into a small :class:`Record` (no
identifiers: DICOM header mix, image statistics, a compact image embedding, headline scores,
label, status, a keyed hash for matching returned labels) and keeps, per site and model
version, a rolling window of the last ``window`` studies. Every ``step`` studies the window
is compared with the site's :class:`Reference`:

* categorical mixes (header fields, size bin, label, status): total variation distance (PSI,
  :func:`psi`, was tried first: its log ratio gives rare categories heavy tails, 2x the false alarms);
* continuous values (image statistics, gate score, each headline score): two-sample KS;
* the embedding: MMD² with an RBF kernel (median bandwidth) in the reference's PCA space;

each statistic is standardised against its null distribution (windows resampled from a
calibration half of the reference data, never the half the statistics compare against), the
combined score is the largest standardised signal, and the alert threshold on it is set from a
target false-alarm rate per study by resampling too (:func:`fit_reference`; an exponential tail
fitted over the top decile of resampled combined scores).

The label-free performance estimate per window is confidence based: with calibrated
probabilities ``p``, expected sensitivity of label ``L`` is ``sum p_L 1[pred=L] / sum p_L`` and
expected specificity ``sum (1-p_L) 1[pred!=L] / sum (1-p_L)``.

Cost and safety: the observer extracts the record synchronously from a strided copy of the
image (no model runs) and hands it to a bounded queue; a daemon thread scores windows and
writes bounded files. A full queue drops the record (counted); any exception is swallowed and
counted. Nothing here can fail or hold up a request. Only numpy and the standard library
(core layer).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import queue
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

log = logging.getLogger(__name__)

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
#: Reference format this code reads.
REFERENCE_FORMAT = "cxrserve-monitor-reference/1"
#: File name of a reference beside a site profile (``<profile dir>/monitor/<model>.json``) or in an archive.
REFERENCE_FILE = "monitor_reference.json"
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
    for name in score_maps:
        value = result.get(name)
        if isinstance(value, dict) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                     for v in value.values()):
            return {str(k): float(v) for k, v in value.items()}
    return {}


def study_key(secret: bytes, xray=None, *, instance_hash: str = "", pixel_digest: bytes = b"") -> str:
    """Keyed hash a returned label is matched by: of the SOP Instance UID's hash (DICOM), else of
    the strided pixels. ``secret`` stays in the monitor's folder; the key alone names nobody."""
    if xray is not None:
        instance_hash = getattr(xray, "instance_hash", "") or ""
    material = ("uid:" + instance_hash).encode() if instance_hash else b"px:" + pixel_digest
    return hmac.new(secret, material, hashlib.sha256).hexdigest()[:24]


def make_records(pipeline, items: list, results: list, secret: bytes = b"") -> list[Record]:
    """One record per study of a scored batch (``items`` and ``results`` aligned)."""
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
    return out


# --------------------------------------------------------------------------- statistics
def psi(ref_counts: dict[str, float], win_counts: dict[str, float]) -> float:
    """Population stability index of two count tables (add-0.5 smoothing)."""
    keys = set(ref_counts) | set(win_counts)
    if not keys:
        return 0.0
    rn = sum(ref_counts.values()) + 0.5 * len(keys)
    wn = sum(win_counts.values()) + 0.5 * len(keys)
    total = 0.0
    for k in keys:
        r = (ref_counts.get(k, 0) + 0.5) / rn
        w = (win_counts.get(k, 0) + 0.5) / wn
        total += (w - r) * math.log(w / r)
    return total


def tvd(ref_counts: dict[str, float], win_counts: dict[str, float]) -> float:
    """Total variation distance of two count tables (half the L1 distance of their shares): the
    categorical signal. Bounded, so its null has light tails; PSI's log ratio makes a category
    that is rare in the reference heavy-tailed (measured: 2.1 false alarms per 10,000 studies
    with PSI against 1 targeted, docs/PERFORMANCE.md)."""
    rn, wn = sum(ref_counts.values()), sum(win_counts.values())
    if not rn or not wn:
        return 0.0
    return 0.5 * sum(abs(ref_counts.get(k, 0) / rn - win_counts.get(k, 0) / wn) for k in set(ref_counts) | set(win_counts))


def ks(ref_sorted: np.ndarray, window: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (``ref_sorted`` sorted)."""
    if len(ref_sorted) == 0 or len(window) == 0:
        return 0.0
    w = np.sort(window)
    grid = np.concatenate([ref_sorted, w])
    cdf_r = np.searchsorted(ref_sorted, grid, side="right") / len(ref_sorted)
    cdf_w = np.searchsorted(w, grid, side="right") / len(w)
    return float(np.max(np.abs(cdf_r - cdf_w)))


def mmd2(ref: np.ndarray, window: np.ndarray, gamma: float, k_rr: float) -> float:
    """Biased MMD² with an RBF kernel ``exp(-gamma |x-y|²)``; ``k_rr``: the reference's own mean kernel."""
    if len(window) == 0:
        return 0.0

    def kmean(a, b):
        d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
        return float(np.exp(-gamma * np.maximum(d, 0)).mean())

    return k_rr + kmean(window, window) - 2 * kmean(ref, window)


def _counts(values: Iterable) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        if v is not None:
            out[str(v)] = out.get(str(v), 0) + 1
    return out


# --------------------------------------------------------------------------- reference
@dataclass
class Reference:
    """A site's reference for one model: what windows are compared with, and the alert rule."""

    model: str
    version: str
    window: int
    categorical: dict[str, dict[str, float]]  # signal -> counts
    continuous: dict[str, list[float]]  # signal -> sorted values
    embedding: dict[str, Any]  # mean, components, points (in PCA space), gamma, k_rr
    null: dict[str, list[float]]  # signal -> [mean, sd] of the statistic on reference windows
    threshold: float  # on the combined score
    target_rate: float  # false alarms per study the threshold was set for
    step: int = 5
    labels: list[str] = field(default_factory=list)
    n: int = 0
    created: str = ""

    # -- signals of one window
    def statistics(self, records: list[Record], *, outputs: bool = True) -> dict[str, float]:
        """Raw statistic per signal of a window of records."""
        out: dict[str, float] = {}
        decoded = [r for r in records if r.stats is not None]
        for name, ref in self.categorical.items():
            if name.startswith("header."):
                win = _counts(r.header.get(name[7:]) for r in decoded)
            elif name == "output.status":
                win = _counts(r.status for r in records)
            elif name == "output.label" and outputs:
                win = _counts(r.label for r in records if r.label is not None)
            else:
                continue
            if win:
                out[name] = tvd(ref, win)
        for name, ref in self.continuous.items():
            if name.startswith("image."):
                i = IMAGE_STATS.index(name[6:])
                win = [r.stats[i] for r in decoded]
            elif name == "output.gate":
                win = [r.gate for r in records if r.gate is not None]
            elif name.startswith("score.") and outputs:
                win = [r.scores[name[6:]] for r in records if name[6:] in r.scores]
            else:
                continue
            if win:
                out[name] = ks(np.asarray(ref), np.asarray(win, dtype=np.float64))
        emb = [r.embedding for r in decoded if r.embedding]
        if emb and self.embedding:
            e = self.embedding
            x = (np.asarray(emb, np.float64) - np.asarray(e["mean"])) @ np.asarray(e["components"]).T
            out["embedding"] = mmd2(np.asarray(e["points"]), x, e["gamma"], e["k_rr"])
        return out

    def scores(self, records: list[Record], *, outputs: bool = True) -> dict[str, float]:
        """Standardised score per signal (``(stat - null mean) / null sd``) and ``combined`` (their max)."""
        out = {}
        for name, value in self.statistics(records, outputs=outputs).items():
            mu, sd = self.null.get(name, (0.0, 1.0))
            out[name] = (value - mu) / max(sd, 1e-9)
        out["combined"] = max(out.values()) if out else 0.0
        return out

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["format"] = REFERENCE_FORMAT
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Reference":
        if d.get("format") != REFERENCE_FORMAT:
            raise ValueError(f"not a monitor reference ({d.get('format')!r})")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict()))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Reference":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _describe(fit: list[Record], rng: np.random.Generator, max_points: int = 200) -> tuple[dict, dict, dict]:
    decoded = [r for r in fit if r.stats is not None]
    categorical = {f"header.{f}": _counts(r.header.get(f) for r in decoded) for f in HEADER_FIELDS}
    categorical["output.status"] = _counts(r.status for r in fit)
    labels = _counts(r.label for r in fit if r.label is not None)
    if labels:
        categorical["output.label"] = labels
    continuous = {f"image.{s}": sorted(r.stats[i] for r in decoded) for i, s in enumerate(IMAGE_STATS)}
    gates = sorted(r.gate for r in fit if r.gate is not None)
    if gates:
        continuous["output.gate"] = gates
    keys: dict[str, list[float]] = {}
    for r in fit:
        for k, v in r.scores.items():
            keys.setdefault(k, []).append(v)
    for k, vals in keys.items():
        continuous[f"score.{k}"] = sorted(vals)
    embedding: dict = {}
    emb = np.asarray([r.embedding for r in decoded if r.embedding], np.float64)
    if len(emb) >= 4:
        mean = emb.mean(0)
        _, _, vt = np.linalg.svd(emb - mean, full_matrices=False)
        comps = vt[:EMBED_DIMS]
        pts = (emb - mean) @ comps.T
        if len(pts) > max_points:
            pts = pts[rng.choice(len(pts), max_points, replace=False)]
        d = ((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1)
        med = float(np.median(d[np.triu_indices(len(pts), 1)])) or 1.0
        gamma = 1.0 / med
        k_rr = float(np.exp(-gamma * d).mean())
        embedding = {"mean": mean.tolist(), "components": comps.tolist(), "points": pts.tolist(),
                     "gamma": gamma, "k_rr": k_rr}
    return categorical, continuous, embedding


def _floor(signal: str) -> float:
    """Smallest null spread of a signal: a mix that never varies in the reference (every study a
    JPEG) must not make one odd study in a window an alert: 0.02 is what one odd study in 50
    gives the total variation distance and KS; MMD² 0.002."""
    if signal == "embedding":
        return 0.002
    return 0.02


def _tail_threshold(samples: np.ndarray, p: float) -> float:
    """Value exceeded with probability ``p``: empirical where the samples reach it, else an
    exponential tail fitted over the top decile (peaks over threshold)."""
    samples = np.sort(np.asarray(samples, np.float64))
    n = len(samples)
    if p * n >= 10:
        return float(np.quantile(samples, 1 - p))
    u = float(np.quantile(samples, 0.9))
    excess = samples[samples > u] - u
    beta = float(excess.mean()) if len(excess) else 1.0
    return u + beta * math.log(0.1 / p)


def fit_reference(records: list[Record], *, window: int = 50, step: int = 5, target_rate: float = 1e-4,
                  resamples: int = 2000, seed: int = 0, groups: list | None = None,
                  exclude: Iterable[str] = ()) -> Reference:
    """A reference from in-distribution records of one site and model.

    Half the records (at random) describe the reference; windows of ``window`` studies drawn with
    replacement from the other half give each signal's null mean and spread and the combined
    score's null distribution; the threshold is the combined score exceeded with probability
    ``target_rate * step`` per window (an alert is evaluated every ``step`` studies, so at most
    ``target_rate`` onsets per study).

    ``groups`` (aligned with ``records``, e.g. patient keys; used here only, never stored): the halves
    are split by group, so the null spread includes the difference between patients. ``exclude``:
    signals (or prefixes, e.g. ``image.aspect``, ``header.``) a site knows to differ and not to watch.
    """
    if len(records) < 20:
        raise ValueError(f"a reference needs at least 20 studies, got {len(records)}")
    rng = np.random.default_rng(seed)
    if groups is not None:
        keys = sorted(set(map(str, groups)))
        chosen = {keys[i] for i in rng.permutation(len(keys))[: len(keys) // 2]}
        fit = [r for r, g in zip(records, groups) if str(g) in chosen]
        cal = [r for r, g in zip(records, groups) if str(g) not in chosen]
    else:
        order = rng.permutation(len(records))
        half = len(records) // 2
        fit = [records[i] for i in order[:half]]
        cal = [records[i] for i in order[half:]]
    categorical, continuous, embedding = _describe(fit, rng)
    exclude = tuple(exclude)
    if exclude:
        categorical = {k: v for k, v in categorical.items() if not k.startswith(exclude)}
        continuous = {k: v for k, v in continuous.items() if not k.startswith(exclude)}
        if any("embedding".startswith(e) for e in exclude):
            embedding = {}
    first = records[0]
    labels = sorted({k for r in records for k in r.probs})
    ref = Reference(model=first.model, version=first.version, window=window, categorical=categorical,
                    continuous=continuous, embedding=embedding, null={}, threshold=math.inf,
                    target_rate=target_rate, step=step, labels=labels, n=len(records),
                    created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    # Windows from pools resampled from the calibration half (a double bootstrap): the studies a
    # site sends later are a new sample, not the calibration half again, so the null includes how
    # far one finite sample of studies falls from another (without it: 3x the target rate).
    stats = []
    for n in range(resamples):
        if n % 20 == 0:
            pool = [cal[i] for i in rng.integers(0, len(cal), len(cal))]
        stats.append(ref.statistics([pool[i] for i in rng.integers(0, len(pool), window)]))
    names = sorted({k for s in stats for k in s})
    for name in names:
        vals = np.asarray([s.get(name, 0.0) for s in stats])
        ref.null[name] = [float(vals.mean()), float(max(vals.std(), _floor(name)))]
    combined = np.asarray([max((s[k] - ref.null[k][0]) / ref.null[k][1] for k in s) if s else 0.0 for s in stats])
    ref.threshold = _tail_threshold(combined, min(0.5, target_rate * step))
    return ref


# --------------------------------------------------------------------------- performance
def estimate(records: list[Record], labels: Iterable[str]) -> dict[str, dict[str, float]]:
    """Label-free expected sensitivity/specificity per label from the window's probabilities."""
    out = {}
    scored = [r for r in records if r.probs and r.label is not None]
    for label in labels:
        p = np.asarray([r.probs.get(label, 0.0) for r in scored])
        pred = np.asarray([r.label == label for r in scored])
        if not len(p):
            continue
        pos, neg = p.sum(), (1 - p).sum()
        out[label] = {"sensitivity": float((p * pred).sum() / pos) if pos > 0 else float("nan"),
                      "specificity": float(((1 - p) * ~pred).sum() / neg) if neg > 0 else float("nan"),
                      "prevalence": float(p.mean())}
    return out


# --------------------------------------------------------------------------- state files
class BoundedLog:
    """A JSON-lines file that rolls over to ``.1`` at ``max_lines`` (so at most twice that on disk)."""

    def __init__(self, path: Path, max_lines: int):
        self.path, self.max_lines = path, max_lines
        self.lines = sum(1 for _ in path.open()) if path.exists() else 0

    def write(self, obj: dict) -> None:
        if self.lines >= self.max_lines:
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            self.lines = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(obj, separators=(",", ":")) + "\n")
        self.lines += 1


def read_log(path: Path) -> list[dict]:
    """Both generations of a :class:`BoundedLog`, oldest first."""
    out = []
    for p in (path.with_name(path.name + ".1"), path):
        if p.exists():
            for line in p.open():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return out


def monitor_secret(state_dir: Path | None) -> bytes:
    """The key study hashes are made with: ``<state_dir>/secret`` (made once, mode 600), else per process."""
    if state_dir is None:
        return secrets.token_bytes(32)
    path = Path(state_dir) / "secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
    return path.read_bytes()


def safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80] or "_"


# --------------------------------------------------------------------------- the monitor
@dataclass
class Stream:
    """One site x model x version: its rolling window and latest scores."""

    site: str
    model: str
    version: str
    window: deque
    reference: Reference | None = None
    seen: int = 0
    windows: int = 0
    scores: dict[str, float] = field(default_factory=dict)
    alert: bool = False
    alerts: int = 0
    estimate: dict = field(default_factory=dict)
    log: BoundedLog | None = None
    predictions: BoundedLog | None = None


class Monitor:
    """The observer every entry point attaches (``pipeline.observers.append(monitor)``).

    ``state_dir``: where window summaries, the prediction log for returned labels, the hash key
    and per-site references live (None: memory only). ``references``: ``{(site, model): path}``
    or ``{site: path}``; else ``<profile dir>/monitor/<model>.json`` of the item's site profile,
    ``<model_dir>/monitor_reference.json`` in the archive, then ``<state_dir>/<site>/<model>/reference.json``.
    """

    def __init__(self, state_dir: str | Path | None = None, *, window: int = 50, step: int = 5,
                 queue_size: int = 1024, references: dict | None = None, sync: bool = False,
                 max_log_lines: int = 20000, max_streams: int = 64):
        self.state_dir = Path(state_dir) if state_dir else None
        self.window_size, self.step = window, step
        self.references = dict(references or {})
        self.max_log_lines, self.max_streams = max_log_lines, max_streams
        self.secret = monitor_secret(self.state_dir)
        self.streams: dict[tuple[str, str, str], Stream] = {}
        self.lock = threading.Lock()
        self.observed = self.dropped = self.errors = 0
        self.sync = sync
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._model_dirs: dict[str, Path] = {}
        self._profile_dirs: dict[str, Path] = {}

    # -- the observer (request path): extract, enqueue, never raise
    def __call__(self, pipeline, items, results) -> None:
        try:
            model_dir = getattr(pipeline, "model_dir", None)
            if model_dir is not None:
                self._model_dirs.setdefault(str(getattr(pipeline, "name", "")), Path(model_dir))
            for item in items:
                site = getattr(item, "site", None)
                if getattr(site, "path", None) is not None and getattr(site, "name", None):
                    folder = Path(site.path)  # the profile's profile.json (or its folder)
                    self._profile_dirs.setdefault(site.name, folder.parent if folder.suffix == ".json" else folder)
            records = make_records(pipeline, items, results, self.secret)
        except Exception:
            self.errors += 1
            log.debug("monitor could not read a batch", exc_info=True)
            return
        if self.sync:
            self.consume(records)
            return
        self._ensure_thread()
        try:
            self.queue.put_nowait(records)
        except queue.Full:
            self.dropped += len(records)

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="cxrserve-monitor", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            records = self.queue.get()
            try:
                self.consume(records)
            except Exception:
                self.errors += 1
                log.debug("monitor could not score a window", exc_info=True)
            finally:
                self.queue.task_done()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until queued records are scored (tests, CLI)."""
        end = time.time() + timeout
        while self.queue.unfinished_tasks and time.time() < end:
            time.sleep(0.01)

    # -- scoring (worker thread)
    def _reference_for(self, site: str, model: str) -> Reference | None:
        candidates = [self.references.get((site, model)), self.references.get(site)]
        if site in self._profile_dirs:
            candidates.append(self._profile_dirs[site] / "monitor" / f"{model}.json")
        if model in self._model_dirs and site == DEFAULT_SITE:
            candidates.append(self._model_dirs[model] / REFERENCE_FILE)
        if self.state_dir is not None:
            candidates.append(self.state_dir / safe_name(site) / safe_name(model) / "reference.json")
        for path in candidates:
            if path is not None and Path(path).is_file():
                try:
                    return Reference.load(path)
                except Exception:
                    self.errors += 1
                    log.warning("monitor reference %s unreadable", path)
        return None

    def _stream(self, rec: Record) -> Stream | None:
        key = (rec.site, rec.model, rec.version)
        stream = self.streams.get(key)
        if stream is None:
            if len(self.streams) >= self.max_streams:
                return None
            ref = self._reference_for(rec.site, rec.model)
            size = ref.window if ref is not None else self.window_size
            stream = Stream(rec.site, rec.model, rec.version, deque(maxlen=size), ref)
            if self.state_dir is not None:
                base = self.state_dir / safe_name(rec.site) / safe_name(rec.model) / safe_name(rec.version)
                stream.log = BoundedLog(base / "windows.jsonl", self.max_log_lines)
                stream.predictions = BoundedLog(base / "predictions.jsonl", self.max_log_lines * 5)
            with self.lock:
                self.streams[key] = stream
        return stream

    def consume(self, records: list[Record]) -> None:
        for rec in records:
            self.observed += 1
            stream = self._stream(rec)
            if stream is None:
                self.dropped += 1
                continue
            stream.window.append(rec)
            stream.seen += 1
            if stream.predictions is not None and rec.key:
                stream.predictions.write({"key": rec.key, "t": round(rec.t, 3), "w": stream.windows,
                                          "label": rec.label, "probs": {k: round(v, 5) for k, v in rec.probs.items()},
                                          "status": rec.status})
            step = stream.reference.step if stream.reference else self.step
            if stream.seen % step == 0 and len(stream.window) == stream.window.maxlen:
                self._score(stream)

    def _score(self, stream: Stream) -> None:
        window = list(stream.window)
        ref = stream.reference
        labels = ref.labels if ref else sorted({k for r in window for k in r.probs})
        stream.estimate = estimate(window, labels)
        if ref is not None:
            stream.scores = ref.scores(window, outputs=ref.version == stream.version)
            alert = stream.scores["combined"] > ref.threshold
            if alert and not stream.alert:
                stream.alerts += 1
            stream.alert = alert
        stream.windows += 1
        if stream.log is not None:
            stream.log.write({"t": round(time.time(), 3), "w": stream.windows, "seen": stream.seen,
                              "scores": {k: round(v, 4) for k, v in stream.scores.items()},
                              "threshold": ref.threshold if ref else None, "alert": stream.alert,
                              "estimate": stream.estimate,
                              "header": {f: _counts(r.header.get(f) for r in window if r.header)
                                         for f in HEADER_FIELDS},
                              "labels": _counts(r.label for r in window),
                              "status": _counts(r.status for r in window)})

    # -- what the metrics endpoints export
    def snapshot(self) -> list[dict]:
        """Latest state per site x model (the newest version seen), for the metrics endpoints."""
        with self.lock:
            streams = list(self.streams.values())
        out = []
        for s in streams:
            out.append({"site": s.site, "model": s.model, "version": s.version, "seen": s.seen,
                        "scores": dict(s.scores), "alert": s.alert, "alerts": s.alerts,
                        "threshold": s.reference.threshold if s.reference else None,
                        "estimate": {k: dict(v) for k, v in s.estimate.items()}})
        return out


# --------------------------------------------------------------------------- attaching
#: Monitors made in this process (the metrics endpoints export them all).
MONITORS: list[Monitor] = []
_SHARED: dict[str, Monitor] = {}


def attach(pipeline, config: dict | None = None) -> Monitor | None:
    """Attach the process's monitor to ``pipeline`` (its ``observers`` list) unless
    ``monitor: false`` in the handler config or ``CXRSERVE_MONITOR=0``.

    Settings: ``monitor_dir`` (else ``$CXRSERVE_MONITOR_DIR``, else memory only),
    ``monitor_window``, ``monitor_reference`` (a reference for site ``default``). Returns the
    monitor (not attached when the pipeline has no ``observers``: the caller calls it), or None
    when monitoring is off.
    """
    config = dict(config or {})
    enabled = str(config.get("monitor", os.environ.get("CXRSERVE_MONITOR", "1"))).strip().lower()
    if enabled in ("0", "false", "no", "off"):
        return None
    try:
        state = config.get("monitor_dir") or os.environ.get("CXRSERVE_MONITOR_DIR") or ""
        key = str(state)
        monitor = _SHARED.get(key)
        if monitor is None:
            monitor = Monitor(state or None, window=int(config.get("monitor_window", 50)))
            _SHARED[key] = monitor
            MONITORS.append(monitor)
        if config.get("monitor_reference"):
            monitor.references[(DEFAULT_SITE, str(getattr(pipeline, "name", "")))] = Path(config["monitor_reference"])
        observers = getattr(pipeline, "observers", None)
        if observers is not None and monitor not in observers:
            observers.append(monitor)
        return monitor
    except Exception:
        log.warning("monitor not attached", exc_info=True)
        return None


def monitor_of(pipeline) -> Monitor | None:
    for obs in getattr(pipeline, "observers", None) or ():
        if isinstance(obs, Monitor):
            return obs
    return None
