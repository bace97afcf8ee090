"""Before / after site calibration with N labelled films of a left-out site.

Each draw picks whole patients at random until it holds ``n`` films (the last patient's surplus
films are set aside, scored by neither side), fits on those films only, and scores every film of
the site's other patients, before (served: argmax of the raw probabilities) and after. Over the
draws the median and the 2.5 / 97.5 percentiles are reported.

The steps are ``cxrserve site calibrate``'s for a binary output, applied to the positive label's
probability one-vs-rest (the targets are about it): Platt scaling with its weak prior towards the
identity (:func:`~cxrserve.tools.site.fitting.fit_platt`; its intercept is what moves the prior,
so no separate prior step is fitted) and the operating point for the sensitivity target, or the
specificity one where the drawn films have no positive
(:func:`~cxrserve.tools.site.fitting.threshold_for`), kept at the served call where the drawn films have
no positive and the served call already meets the specificity target on them. The multi-class step, one temperature, is
not used: it cannot move a prior, so on a site whose films are all COVID-19 and a model whose
argmax is another class it only flattens the softmax (a first run gave T -> 20, p ~ 1/3, ECE 0.69
at every N). The EM prior shift needs unlabelled films, which this experiment does not draw.
"""
from __future__ import annotations

import numpy as np

from cxrserve.core.site_profile import platt
from cxrserve.tools.site.fitting import fit_platt, threshold_for
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


def fit_site(p, y, served) -> dict:
    """Platt parameters and the operating point fitted on one draw's films (``p``: the positive
    label's probability, ``y``: 0/1, ``served``: the served call). Without a positive among them
    the specificity target is a floor: the served call is kept where it meets it on these films."""
    a, b = fit_platt(p, y)
    q = platt(p, a, b)
    if np.any(y == 1):
        return {"a": a, "b": b, "threshold": threshold_for(y, q, "sensitivity", SENSITIVITY), "metric": "sensitivity"}
    if np.mean(~np.asarray(served, bool)) >= SPECIFICITY:
        return {"a": a, "b": b, "threshold": None, "metric": "served (meets the specificity floor)"}
    return {"a": a, "b": b, "threshold": threshold_for(y, q, "specificity", SPECIFICITY), "metric": "specificity"}


def judge(meta: dict, q: np.ndarray, called: np.ndarray, truth: np.ndarray) -> dict:
    """Sensitivity and specificity of calling the positive label, ECE of its probability."""
    j = list(meta["labels"]).index(meta["positive"])
    y = truth == j
    return {"sensitivity": float(called[y].mean()) if y.any() else None,
            "specificity": float((~called[~y]).mean()) if (~y).any() else None,
            "ece": expected_calibration_error(y, q[:, j]) if y.size else None}


def one_draw(meta: dict, probs, truth, fit, held) -> dict:
    j = list(meta["labels"]).index(meta["positive"])
    y = (np.asarray(truth) == j).astype(int)
    p = np.asarray(probs, float)[:, j]
    before = judge(meta, probs[held], probs[held].argmax(1) == j, truth[held])
    served = np.asarray(probs).argmax(1) == j
    steps = fit_site(p[fit], y[fit], served[fit])
    q = probs[held].copy()
    q[:, j] = platt(p[held], steps["a"], steps["b"])
    called = served[held] if steps["threshold"] is None else q[:, j] >= steps["threshold"]
    after = judge(meta, q, called, truth[held])
    return {"before": before, "after": after, "fit_films": int(fit.size), "scored_films": int(held.size),
            "platt": [steps["a"], steps["b"]], "operating_point": {meta["positive"]: steps["metric"]}}


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
                       "platt_a": _summary([r["platt"][0] for r in runs]),
                       "platt_b": _summary([r["platt"][1] for r in runs]),
                       "operating_point": dict(sorted({f"{c}:{m}": sum(1 for r in runs if r["operating_point"].get(c) == m)
                                                       for r in runs for c, m in r["operating_point"].items()}.items()))}
    return out
