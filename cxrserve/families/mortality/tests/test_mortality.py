"""Mortality building blocks: log-odds, Platt calibration, threshold report, card checks."""
from __future__ import annotations

import numpy as np
import pytest

from cxrserve.core.card import ModelCard
from cxrserve.families.mortality.pipeline import OUTCOMES, calibrate, log_odds, research_statement
from cxrserve.families.mortality.task import fit_platt, risk_report


def test_log_odds_of_probabilities_and_saturation():
    p = np.array([[0.5, 0.5], [0.2, 0.8], [1.0, 0.0], [0.0, 1.0]])
    z = log_odds(p)
    assert z[0] == pytest.approx(0.0) and z[1] == pytest.approx(np.log(4.0))
    assert np.isfinite(z).all() and z[2] < -15 and z[3] > 15


def test_platt_recovers_a_known_calibration():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 20000)
    y = rng.random(z.size) < 1 / (1 + np.exp(-(0.6 * z - 1.2)))
    cal = fit_platt(z, y.astype(int), l2=0.0)
    assert cal["a"] == pytest.approx(0.6, abs=0.03) and cal["b"] == pytest.approx(-1.2, abs=0.05)
    assert calibrate(np.array([2.0]), cal)[0] == pytest.approx(0.5, abs=0.02)


def test_platt_stays_finite_on_separable_data():
    z = np.array([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0])
    cal = fit_platt(z, np.array([0, 0, 0, 1, 1, 1]))
    assert np.isfinite([cal["a"], cal["b"]]).all() and cal["a"] > 0


def test_platt_needs_both_outcomes():
    with pytest.raises(ValueError, match="both outcomes"):
        fit_platt(np.zeros(5), np.zeros(5))


def test_class_weighted_scores_are_pulled_back_to_the_base_rate():
    """Weighted training inflates the minority class; Platt's intercept undoes it."""
    rng = np.random.default_rng(1)
    y = (rng.random(4000) < 0.1).astype(int)
    z = rng.normal(0, 1, y.size) + 1.5 * y + 2.0  # raw log-odds say ~90 % die
    risk = calibrate(z, fit_platt(z, y))
    assert abs(risk.mean() - y.mean()) < 0.01


def test_report_has_a_patient_level_interval_around_the_estimate():
    rng = np.random.default_rng(2)
    groups = np.repeat(np.arange(40), 2)
    y = np.repeat(rng.random(40) < 0.3, 2).astype(int)
    risk = np.clip(0.3 * y + rng.random(80) * 0.7, 0, 1)
    report = risk_report(y, risk, groups, threshold=0.5, n_boot=300)
    low, high = report["auc_ci95"]
    assert low <= report["auc"] <= high and high - low > 0.05
    assert report["n_patients"] == 40 and report["n_images"] == 80
    assert report["deaths_patients"] == int(y[::2].sum())
    assert 0 <= report["sensitivity"] <= 1 and 0 <= report["specificity"] <= 1


def test_statement_says_research_only_and_how_much_data():
    card = ModelCard(name="mortality", architecture="resnet18_cam", task="classification",
                     preprocessing="mortality", labels=list(OUTCOMES),
                     extra={"data_summary": "Trained on 96 films of 48 patients, 9 of whom died."})
    text = research_statement(card)
    assert text.startswith("Research use only") and "48 patients" in text
