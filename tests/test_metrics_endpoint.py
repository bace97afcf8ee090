"""Prometheus metrics: sent requests show up on TorchServe's metrics endpoint.

Counters are compared before and after this test's own requests, so other tests using
the same server do not disturb the numbers.
"""
from __future__ import annotations

import re
import time

import cv2
import pytest
import requests

from cxrserve.core.errors import MalformedInput
from cxrserve.synthetic.phantoms import render, sample_spec
from cxrserve.core.servemetrics import batch_metrics

LINE = re.compile(r'^(?P<name>[A-Za-z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>[-+0-9.eE]+|NaN)$')


def scrape(url: str) -> list[tuple[str, dict, float]]:
    text = requests.get(f"{url}/metrics", timeout=10).text
    out = []
    for line in text.splitlines():
        m = LINE.match(line.strip())
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group("labels") or ""))
            out.append((m.group("name"), labels, float(m.group("value"))))
    return out


def value(samples, name: str, **labels) -> float:
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == w for k, w in labels.items()))


def png(kind: str, seed: int) -> bytes:
    return cv2.imencode(".png", render(sample_spec(seed, kind=kind, height=256, width=256)).image)[1].tobytes()


@pytest.mark.serve
def test_metrics_endpoint_counts_requests_stages_gate_and_scores(served):
    model = "cxr-triage"
    before = scrape(served.metrics)
    sent = {"200": 0, "415": 0, "400": 0}
    for i in range(3):
        assert served.post(model, png("frontal", 800 + i)).status_code == 200
        sent["200"] += 1
    assert served.post(model, png("hand", 810)).status_code == 200  # demo gate: reported, not enforced
    sent["200"] += 1
    assert served.post(model, b"neither DICOM nor PNG").status_code == 415
    sent["415"] += 1
    assert served.post(model, b"\x89PNG\r\n\x1a\n" + b"\x01" * 64).status_code == 400
    sent["400"] += 1
    time.sleep(1.0)  # the frontend folds metrics in as the worker logs them
    after = scrape(served.metrics)

    for status, n in sent.items():
        delta = value(after, "CXRRequests", ModelName=model, Status=status) - \
            value(before, "CXRRequests", ModelName=model, Status=status)
        assert delta == n, (status, delta)
    assert value(after, "CXRRequests", ModelName=model, Outcome="rejected") >= 2
    # every stage of the chain has a timing
    for stage in ("decode", "preprocess", "model_lungseg", "model_triage_classifier", "model_gate"):
        assert value(after, f"Stage_{stage}", ModelName=model) > 0, stage
    # gate verdicts: the hand phantom counted as "other", not enforced by the demo gate
    assert value(after, "CXRGateVerdicts", ModelName=model, Verdict="other", Enforced="false") - \
        value(before, "CXRGateVerdicts", ModelName=model, Verdict="other", Enforced="false") == 1
    assert value(after, "CXRGateScore_count", ModelName=model) - value(before, "CXRGateScore_count", ModelName=model) == 4
    # score distributions: one observation per answered request and label
    for label in ("covid19", "normal", "pneumonia"):
        key = dict(ModelName=model, Output=f"probabilities.{label}")
        assert value(after, "CXRScore_count", **key) - value(before, "CXRScore_count", **key) == 4
        assert value(after, "CXRScore_bucket", le="+Inf", **key) >= 4
    # TorchServe's own counters and latencies stay available beside ours
    assert value(after, "ts_inference_requests_total", model_name=model) > 0


def test_batch_metrics_records():
    from cxrserve.core.errors import NotFrontalCXR

    gate = {"verdict": "inverted_cxr", "score": 0.02, "threshold": 0.5, "enforced": True}
    results = [
        {"model": "m", "probabilities": {"a": 0.25, "b": 0.75}, "pxs_score": 3.5, "crop_used": True,
         "input_gate": {**gate, "verdict": "frontal_cxr", "score": 0.9}},
        MalformedInput("bad"),
        NotFrontalCXR("inverted", detail={"input_gate": gate}),
    ]
    recs = batch_metrics(results, {"decode": 0.01}, ("probabilities",))
    names = [(r.name, dict(r.dims)) for r in recs]
    assert ("Stage_decode", {}) in names
    assert ("CXRRequests", {"Status": "200", "Outcome": "ok"}) in names
    assert ("CXRRequests", {"Status": "400", "Outcome": "rejected"}) in names
    assert ("CXRGateRejections", {"Verdict": "inverted_cxr"}) in names
    assert ("CXRGateVerdicts", {"Verdict": "inverted_cxr", "Enforced": "true"}) in names
    scores = {dict(r.dims)["Output"]: r.value for r in recs if r.name == "CXRScore"}
    assert scores == {"probabilities.a": 0.25, "probabilities.b": 0.75, "pxs_score": 3.5}
    # a map is read only where the pipeline declares it (Pipeline.score_maps)
    undeclared = {dict(r.dims)["Output"] for r in batch_metrics(results, {}) if r.name == "CXRScore"}
    assert undeclared == {"pxs_score"}
    assert next(r for r in recs if r.name == "Stage_decode").value == pytest.approx(10.0)
