"""cxr-mortality from the model store: risk on phantoms, overlay, handler and TorchServe.

Phantoms draw survival from a documented logistic model of extent, opacity and age
(:func:`cxrserve.synthetic.phantoms.death_probability`), so the true risk of each evaluation
phantom is known; age is not drawn in the image, so no model can reach AUC 1.
"""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import requests
from PIL import Image

from cxrserve.core.imageio import decode
from cxrserve.training.metrics import roc_auc, spearman
from cxrserve.synthetic.phantoms import render, sample_spec
from cxrserve.core.item import Item
from handlers_loader import handler_for
from schemas import validate
from tsutil import png as _png

MODEL = "cxr-mortality"




@pytest.fixture(scope="module")
def phantoms():
    labels = ("normal", "covid19", "pneumonia")
    return [render(sample_spec(920_000 + i, label=labels[i % 3], height=320, width=320, min_extent=2))
            for i in range(90)]


@pytest.fixture(scope="module")
def risks(pipeline, phantoms):
    mortality = pipeline(MODEL)
    items = [Item(xray=decode(_png(p.image)), options=mortality.parse_options({})) for p in phantoms]
    return [out["risk"] for out in mortality.predict(items)]


def test_risk_tracks_the_phantoms_true_risk(phantoms, risks):
    """Served risk ranks unseen phantoms by their true death probability (rho >= 0.4).

    The true probability depends on extent and opacity (visible) and age (not): a
    model reading the lungs correlates with it; under no association rho on 90 images
    has a standard deviation of about 0.11, so 0.4 is over three and a half above chance.
    """
    true_risk = [p.extra["p_death"] for p in phantoms]
    assert spearman(true_risk, risks) >= 0.4
    normal = [r for p, r in zip(phantoms, risks) if p.geographic_extent == 0]
    severe = [r for p, r in zip(phantoms, risks) if p.geographic_extent >= 6]
    assert np.mean(severe) > np.mean(normal)


def test_auc_against_drawn_outcomes_beats_chance(phantoms, risks):
    died = [1 - p.survival for p in phantoms]
    assert sum(died) >= 5
    assert roc_auc(died, risks) >= 0.6


def test_every_response_is_research_only_with_an_overlay_on_request(pipeline, phantoms):
    handler, context = handler_for(pipeline(MODEL))
    good = _png(phantoms[4].image)
    out = handler.handle([{"body": good, "overlay": b"true"}, {"body": b"\x00" * 64}, {"body": good}], context)
    assert [context.status(i) for i in range(3)] == [200, 415, 200]
    for i in (0, 2):
        validate(out[i], MODEL)
        assert out[i]["research_only"].startswith("Research use only")
        assert out[i]["risk_label"] == ("high" if out[i]["risk"] >= out[i]["threshold"] else "low")
    validate(out[1], "error")
    assert out[0]["risk"] == out[2]["risk"]
    overlay = Image.open(io.BytesIO(base64.b64decode(out[0]["overlay_png"])))
    assert overlay.size == (320, 320) and "overlay_png" not in out[2]


def test_card_states_its_calibration_threshold_and_data(pipeline):
    card = pipeline(MODEL).parts["mortality"].card
    assert card.extra["calibration"]["method"] == "platt"
    assert 0 < card.thresholds["high_risk"] < 1
    assert card.extra["threshold_rule"]["chosen_on"] == "validation"
    assert "patients" in card.extra["data_summary"]


@pytest.mark.serve
def test_served_mortality_with_overlay(served, phantoms):
    r = requests.post(f"{served.inference}/predictions/{MODEL}",
                      headers={**served.headers(), "X-CXR-Overlay": "true", "Content-Type": "image/png"},
                      data=_png(phantoms[7].image), timeout=300)
    assert r.status_code == 200, r.text
    body = r.json()
    validate(body, MODEL)
    assert "overlay_png" in body and body["research_only"].startswith("Research use only")
