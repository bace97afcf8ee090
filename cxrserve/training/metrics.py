"""Evaluation metrics in plain numpy/scipy (no scikit-learn).

Conventions: inputs are array-likes; a metric that is undefined (division by zero, a
class absent, a constant input) returns ``None`` rather than NaN so results serialise
to JSON ``null`` (:func:`cxrserve.training.jsonable.to_jsonable` writes them). Confidence
intervals of any of them: :func:`cxrserve.training.bootstrap.bootstrap_ci`.

Formulas (TP/FP/TN/FN counted per class, one-vs-rest):

* Dice = 2|A∩B| / (|A|+|B|); IoU = |A∩B| / |A∪B| (both 1.0 when both masks are empty).
* sensitivity (recall) = TP/(TP+FN); specificity = TN/(TN+FP); PPV (precision) =
  TP/(TP+FP); F1 = 2TP/(2TP+FP+FN).
* ROC AUC = U / (n_pos n_neg), U the Mann-Whitney statistic of the positive scores
  computed from average ranks (ties count 1/2).
* Pearson r, Spearman rho (Pearson of average ranks), MAE, MSE, R² = 1 - SS_res/SS_tot
  (can be negative), as reported in Cohen et al. 2020 (COVID-19 severity, Table 1).
* ECE = Σ_b (n_b/N) |acc_b - conf_b| over equal-width confidence bins; Brier = mean
  squared error of the probabilities.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy.stats import rankdata

__all__ = [
    "dice", "iou", "confusion_matrix", "per_class_report", "roc_auc", "roc_curve",
    "sensitivity_specificity_at", "threshold_for_sensitivity",
    "pearson", "spearman", "mae", "mse", "r2", "expected_calibration_error", "brier",
    "pairwise_ranking_accuracy",
]


def _div(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def _binary(y_true: Any) -> np.ndarray:
    y = np.asarray(y_true)
    if y.dtype == bool:
        return y.ravel()
    yv = y.ravel()
    u = np.unique(yv)
    if not np.all(np.isin(u, (0, 1))):
        raise ValueError(f"binary labels must be 0/1 or bool, got values {u[:5]}")
    return yv.astype(bool)


def _scores(scores: Any, n: int) -> np.ndarray:
    s = np.asarray(scores, dtype=float).ravel()
    if s.shape[0] != n:
        raise ValueError(f"{s.shape[0]} scores for {n} labels")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    return s


# --------------------------------------------------------------------------- segmentation
def _masks(pred_mask: Any, true_mask: Any) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(pred_mask).astype(bool)
    b = np.asarray(true_mask).astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    return a, b


def dice(pred_mask: Any, true_mask: Any) -> float:
    """Dice coefficient 2|A∩B| / (|A|+|B|) of two masks (non-zero = inside).

    Args:
        pred_mask: predicted mask.
        true_mask: reference mask of the same shape.

    Returns:
        Dice in [0, 1]; 1.0 when both masks are empty.
    """
    a, b = _masks(pred_mask, true_mask)
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def iou(pred_mask: Any, true_mask: Any) -> float:
    """Intersection over union |A∩B| / |A∪B| (Jaccard index) of two masks.

    Args:
        pred_mask: predicted mask.
        true_mask: reference mask of the same shape.

    Returns:
        IoU in [0, 1]; 1.0 when both masks are empty.
    """
    a, b = _masks(pred_mask, true_mask)
    union = int(np.logical_or(a, b).sum())
    return 1.0 if union == 0 else int(np.logical_and(a, b).sum()) / union


# --------------------------------------------------------------------------- classification
def confusion_matrix(y_true: Sequence[Any], y_pred: Sequence[Any], labels: Sequence[Any]) -> np.ndarray:
    """Confusion matrix ``cm[i, j]`` = number of samples of true ``labels[i]`` predicted ``labels[j]``.

    Args:
        y_true: true labels (values from ``labels``).
        y_pred: predicted labels (values from ``labels``).
        labels: the class order.

    Returns:
        int64 array of shape ``(len(labels), len(labels))``.

    Raises:
        ValueError: on length mismatch or a value not in ``labels``.
    """
    yt, yp = list(y_true), list(y_pred)
    if len(yt) != len(yp):
        raise ValueError(f"{len(yt)} true vs {len(yp)} predicted labels")
    index = {lab: i for i, lab in enumerate(labels)}
    if len(index) != len(labels):
        raise ValueError("labels must be unique")
    cm = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(yt, yp):
        t = t.item() if isinstance(t, np.generic) else t
        p = p.item() if isinstance(p, np.generic) else p
        if t not in index or p not in index:
            raise ValueError(f"label {t if t not in index else p!r} not in {list(labels)}")
        cm[index[t], index[p]] += 1
    return cm


def per_class_report(cm: Any, labels: Sequence[Any]) -> dict:
    """Per-class and overall scores from a confusion matrix (rows = truth, columns = prediction).

    Per class (one-vs-rest): ``sensitivity`` (recall) TP/(TP+FN), ``ppv`` (precision)
    TP/(TP+FP), ``specificity`` TN/(TN+FP), ``f1`` 2TP/(2TP+FP+FN), ``support`` TP+FN.
    Overall: ``accuracy`` = trace/N; ``balanced_accuracy`` = mean sensitivity over
    classes with support > 0; ``macro_f1`` = mean F1 over classes where F1 is defined
    (a class never true nor predicted is left out). Undefined values are None.

    Args:
        cm: square confusion matrix.
        labels: class names, in matrix order.

    Returns:
        ``{"per_class": {label: {...}}, "accuracy", "balanced_accuracy", "macro_f1", "n"}``.
    """
    m = np.asarray(cm, dtype=np.int64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(labels):
        raise ValueError(f"confusion matrix shape {m.shape} does not fit {len(labels)} labels")
    n = int(m.sum())
    per: dict[str, dict[str, Any]] = {}
    sens_list, f1_list = [], []
    for i, lab in enumerate(labels):
        tp = int(m[i, i])
        fn = int(m[i, :].sum()) - tp
        fp = int(m[:, i].sum()) - tp
        tn = n - tp - fn - fp
        sens = _div(tp, tp + fn)
        f1 = _div(2 * tp, 2 * tp + fp + fn)
        per[str(lab)] = {
            "sensitivity": sens, "ppv": _div(tp, tp + fp), "specificity": _div(tn, tn + fp),
            "f1": f1, "support": tp + fn, "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        }
        if sens is not None:
            sens_list.append(sens)
        if f1 is not None:
            f1_list.append(f1)
    return {
        "per_class": per,
        "accuracy": _div(int(np.trace(m)), n),
        "balanced_accuracy": float(np.mean(sens_list)) if sens_list else None,
        "macro_f1": float(np.mean(f1_list)) if f1_list else None,
        "n": n,
    }


def roc_auc(y_true: Any, scores: Any) -> float | None:
    """Area under the ROC curve via the Mann-Whitney U statistic.

    AUC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg), R_pos the sum of the
    positives' average ranks: the probability that a random positive scores above a
    random negative, ties counting 1/2.

    Args:
        y_true: binary labels (0/1 or bool).
        scores: higher = more likely positive.

    Returns:
        AUC in [0, 1], or None when either class is absent.
    """
    y = _binary(y_true)
    s = _scores(scores, y.shape[0])
    n_pos = int(y.sum())
    n_neg = y.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(s)
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def roc_curve(y_true: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve points, predicting positive when ``score >= threshold``.

    Args:
        y_true: binary labels.
        scores: higher = more likely positive.

    Returns:
        ``(fpr, tpr, thresholds)``: thresholds are the distinct scores in decreasing
        order preceded by ``+inf`` (the point (0, 0)); the last point is (1, 1).
        FPR (TPR) is all zeros when there are no negatives (positives).
    """
    y = _binary(y_true)
    s = _scores(scores, y.shape[0])
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    distinct = np.r_[np.nonzero(np.diff(s_sorted))[0], y_sorted.size - 1] if y_sorted.size else np.array([], int)
    tps = np.cumsum(y_sorted)[distinct] if y_sorted.size else np.array([])
    fps = (distinct + 1) - tps
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    tpr = np.r_[0.0, tps / n_pos] if n_pos else np.zeros(len(distinct) + 1)
    fpr = np.r_[0.0, fps / n_neg] if n_neg else np.zeros(len(distinct) + 1)
    thresholds = np.r_[np.inf, s_sorted[distinct]]
    return fpr.astype(float), tpr.astype(float), thresholds.astype(float)


def sensitivity_specificity_at(y_true: Any, scores: Any, threshold: float) -> tuple[float | None, float | None]:
    """Sensitivity and specificity when ``score >= threshold`` is called positive.

    Args:
        y_true: binary labels.
        scores: scores.
        threshold: decision threshold.

    Returns:
        ``(sensitivity, specificity)``, each None when its class is absent.
    """
    y = _binary(y_true)
    s = _scores(scores, y.shape[0])
    pred = s >= threshold
    tp = int(np.sum(pred & y))
    tn = int(np.sum(~pred & ~y))
    return _div(tp, int(y.sum())), _div(tn, int((~y).sum()))


def threshold_for_sensitivity(y_true: Any, scores: Any, target: float) -> float | None:
    """Highest threshold whose sensitivity (``score >= t`` positive) is at least ``target``.

    It is the k-th largest positive score with k = ceil(target × n_pos); ties at that
    score can only raise sensitivity above the target.

    Args:
        y_true: binary labels.
        scores: scores.
        target: wanted sensitivity in (0, 1].

    Returns:
        the threshold, or None when there are no positives.
    """
    if not 0 < target <= 1:
        raise ValueError("target must be in (0, 1]")
    y = _binary(y_true)
    s = _scores(scores, y.shape[0])
    pos = np.sort(s[y])[::-1]
    if pos.size == 0:
        return None
    k = max(1, math.ceil(target * pos.size - 1e-9))
    return float(pos[k - 1])


# --------------------------------------------------------------------------- regression
def _pair(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(x, dtype=float).ravel()
    b = np.asarray(y, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"lengths differ: {a.shape[0]} vs {b.shape[0]}")
    return a, b


def pearson(x: Any, y: Any) -> float | None:
    """Pearson correlation r = cov(x, y) / (sd(x) sd(y)).

    Args:
        x: values.
        y: values of the same length.

    Returns:
        r in [-1, 1], or None for fewer than 2 points or a constant input.
    """
    a, b = _pair(x, y)
    if a.size < 2:
        return None
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    if den == 0:
        return None
    return float(np.clip((a @ b) / den, -1.0, 1.0))


def spearman(x: Any, y: Any) -> float | None:
    """Spearman rank correlation: Pearson r of the average ranks (as scipy.stats.spearmanr).

    Args:
        x: values.
        y: values of the same length.

    Returns:
        rho in [-1, 1], or None for fewer than 2 points or a constant input.
    """
    a, b = _pair(x, y)
    return pearson(rankdata(a), rankdata(b)) if a.size else None


def mae(y_true: Any, y_pred: Any) -> float | None:
    """Mean absolute error mean(|y_pred - y_true|); None when empty."""
    a, b = _pair(y_true, y_pred)
    return float(np.mean(np.abs(b - a))) if a.size else None


def mse(y_true: Any, y_pred: Any) -> float | None:
    """Mean squared error mean((y_pred - y_true)²); None when empty."""
    a, b = _pair(y_true, y_pred)
    return float(np.mean((b - a) ** 2)) if a.size else None


def r2(y_true: Any, y_pred: Any) -> float | None:
    """Coefficient of determination R² = 1 - SS_res / SS_tot.

    SS_res = Σ(y_true - y_pred)², SS_tot = Σ(y_true - mean(y_true))². Negative when
    the predictions are worse than predicting the mean.

    Args:
        y_true: reference values.
        y_pred: predictions.

    Returns:
        R², or None when empty or ``y_true`` is constant.
    """
    a, b = _pair(y_true, y_pred)
    if a.size == 0:
        return None
    ss_tot = float(np.sum((a - a.mean()) ** 2))
    if ss_tot == 0:
        return None
    return 1.0 - float(np.sum((a - b) ** 2)) / ss_tot


# --------------------------------------------------------------------------- calibration
def _calib_inputs(y_true: Any, prob: Any) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct) for ECE: binary P(y=1) or multi-class top-label."""
    p = np.asarray(prob, dtype=float)
    y = np.asarray(y_true)
    if p.ndim == 2:
        if y.shape[0] != p.shape[0]:
            raise ValueError("one label per row of prob")
        conf = p.max(axis=1)
        correct = (p.argmax(axis=1) == y.astype(int)).astype(float)
        return conf, correct
    yb = _binary(y)
    if p.ravel().shape[0] != yb.shape[0]:
        raise ValueError("one probability per label")
    return p.ravel(), yb.astype(float)


def expected_calibration_error(y_true: Any, prob: Any, n_bins: int = 10) -> float | None:
    """Expected calibration error with equal-width bins on [0, 1].

    ECE = Σ_b (n_b / N) |mean(outcome in b) - mean(confidence in b)|. Binary: ``prob``
    is P(y = 1) and the outcome is y (reliability-diagram form). Multi-class: ``prob``
    is ``(N, C)``, ``y_true`` class indices; confidence is the top probability and the
    outcome whether the top class is right. A value p goes to bin
    ``min(floor(p n_bins), n_bins - 1)``.

    Args:
        y_true: binary labels, or class indices for 2-D ``prob``.
        prob: probabilities, ``(N,)`` or ``(N, C)``.
        n_bins: number of bins.

    Returns:
        ECE in [0, 1], or None when empty.
    """
    conf, out = _calib_inputs(y_true, prob)
    if conf.size == 0:
        return None
    if np.any((conf < 0) | (conf > 1)):
        raise ValueError("probabilities must lie in [0, 1]")
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            ece += sel.mean() * abs(out[sel].mean() - conf[sel].mean())
    return float(ece)


def brier(y_true: Any, prob: Any) -> float | None:
    """Brier score.

    Binary: mean((p - y)²) with p = P(y = 1). Multi-class (``prob`` of shape
    ``(N, C)``, ``y_true`` class indices): mean over samples of Σ_c (p_c - 1[y = c])²
    (the original Brier 1950 form, range [0, 2]).

    Args:
        y_true: binary labels or class indices.
        prob: probabilities.

    Returns:
        the score (lower is better), or None when empty.
    """
    p = np.asarray(prob, dtype=float)
    if p.ndim == 2:
        y = np.asarray(y_true).astype(int)
        if p.shape[0] == 0:
            return None
        onehot = np.zeros_like(p)
        onehot[np.arange(p.shape[0]), y] = 1.0
        return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))
    yb = _binary(y_true).astype(float)
    pv = p.ravel()
    if pv.shape[0] != yb.shape[0]:
        raise ValueError("one probability per label")
    return float(np.mean((pv - yb) ** 2)) if pv.size else None


# --------------------------------------------------------------------------- ranking
def pairwise_ranking_accuracy(values: Any, targets: Any) -> float | None:
    """Fraction of pairs that ``values`` order the same way as ``targets`` (concordance).

    Over all pairs i < j with ``targets[i] != targets[j]``: 1 if sign(values_i -
    values_j) equals sign(targets_i - targets_j), 1/2 if the values tie, else 0. Pairs
    tied in ``targets`` are skipped. This is Harrell's C without censoring; for binary
    targets it equals the ROC AUC.

    Args:
        values: predicted scores (e.g. a change score per same-patient image pair).
        targets: reference values (e.g. radiologist change in severity).

    Returns:
        the accuracy in [0, 1], or None when no pair is comparable.
    """
    v, t = _pair(values, targets)
    concordant = 0.0
    comparable = 0
    block = max(1, 4_000_000 // max(v.size, 1))  # rows per chunk: bounded memory
    for start in range(0, v.size, block):
        vi = v[start:start + block, None]
        ti = t[start:start + block, None]
        j = np.arange(v.size)[None, :]
        i = np.arange(start, start + vi.shape[0])[:, None]
        upper = j > i
        dt = np.sign(ti - t[None, :])
        dv = np.sign(vi - v[None, :])
        ok = upper & (dt != 0)
        comparable += int(ok.sum())
        concordant += float(np.sum(ok & (dv == dt))) + 0.5 * float(np.sum(ok & (dv == 0)))
    return concordant / comparable if comparable else None
