"""What ``site calibrate`` fits, each a small function of probabilities and labels (no model runs).

* :func:`fit_temperature`: one temperature for a softmax family, by maximum likelihood on the
  labels the site has, full classes and one-vs-rest negatives alike (a PCR-negative film adds
  ``log(1 - p_covid)``);
* :func:`fit_platt`: ``sigmoid(a logit(p) + b)`` for a binary / multi-label output, with a weak
  Gaussian prior towards the identity (``a = 1, b = 0``) so that a few films cannot flip a score;
* :func:`em_priors`: class priors of unlabelled films by EM (Saerens, Latinne and Decaestecker,
  Neural Computation 2002);
* :func:`threshold_for` (sensitivity / specificity targets) and :func:`gate_threshold`.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize, minimize_scalar

from cxrserve.core.site_profile import logit, platt, temperature_scale
from cxrserve.training.metrics import threshold_for_sensitivity

_EPS = 1e-7


def mixed_nll(probs: np.ndarray, truth: np.ndarray) -> float | None:
    """Mean negative log-likelihood of what is known: a row with a positive class adds
    ``-log p_class``; a row with only negatives known adds ``-Σ log(1 - p_c)`` over them."""
    p = np.clip(np.asarray(probs, dtype=float), _EPS, 1 - _EPS)
    y = np.asarray(truth, dtype=float)
    total, n = 0.0, 0
    for row_p, row_y in zip(p, y):
        known = ~np.isnan(row_y)
        if not known.any():
            continue
        pos = known & (row_y == 1)
        if pos.any():
            total -= float(np.log(row_p[pos]).sum())
        else:
            total -= float(np.log1p(-row_p[known]).sum())
        n += 1
    return total / n if n else None


def binary_nll(p, y) -> float | None:
    p = np.clip(np.asarray(p, dtype=float), _EPS, 1 - _EPS)
    y = np.asarray(y, dtype=float)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p))) if y.size else None


def fit_temperature(probs: np.ndarray, truth: np.ndarray) -> float:
    """Temperature T in [0.05, 20] minimising :func:`mixed_nll` of ``softmax(log p / T)``."""
    if mixed_nll(probs, truth) is None:
        raise ValueError("no labelled film to fit a temperature on")
    res = minimize_scalar(lambda lt: mixed_nll(temperature_scale(probs, math.exp(lt)), truth),
                          bounds=(math.log(0.05), math.log(20.0)), method="bounded", options={"xatol": 1e-4})
    return float(math.exp(res.x))


def fit_platt(p, y, prior_weight: float = 1.0) -> tuple[float, float]:
    """Platt parameters ``(a, b)``: penalised binary likelihood, penalty ``w/2 ((a-1)^2 + b^2)``."""
    z = logit(p)
    y = np.asarray(y, dtype=float)
    if y.size == 0:
        raise ValueError("no labelled film to fit Platt scaling on")

    def loss(theta):
        a, b = theta
        q = np.clip(1 / (1 + np.exp(-(a * z + b))), _EPS, 1 - _EPS)
        return float(-np.sum(y * np.log(q) + (1 - y) * np.log1p(-q)) + 0.5 * prior_weight * ((a - 1) ** 2 + b ** 2))

    res = minimize(loss, x0=np.array([1.0, 0.0]), method="L-BFGS-B", bounds=[(0.01, 20.0), (-20.0, 20.0)])
    return float(res.x[0]), float(res.x[1])


def em_priors(probs: np.ndarray, reference, *, max_iter: int = 1000, tol: float = 1e-8) -> tuple[np.ndarray, int]:
    """Class priors of a new population from posteriors ``probs`` (N, C) that are calibrated for
    priors ``reference`` (Saerens et al. 2002): iterate ``π ← mean_i p_π(c|x_i)`` with
    ``p_π(c|x) ∝ p(c|x) π_c / π_ref_c``. Returns ``(priors, iterations)``. A binary output is
    passed as two columns ``[1 - p, p]``."""
    p = np.clip(np.asarray(probs, dtype=float), _EPS, 1.0)
    ref = np.asarray(reference, dtype=float)
    if p.ndim != 2 or p.shape[1] != ref.size or p.shape[0] == 0:
        raise ValueError("probs must be (N, C) with C = len(reference), N > 0")
    pi = ref.copy()
    for it in range(1, max_iter + 1):
        q = p * (pi / ref)
        q /= q.sum(axis=1, keepdims=True)
        new = q.mean(axis=0)
        if np.max(np.abs(new - pi)) < tol:
            return new, it
        pi = new
    return pi, max_iter


def threshold_for(y, scores, metric: str, value: float) -> float | None:
    """Threshold on ``scores`` (``>= t`` positive) for a target: the highest one whose sensitivity
    reaches ``value``, or the lowest whose specificity does. None without films of that class."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(scores, dtype=float)
    if metric == "sensitivity":
        return threshold_for_sensitivity(y, s, value) if y.any() else None
    if metric == "specificity":
        neg = np.sort(s[~y])
        if neg.size == 0:
            return None
        k = max(1, math.ceil(value * neg.size - 1e-9))
        return float(min(1.0, np.nextafter(neg[k - 1], np.inf)))  # just above the k-th lowest negative
    raise ValueError(f"no threshold rule for {metric!r}")


def gate_threshold(scores, max_refusal: float) -> float | None:
    """The largest gate threshold (refuse when ``score < t``) that refuses at most ``max_refusal``
    of these frontal films; None without scores."""
    s = np.sort(np.asarray(scores, dtype=float)[~np.isnan(np.asarray(scores, dtype=float))])
    if s.size == 0:
        return None
    m = int(math.floor(max_refusal * s.size + 1e-9))  # films it may refuse
    # refusing exactly the m lowest: t = the (m+1)-th lowest score (ties refuse no more)
    return float(s[m]) if m < s.size else 1.0


def platt_apply(p, params):
    return platt(p, *params)
