"""Before / after site calibration with N labelled films of a left-out site.

Each draw picks whole patients at random until it holds ``n`` films (the last patient's surplus
films are set aside, scored by neither side), fits the steps ``cxrserve site calibrate`` fits
(:func:`cxrserve.tools.site.calibrate.fit_steps`: temperature, prior shift by EM, the operating
point for the sensitivity target, else the specificity one) on those films only, and scores the
site's other patients' films, before (served: argmax of the raw probabilities) and after. The
prior shift's unlabelled films are the same ``n`` films: nothing of a scored film, not even its
image, is used to fit. Over the draws the median and the 2.5 / 97.5 percentiles are reported.
"""
from __future__ import annotations

import numpy as np

from cxrserve.core.site_profile import adjust, decide
from cxrserve.tools.site.calibrate import fit_steps
from cxrserve.tools.site.config import SiteFile, Target
from cxrserve.tools.site.models import Output
from cxrserve.tools.site.scoring import FamilyScores
from cxrserve.training.metrics import expected_calibration_error

SENSITIVITY, SPECIFICITY, MAX_ECE = 0.90, 0.80, 0.05


def patient_draw(groups, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(fit, score)`` film indices: ``n`` films of whole random patients (the last one's
    surplus dropped), and every film of the patients not drawn. Never overlapping."""
    g = np.asarray(groups)
    fit: list[int] = []
    used = []
    for p in rng.permutation(np.unique(g)):
        idx = rng.permutation(np.flatnonzero(g == p))
        fit.extend(idx[: n - len(fit)].tolist())
        used.append(p)
        if len(fit) >= n:
            break
    return np.array(sorted(fit), dtype=np.int64), np.flatnonzero(~np.isin(g, used))


def _family(meta: dict, probs: np.ndarray, truth: np.ndarray) -> tuple[FamilyScores, SiteFile]:
    labels = tuple(meta["labels"])
    Y = np.zeros((truth.size, len(labels)))
    Y[np.arange(truth.size), truth] = 1.0
    served = np.zeros(probs.shape, dtype=bool)
    served[np.arange(truth.size), probs.argmax(1)] = True
    output = Output(family=meta["family"], model=meta["model"], kind="multiclass", labels=labels,
                    read=lambda r: {})
    fs = FamilyScores(output=output, archive=None, probs=probs, served_positive=served, truth=Y, labels=labels)
    pos = meta["positive"]
    site = SiteFile(name="loso", labels={}, targets=(
        Target(f"{meta['family']}.{pos}.sensitivity", meta["family"], pos, "sensitivity", SENSITIVITY),
        Target(f"{meta['family']}.{pos}.specificity", meta["family"], pos, "specificity", SPECIFICITY)))
    return fs, site


def judge(meta: dict, q: np.ndarray, called: np.ndarray, truth: np.ndarray) -> dict:
    """Sensitivity and specificity of calling the positive label, ECE of its probability."""
    j = list(meta["labels"]).index(meta["positive"])
    y = truth == j
    return {"sensitivity": float(called[y].mean()) if y.any() else None,
            "specificity": float((~called[~y]).mean()) if (~y).any() else None,
            "ece": expected_calibration_error(y, q[:, j]) if y.size else None}


def one_draw(meta: dict, probs, truth, fit, held) -> dict:
    fs, site = _family(meta, probs, truth)
    j = list(meta["labels"]).index(meta["positive"])
    before = judge(meta, probs[held], probs[held].argmax(1) == j, truth[held])
    fam = fit_steps(fs, site, probs[fit], fs.truth[fit], probs[fit])["operating_points"]
    q = adjust(fam, probs[held])
    called = np.array([decide(fam, row)[0] == meta["positive"] for row in q], dtype=bool)
    after = judge(meta, q, called, truth[held])
    return {"before": before, "after": after, "fit_films": int(fit.size), "scored_films": int(held.size),
            "temperature": (fam.calibration or {}).get("T"),
            "operating_point": {c: v["metric"] for c, v in (fam.thresholds or {}).items()}}


def _summary(values) -> dict:
    v = np.array([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return {"median": None, "low": None, "high": None, "draws": 0}
    return {"median": float(np.median(v)), "low": float(np.percentile(v, 2.5)),
            "high": float(np.percentile(v, 97.5)), "draws": int(v.size)}


def curve(meta: dict, probs, truth, groups, ns=(10, 20, 50), draws: int = 50, seed: int = 0) -> dict:
    """Per N: the draws' before / after metrics summarised (median, 95 % percentile interval)."""
    probs, truth, groups = np.asarray(probs, float), np.asarray(truth), np.asarray(groups)
    out = {}
    for n in ns:
        rng = np.random.default_rng((seed, n))
        runs = []
        for _ in range(draws):
            fit, held = patient_draw(groups, n, rng)
            if fit.size < n or held.size == 0:
                break  # the site has too few films / patients for this N
            runs.append(one_draw(meta, probs, truth, fit, held))
        if not runs:
            out[str(n)] = {"draws": 0, "note": "too few patients for this N"}
            continue
        out[str(n)] = {"draws": len(runs),
                       "scored_films": _summary([r["scored_films"] for r in runs]),
                       **{side: {m: _summary([r[side][m] for r in runs]) for m in ("sensitivity", "specificity", "ece")}
                          for side in ("before", "after")},
                       "temperature": _summary([r["temperature"] for r in runs]),
                       "operating_point": dict(sorted({f"{c}:{m}": sum(1 for r in runs if r["operating_point"].get(c) == m)
                                                       for r in runs for c, m in r["operating_point"].items()}.items()))}
    return out
