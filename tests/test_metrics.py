"""Tests for cxrserve.training.metrics (and its bootstrap CIs and JSON conversion) against hand-computed values and scipy."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from scipy import stats

from cxrserve.training import metrics as M
from cxrserve.training.bootstrap import bootstrap_ci
from cxrserve.training.jsonable import to_jsonable


# --------------------------------------------------------------------------- segmentation
def test_dice_iou_hand_computed():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, :3] = True  # 3 px
    b[0, 1:] = True  # 3 px, overlap 2, union 4
    assert M.dice(a, b) == pytest.approx(2 * 2 / 6)
    assert M.iou(a, b) == pytest.approx(2 / 4)
    assert M.dice(a, a) == 1.0 and M.iou(a, a) == 1.0
    assert M.dice(a, ~a) == 0.0 and M.iou(a, ~a) == 0.0
    empty = np.zeros((3, 3), bool)
    assert M.dice(empty, empty) == 1.0 and M.iou(empty, empty) == 1.0
    assert M.dice(empty, np.eye(3)) == 0.0
    assert M.dice(a.astype(np.uint8) * 255, b) == pytest.approx(2 / 3)  # 0/255 masks work
    d, j = M.dice(a, b), M.iou(a, b)
    assert d == pytest.approx(2 * j / (1 + j))
    with pytest.raises(ValueError):
        M.dice(np.zeros((2, 2)), np.zeros((3, 3)))


# --------------------------------------------------------------------------- classification
LABELS = ("covid19", "normal", "pneumonia")


def test_confusion_matrix_and_report():
    y_true = ["covid19"] * 4 + ["normal"] * 3 + ["pneumonia"] * 3
    y_pred = ["covid19", "covid19", "covid19", "pneumonia", "normal", "normal", "covid19", "pneumonia", "pneumonia", "normal"]
    cm = M.confusion_matrix(y_true, y_pred, LABELS)
    np.testing.assert_array_equal(cm, [[3, 0, 1], [1, 2, 0], [0, 1, 2]])
    rep = M.per_class_report(cm, LABELS)
    c = rep["per_class"]["covid19"]
    # TP 3, FN 1, FP 1, TN 5
    assert c["sensitivity"] == pytest.approx(3 / 4) and c["ppv"] == pytest.approx(3 / 4)
    assert c["specificity"] == pytest.approx(5 / 6) and c["f1"] == pytest.approx(6 / 8) and c["support"] == 4
    n = rep["per_class"]["normal"]  # TP 2 FN 1 FP 1 TN 6
    assert (n["sensitivity"], n["ppv"], n["specificity"]) == pytest.approx((2 / 3, 2 / 3, 6 / 7))
    assert rep["accuracy"] == pytest.approx(7 / 10)
    assert rep["balanced_accuracy"] == pytest.approx((3 / 4 + 2 / 3 + 2 / 3) / 3)
    assert rep["macro_f1"] == pytest.approx((6 / 8 + 4 / 6 + 4 / 6) / 3)
    assert rep["n"] == 10


def test_report_zero_division_is_none_and_jsonable():
    cm = M.confusion_matrix(["a", "a", "b"], ["a", "a", "a"], ["a", "b", "c"])
    rep = M.per_class_report(cm, ["a", "b", "c"])
    b, c = rep["per_class"]["b"], rep["per_class"]["c"]
    assert b["ppv"] is None and b["sensitivity"] == 0.0 and b["f1"] == 0.0
    assert c["sensitivity"] is None and c["ppv"] is None and c["f1"] is None and c["specificity"] == 1.0
    assert rep["balanced_accuracy"] == pytest.approx(0.5)  # mean over a (1.0) and b (0.0)
    assert rep["macro_f1"] == pytest.approx((0.8 + 0.0) / 2)  # c left out
    text = json.dumps(to_jsonable(rep), allow_nan=False)
    assert '"ppv": null' in text
    with pytest.raises(ValueError):
        M.confusion_matrix(["a"], ["z"], ["a", "b"])
    with pytest.raises(ValueError):
        M.confusion_matrix(["a"], [], ["a"])
    empty = M.per_class_report(np.zeros((2, 2), int), ["a", "b"])
    assert empty["accuracy"] is None and empty["balanced_accuracy"] is None


def test_confusion_matrix_numpy_labels():
    cm = M.confusion_matrix(np.array([0, 1, 2, 2]), np.array([0, 2, 2, 1]), [0, 1, 2])
    np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 0, 1], [0, 1, 1]])


# --------------------------------------------------------------------------- ROC
def test_roc_auc_equals_mann_whitney():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(size=300) + y, 1)  # rounding makes ties
    u = stats.mannwhitneyu(s[y == 1], s[y == 0], alternative="two-sided").statistic
    assert M.roc_auc(y, s) == pytest.approx(u / ((y == 1).sum() * (y == 0).sum()))
    # brute force: P(pos > neg) + 0.5 P(tie)
    pos, neg = s[y == 1][:, None], s[y == 0][None, :]
    assert M.roc_auc(y, s) == pytest.approx(np.mean((pos > neg) + 0.5 * (pos == neg)))


def test_roc_auc_edge_cases():
    assert M.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert M.roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert M.roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert M.roc_auc([1, 1, 1], [0.1, 0.2, 0.3]) is None
    assert M.roc_auc([True, False], [0.7, 0.2]) == 1.0
    with pytest.raises(ValueError):
        M.roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError):
        M.roc_auc([0, 1], [0.1, float("nan")])


def test_roc_curve_trapezoid_equals_auc():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.normal(size=200) + 0.8 * y, 1)
    fpr, tpr, thr = M.roc_curve(y, s)
    assert (fpr[0], tpr[0], thr[0]) == (0.0, 0.0, math.inf)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0) and np.all(np.diff(thr) < 0)
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz
    assert trapezoid(tpr, fpr) == pytest.approx(M.roc_auc(y, s))
    for f, t, th in zip(fpr[1:], tpr[1:], thr[1:]):
        sens, spec = M.sensitivity_specificity_at(y, s, th)
        assert (sens, 1 - spec) == pytest.approx((t, f))


def test_roc_curve_hand_computed():
    fpr, tpr, thr = M.roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(thr[1:], [0.8, 0.4, 0.35, 0.1])


def test_sensitivity_specificity_and_threshold():
    y = [0, 0, 0, 1, 1, 1, 1]
    s = [0.1, 0.3, 0.6, 0.2, 0.5, 0.7, 0.9]
    assert M.sensitivity_specificity_at(y, s, 0.5) == pytest.approx((3 / 4, 2 / 3))
    assert M.sensitivity_specificity_at(y, s, 0.0) == (1.0, 0.0)
    assert M.sensitivity_specificity_at([1, 1], [0.2, 0.3], 0.25) == (0.5, None)
    assert M.threshold_for_sensitivity(y, s, 0.75) == 0.5  # ceil(0.75*4)=3rd highest positive
    assert M.threshold_for_sensitivity(y, s, 0.76) == 0.2
    assert M.threshold_for_sensitivity(y, s, 1.0) == 0.2
    assert M.threshold_for_sensitivity(y, s, 0.1) == 0.9
    assert M.threshold_for_sensitivity([0, 0], [0.1, 0.2], 0.9) is None
    rng = np.random.default_rng(2)
    yy = rng.integers(0, 2, 500)
    ss = rng.random(500)
    for target in (0.8, 0.9, 0.95):
        t = M.threshold_for_sensitivity(yy, ss, target)
        sens, _ = M.sensitivity_specificity_at(yy, ss, t)
        assert sens >= target
        above = ss[yy == 1][ss[yy == 1] > t]
        if above.size:  # the next higher positive score misses the target: t is the highest
            assert M.sensitivity_specificity_at(yy, ss, above.min())[0] < target
    with pytest.raises(ValueError):
        M.threshold_for_sensitivity(y, s, 0.0)


# --------------------------------------------------------------------------- bootstrap
def _mean(x):
    return float(np.mean(x))


def test_bootstrap_ci_contains_estimate_and_narrows():
    rng = np.random.default_rng(3)
    small = rng.normal(size=50)
    big = rng.normal(size=2000)
    a = bootstrap_ci(_mean, small, n=500, seed=0)
    b = bootstrap_ci(_mean, big, n=500, seed=0)
    assert a["low"] <= a["estimate"] <= a["high"]
    assert b["low"] <= b["estimate"] <= b["high"]
    assert (b["high"] - b["low"]) < (a["high"] - a["low"]) / 3
    # percentile CI of the mean ~ normal theory 1.96 * sd / sqrt(n)
    assert (b["high"] - b["low"]) / 2 == pytest.approx(1.96 * big.std() / math.sqrt(big.size), rel=0.15)
    assert bootstrap_ci(_mean, small, n=500, seed=0) == a  # deterministic
    assert a["n_valid"] == 500 and a["alpha"] == 0.05


def test_bootstrap_ci_auc_skips_one_class_resamples():
    y = np.array([1, 0, 0, 0, 0, 0])
    s = np.array([0.9, 0.1, 0.2, 0.3, 0.4, 0.5])
    ci = bootstrap_ci(M.roc_auc, y, s, n=300, seed=1)
    assert ci["estimate"] == 1.0 and 0 < ci["n_valid"] < 300  # resamples without the positive
    none = bootstrap_ci(lambda x: None, np.arange(5), n=10)
    assert none["low"] is None and none["high"] is None and none["n_valid"] == 0


def test_cluster_bootstrap_resamples_groups():
    # 10 patients, each with 20 identical images: the image-level bootstrap is far too narrow
    rng = np.random.default_rng(4)
    patient_values = rng.normal(size=10)
    x = np.repeat(patient_values, 20)
    groups = np.repeat([f"p{i}" for i in range(10)], 20)
    seen_sizes = set()

    def spy(v):
        seen_sizes.add(len(v))
        return float(np.mean(v))

    naive = bootstrap_ci(_mean, x, n=400, seed=0)
    clustered = bootstrap_ci(spy, x, n=400, seed=0, groups=groups)
    assert seen_sizes == {200}  # 10 groups of 20 drawn each time
    width = lambda ci: ci["high"] - ci["low"]
    assert width(clustered) > 3 * width(naive)
    patient_level = bootstrap_ci(_mean, patient_values, n=400, seed=0)
    assert width(clustered) == pytest.approx(width(patient_level), rel=0.25)
    # each replicate is a union of whole groups: values come in blocks of 20
    blocks = []
    bootstrap_ci(lambda v: blocks.append(np.unique(v, return_counts=True)[1]) or 0.0, x, n=20, groups=groups)
    assert all(np.all(c % 20 == 0) for c in blocks)
    # unequal group sizes
    g2 = np.array([0, 0, 0, 1, 2, 2])
    sizes = set()
    bootstrap_ci(lambda v: sizes.add(len(v)) or 0.0, np.arange(6), n=200, groups=g2)
    assert sizes <= {3, 4, 5, 6, 7, 8, 9} and len(sizes) > 1
    with pytest.raises(ValueError):
        bootstrap_ci(_mean, x, groups=groups[:5])


# --------------------------------------------------------------------------- regression
def test_pearson_spearman_vs_scipy():
    rng = np.random.default_rng(5)
    x = rng.normal(size=100)
    y = 0.5 * x + rng.normal(size=100)
    y_tied = np.round(y)
    assert M.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert M.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])
    assert M.spearman(x, y_tied) == pytest.approx(stats.spearmanr(x, y_tied)[0])
    assert M.pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert M.pearson(x, -x) == pytest.approx(-1.0)
    assert M.spearman(x, np.exp(x)) == pytest.approx(1.0)
    assert M.pearson([1, 1, 1], [1, 2, 3]) is None and M.spearman([1, 1, 1], [1, 2, 3]) is None
    assert M.pearson([1], [2]) is None


def test_mae_mse_r2():
    t = np.array([3.0, -0.5, 2.0, 7.0])
    p = np.array([2.5, 0.0, 2.0, 8.0])
    assert M.mae(t, p) == pytest.approx((0.5 + 0.5 + 0 + 1) / 4)
    assert M.mse(t, p) == pytest.approx((0.25 + 0.25 + 0 + 1) / 4)
    ss_tot = np.sum((t - t.mean()) ** 2)
    assert M.r2(t, p) == pytest.approx(1 - 1.5 / ss_tot)  # 0.9486 (the sklearn doc example)
    assert M.r2(t, p) == pytest.approx(0.948608, abs=1e-6)
    assert M.r2(t, t) == 1.0
    assert M.r2(t, np.full(4, t.mean())) == pytest.approx(0.0)
    assert M.r2(t, -t) < 0  # worse than the mean
    assert M.r2([2, 2], [1, 3]) is None and M.mae([], []) is None
    with pytest.raises(ValueError):
        M.mae([1, 2], [1])


# --------------------------------------------------------------------------- calibration
def test_ece_and_brier_hand_computed():
    y = np.array([1, 0, 1, 1])
    p = np.array([0.9, 0.1, 0.6, 0.4])
    assert M.brier(y, p) == pytest.approx((0.01 + 0.01 + 0.16 + 0.36) / 4)
    # bins (n_bins=10): 0.1->1, 0.4->4, 0.6->6, 0.9->9; each bin holds one sample
    expected = (abs(1 - 0.9) + abs(0 - 0.1) + abs(1 - 0.6) + abs(1 - 0.4)) / 4
    assert M.expected_calibration_error(y, p) == pytest.approx(expected)
    # 2 bins: [0,0.5): {0.1 (y0), 0.4 (y1)} ; [0.5,1]: {0.6, 0.9 (y1, y1)}
    exp2 = 0.5 * abs(0.5 - 0.25) + 0.5 * abs(1.0 - 0.75)
    assert M.expected_calibration_error(y, p, n_bins=2) == pytest.approx(exp2)
    assert M.expected_calibration_error([1, 0], [1.0, 0.0]) == 0.0 and M.brier([1, 0], [1.0, 0.0]) == 0.0
    rng = np.random.default_rng(6)
    probs = rng.random(20000)
    outcomes = rng.random(20000) < probs  # perfectly calibrated
    assert M.expected_calibration_error(outcomes, probs) < 0.02
    assert M.expected_calibration_error(outcomes, probs ** 3) > 0.1
    with pytest.raises(ValueError):
        M.expected_calibration_error([1], [1.5])


def test_ece_brier_multiclass():
    prob = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    y = np.array([0, 0, 2])
    # brier: (0.09+0.04+0.01) + (0.81+0.64+0.01) + (0.09+0.09+0.36)
    assert M.brier(y, prob) == pytest.approx((0.14 + 1.46 + 0.54) / 3)
    # top-label: conf .7 right, .8 wrong, .4 right -> bins 7, 8, 4
    assert M.expected_calibration_error(y, prob) == pytest.approx((0.3 + 0.8 + 0.6) / 3)


# --------------------------------------------------------------------------- ranking
def test_pairwise_ranking_accuracy():
    assert M.pairwise_ranking_accuracy([1, 2, 3], [10, 20, 30]) == 1.0
    assert M.pairwise_ranking_accuracy([3, 2, 1], [10, 20, 30]) == 0.0
    # pairs (t): (0,1) ok, (0,2) ok, (1,2) wrong -> 2/3
    assert M.pairwise_ranking_accuracy([1, 3, 2], [1, 2, 3]) == pytest.approx(2 / 3)
    # value tie counts 1/2, target tie skipped
    assert M.pairwise_ranking_accuracy([1, 1, 5], [0, 1, 1]) == pytest.approx((0.5 + 1) / 2)
    assert M.pairwise_ranking_accuracy([1, 2], [3, 3]) is None
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 300)
    s = rng.normal(size=300) + y
    assert M.pairwise_ranking_accuracy(s, y) == pytest.approx(M.roc_auc(y, s))  # binary target: AUC
    t = rng.normal(size=400)
    v = t + rng.normal(size=400)
    tau = stats.kendalltau(v, t)[0]  # no ties: accuracy = (tau + 1) / 2
    assert M.pairwise_ranking_accuracy(v, t) == pytest.approx((tau + 1) / 2)


# --------------------------------------------------------------------------- json
def test_to_jsonable():
    class NT(NamedTuple):
        a: int
        b: float

    @dataclass
    class DC:
        x: np.ndarray
        p: Path

    obj = {
        "i": np.int64(3), "f": np.float32(0.5), "b": np.bool_(True), "nan": float("nan"), "inf": np.inf,
        "arr": np.array([[1, 2], [3, 4]], dtype=np.int16), "farr": np.array([0.5, np.nan]),
        np.int64(7): "numpy key", 2: (1, 2), "set": {3, 1}, "nt": NT(1, 2.0),
        "dc": DC(np.arange(2), Path("/a/b")), "none": None, "s": "x", "cm": M.confusion_matrix([0], [0], [0, 1]),
    }
    out = to_jsonable(obj)
    text = json.dumps(out, allow_nan=False)
    back = json.loads(text)
    assert back["i"] == 3 and back["f"] == 0.5 and back["b"] is True and back["nan"] is None and back["inf"] is None
    assert back["arr"] == [[1, 2], [3, 4]] and back["farr"] == [0.5, None]
    assert back["7"] == "numpy key" and back["2"] == [1, 2] and back["set"] == [1, 3]
    assert back["nt"] == {"a": 1, "b": 2.0} and back["dc"] == {"x": [0, 1], "p": "/a/b"}
    assert back["cm"] == [[1, 0], [0, 0]]
    assert type(out["i"]) is int and type(out["f"]) is float
    import torch

    assert to_jsonable(torch.tensor([1.5, 2.0])) == [1.5, 2.0]
    with pytest.raises(TypeError):
        to_jsonable(object())
