"""FHIR R4 transaction Bundle of one study result, its validation (fhir.resources), and its POST.

The Bundle (``type: transaction``) holds, each as a conditional create (``POST`` with
``ifNoneExist: identifier=<system>|<value>``), so a resend after a crash or a retry creates
nothing twice:

* ``Patient``: the source's patient (identifier PatientID in the destination's system, name,
  birth date, gender): an existing patient with that identifier is used, not duplicated;
* one ``Device`` per algorithm (TID 4019 name and version; type DCM 123110 Artificial
  Intelligence), the input gate's included;
* one ``Observation`` per NUM and CODE item of the SR (the SR's codes; UCUM quantities),
  ``status: preliminary``, category ``imaging``, ``device`` its algorithm, ``derivedFrom``
  the ImagingStudy by Study Instance UID; the research-use and demo-weight evaluations of
  each group are components of its finding-type Observation; the priority is one more
  Observation (the SR's CXR0110, with the reasons as CXR0114 components); a section calibrated
  by a site profile gives each changed item twice, ``method`` CXR0093 / CXR0094 as in the SR;
* the ``DiagnosticReport``: ``status: preliminary``, category RAD (v2-0074) and imaging,
  code LOINC 36554-4 *XR Chest Single view*, ``imagingStudy`` a logical reference by Study
  Instance UID (``urn:dicom:uid`` / ``urn:oid:<uid>``), ``result`` every Observation,
  ``conclusion`` the research-use statement and the priority, ``conclusionCode`` every coded
  value and the priority with its reasons, the accession number as an ``ACSN`` identifier,
  the site and the operating points as extensions when the answer names them (each group's
  operating point is also a note on its finding-type Observation).

fhir.resources 8 ships R5 (its default), R4B (4.3) and STU3 models, no 4.0.1: the resources
here are validated with the R4B models, whose Patient, Device, Observation,
DiagnosticReport and Bundle are R4's (R4B changed none of the elements used here).
"""
from __future__ import annotations

import datetime
import json
import re

from cxrserve.core.family import PRIVATE_SCHEME, Concept
from cxrserve.tools.dicom_results.codes import CODES, MANUFACTURER
from cxrserve.tools.hl7fhir.results import FINDING, PRIORITY, PRIORITY_REASON, PROCEDURE, Group, StudyResult, concept

SYSTEMS = {"SCT": "http://snomed.info/sct", "LN": "http://loinc.org", "DCM": "http://dicom.nema.org/resources/ontology/DCM",
           "UCUM": "http://unitsofmeasure.org", "UMLS": "http://www.nlm.nih.gov/research/umls",
           PRIVATE_SCHEME: "urn:cxrserve:codesystem:" + PRIVATE_SCHEME}
RESULT_SYSTEM = "urn:cxrserve:result"          # identifiers of the report and its observations
DEVICE_SYSTEM = "urn:cxrserve:algorithm"       # identifiers of the algorithms (name-version)
PATIENT_SYSTEM = "urn:cxrserve:dicom-patient-id"  # default: PatientID; ":<issuer>" appended when there is one
EXTENSION = "urn:cxrserve:fhir:extension:"
FHIR_JSON = "application/fhir+json"


class FHIRError(ValueError):
    """A resource that does not validate, or a server answer that is not a success."""


def _token(text: str) -> str:
    """A token-search-safe identifier value (no ``|``, ``,`` or ``$``)."""
    return re.sub(r"[^A-Za-z0-9.\-_:]", "-", text)[:128]


def coding(c: Concept) -> dict:
    return {"system": SYSTEMS.get(c.scheme, "urn:cxrserve:codesystem:" + _token(c.scheme)), "code": c.value,
            "display": c.meaning}


def codeable(c: Concept) -> dict:
    return {"coding": [coding(c)], "text": c.meaning}


def _date(dicom_date: str) -> str:
    return f"{dicom_date[:4]}-{dicom_date[4:6]}-{dicom_date[6:8]}" if len(dicom_date) >= 8 else ""


def _ident(value: str, system: str = RESULT_SYSTEM) -> dict:
    return {"system": system, "value": value}


def _entry(result: StudyResult, what: str, resource: dict, identifier: dict) -> dict:
    return {"fullUrl": f"urn:uuid:{result.uuid('fhir-' + what)}", "resource": resource,
            "request": {"method": "POST", "url": resource["resourceType"],
                        "ifNoneExist": f"identifier={identifier['system']}|{identifier['value']}"}}


def patient_system(issuer: str, base: str = "") -> str:
    return base or (PATIENT_SYSTEM + (":" + _token(issuer) if issuer else ""))


def build_bundle(result: StudyResult, *, patient_system_uri: str = "", now: str | None = None) -> dict:
    """The transaction Bundle (a JSON-ready dict) of one study result."""
    s = result.subject
    now = now or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    effective = _date(s.study_datetime) or now
    study_ref = {"type": "ImagingStudy", "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{s.study_uid}"},
                 "display": "the source study"}
    category = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                             "code": "imaging", "display": "Imaging"}]}]
    research = [{"text": note} for note in result.notes]
    entries = []

    pid = _ident(s.patient_id or "UNKNOWN", patient_system(s.issuer, patient_system_uri))
    patient = {"resourceType": "Patient", "identifier": [pid]}
    name = {k: v for k, v in (("family", s.family_name), ("given", list(s.given_names)),
                              ("prefix", [s.prefix] if s.prefix else []), ("suffix", [s.suffix] if s.suffix else []))
            if v}
    if name:
        patient["name"] = [name]
    if _date(s.birth_date):
        patient["birthDate"] = _date(s.birth_date)
    if s.sex:
        patient["gender"] = {"M": "male", "F": "female", "O": "other"}[s.sex]
    entries.append(_entry(result, "patient", patient, pid))
    subject = {"reference": entries[-1]["fullUrl"]}

    devices: dict[tuple[str, str], str] = {}

    def device(group: Group) -> dict:
        key = (group.algorithm, group.version)
        if key not in devices:
            ident = _ident(_token(f"{group.algorithm}-{group.version}"), DEVICE_SYSTEM)
            resource = {"resourceType": "Device", "identifier": [ident], "manufacturer": MANUFACTURER,
                        "deviceName": [{"name": group.algorithm, "type": "model-name"}],
                        "version": [{"value": group.version}], "type": codeable(concept(CODES["ai"])),
                        "note": research + ([{"text": "demo model weights"}] if group.demo else [])}
            entries.append(_entry(result, f"device-{ident['value']}", resource, ident))
            devices[key] = entries[-1]["fullUrl"]
        return {"reference": devices[key], "display": f"{group.algorithm} {group.version}"}

    observations = []

    def observation(what: str, code: Concept, value: dict, dev: dict | None, components: list | None = None,
                    notes: list | None = None) -> None:
        ident = _ident(_token(f"{result.result_id}-{what}"))
        resource = {"resourceType": "Observation", "identifier": [ident], "status": "preliminary",
                    "category": category, "code": codeable(code), "subject": subject,
                    "effectiveDateTime": effective, "issued": now, "derivedFrom": [study_ref], **value,
                    "note": research + (notes or [])}
        if dev:
            resource["device"] = dev
        if components:
            resource["component"] = components
        entries.append(_entry(result, f"observation-{ident['value']}", resource, ident))
        observations.append({"reference": entries[-1]["fullUrl"]})

    flags = {concept(CODES["research_use"]), concept(CODES["demo_weights"])}
    for group in result.groups:
        dev = device(group)
        quals = [{"code": codeable(i.concept), "valueCodeableConcept": codeable(i.coded)}
                 for i in group.items if i.concept in flags]
        observation(f"{group.key}-finding", FINDING, {"valueCodeableConcept": codeable(group.finding)}, dev, quals,
                    [{"text": group.note}] if group.note else [])
        for item in group.items:
            if item.concept in flags:
                continue
            if item.numeric:
                unit = item.unit or Concept("1", "UCUM", "no units")
                value = {"valueQuantity": {"value": item.number, "unit": unit.meaning, "system": SYSTEMS["UCUM"],
                                           "code": unit.value}}
            else:
                value = {"valueCodeableConcept": codeable(item.coded)}
            if item.method is not None:
                value["method"] = codeable(item.method)
            suffix = "-before-calibration" if item.method == concept(CODES["uncalibrated"]) else ""
            observation(f"{group.key}-{item.concept.value}{suffix}", item.concept, value, dev)
    priority = result.priority
    observation("priority", PRIORITY, {"valueCodeableConcept": codeable(priority.code)}, None,
                [{"code": codeable(PRIORITY_REASON), "valueCodeableConcept": codeable(r)} for r in priority.reasons])

    report_id = _ident(_token(result.result_id))
    conclusion = [f"AI worklist priority: {priority.level}"
                  + (" (" + "; ".join(r.meaning for r in priority.reasons) + ")" if priority.reasons else ""),
                  *result.notes]
    report = {"resourceType": "DiagnosticReport",
              "identifier": [report_id] + ([{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                                                  "code": "ACSN", "display": "Accession ID"}]},
                                             "value": s.accession}] if s.accession else []),
              "status": "preliminary",
              "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD",
                                        "display": "Radiology"}]}, *category],
              "code": codeable(PROCEDURE), "subject": subject, "effectiveDateTime": effective, "issued": now,
              "imagingStudy": [study_ref], "result": observations, "conclusion": " ".join(conclusion),
              "conclusionCode": [codeable(c) for c in _unique(result.coded_conclusions)]}
    extensions = [{"url": EXTENSION + "priority", "valueCodeableConcept": codeable(priority.code)}]
    if result.site:
        extensions.append({"url": EXTENSION + "site", "valueString": result.site})
    points = [result.operating_point] if result.operating_point else [g.operating_point for g in result.groups
                                                                        if g.operating_point]
    extensions += [{"url": EXTENSION + "operating-point", "valueString": p} for p in points]
    if priority.rules:
        extensions.append({"url": EXTENSION + "priority-rules", "valueString": priority.rules})
    report["extension"] = extensions
    entries.append(_entry(result, "report", report, report_id))
    return {"resourceType": "Bundle", "type": "transaction", "identifier": _ident(_token(result.result_id)),
            "timestamp": now, "entry": entries}


def _unique(concepts: list[Concept]) -> list[Concept]:
    seen, out = set(), []
    for c in concepts:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def model_class(resource_type: str):
    from fhir.resources.R4B import get_fhir_model_class

    return get_fhir_model_class(resource_type)


def validate_resource(resource: dict):
    """The resource parsed by its fhir.resources (R4B) model, or FHIRError."""
    from pydantic import ValidationError

    try:
        return model_class(str(resource.get("resourceType"))).model_validate(resource)
    except (ValidationError, KeyError, ValueError, TypeError) as err:
        raise FHIRError(f"{resource.get('resourceType')}: not a valid resource ({type(err).__name__}: {err})") from err


#: Required bindings the models do not check (fhir.resources validates structure, cardinality
#: and types, not code values): the statuses used here, R4's value sets.
STATUSES = {"DiagnosticReport": {"registered", "partial", "preliminary", "final", "amended", "corrected", "appended",
                                 "cancelled", "entered-in-error", "unknown"},
            "Observation": {"registered", "preliminary", "final", "amended", "corrected", "cancelled",
                            "entered-in-error", "unknown"}}


def validate_bundle(bundle: dict) -> None:
    """The Bundle and every resource in it validated with fhir.resources (and the statuses against
    their required value sets); its references resolved (every ``urn:uuid`` reference names an
    entry's fullUrl); FHIRError otherwise."""
    validate_resource({**bundle, "entry": [{k: v for k, v in e.items() if k != "resource"} for e in bundle["entry"]]})
    full = {e["fullUrl"] for e in bundle["entry"]}
    for entry in bundle["entry"]:
        validate_resource(entry["resource"])
        kind = entry["resource"].get("resourceType")
        if kind in STATUSES and entry["resource"].get("status") not in STATUSES[kind]:
            raise FHIRError(f"{kind}: status is not one of {sorted(STATUSES[kind])}")
        for ref in re.findall(r'"reference": "([^"]+)"', json.dumps(entry["resource"])):
            if ref.startswith("urn:uuid:") and ref not in full:
                raise FHIRError(f"{entry['resource']['resourceType']}: reference to no entry of the bundle")


def post_bundle(bundle: dict, url: str, *, timeout_s: float = 30.0, token: str = "", username: str = "",
                password: str = "", identifiers: list[str] | None = None) -> list[str]:
    """POST the transaction to the server's base ``url``; the entries' response statuses.

    Raises ConnectionError (retried by the node) for no answer, a 5xx, a 4xx (its
    OperationOutcome's diagnostics, scrubbed of the identifiers) or an entry not 200/201."""
    import requests

    from cxrserve.tools.hl7fhir.mllp import scrub

    headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        answer = requests.post(url.rstrip("/"), data=json.dumps(bundle), headers=headers, timeout=timeout_s,
                               auth=(username, password) if username else None)
    except requests.RequestException as err:
        raise ConnectionError(f"FHIR {url}: {type(err).__name__}") from err
    if answer.status_code >= 300:
        detail = ""
        try:
            issues = answer.json().get("issue") or []
            detail = "; ".join(str(i.get("diagnostics") or i.get("code") or "") for i in issues)
        except ValueError:
            pass
        raise ConnectionError(scrub(f"FHIR transaction answered {answer.status_code}"
                                    + (f": {detail}" if detail else ""), identifiers or []))
    try:
        statuses = [str(e["response"]["status"]) for e in answer.json()["entry"]]
    except (ValueError, KeyError, TypeError) as err:
        raise ConnectionError("FHIR transaction: the answer is not a transaction-response Bundle") from err
    if len(statuses) != len(bundle["entry"]) or not all(s.split()[0] in ("200", "201") for s in statuses):
        raise ConnectionError(f"FHIR transaction: entry statuses {sorted(set(statuses))}")
    return statuses
