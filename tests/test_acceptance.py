"""Acceptance bars of a real store (cxrserve/packaging/acceptance.py) on synthetic evaluation dicts:
each bar fails for its own reason, and the chance bars read intervals, not point values."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from cxrserve.packaging import acceptance
from cxrserve.packaging.acceptance import gate_evidence, gate_threshold, judge, load_bars

REPO = Path(__file__).resolve().parent.parent


def _by_bar(verdict):
    out = {}
    for c in verdict.checks:
        out.setdefault(c.bar.name, []).append(c)
    return out


def test_mortality_auc_needs_its_interval_above_chance_not_its_point():
    counts = {"n_images": 160, "deaths_images": 20}
    good = {"component": "mortality", "validation": {"auc": 0.71, "auc_ci95": [0.58, 0.83], **counts}}
    assert judge(good).passed
    # a point estimate well above 0.5 whose interval still reaches chance (few deaths): not shipped
    lucky = {"component": "mortality", "validation": {"auc": 0.74, "auc_ci95": [0.45, 0.95], **counts}}
    verdict = judge(lucky)
    assert not verdict.passed
    (check,) = verdict.checks
    assert check.bar.name == "mortality_auc" and check.value == pytest.approx(0.74)
    assert "0.450" in check.reason and "mortality_auc" in verdict.failures[0]
    # the starved build: AUC 0.27 (0.02-0.64)
    assert not judge({"component": "mortality", "validation": {"auc": 0.27, "auc_ci95": [0.02, 0.64], **counts}}).passed
    # no interval at all: not measured well enough to ship
    assert "no 95 % interval" in judge({"component": "mortality", "validation": {"auc": 0.9, **counts}}).checks[0].reason


def test_an_auc_interval_from_a_handful_of_positives_is_not_trusted():
    # one death among six films ranked first: every bootstrap replicate says 1.0, the interval is [1, 1]
    one = {"component": "mortality", "validation": {"auc": 1.0, "auc_ci95": [1.0, 1.0], "n_images": 6,
                                                    "deaths_images": 1}}
    (check,) = judge(one).checks
    assert not check.passed and "rank test" in check.reason
    assert acceptance.rank_p(1.0, 1, 5) > 0.1  # one in six ranked first by chance: p = 1/6
    # the same AUC on enough films is evidence
    many = {"component": "mortality", "validation": {"auc": 1.0, "auc_ci95": [1.0, 1.0], "n_images": 40,
                                                     "deaths_images": 8}}
    assert judge(many).passed and acceptance.rank_p(1.0, 8, 32) < 1e-4
    # without counts the rank test cannot run: not shipped
    bare = {"component": "mortality", "validation": {"auc": 0.9, "auc_ci95": [0.8, 0.95]}}
    assert "counts" in judge(bare).checks[0].reason
    # every film refused: nothing scored
    refused = judge({"component": "mortality", "validation": {"auc": None, "auc_ci95": [None, None]}})
    assert not refused.passed and "not measured" in refused.checks[0].reason


def test_classifier_must_beat_the_majority_baseline_beyond_its_interval():
    ok = {"component": "triage_classifier", "acceptance": {
        "macro_f1": 0.62, "macro_f1_ci95": [0.50, 0.73], "majority_macro_f1": 0.19,
        "n": 200, "per_class": {"covid19": {"auc": 0.8, "auc_ci95": [0.7, 0.9], "positives": 70},
                                "normal": {"auc": 0.75, "auc_ci95": [0.6, 0.88], "positives": 60}}}}
    assert judge(ok).passed
    # the build: macro-F1 0.255, above the baseline's 0.19 as a point, not beyond its interval
    starved = {"component": "triage_classifier", "acceptance": {
        "macro_f1": 0.255, "macro_f1_ci95": [0.17, 0.33], "majority_macro_f1": 0.19, "n": 330,
        "per_class": {"covid19": {"auc": 0.8, "auc_ci95": [0.7, 0.9], "positives": 120}}}}
    bars = _by_bar(judge(starved))
    (f1,) = bars["triage_beats_majority"]
    assert not f1.passed and f1.bound == pytest.approx(0.19) and "0.170" in f1.reason
    assert all(c.passed for c in bars["triage_auc"])  # it fails for the baseline, not the AUCs
    # the baseline itself must have been measured
    no_base = {"component": "triage_classifier", "acceptance": {"macro_f1": 0.6, "macro_f1_ci95": [0.5, 0.7],
                                                               "per_class": {}}}
    assert "baseline" in _by_bar(judge(no_base))["triage_beats_majority"][0].reason


def test_per_label_auc_bars_skip_labels_without_truth_but_fail_chance_ones():
    evaluation = {"component": "zeroshot", "validation": {"labels": {
        "Pneumonia": {"auc": 0.81, "ci95": [0.7, 0.9], "n": 120, "positives": 30},
        "COVID-19": {"auc": 0.62, "ci95": [0.41, 0.8], "n": 120, "positives": 40},
        "Edema": {"auc": None, "n": 0}}}}
    checks = {c.label: c for c in judge(evaluation).checks}
    assert checks["zero-shot AUC, Pneumonia"].passed
    assert not checks["zero-shot AUC, COVID-19"].passed  # 0.62, but its interval reaches 0.41
    assert checks["zero-shot AUC, Edema"].passed and "skipped" in checks["zero-shot AUC, Edema"].reason
    # no label measured at all: fails
    none = {"component": "zeroshot", "validation": {"labels": {"Edema": {"auc": None}}}}
    assert not judge(none).passed


def test_lung_dice_bar_and_a_missing_number():
    assert judge({"component": "lungseg", "validation": {"dice": 0.93}}).passed
    low = judge({"component": "lungseg", "validation": {"dice": 0.87}})
    assert not low.passed and "0.870 < 0.900" in low.checks[0].reason
    # a renamed metric must not pass unnoticed
    renamed = judge({"component": "lungseg", "validation": {"mean_dice": 0.97}})
    assert not renamed.passed and "no such number" in renamed.checks[0].reason


def test_pxs_and_severity_correlations_must_exclude_zero():
    pxs = {"component": "pxs", "validation": {"pxs_vs_target": {"spearman": 0.42, "spearman_ci95": [0.15, 0.63]}}}
    assert judge(pxs).passed
    pxs["validation"]["pxs_vs_target"]["spearman_ci95"] = [-0.05, 0.7]
    assert not judge(pxs).passed

    def table1(mean, sd):
        row = {"lung_opacity": {"pearson": {"mean": mean, "std": sd}}}
        return {"component": "severity", "training_validation": {"table1": {"scores": {
            "geographic_extent": row, "opacity": {"lung_opacity": {"pearson": {"mean": 0.7, "std": 0.05}}}}}}}

    assert judge(table1(0.6, 0.1)).passed  # 0.6 - 1.96 * 0.1 > 0
    bad = judge(table1(0.3, 0.2))  # a mean r of 0.3 whose splits' spread reaches below 0
    failed = [c for c in bad.checks if not c.passed]
    assert len(failed) == 1 and "geographic_extent" in failed[0].label
    assert failed[0].interval[0] == pytest.approx(0.3 - acceptance.Z95 * 0.2)


def test_gate_threshold_is_lowered_only_as_far_as_two_percent_of_frontal_films():
    rng = np.random.default_rng(0)
    frontal = rng.uniform(0.6, 1.0, 100)
    assert gate_threshold(frontal, 0.5, 0.02) == 0.5  # refuses none already: the trained one stays
    starved = np.r_[rng.uniform(0.05, 0.45, 43), rng.uniform(0.5, 1.0, 57)]  # refuses 43 % at 0.5
    t = gate_threshold(starved, 0.5, 0.02)
    assert t < 0.5 and np.mean(starved < t) <= 0.02 and np.mean(starved < np.nextafter(t, 1)) > 0.02


def test_gate_bars_read_the_refusal_of_non_frontal_images_at_the_set_threshold():
    rng = np.random.default_rng(1)
    frontal = rng.uniform(0.7, 1.0, 200)
    kinds = {k: list(rng.uniform(0.0, 0.2, 20)) for k in ("lateral", "hand", "knee", "pelvis", "natural")}
    good = gate_evidence(frontal, rng.uniform(0.0, 0.3, 80), kinds, 0.5, 0.02)
    assert good["threshold"] == 0.5 and judge(good).passed
    # a starved gate: frontal scores overlap non-frontal ones, so meeting the 2 % cap lets laterals through
    starved_frontal = np.r_[rng.uniform(0.05, 0.45, 86), rng.uniform(0.5, 1.0, 114)]
    bad = gate_evidence(starved_frontal, rng.uniform(0.1, 0.4, 80), kinds, 0.5, 0.02)
    bars = _by_bar(judge(bad))
    assert bars["gate_frontal_refused"][0].passed  # the threshold was moved to meet it...
    assert not bars["gate_refuses_non_frontal"][0].passed  # ...and then the laterals pass the gate
    assert bad["frontal"]["refused_rate"] <= 0.02
    # all refused but too few to show it: the Wilson bound stays under 0.9 with 10 images
    few = gate_evidence(frontal, rng.uniform(0.0, 0.3, 10), kinds, 0.5, 0.02)
    check = _by_bar(judge(few))["gate_refuses_non_frontal"][0]
    assert few["non_frontal"]["refused_rate"] == 1.0 and not check.passed and check.interval[0] < 0.9


def test_classifier_evidence_bootstraps_by_patient_against_the_constant_answer():
    rng = np.random.default_rng(2)
    labels = ["covid19", "normal", "pneumonia"]
    truth = list(rng.choice(labels, 120, p=[0.5, 0.3, 0.2]))
    patients = np.repeat(np.arange(60), 2)
    evidence = acceptance.classifier_evidence(truth, ["covid19"] * 120, np.tile([0.8, 0.1, 0.1], (120, 1)), labels,
                                              patients, n_boot=300)
    # answering the majority class for every film *is* the baseline: it cannot beat it
    assert evidence["majority_class"] == "covid19"
    assert evidence["macro_f1"] == pytest.approx(evidence["majority_macro_f1"])
    assert not _by_bar(judge({"component": "triage_classifier", "acceptance": evidence}))["triage_beats_majority"][0].passed
    probs = np.array([[0.9 if lab == t else 0.05 for lab in labels] for t in truth])
    perfect = acceptance.classifier_evidence(truth, truth, probs, labels, patients, n_boot=300)
    assert perfect["macro_f1"] == 1.0 and judge({"component": "triage_classifier", "acceptance": perfect}).passed


def test_bars_are_data_in_the_real_recipe_and_a_recipe_may_change_them_by_name():
    bars = {b.name: b for b in load_bars()}
    cfg = yaml.safe_load((REPO / "training" / "real.yaml").read_text())["store"]["acceptance"]
    assert set(bars) == set(cfg["bars"]) and bars["lung_dice"].bound == 0.90
    assert bars["gate_frontal_refused"].bound == 0.02 and bars["triage_beats_majority"].baseline
    stricter = load_bars({"bars": {"lung_dice": {"bound": 0.95}}})
    assert judge({"component": "lungseg", "validation": {"dice": 0.93}}, stricter).passed is False
    assert judge({"component": "lungseg", "validation": {"dice": 0.93}}).passed
    added = load_bars({"bars": {"lung_dice_median": {"component": "lungseg", "what": "median Dice",
                                                     "key": r"^validation\.dice_median$", "test": "at_least",
                                                     "bound": 0.9}}})
    assert not judge({"component": "lungseg", "validation": {"dice": 0.93, "dice_median": 0.8}}, added).passed
    with pytest.raises(ValueError, match="unknown setting"):
        load_bars({"bars": {"lung_dice": {"bond": 0.9}}})
    with pytest.raises(ValueError, match="exactly one of bound, baseline"):
        load_bars({"bars": {"triage_beats_majority": {"bound": 0.1}}})
    with pytest.raises(ValueError, match="unknown test"):
        load_bars({"bars": {"lung_dice": {"test": "roughly"}}})
    assert acceptance.gate_settings({"gate": {"phantoms_per_kind": 5}})["phantoms_per_kind"] == 5
    assert acceptance.gate_settings()["phantoms_per_kind"] == cfg["gate"]["phantoms_per_kind"]


def test_a_component_with_no_bars_is_not_passed():
    verdict = judge({"component": "something_new", "validation": {"auc": 0.99, "auc_ci95": [0.98, 1.0]}})
    assert not verdict.passed and "no acceptance bar" in verdict.failures[0]
