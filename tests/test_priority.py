"""The worklist priority rule engine (``cxrserve.core.priority``) and the store's default rules."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cxrserve.core.priority import (NOT_ASSESSED, ROUTINE, STORE_DEFAULT, URGENT, PriorityRuleError, assess,
                                    parse_rules, site_source)

RULES = parse_rules({"rules": [
    {"field": "triage.label", "equals": "covid19", "code": "CXR0120", "meaning": "COVID-19 suspected"},
    {"field": "severity.geographic_extent", "at_least": 6, "code": "CXR0121", "meaning": "Extent"},
    {"field": "pxs.change.direction", "equals": "worse", "optional": True, "code": "CXR0122", "meaning": "Worse"},
]})


def results(label="normal", extent=2.0, change=None, **extra):
    pxs = {"pxs": 3.1, **({"change": {"direction": change}} if change else {})}
    return {"triage": {"label": label}, "severity": {"geographic_extent": extent}, "pxs": pxs, **extra}


def test_routine_when_every_rule_is_evaluated_and_none_fires():
    assert assess(results(), RULES) == {"level": ROUTINE, "reasons": [], "rules": STORE_DEFAULT}
    # an optional field that is absent (no prior: no change) is evaluated as not firing
    assert assess(results(change="better"), RULES)["level"] == ROUTINE


def test_urgent_with_every_rule_that_fired():
    out = assess(results(label="covid19", extent=6.0, change="worse"), RULES, site_source("stmary"))
    assert out["level"] == URGENT and out["rules"] == "site stmary"
    assert [(r["code"], r["field"], r["value"]) for r in out["reasons"]] == [
        ("CXR0120", "triage.label", "covid19"), ("CXR0121", "severity.geographic_extent", 6.0),
        ("CXR0122", "pxs.change.direction", "worse")]
    assert out["reasons"][0] == {"code": "CXR0120", "scheme": "99CXRSRV", "meaning": "COVID-19 suspected",
                                 "field": "triage.label", "value": "covid19"}


def test_not_assessed_when_a_section_is_missing_or_failed():
    partial = results()
    del partial["severity"]  # models= left it out
    assert assess(partial, RULES)["level"] == NOT_ASSESSED
    failed = {**results(), "pxs": {"error": "prior_rejected", "status": 422, "message": "..."}}
    assert assess(failed, RULES)["level"] == NOT_ASSESSED
    # a required field missing from an answered section
    assert assess({**results(), "triage": {"probabilities": {}}}, RULES)["level"] == NOT_ASSESSED
    assert assess(results(), ())["level"] == NOT_ASSESSED  # no rules: nothing assessed


def test_a_fired_rule_beats_a_missing_section():
    partial = results(label="covid19")
    del partial["severity"]
    out = assess(partial, RULES)
    assert out["level"] == URGENT and [r["code"] for r in out["reasons"]] == ["CXR0120"]


def test_operators():
    rules = parse_rules({"rules": [
        {"field": "a.x", "in": ["p", "q"], "code": "C1", "meaning": "in"},
        {"field": "a.y", "at_most": 0.1, "code": "C2", "meaning": "low"},
        {"field": "a.z", "at_least": 0.2, "at_most": 0.4, "code": "C3", "meaning": "band"},
    ]})
    codes = lambda a: [r["code"] for r in assess({"a": a}, rules)["reasons"]]  # noqa: E731
    assert codes({"x": "q", "y": 0.05, "z": 0.3}) == ["C1", "C2", "C3"]
    assert codes({"x": "r", "y": 0.2, "z": 0.5}) == []
    assert codes({"x": "p", "y": "low", "z": True}) == ["C1"]  # a bound never holds for a non-number


@pytest.mark.parametrize("block, message", [
    ({"rules": [{"field": "a.b", "code": "C", "meaning": "m"}]}, "no condition"),
    ({"rules": [{"field": "a", "equals": 1, "code": "C", "meaning": "m"}]}, "<section>.<field>"),
    ({"rules": [{"field": "a.b", "equals": 1, "code": "C" * 17, "meaning": "m"}]}, "must fit DICOM"),
    ({"rules": [{"field": "a.b", "equal": 1, "code": "C", "meaning": "m"}]}, "unknown keys"),
    ({"rules": [{"field": "a.b", "at_least": "6", "code": "C", "meaning": "m"}]}, "not a finite number"),
    ({"rules": [{"field": "a.b", "in": "xy", "code": "C", "meaning": "m"}]}, "list of values"),
    ({"rule": []}, "one key"),
])
def test_bad_rules_are_refused(block, message):
    with pytest.raises(PriorityRuleError, match=message):
        parse_rules(block)


def test_the_store_default_rules_parse_and_name_real_sections():
    from cxrserve import families

    family, served = families.get_served(families.composed_model())
    config = yaml.safe_load(Path(family.model_config_path(served)).read_text())
    rules = parse_rules(config["handler"]["priority"])
    keys = {families.get_served(n)[1].key for n in families.composed(served.name)}
    assert rules and {r.section for r in rules} <= keys
    assert all(r.scheme == "99CXRSRV" and r.code.startswith("CXR") for r in rules)
    # every reason code is in docs/DICOM.md's code table
    table = (Path(__file__).resolve().parents[1] / "docs" / "DICOM.md").read_text()
    assert all(f"| {r.code} | {r.meaning} |" in table for r in rules)


def test_batch_rows_carry_the_priority():
    from cxrserve import families
    from cxrserve.tools.batch.rows import PRIORITY_COLUMNS, headline_columns, headline_values

    composed = families.composed_model()
    assert headline_columns(composed)[-2:] == list(PRIORITY_COLUMNS)
    assert not set(PRIORITY_COLUMNS) & set(headline_columns(families.composed(composed)[0]))  # plain model
    answer = {"model": composed, "results": results(label="covid19"),
              "priority": assess(results(label="covid19"), RULES)}
    row = headline_values(answer)
    assert row["priority"] == "urgent" and row["priority_reasons"] == "CXR0120 COVID-19 suspected"
    assert headline_values({"model": composed, "results": {}})["priority"] == ""


def test_the_site_file_takes_priority_rules():
    from cxrserve.tools.site.config import SiteConfigError, site_from_dict

    base = {"name": "stmary", "labels": {"pos": "covid19", "neg": "not:covid19"}}
    assert site_from_dict(base).priority is None  # the store's defaults
    block = {"rules": [{"field": "triage.label", "equals": "covid19", "code": "CXR0120", "meaning": "COVID"}]}
    assert site_from_dict({**base, "priority": block}).priority == block
    with pytest.raises(SiteConfigError, match="no condition"):
        site_from_dict({**base, "priority": {"rules": [{"field": "a.b", "code": "C", "meaning": "m"}]}})
