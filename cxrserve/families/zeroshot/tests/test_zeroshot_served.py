"""cxr-zeroshot from the model store: zero-shot finds phantom opacities, handler batches, TorchServe.

The demo model is trained only on phantom image/report pairs; it has never seen the
prompt pair "Lung Opacity" / "no Lung Opacity" as such (phantom reports say "airspace
opacities", "consolidation", "lungs are clear"). The held-out phantoms here use seeds
no recipe trains or validates on.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import requests

from cxrserve.training.metrics import roc_auc
from cxrserve.synthetic.phantoms import render, sample_spec
from schemas import validate
from tsutil import png

MODEL = "cxr-zeroshot"
#: Held-out phantoms: seeds far from the demo recipe's (train 0.., val 500000..).
HELD_OUT_SEEDS = range(910_000, 910_150)
#: The CheXpert finding a user would ask for "opacity present"; fixed before training.
TARGET = "Lung Opacity"
#: Opacity-present AUC the demo model must reach on the 150 held-out phantoms (100 with
#: opacity). Chance is 0.5 and a model without signal has an AUC standard deviation of
#: about 0.05 here, so 0.65 is three of those above chance; the demo model measures
#: 0.84-0.88 (two training seeds), leaving room for training noise across machines.
MIN_PHANTOM_AUC = 0.65




@pytest.fixture(scope="module")
def held_out():
    """Frontal phantoms with marked disease or none, as the demo store's phantom sets."""
    out = []
    for seed in HELD_OUT_SEEDS:
        label = ("normal", "covid19", "pneumonia")[seed % 3]
        ph = render(sample_spec(seed, label=label, height=320, width=320, min_extent=2))
        out.append(ph)
    return out


def test_zero_shot_finds_the_phantom_opacity(pipeline, held_out):
    zs = pipeline(MODEL)
    if zs.parts["zeroshot"].card.extra.get("source") == "imported":
        pytest.skip("the store serves imported CheXzero weights, not the phantom-trained demo model")
    target = TARGET
    options = zs.parse_options({"labels": [target]})
    from cxrserve.core.imageio import decode
    from cxrserve.core.item import Item

    results = zs.predict([Item(xray=decode(png(ph.image)), options=options) for ph in held_out])
    scores = [r["probabilities"][target] for r in results]
    truth = [ph.geographic_extent > 0 for ph in held_out]
    assert 0 < sum(truth) < len(truth)
    auc = roc_auc(truth, scores)
    assert auc >= MIN_PHANTOM_AUC, f"AUC of '{target}' for opacity present: {auc:.3f}"


def test_handler_answers_each_request_on_its_own(pipeline, held_out):
    from handlers_loader import handler_for

    zs = pipeline(MODEL)
    handler, context = handler_for(zs, headers=[{}, {}, {"X-CXR-Labels": "Pneumonia, Edema"}, {}])
    requests_ = [
        {"body": png(held_out[0].image)},
        {"body": b"GIF89a not a radiograph"},
        {"body": png(held_out[1].image)},
        {"body": png(held_out[2].image), "labels": b"[]"},
    ]
    out = handler.postprocess(handler.inference(handler.preprocess(requests_)))
    assert [context.status(i) for i in range(4)] == [200, 415, 200, 400]
    validate(out[0], MODEL)
    validate(out[2], MODEL)
    validate(out[1], "error")
    assert list(out[2]["probabilities"]) == ["Pneumonia", "Edema"]
    assert out[2]["labels_source"] == "request"
    assert len(out[0]["probabilities"]) == 14
    assert any("DEMO" in w for w in out[0]["warnings"]) == zs.demo


@pytest.mark.serve
def test_served_scores_match_in_process(served, pipeline, held_out):
    body = png(held_out[4].image)
    r = served.post(MODEL, body)
    assert r.status_code == 200, r.text
    result = r.json()
    validate(result, MODEL)
    local = pipeline(MODEL).predict_bytes(body)
    assert result["probabilities"].keys() == local["probabilities"].keys()
    np.testing.assert_allclose(list(result["probabilities"].values()), list(local["probabilities"].values()),
                               atol=1e-5)

    custom = requests.post(f"{served.inference}/predictions/{MODEL}", headers=served.headers(),
                           files={"image": ("study.png", body, "image/png")},
                           data={"labels": json.dumps(["Pneumothorax", "lung opacity"])}, timeout=120)
    assert custom.status_code == 200, custom.text
    assert list(custom.json()["probabilities"]) == ["Pneumothorax", "lung opacity"]

    bad = served.post(MODEL, body, headers={"X-CXR-Labels": "[1, 2]"})
    assert bad.status_code == 400 and "labels" in bad.json()["message"]
    validate(bad.json(), "error")


def test_real_records_get_report_text(shared_data):
    from cxrserve.training.common import load_records
    from cxrserve.families.zeroshot.task import EVAL_TARGETS, report_text, usable_records

    records = load_records(shared_data)
    usable = usable_records(records)
    assert len(usable) > 1000
    texts = {r.relpath: report_text(r) for r in usable}
    nih_pneumonia = [t for r, t in zip(usable, texts.values()) if r.source.startswith("nih") and r.label == "pneumonia"]
    assert nih_pneumonia and all("Pneumonia." in t for t in nih_pneumonia)
    assert all(texts[r.relpath] == "No finding." for r in usable if r.source.startswith("openist"))
    # Every finding the model card reports has positives and negatives in the real data.
    for label, rule in EVAL_TARGETS.items():
        truth = [rule(r) for r in usable]
        assert 0 < sum(t is True for t in truth) < sum(t is not None for t in truth), label
