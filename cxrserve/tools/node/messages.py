"""The node's HL7 and FHIR legs: messages written with the result objects, sent per destination.

At scoring time, before the instance is marked ``scored``, each ``mllp`` destination's ORU^R01
(``<name>.hl7``) and each ``fhir`` destination's transaction Bundle (``<name>.json``) are built
from the answer, validated (hl7apy strict, fhir.resources) and fsynced beside the DICOM
objects in ``spool/results/<hash>/``. Delivery sends those very bytes, so every resend of a
result is the same message: the same MSH-10 control ID, the same conditional creates.

A destination is marked delivered only after the receiver's AA/CA (MLLP) or a
transaction-response whose every entry is 200/201 (FHIR). A NAK is a failure with its reason
(the code, the error code, the receiver's text scrubbed of the message's identifiers).
"""
from __future__ import annotations

import json
from pathlib import Path

from cxrserve.tools.node.config import MESSAGE_KINDS, Destination
from cxrserve.tools.node.dimse import DeliveryError


def message_path(folder: Path, dest: Destination) -> Path:
    return Path(folder) / f"{dest.name}.{'hl7' if dest.kind == 'mllp' else 'json'}"


def write_messages(folder: Path, source, response: dict, destinations: list[Destination], ae_title: str) -> int:
    """Build, validate and write (fsynced) the message of every HL7/FHIR destination; how many."""
    from cxrserve.tools.hl7fhir import bundle_text, write_private
    from cxrserve.tools.hl7fhir.fhir import build_bundle, validate_bundle
    from cxrserve.tools.hl7fhir.hl7 import build_oru, validate
    from cxrserve.tools.hl7fhir.results import study_result

    wanted = [d for d in destinations if d.kind in MESSAGE_KINDS]
    if not wanted:
        return 0
    result = study_result(source, response)
    for dest in wanted:
        if dest.kind == "mllp":
            text = build_oru(result, receiving_application=dest.receiving_application,
                             receiving_facility=dest.receiving_facility, sending_facility=ae_title,
                             processing_id=dest.processing_id)
            validate(text)
        else:
            bundle = build_bundle(result, patient_system_uri=dest.patient_system)
            validate_bundle(bundle)
            text = bundle_text(bundle)
        write_private(message_path(folder, dest), text, fsync=True)
    return len(wanted)


def hl7_identifiers(text: str) -> list[str]:
    """The identifying values of an ORU^R01 (PID-3, -5, -7; OBR-18, -20; the study UID OBX)."""
    from cxrserve.tools.hl7fhir.hl7 import fields_of

    out = []
    for name, indexes in (("PID", (3, 5, 7)), ("OBR", (18, 20))):
        parts = fields_of(text, name) or []
        for i in indexes:
            if i < len(parts):
                out += [v for v in parts[i].replace("&", "^").split("^") if len(v) >= 3]
    return out


def bundle_identifiers(bundle: dict) -> list[str]:
    out = []
    for entry in bundle.get("entry", []):
        res = entry.get("resource", {})
        if res.get("resourceType") == "Patient":
            out += [i.get("value", "") for i in res.get("identifier", [])]
            for n in res.get("name", []):
                out += [n.get("family", ""), *n.get("given", [])]
            out.append(res.get("birthDate", ""))
        if res.get("resourceType") == "DiagnosticReport":
            out += [i.get("value", "") for i in res.get("identifier", [])]
            out += [s.get("identifier", {}).get("value", "").removeprefix("urn:oid:") for s in res.get("imagingStudy", [])]
    return [v for v in out if v and len(v) >= 3]


def deliver_message(folder: Path, dest: Destination) -> str:
    """Send the destination's stored message; the receiver's acceptance, else DeliveryError (retried)."""
    from cxrserve.tools.hl7fhir import mllp
    from cxrserve.tools.hl7fhir.fhir import post_bundle
    from cxrserve.tools.hl7fhir.hl7 import field, fields_of

    text = message_path(folder, dest).read_bytes().decode("utf-8")  # as written: CR ends a segment
    if dest.kind == "mllp":
        control_id = field(fields_of(text, "MSH"), 10)
        try:
            return mllp.send(text, dest.host, dest.port, control_id, timeout_s=dest.timeout_s,
                             identifiers=hl7_identifiers(text))
        except mllp.MLLPError as err:
            raise DeliveryError(f"MLLP {dest.host}:{dest.port}: {err}") from err
    bundle = json.loads(text)
    try:
        statuses = post_bundle(bundle, dest.url, timeout_s=dest.timeout_s, token=dest.token, username=dest.username,
                               password=dest.password, identifiers=bundle_identifiers(bundle))
    except ConnectionError as err:
        raise DeliveryError(str(err)) from err
    return f"{sum(s.startswith('201') for s in statuses)} created, {sum(s.startswith('200') for s in statuses)} existed"


def messages_missing(folder: Path, pending: list[str], destinations: list[Destination]) -> bool:
    by_name = {d.name: d for d in destinations}
    return any(name in by_name and by_name[name].kind in MESSAGE_KINDS
               and not message_path(folder, by_name[name]).exists() for name in pending)
