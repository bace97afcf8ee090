"""A change that should keep every answer keeps every byte of it.

Every served model (``cxr-study`` included) answers a fixed batch of phantom requests
(:mod:`record_responses`: pictures on and off, a prior, a bad prior, a knee, undecodable
bytes, the input gate enforced) in process. Two checks:

* the answers equal, byte for byte, a recording made with trusted code for the same
  weights (``build/expected_responses/<digest>.json``, written by
  ``tests/record_responses.py``; the demo weights are trained locally, so without a
  recording for them the check skips and says how to make one);
* on any weights, each section of the study is what that model's own endpoint answers
  to the same request (the study's design: one decode, the same numbers).
"""
from __future__ import annotations

import json

import pytest

import record_responses as rec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def today(model_store, pipeline):
    names = [n for n in rec.served_names() if (model_store / f"{n}.mar").exists()]
    return rec.record(pipeline, names)


def first_difference(got, want, path="") -> str:
    """Where two JSON values first differ (key order counts: it is the body's bytes)."""
    if isinstance(got, dict) and isinstance(want, dict):
        if list(got) != list(want):
            return f"{path or '/'}: keys {list(got)} != recorded {list(want)}"
        for key in got:
            found = first_difference(got[key], want[key], f"{path}/{key}")
            if found:
                return found
        return ""
    if isinstance(got, list) and isinstance(want, list) and len(got) == len(want):
        return next((d for i, (g, w) in enumerate(zip(got, want)) if (d := first_difference(g, w, f"{path}/{i}"))), "")
    return "" if json.dumps(got) == json.dumps(want) else f"{path}: {json.dumps(got)[:200]} != recorded {json.dumps(want)[:200]}"


def test_responses_equal_the_recording_for_these_weights(today):
    path = rec.recording_path(today["store_digest"])
    if not path.exists():
        pytest.skip(f"no responses recorded for these weights ({path.relative_to(rec.REPO)}): record them "
                    f"with code you trust: .venv/bin/python tests/record_responses.py")
    recorded = json.loads(path.read_text())
    assert today["digests"] == recorded["digests"]
    assert list(today["responses"]) == list(recorded["responses"]), "served models changed: re-record"
    made_with = f"recorded with {recorded['recorded_with']}; re-record (--force) only for an intended change"
    for model, answers in recorded["responses"].items():
        assert list(today["responses"][model]) == list(answers)
        for request, want in answers.items():
            diff = first_difference(today["responses"][model][request], want)
            assert not diff, f"{model}, request {request!r}: {diff} ({made_with})"
    assert today["dicom"] == recorded["dicom"], f"DICOM result objects differ ({made_with})"


def test_study_sections_are_each_models_own_answer(today):
    from cxrserve import families

    responses, strict = today["responses"], rec.STRICT
    composed = [n for n in families.composed("cxr-study") if n in responses]
    for study, singles in (("cxr-study", composed), ("cxr-study" + strict, [n for n in composed if n in rec.GATED])):
        for request, answer in responses[study].items():
            for name in singles:
                single = responses[name + (strict if study.endswith(strict) else "")][request]
                if "results" not in answer:  # refused whole: exactly what every endpoint refuses
                    assert single == answer, (study, request, name)
                else:
                    assert answer["results"][name.removeprefix("cxr-")] == single, (study, request, name)
    assert responses["cxr-study"]["pneumonia"]["results"]["triage"]["heatmap_png"].startswith("sha256:")
    assert "change" in responses["cxr-study"]["covid19+prior"]["results"]["pxs"]
    assert responses["cxr-study"]["normal+garbage-prior"]["results"]["pxs"]["status"] == 415
    assert responses["cxr-study" + strict]["normal+knee-prior"]["results"]["pxs"]["status"] == 422
    assert responses["cxr-study" + strict]["knee"]["status"] == 422
    assert {o["kind"] for o in today["dicom"]["cxr-study"]} >= {"sr", "seg"}
