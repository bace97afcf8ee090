"""The study answer's worklist priority: the archive's default rules, a site profile's own, and
``not assessed`` when a section the rules read is left out or fails (issue 24)."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import cv2
import pytest

from cxrserve.core.priority import LEVELS, parse_rules
from cxrserve.families.study.pipeline import PRIORITY, StudyPipeline
from cxrserve.synthetic.phantoms import render, sample_spec
from schemas import validate

SITE_RULES = {"rules": [{"field": "mortality.risk", "at_least": 0.0, "code": "CXR0123",
                         "meaning": "Any mortality risk (test rule)"}]}


def bare_study(block) -> StudyPipeline:
    """The study's priority step alone (no archive loaded)."""
    study = StudyPipeline.__new__(StudyPipeline)
    study.priority_rules = parse_rules(block)
    study._site_rules = {}
    return study


def results(label="normal", extent=1.0):
    return {"triage": {"label": label}, "severity": {"geographic_extent": extent}, "pxs": {"pxs": 2.0},
            "mortality": {"risk": 0.2}}


@pytest.fixture(scope="module")
def defaults():
    import yaml

    from cxrserve import families

    family, served = families.get_served("cxr-study")
    return yaml.safe_load(family.model_config_path(served).read_text())["handler"][PRIORITY]


def test_a_site_profile_with_rules_replaces_the_defaults(defaults):
    study = bare_study(defaults)
    plain = SimpleNamespace(site=None)
    assert study.priority(plain, results()) == {"level": "routine", "reasons": [], "rules": "store default"}
    assert study.priority(plain, results(label="covid19"))["level"] == "urgent"
    site = SimpleNamespace(site=SimpleNamespace(name="stmary", raw={PRIORITY: SITE_RULES}))
    out = study.priority(site, results())
    assert out["rules"] == "site stmary" and [r["code"] for r in out["reasons"]] == ["CXR0123"]
    # a site profile without a priority block keeps the store's rules
    other = SimpleNamespace(site=SimpleNamespace(name="other", raw={}))
    assert study.priority(other, results(label="covid19"))["rules"] == "store default"


def test_a_broken_site_block_is_not_assessed_and_logged(defaults, caplog):
    study = bare_study(defaults)
    site = SimpleNamespace(site=SimpleNamespace(name="bad", raw={PRIORITY: {"rules": [{"field": "x"}]}}))
    with caplog.at_level(logging.ERROR):
        out = study.priority(site, results(label="covid19"))
    assert out == {"level": "not assessed", "reasons": [], "rules": "site bad"}
    assert "site bad" in caplog.text


def png(seed: int) -> bytes:
    return cv2.imencode(".png", render(sample_spec(seed, height=256, width=256)).image)[1].tobytes()


def test_the_served_answer_carries_the_priority(pipeline):
    study = pipeline("cxr-study")
    assert study.priority_rules, "the archive ships no default priority rules"
    image = png(7201)
    full = study.predict_bytes(image, {})
    validate(full, "cxr-study")
    assert full[PRIORITY]["level"] in LEVELS and full[PRIORITY]["level"] != "not assessed"
    assert full[PRIORITY]["rules"] == "store default"
    for reason in full[PRIORITY]["reasons"]:
        section, _, path = reason["field"].partition(".")
        value = full["results"][section]
        for part in path.split("."):
            value = value[part]
        assert value == reason["value"]
    # a study asked without the sections the rules read cannot be assessed (unless a rule fired)
    partial = study.predict_bytes(image, {"models": "lungseg"})
    validate(partial, "cxr-study")
    assert partial[PRIORITY] == {"level": "not assessed", "reasons": [], "rules": "store default"}
