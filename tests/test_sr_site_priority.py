"""The SR of a study answer served with a site profile and a worklist priority (issue 24).

The answer is written by hand here (the shape serving gives: calibrated values in the usual
fields, the served ones under ``uncalibrated``, the site and operating point beside them; a
top-level ``priority``), so the SR writer is tested without a store; every SR goes through
dicom3tools' ``dciodvfy``.
"""
from __future__ import annotations

import pydicom
import pytest

from cxrserve.synthetic.dicomwrite import to_dicom
from cxrserve.synthetic.phantoms import render, sample_spec
from cxrserve.tools.dicom_results import build_sr
from cxrserve.tools.dicom_results import codes as dr_codes
from dicomtools import dciodvfy, have

C = dr_codes.CODES
METHOD = "370129005"  # SCT Measurement Method
INFERRED_FROM, HAS_CONCEPT_MOD = "INFERRED FROM", "HAS CONCEPT MOD"


def source() -> pydicom.Dataset:
    import io

    img = render(sample_spec(7, height=256, width=256)).image
    return pydicom.dcmread(io.BytesIO(to_dicom(img, modality="CR", view_position="PA", patient_name="Doe^Jane",
                                               patient_id="PID-1")))


def answer(*, calibrated: bool = True, priority: dict | None = None) -> dict:
    site = {"site": "stmary", "operating_point": "stmary:covid19.sensitivity>=0.90",
            "site_profile": "0123456789abcdef"} if calibrated else {}
    triage = {"model": "cxr-triage", "model_version": "0.1.0", "warnings": [],
              "label": "covid19", "probabilities": {"covid19": 0.41, "normal": 0.35, "pneumonia": 0.24}, **site}
    mortality = {"model": "cxr-mortality", "model_version": "0.1.0", "warnings": [],
                 "risk": 0.62, "threshold": 0.5, "risk_label": "high", **site}
    if calibrated:
        triage["uncalibrated"] = {"label": "normal",
                                  "probabilities": {"covid19": 0.30, "normal": 0.45, "pneumonia": 0.25}}
        mortality["uncalibrated"] = {"risk": 0.44, "risk_label": "low"}
    out = {"model": "cxr-study", "model_version": "0.1.0", "warnings": [],
           "input_gate": {"verdict": "frontal_cxr", "score": 0.97, "threshold": 0.5, "enforced": True},
           "results": {"triage": triage, "mortality": mortality}, "timings_ms": {}}
    if priority is not None:
        out["priority"] = priority
    return out


URGENT = {"level": "urgent", "rules": "site stmary", "reasons": [
    {"code": "CXR0120", "scheme": "99CXRSRV", "meaning": "COVID-19 suspected at the operating point",
     "field": "triage.label", "value": "covid19"},
    {"code": "CXR0122", "scheme": "99CXRSRV", "meaning": "Change against the prior study marked worse",
     "field": "pxs.change.direction", "value": "worse"}]}


def written(ds, tmp_path, name="sr.dcm"):
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    if not have("dciodvfy"):  # installed (make dicomtools): no errors, as for every object we write
        errors, _ = dciodvfy(path)
        assert errors == [], errors
    return pydicom.dcmread(path)


def walk(items, depth=0):
    for item in items:
        yield depth, item
        yield from walk(getattr(item, "ContentSequence", []), depth + 1)


def name_of(item) -> str:
    return item.ConceptNameCodeSequence[0].CodeValue


def group(ds, tracking: str):
    for _, item in walk(ds.ContentSequence):
        if item.ValueType == "CONTAINER" and any(getattr(c, "TextValue", "") == tracking
                                                 for c in getattr(item, "ContentSequence", [])):
            return item
    raise AssertionError(f"no group {tracking!r}")


def methods(group_item) -> dict[str, list[tuple[object, str | None]]]:
    """concept code -> [(value, Measurement Method code or None)] of a group's NUM and CODE items."""
    out: dict[str, list] = {}
    for item in group_item.ContentSequence:
        if item.ValueType == "NUM":
            value = float(item.MeasuredValueSequence[0].NumericValue)
        elif item.ValueType == "CODE":
            value = item.ConceptCodeSequence[0].CodeValue
        else:
            continue
        mods = [c.ConceptCodeSequence[0].CodeValue for c in getattr(item, "ContentSequence", [])
                if c.RelationshipType == HAS_CONCEPT_MOD and name_of(c) == METHOD]
        out.setdefault(name_of(item), []).append((value, mods[0] if mods else None))
    return out


@pytest.fixture(scope="module")
def src():
    return source()


def test_calibrated_sections_record_both_values_and_the_site(src, tmp_path):
    ds = written(build_sr(src, answer(priority=URGENT)), tmp_path)
    cal, unc = C["site_calibrated"].value, C["uncalibrated"].value
    triage = methods(group(ds, "cxrserve triage"))
    assert triage[C["p_covid19"].value] == [(pytest.approx(0.41), cal), (pytest.approx(0.30), unc)]
    assert triage[C["p_normal"].value] == [(pytest.approx(0.35), cal), (pytest.approx(0.45), unc)]
    assert triage[C["triage_class"].value] == [(C["class_covid19"].value, cal), (C["class_normal"].value, unc)]
    mortality = methods(group(ds, "cxrserve mortality"))
    assert mortality[C["mortality_risk"].value] == [(pytest.approx(0.62), cal), (pytest.approx(0.44), unc)]
    assert mortality[C["mortality_threshold"].value] == [(pytest.approx(0.5), None)]  # not recalibrated: once
    assert mortality[C["mortality_label"].value] == [(C["mortality_high"].value, cal), (C["mortality_low"].value, unc)]
    # TID 4019 Algorithm Parameters name the site, its operating point and the profile's digest
    params = [getattr(i, "TextValue", "") for _, i in walk(group(ds, "cxrserve triage").ContentSequence)
              if name_of(i) == "111002"]
    assert {"site: stmary", "operating point: stmary:covid19.sensitivity>=0.90",
            "site profile: 0123456789abcdef"} <= set(params)


def test_an_uncalibrated_answer_keeps_one_value_per_concept(src, tmp_path):
    ds = written(build_sr(src, answer(calibrated=False)), tmp_path)
    triage = methods(group(ds, "cxrserve triage"))
    assert triage[C["p_covid19"].value] == [(pytest.approx(0.41), None)]
    assert all(len(v) == 1 and v[0][1] is None for v in triage.values())
    params = [getattr(i, "TextValue", "") for _, i in walk(ds.ContentSequence) if name_of(i) == "111002"]
    assert not [p for p in params if p.startswith("site")]
    # no priority in the answer: no priority item
    assert not [i for _, i in walk(ds.ContentSequence) if name_of(i) == C["priority"].value]


def priority_items(ds):
    container = ds.ContentSequence[-1]
    assert name_of(container) == C["qualitative_container"].value
    return {name_of(i): i for i in container.ContentSequence}


def test_priority_is_a_coded_finding_with_its_reasons(src, tmp_path):
    ds = written(build_sr(src, answer(priority=URGENT)), tmp_path)
    items = priority_items(ds)
    level = items[C["priority"].value]
    assert level.ValueType == "CODE"
    assert level.ConceptCodeSequence[0].CodeValue == dr_codes.PRIORITY_LEVELS["urgent"].value
    reasons = [(c.RelationshipType, name_of(c), c.ConceptCodeSequence[0].CodeValue,
                c.ConceptCodeSequence[0].CodingSchemeDesignator) for c in level.ContentSequence]
    assert reasons == [(INFERRED_FROM, C["priority_reason"].value, "CXR0120", "99CXRSRV"),
                       (INFERRED_FROM, C["priority_reason"].value, "CXR0122", "99CXRSRV")]
    assert items[C["priority_rules"].value].TextValue == "site stmary"
    assert items[C["research_statement"].value].TextValue == dr_codes.RESEARCH_NOTICE


@pytest.mark.parametrize("level", ["routine", "not assessed"])
def test_priority_without_reasons(src, tmp_path, level):
    ds = written(build_sr(src, answer(calibrated=False, priority={"level": level, "reasons": [],
                                                                  "rules": "store default"})), tmp_path)
    item = priority_items(ds)[C["priority"].value]
    assert item.ConceptCodeSequence[0].CodeValue == dr_codes.PRIORITY_LEVELS[level].value
    assert "ContentSequence" not in item


# --------------------------------------------------------------------------- end to end
def test_a_served_site_answer_makes_a_valid_sr_with_both_values(model_store, tmp_path):
    """The study archive with a site profile (known numbers: tests/site_fixture.py) plus a
    priority block: the answer is prioritised by the site's rules and its SR records the
    calibrated and the served values of every calibrated section."""
    import io
    import json

    from cxrserve.core.loading import load_pipeline
    from site_fixture import OPERATING_POINT, SITE, write_sites

    folder = write_sites(tmp_path / "sites", model_store)
    profile = folder / SITE / "profile.json"
    rules = {"rules": [{"field": "mortality.risk", "at_least": 0.0, "code": "CXR9001",
                        "meaning": "Any mortality risk (site test rule)"}]}
    profile.write_text(json.dumps({**json.loads(profile.read_text()), "priority": rules}))
    study = load_pipeline(model_store / "cxr-study.mar", device="cpu", sites=folder)
    img = render(sample_spec(3, label="covid19", height=256, width=256)).image
    dicom = to_dicom(img, modality="CR", view_position="PA", patient_name="Doe^Jane", patient_id="PID-2")
    answer = study.predict_bytes(dicom, {"site": SITE, "models": "triage,mortality"})
    assert answer["priority"]["rules"] == f"site {SITE}" and answer["priority"]["level"] == "urgent"
    assert [r["code"] for r in answer["priority"]["reasons"]] == ["CXR9001"]
    triage = answer["results"]["triage"]
    assert triage["operating_point"] in (OPERATING_POINT, "argmax") and "uncalibrated" in triage
    # the store's defaults answer a request that names no site (triage and mortality only: severity
    # is not asked, so unless COVID-19 is suspected the study is not assessed)
    plain = study.predict_bytes(dicom, {"models": "triage,mortality"})["priority"]
    assert plain["rules"] == "store default" and plain["level"] in ("urgent", "not assessed")

    ds = written(build_sr(pydicom.dcmread(io.BytesIO(dicom)), answer), tmp_path)
    cal, unc = C["site_calibrated"].value, C["uncalibrated"].value
    got = methods(group(ds, "cxrserve triage"))
    for label, concept in (("covid19", "p_covid19"), ("normal", "p_normal"), ("pneumonia", "p_pneumonia")):
        assert got[C[concept].value] == [(pytest.approx(triage["probabilities"][label]), cal),
                                         (pytest.approx(triage["uncalibrated"]["probabilities"][label]), unc)]
    mortality = answer["results"]["mortality"]
    assert methods(group(ds, "cxrserve mortality"))[C["mortality_risk"].value] == [
        (pytest.approx(mortality["risk"]), cal), (pytest.approx(mortality["uncalibrated"]["risk"]), unc)]
    level = priority_items(ds)[C["priority"].value]
    assert [c.ConceptCodeSequence[0].CodeValue for c in level.ContentSequence] == ["CXR9001"]
