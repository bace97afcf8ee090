"""Drift statistics and the reference a site's window is judged against (:class:`Reference`,
:func:`fit_reference`), and the label-free performance estimate (:func:`estimate`); see
:mod:`cxrserve.core.monitor` for how they are used. Only numpy and the standard library (core layer).
"""
from __future__ import annotations

import json
import math
from collections import Counter
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from cxrserve.core.drift_embedding import THUMBNAIL
from cxrserve.core.drift_record import EMBED_DIMS, HEADER_FIELDS, IMAGE_STATS, Record

#: Reference format this code reads.
REFERENCE_FORMAT = "cxrserve-monitor-reference/1"
#: File name of a reference beside a site profile (``<profile dir>/monitor/<model>.json``) or in an archive.
REFERENCE_FILE = "monitor_reference.json"


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


def category_counts(values: Iterable) -> dict[str, int]:
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
                win = category_counts(r.header.get(name[7:]) for r in decoded)
            elif name == "output.status":
                win = category_counts(r.status for r in records)
            elif name == "output.label" and outputs:
                win = category_counts(r.label for r in records if r.label is not None)
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
        e = self.embedding
        source = e.get("source", THUMBNAIL) if e else None
        emb = [r.embedding for r in decoded if r.embedding and (r.embedding_source or THUMBNAIL) == source
               and len(r.embedding) == len(e["mean"])]
        if emb and e:
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
    categorical = {f"header.{f}": category_counts(r.header.get(f) for r in decoded) for f in HEADER_FIELDS}
    categorical["output.status"] = category_counts(r.status for r in fit)
    labels = category_counts(r.label for r in fit if r.label is not None)
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
    sources = Counter(r.embedding_source or THUMBNAIL for r in decoded if r.embedding)
    source = sources.most_common(1)[0][0] if sources else THUMBNAIL  # one kind of embedding per reference
    emb = [r.embedding for r in decoded if r.embedding and (r.embedding_source or THUMBNAIL) == source]
    emb = np.asarray([e for e in emb if len(e) == len(emb[0])] if emb else [], np.float64)
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
                     "gamma": gamma, "k_rr": k_rr, "source": source}
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


