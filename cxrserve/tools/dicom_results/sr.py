"""The TID 1500 Measurement Report (Comprehensive SR) of a ``cxr-study`` response."""
from __future__ import annotations

import logging

from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from cxrserve.core.family import NO_UNITS, Coded, Report
from cxrserve.tools.dicom_results.codes import (CODES, MANUFACTURER, PRIORITY_LEVELS, RESEARCH_NOTICE,
                                                add_coding_scheme, code, gate_code)
from cxrserve.tools.dicom_results.identity import SR_SERIES_NUMBER, result_uid
from cxrserve.tools.dicom_results.response import (NotProcessed, is_demo, report_values, reported_sections,
                                                   section_ok)

log = logging.getLogger(__name__)


#: Which profile and operating point calibrated a section (the serving core adds them to any family).
SITE_FACTS = (("site", "site"), ("operating_point", "operating point"), ("site_profile", "site profile"))


def _algorithm(name: str, section: dict):
    import highdicom as hd

    params = [f"weights: {'demo' if is_demo(section) else 'trained'}", "research use only: yes"]
    # TID 4019 Algorithm Parameters (TEXT): the site profile that calibrated this section
    params += [f"{label}: {section[key]}"[:1024] for key, label in SITE_FACTS if section.get(key)]
    return hd.sr.AlgorithmIdentification(name=section.get("model", name),
                                         version=str(section.get("model_version", "unknown"))[:64],
                                         parameters=params, family=CODES["ai"], manufacturer=MANUFACTURER)


def _m(name: Code, value, unit: Code, algorithm, method: Code | None = None):
    import highdicom as hd

    return hd.sr.Measurement(name=name, value=float(value), unit=unit, algorithm_id=algorithm, method=method)


def _q(name: Code, value: Code, method: Code | None = None):
    """A qualitative evaluation; with ``method``, a HAS CONCEPT MOD "Measurement Method" child
    (the modifier TID 300 gives a NUM item, here on the CODE item) saying how it was made."""
    import highdicom as hd

    q = hd.sr.QualitativeEvaluation(name=name, value=value)
    if method is not None:
        modifier = hd.sr.CodeContentItem(name=Code("370129005", "SCT", "Measurement Method"), value=method,
                                         relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD)
        q[0].ContentSequence = hd.sr.ContentSequence([modifier])
    return q


def _family_items(report: Report, s: dict, algorithm) -> tuple[list, list]:
    """(measurements, qualitative evaluations) of one section, as its family's report declares.

    A section calibrated with a site profile (it has ``uncalibrated``) gives each item that
    calibration changed twice, with the same concept: its served (calibrated) value, with
    Measurement Method "Site-calibrated model output", and the value before calibration, with
    Measurement Method "Model output before site calibration".
    """
    m, q = [], []
    for declared, concept, value, unit, method in report_values(report, s):
        method = CODES[method] if method else None
        if isinstance(declared, Coded):
            q.append(_q(code(concept), code(value), method))
        else:
            m.append(_m(code(concept), value, code(unit), algorithm, method))
    q.append(_q(CODES["research_use"], CODES["yes"]))
    q.append(_q(CODES["demo_weights"], CODES["yes"] if is_demo(s) else CODES["no"]))
    return m, q


def _priority_items(priority) -> list:
    """The worklist priority (``cxrserve.core.priority``) as CODE items of the Qualitative
    Evaluations container: "Worklist priority" = Urgent / Routine / Priority not assessed, each
    reason a CODE child "Worklist priority reason" (INFERRED FROM: the level follows from it), and
    a TEXT item naming the rules (``store default`` or ``site <name>``)."""
    import highdicom as hd

    if not isinstance(priority, dict) or priority.get("level") not in PRIORITY_LEVELS:
        return []
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    level = hd.sr.CodeContentItem(name=CODES["priority"], value=PRIORITY_LEVELS[priority["level"]],
                                  relationship_type=contains)
    reasons = [hd.sr.CodeContentItem(name=CODES["priority_reason"],
                                     value=Code(str(r["code"])[:16], str(r["scheme"])[:16], str(r["meaning"])[:64]),
                                     relationship_type=hd.sr.RelationshipTypeValues.INFERRED_FROM)
               for r in priority.get("reasons") or []]
    if reasons:
        level.ContentSequence = hd.sr.ContentSequence(reasons)
    items = [level]
    if priority.get("rules"):
        items.append(hd.sr.TextContentItem(name=CODES["priority_rules"], value=str(priority["rules"])[:1024],
                                           relationship_type=contains))
    return items


def build_sr(source: Dataset, response: dict) -> Dataset:
    """The TID 1500 Measurement Report (Comprehensive SR) of one response."""
    import highdicom as hd

    sop = str(source.SOPInstanceUID)
    version = str(response.get("model_version", "unknown"))
    results = response["results"]
    image_ref = hd.sr.SourceImageForMeasurementGroup.from_source_image(source)
    groups = []
    for key, name, report in reported_sections(results):
        section = results.get(key)
        if not section_ok(section):
            continue
        algorithm = _algorithm(name, section)
        measurements, qualitative = _family_items(report, section, algorithm)
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=result_uid(sop, version, "sr", f"track-{key}"),
                                                         identifier=f"cxrserve {key}"),
            finding_type=code(report.finding), algorithm_id=algorithm,
            finding_sites=[hd.sr.FindingSite(CODES["lung"])] if report.lung_site else None,
            measurements=measurements or None, qualitative_evaluations=qualitative or None,
            source_images=[image_ref]))
    gate = response.get("input_gate")
    if gate:
        gate_alg = hd.sr.AlgorithmIdentification(name="cxr-input-gate", version=version[:64],
                                                 parameters=[f"threshold: {gate.get('threshold')}",
                                                             "research use only: yes"],
                                                 family=CODES["ai"], manufacturer=MANUFACTURER)
        gate_q = [_q(CODES["gate_verdict"], gate_code(str(gate.get("verdict", "unknown")))),
                  _q(CODES["gate_enforced"], CODES["yes"] if gate.get("enforced") else CODES["no"])]
        gate_m = ([_m(CODES["gate_score"], gate["score"], code(NO_UNITS), gate_alg)]
                  if gate.get("score") is not None else None)
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=result_uid(sop, version, "sr", "track-gate"),
                                                         identifier="cxrserve input gate"),
            finding_type=CODES["family_gate"], algorithm_id=gate_alg, measurements=gate_m,
            qualitative_evaluations=gate_q, source_images=[image_ref]))
    if not groups:
        raise NotProcessed("no family section answered: nothing to report", status=500)
    observer = hd.sr.ObserverContext(
        observer_type=Code("121007", "DCM", "Device"),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=result_uid("cxrserve-device", "", "device"), name="cxrserve", manufacturer_name=MANUFACTURER,
            model_name=str(response.get("model", "cxrserve"))[:64]))
    context = hd.sr.ObservationContext(observer_device_context=observer)
    try:  # TID 4020 image library: highdicom needs the projection facts (ImagerPixelSpacing)
        report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=CODES["procedure"],
                                         imaging_measurements=groups, referenced_images=[source])
    except (AttributeError, ValueError, TypeError) as err:  # e.g. a secondary capture of a film
        log.debug("SR without image library: %s", err)
        report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=CODES["procedure"],
                                         imaging_measurements=groups)
    # TID 1500 row 12-14: the Qualitative Evaluations container, here a TEXT item with
    # the research-use statement, so every viewer that renders the SR tree shows it.
    root = report[0]
    text = hd.sr.TextContentItem(name=CODES["research_statement"], value=RESEARCH_NOTICE,
                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container = hd.sr.ContainerContentItem(name=CODES["qualitative_container"],
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence([text, *_priority_items(response.get("priority"))])
    root.ContentSequence.append(container)
    sr = hd.sr.ComprehensiveSR(
        evidence=[source], content=report[0], series_instance_uid=result_uid(sop, version, "sr", "series"),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=result_uid(sop, version, "sr"), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
        series_description="AI results (cxrserve) - RESEARCH USE ONLY")
    add_coding_scheme(sr)
    return sr
