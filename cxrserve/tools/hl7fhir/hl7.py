"""HL7 v2.5.1 ORU^R01 of one study result, its strict validation (hl7apy), and ACKs.

One message per scored instance::

    MSH  sending CXRSERVE, MSH-10 = StudyResult.control_id (the same for every resend)
    PID  PID-3 patient ID ^^^ issuer, PID-5 name, PID-7 birth date, PID-8 sex (the source's patient module)
    ORC  RE, filler order number = the result's identifier
    OBR  OBR-4 LOINC 36554-4 XR Chest Single view, OBR-7 study date/time, OBR-18 accession number,
         OBR-20 Study Instance UID, OBR-25 P (preliminary)
    NTE  the research-use statement; the site and operating point when the answer names them
    TQ1  TQ1-9 the priority (S stat for urgent, R routine; none when not assessed)
    OBX  ST 110180 Study Instance UID (DCM), the full UID
    OBX  CE CXR0110 Worklist priority = CXR0111/2/3, then one CE CXR0114 per coded reason (the SR's)
    per SR measurement group (OBX-4 sub-ID = the group's number):
    OBX  CE 121071 Finding (DCM) = the group's finding type
    OBX  ST 111001 Algorithm Name / 111003 Algorithm Version (DCM): the TID 4019 identification
    NTE  (after the version) the group's site and operating point, when its section names them
    OBX  NM <concept> = number, OBX-6 UCUM unit;  OBX CE <concept> = coded value; a section
         calibrated by a site profile gives each changed item twice, OBX-17 (observation method)
         CXR0093 Site-calibrated model output / CXR0094 Model output before site calibration
    OBX  CE CXR0090 Research use only = Yes; CXR0091 Demo model weights = Yes/No

Every code is the SR's (``docs/DICOM.md``); coding systems are HL7 table 0396's names
(``SCT``, ``LN``, ``DCM``, ``UCUM``), the private scheme keeps its designator ``99CXRSRV``
(HL7's form for a local table).
"""
from __future__ import annotations

import datetime
import re
from decimal import Decimal

from cxrserve.core.family import Concept
from cxrserve.tools.hl7fhir.results import (ALGORITHM_NAME, ALGORITHM_VERSION, FINDING, PRIORITY,
                                            PRIORITY_REASON, PROCEDURE, STUDY_UID, StudyResult)

VERSION = "2.5.1"
SENDING_APPLICATION = "CXRSERVE"
#: HL7 table 0396 names of the SR's coding schemes
CODING_SYSTEMS = {"SCT": "SCT", "LN": "LN", "DCM": "DCM", "UCUM": "UCUM", "UMLS": "UML"}
#: TQ1-9 (HL7 table 0485) of each priority level; "not assessed" has none
PRIORITY_0485 = {"urgent": ("S", "Stat"), "routine": ("R", "Routine")}
SEGMENT_END = "\r"


class HL7Error(ValueError):
    """A message that does not validate, or an ACK that cannot be read."""


def escape(text) -> str:
    """An ER7 value: the delimiters escaped (HL7 2.5.1 2.7.4), line breaks as ``\\.br\\``."""
    text = "" if text is None else str(text)
    out = (text.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\").replace("&", "\\T\\")
           .replace("~", "\\R\\"))
    return out.replace("\r\n", "\\.br\\").replace("\n", "\\.br\\").replace("\r", "\\.br\\")


def components(*values) -> str:
    out = "^".join(escape(v) for v in values)
    return out.rstrip("^")


def ce(c: Concept) -> str:
    return components(c.value, c.meaning, CODING_SYSTEMS.get(c.scheme, c.scheme))


def number(value: float) -> str:
    """An NM value: plain decimal, no exponent (``1e-05`` is not NM)."""
    text = format(Decimal(repr(float(value))), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def segment(name: str, fields: dict[int, str]) -> str:
    top = max(fields) if fields else 0
    return "|".join([name, *(fields.get(i, "") for i in range(1, top + 1))])


def hl7_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d%H%M%S+0000")


def build_oru(result: StudyResult, *, receiving_application: str = "", receiving_facility: str = "",
              sending_facility: str = "", processing_id: str = "P", now: str | None = None) -> str:
    """The ORU^R01 (ER7, segments ended by CR) of one study result."""
    s = result.subject
    now = now or hl7_now()
    observed = s.study_datetime or now
    msh = "MSH|^~\\&|" + "|".join([
        escape(SENDING_APPLICATION), escape(sending_facility or SENDING_APPLICATION), escape(receiving_application),
        escape(receiving_facility), now, "", "ORU^R01^ORU_R01", result.control_id, processing_id, VERSION,
        "", "", "", "", "", "", "UNICODE UTF-8"])
    name = components(s.family_name, s.given_names[0] if s.given_names else "", " ".join(s.given_names[1:]),
                      s.suffix, s.prefix)
    pid = segment("PID", {1: "1", 3: components(s.patient_id or "UNKNOWN", "", "", s.issuer), 5: name,
                          7: s.birth_date, 8: s.sex})
    filler = components(result.result_id, SENDING_APPLICATION)
    orc = segment("ORC", {1: "RE", 3: filler, 5: "CM"})
    obr = segment("OBR", {1: "1", 3: filler, 4: ce(PROCEDURE), 7: observed, 18: escape(s.accession),
                          20: escape(s.study_uid) if len(s.study_uid) <= 60 else "", 22: now, 24: "RAD", 25: "P"})
    segments = ["MSH" + msh[3:], pid, orc, obr]
    notes = list(result.notes)
    if result.site or result.operating_point:
        notes.append("; ".join(x for x in (f"site: {result.site}" if result.site else "",
                                          f"operating point: {result.operating_point}" if result.operating_point
                                          else "") if x))
    if result.priority.rules:
        notes.append(f"priority rules: {result.priority.rules}")
    segments += [segment("NTE", {1: str(i), 2: "L", 3: escape(text)}) for i, text in enumerate(notes, 1)]
    if result.priority.level in PRIORITY_0485:
        code, meaning = PRIORITY_0485[result.priority.level]
        segments.append(segment("TQ1", {1: "1", 9: components(code, meaning, "HL70485")}))
    obx: list[str] = []

    count = 0

    def add(kind: str, what: Concept, value: str, sub: str = "", unit: str = "", method: Concept | None = None) -> None:
        nonlocal count
        count += 1
        obx.append(segment("OBX", {1: str(count), 2: kind, 3: ce(what), 4: sub, 5: value, 6: unit,
                                   11: "P", 14: observed, 17: ce(method) if method else ""}))

    add("ST", STUDY_UID, escape(s.study_uid))
    add("CE", PRIORITY, ce(result.priority.code))
    for reason in result.priority.reasons:
        add("CE", PRIORITY_REASON, ce(reason))
    for n, group in enumerate(result.groups, 1):
        sub = str(n)
        add("CE", FINDING, ce(group.finding), sub)
        add("ST", ALGORITHM_NAME, escape(group.algorithm), sub)
        add("ST", ALGORITHM_VERSION, escape(group.version), sub)
        if group.note:  # the site profile and operating point that decided this group's values
            obx.append(segment("NTE", {1: "1", 2: "L", 3: escape(group.note)}))
        for item in group.items:
            if item.numeric:
                add("NM", item.concept, number(item.number), sub, ce(item.unit) if item.unit else "", item.method)
            else:
                add("CE", item.concept, ce(item.coded), sub, method=item.method)
    return SEGMENT_END.join(segments + obx) + SEGMENT_END


def validate(message: str):
    """Parse ``message`` with hl7apy in STRICT mode and validate it against the 2.5.1 ORU^R01
    structure (segments, groups, cardinality, data types); the parsed message, or HL7Error."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.exceptions import HL7apyException
    from hl7apy.parser import parse_message

    try:
        parsed = parse_message(message.replace("\n", "\r").strip("\r"), validation_level=VALIDATION_LEVEL.STRICT,
                               find_groups=True)
        parsed.validate()
    except (HL7apyException, ValueError, KeyError, TypeError) as err:
        raise HL7Error(f"not a valid HL7 {VERSION} message: {type(err).__name__}: {err}") from err
    _check_values(message)
    return parsed


NM = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")


def _check_values(message: str) -> None:
    """What hl7apy leaves to the sender: MSH-10's length (ST 20), OBX-5 against its OBX-2 type
    (an NM a plain decimal, a CE a code, a text and a coding system), OBX-3 coded."""
    msh = fields_of(message, "MSH")
    if not field(msh, 10) or len(field(msh, 10)) > 20:
        raise HL7Error("MSH-10 (message control ID) must be 1-20 characters")
    for seg in message.replace("\n", "\r").split("\r"):
        if not seg.startswith("OBX|"):
            continue
        parts = seg.split("|")
        kind, value = field(parts, 2), (parts[5] if len(parts) > 5 else "")
        if not (field(parts, 3, 1) and field(parts, 3, 3)):
            raise HL7Error(f"OBX-{field(parts, 1)}: OBX-3 must be coded (code^text^system)")
        if kind == "NM" and not NM.fullmatch(value):
            raise HL7Error(f"OBX-{field(parts, 1)}: an NM value must be a plain decimal")
        if kind == "CE" and len([c for c in value.split("^")[:3] if c]) != 3:
            raise HL7Error(f"OBX-{field(parts, 1)}: a CE value must be code^text^coding system")
        if kind not in ("NM", "CE", "ST"):
            raise HL7Error(f"OBX-{field(parts, 1)}: unexpected value type {kind!r}")


# --------------------------------------------------------------------------- acknowledgements
ACCEPTED = {"AA", "CA"}  # application accept; commit accept (enhanced mode: stored safely)


def fields_of(message: str, name: str) -> list[str] | None:
    """The fields of the first ``name`` segment (index 0 is the segment name), or None."""
    for seg in message.replace("\n", "\r").split("\r"):
        if seg.startswith(name + "|"):
            parts = seg.split("|")
            if name == "MSH":  # MSH-1 is the field separator itself
                parts = [parts[0], "|", *parts[1:]]
            return parts
    return None


def field(parts: list[str] | None, index: int, component: int = 1) -> str:
    if not parts or index >= len(parts):
        return ""
    comps = parts[index].split("^")
    return comps[component - 1] if component <= len(comps) else ""


def read_ack(ack: str, control_id: str) -> tuple[bool, str]:
    """(accepted, reason) of an ACK to the message ``control_id``.

    AA/CA accept; AE/AR/CE/CR are a NAK, whose reason is the code, the ERR-3 error code and the
    receiver's text (MSA-3 / ERR-8). An ACK without MSA or for another control ID is an HL7Error."""
    msa = fields_of(ack, "MSA")
    if msa is None:
        raise HL7Error("the answer has no MSA segment")
    code, acked = field(msa, 1), field(msa, 2)
    if acked != control_id:
        raise HL7Error("the ACK is for another message (MSA-2 differs from MSH-10)")
    if code in ACCEPTED:
        return True, code
    err = fields_of(ack, "ERR")
    parts = [code or "no code"]
    if field(err, 3):
        parts.append(f"error {field(err, 3)} {field(err, 3, 2)}".strip())
    text = field(msa, 3) or field(err, 8)
    if text:
        parts.append(text)
    return False, ": ".join(parts[:1]) + (" " + "; ".join(parts[1:]) if parts[1:] else "")


def make_ack(message: str, code: str = "AA", text: str = "", error: tuple[str, str] | None = None,
             application: str = "RECEIVER") -> str:
    """An ACK to ``message`` (what a receiver answers; the test listener uses it)."""
    msh = fields_of(message, "MSH") or []
    control = field(msh, 10)
    version = field(msh, 12) or VERSION
    head = "MSH|^~\\&|" + "|".join([escape(application), "", field(msh, 3), field(msh, 4), hl7_now(), "",
                                   f"ACK^{field(msh, 9, 2)}^ACK", "ACK" + control[3:20], field(msh, 11) or "P", version])
    segments = [head, segment("MSA", {1: code, 2: control, 3: escape(text)})]
    if error:
        segments.append(segment("ERR", {3: components(error[0], error[1], "HL70357"), 4: "E"}))
    return SEGMENT_END.join(segments) + SEGMENT_END
