"""Per-label numbers with 95 % intervals by patient-level bootstrap (films of one patient are
resampled together, so a patient with ten films does not look like ten independent cases)."""
from __future__ import annotations

import numpy as np

from cxrserve.training.bootstrap import bootstrap_ci
from cxrserve.training.metrics import expected_calibration_error, roc_auc


def _rate(num, den):
    return float(num) / float(den) if den else None


def sens(y, s, pred):
    return _rate(np.sum(pred & (y == 1)), np.sum(y == 1))


def spec(y, s, pred):
    return _rate(np.sum(~pred & (y == 0)), np.sum(y == 0))


def ppv(y, s, pred):
    return _rate(np.sum(pred & (y == 1)), np.sum(pred))


def npv(y, s, pred):
    return _rate(np.sum(~pred & (y == 0)), np.sum(~pred))


def auc(y, s, pred):
    return roc_auc(y.astype(bool), s) if 0 < np.sum(y == 1) < y.size else None


def ece(y, s, pred):
    return expected_calibration_error(y.astype(bool), s) if y.size else None


METRICS = {"sensitivity": sens, "specificity": spec, "ppv": ppv, "npv": npv, "auc": auc, "ece": ece}


def binary_report(y, scores, pred, groups, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Sensitivity, specificity, PPV, NPV (at ``pred``), AUC and ECE (of ``scores``), each
    ``{"estimate", "low", "high"}``, plus the counts. ``y`` is 0/1."""
    y = np.asarray(y).astype(int)
    s = np.asarray(scores, dtype=float)
    p = np.asarray(pred, dtype=bool)
    g = np.asarray(groups)
    out: dict = {"n": int(y.size), "positives": int(np.sum(y == 1)), "negatives": int(np.sum(y == 0)),
                 "patients": int(np.unique(g).size),
                 "tp": int(np.sum(p & (y == 1))), "fp": int(np.sum(p & (y == 0))),
                 "tn": int(np.sum(~p & (y == 0))), "fn": int(np.sum(~p & (y == 1)))}
    for name, fn in METRICS.items():
        if y.size == 0:
            out[name] = {"estimate": None, "low": None, "high": None}
            continue
        ci = bootstrap_ci(fn, y, s, p, n=n_boot, seed=seed, groups=g)
        out[name] = {"estimate": ci["estimate"], "low": ci["low"], "high": ci["high"]}
    return out


def rate_ci(flags, groups, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """A proportion (e.g. refusals among frontal films) with its patient-bootstrap interval."""
    f = np.asarray(flags, dtype=float)
    if f.size == 0:
        return {"estimate": None, "low": None, "high": None, "n": 0, "count": 0}
    ci = bootstrap_ci(lambda x: float(np.mean(x)), f, n=n_boot, seed=seed, groups=np.asarray(groups))
    return {"estimate": ci["estimate"], "low": ci["low"], "high": ci["high"], "n": int(f.size), "count": int(f.sum())}


def reliability(y, scores, n_bins: int = 10) -> dict:
    """Equal-width bins: mean predicted probability, observed frequency and count per bin."""
    y = np.asarray(y, dtype=float)
    s = np.asarray(scores, dtype=float)
    b = np.minimum((s * n_bins).astype(int), n_bins - 1)
    rows = []
    for k in range(n_bins):
        sel = b == k
        if sel.any():
            rows.append({"bin": k, "confidence": float(s[sel].mean()), "frequency": float(y[sel].mean()),
                         "n": int(sel.sum())})
    return {"bins": rows, "n_bins": n_bins}


def target_met(estimate: dict | None, value: float, higher_is_better: bool, rule: str) -> bool | None:
    """True / False, or None when the metric could not be measured (no positives, ...)."""
    if not estimate or estimate.get("estimate") is None:
        return None
    x = estimate["estimate"]
    if rule == "lower_bound":
        x = estimate["low"] if higher_is_better else estimate["high"]
        if x is None:
            return None
    return bool(x >= value - 1e-12) if higher_is_better else bool(x <= value + 1e-12)
