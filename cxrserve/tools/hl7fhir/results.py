"""One study result as coded items: what the ORU^R01 and the FHIR Bundle are both built from.

The items are the SR's (:mod:`cxrserve.tools.dicom_results.sr`): each answered section whose
family declares a ``Report`` gives a group with its finding type, its algorithm (name and
version), its NUM items (number and UCUM unit) and CODE items (coded value), and the
research-use and demo-weights evaluations; the input gate gives one more group. The codes are
the SR's codes (``docs/DICOM.md``), read through the same registry, so the three outputs
cannot drift apart. Nothing here names a family.

The patient and study come from the source instance's header (:class:`Subject`), cleaned as
the SR's copy is (:func:`cxrserve.tools.dicom_results.source.clean_source`). They go into the
messages and nowhere else: no log line or exception text here quotes them.
"""
from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from cxrserve.core.family import NO_UNITS, PRIVATE_SCHEME, Coded, Concept, NumEach
from cxrserve.tools.dicom_results.codes import CODES, RESEARCH_NOTICE, gate_code
from cxrserve.tools.dicom_results.codes import PRIORITY_LEVELS as SR_PRIORITY_LEVELS
from cxrserve.tools.dicom_results.identity import result_uid
from cxrserve.tools.dicom_results.response import (NotProcessed, is_demo, not_processed_reason, report_values,
                                                   reported_sections, section_ok)

def concept(code) -> Concept:
    """A pydicom ``Code`` (the SR's) as a :class:`Concept`."""
    if isinstance(code, Concept):
        return code
    return Concept(str(code.value), str(code.scheme_designator), str(code.meaning))


#: The procedure the report is of (DiagnosticReport.code, OBR-4): LOINC "XR Chest Single view".
PROCEDURE = Concept("36554-4", "LN", "XR Chest Single view")
#: TID 4019's algorithm name and version (DCM), as the SR's algorithm identification.
ALGORITHM_NAME = Concept("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = Concept("111003", "DCM", "Algorithm Version")
FINDING = Concept("121071", "DCM", "Finding")
STUDY_UID = Concept("110180", "DCM", "Study Instance UID")
#: The worklist priority (the answer's ``priority``): the SR's codes (CXR0110-CXR0115).
PRIORITY = concept(CODES["priority"])
PRIORITY_LEVELS = {level: concept(c) for level, c in SR_PRIORITY_LEVELS.items()}
PRIORITY_REASON = concept(CODES["priority_reason"])
NOT_ASSESSED = "not assessed"
GATE_ALGORITHM = "cxr-input-gate"


@dataclass(frozen=True)
class Item:
    """One NUM (``number`` and ``unit``) or CODE (``coded``) item of a group."""

    concept: Concept
    number: float | None = None
    unit: Concept | None = None
    coded: Concept | None = None
    #: a calibrated section's changed items: Site-calibrated model output (the served value) or
    #: Model output before site calibration (the ``uncalibrated`` one), as the SR's Measurement Method
    method: Concept | None = None

    @property
    def numeric(self) -> bool:
        return self.number is not None


@dataclass(frozen=True)
class Group:
    """One measurement group of the SR: a section's (or the input gate's) items."""

    key: str                 # section key (identifiers of the resources made from it)
    finding: Concept         # the group's finding type
    algorithm: str           # TID 4019 algorithm name
    version: str             # TID 4019 algorithm version
    demo: bool
    items: tuple[Item, ...]
    site: str = ""             # the site whose profile answered, when the answer names one
    operating_point: str = ""  # the site threshold that decided (per section)

    @property
    def note(self) -> str:
        return "; ".join(x for x in (f"site: {self.site}" if self.site else "",
                                     f"operating point: {self.operating_point}" if self.operating_point else "") if x)


@dataclass(frozen=True)
class Priority:
    level: str = NOT_ASSESSED
    reasons: tuple[Concept, ...] = ()
    rules: str = ""

    @property
    def code(self) -> Concept:
        return PRIORITY_LEVELS.get(self.level, PRIORITY_LEVELS[NOT_ASSESSED])


@dataclass(frozen=True)
class Subject:
    """The patient and study of the source instance (identifiers: only into the messages)."""

    patient_id: str = ""
    issuer: str = ""
    family_name: str = ""
    given_names: tuple[str, ...] = ()   # given, middle
    prefix: str = ""
    suffix: str = ""
    birth_date: str = ""      # YYYYMMDD
    sex: str = ""             # M F O or empty
    accession: str = ""
    study_uid: str = ""
    study_datetime: str = ""  # YYYYMMDD[HHMMSS]
    sop_uid: str = ""

    def identifiers(self) -> list[str]:
        """Every value here that identifies the patient or study (scrubbed from error texts)."""
        names = [self.family_name, *self.given_names]
        values = [self.patient_id, self.birth_date, self.accession, self.study_uid, self.sop_uid, *names]
        return sorted({v for v in values if v and len(v) >= 3}, key=len, reverse=True)


@dataclass(frozen=True)
class StudyResult:
    """Everything both messages say about one scored instance."""

    subject: Subject
    groups: tuple[Group, ...]
    priority: Priority
    model: str
    model_version: str
    site: str = ""
    operating_point: str = ""
    notes: tuple[str, ...] = field(default=(RESEARCH_NOTICE,))

    def uid(self, what: str) -> str:
        """A stable 2.25 UID of this result (as the SR's UIDs: source SOP UID, model version)."""
        return result_uid(self.subject.sop_uid, self.model_version, "hl7fhir", what)

    def uuid(self, what: str) -> str:
        """A stable UUID (FHIR ``urn:uuid`` full URLs)."""
        return str(uuid.UUID(int=int(self.uid(what).removeprefix("2.25.")) & ((1 << 128) - 1), version=5))

    @property
    def control_id(self) -> str:
        """MSH-10 (20 characters): the same for every send of this result, so a receiver sees a
        resend after a crash as the duplicate it is."""
        text = "\x1f".join(["cxrserve-hl7-v1", self.subject.sop_uid, self.model_version])
        return "CXR" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:17].upper()

    @property
    def result_id(self) -> str:
        """The result's own identifier (OBR-3 filler order number, the FHIR identifiers' root)."""
        return self.control_id

    @property
    def coded_conclusions(self) -> list[Concept]:
        """Every coded value of the groups (besides the research-use flags) and the priority's."""
        skip = {concept(CODES["research_use"]), concept(CODES["demo_weights"])}
        out = []
        for group in self.groups:
            out += [i.coded for i in group.items if i.coded is not None and i.concept not in skip
                    and i.method != concept(CODES["uncalibrated"])]
        out.append(self.priority.code)
        out += list(self.priority.reasons)
        return out


def _text(value) -> str:
    return "" if value is None else str(value).strip()


def subject_of(source: Dataset) -> Subject:
    """The :class:`Subject` of a source instance (its header cleaned as the SR's copy is)."""
    from cxrserve.tools.dicom_results.source import clean_source

    ds = clean_source(source)
    name = ds.get("PatientName")
    family = given = middle = prefix = suffix = ""
    if name:
        family, given, middle = _text(name.family_name), _text(name.given_name), _text(name.middle_name)
        prefix, suffix = _text(name.name_prefix), _text(name.name_suffix)
    date, time = _text(ds.get("StudyDate")), _text(ds.get("StudyTime")).split(".")[0]
    sex = _text(ds.get("PatientSex")).upper()
    return Subject(patient_id=_text(ds.get("PatientID")), issuer=_text(ds.get("IssuerOfPatientID")),
                   family_name=family, given_names=tuple(n for n in (given, middle) if n), prefix=prefix,
                   suffix=suffix, birth_date=_text(ds.get("PatientBirthDate")),
                   sex=sex if sex in ("M", "F", "O") else "", accession=_text(ds.get("AccessionNumber")),
                   study_uid=_text(ds.get("StudyInstanceUID")),
                   study_datetime=(date + time) if len(date) == 8 else "", sop_uid=_text(ds.get("SOPInstanceUID")))


def _section_items(report, section: dict) -> list[Item]:
    """The items of one section, as its family's report declares them (the SR's walk: a section
    calibrated with a site profile gives each item calibration changed twice, with its method)."""
    items = []
    for declared, item_concept, value, unit, method in report_values(report, section):
        method = concept(CODES[method]) if method else None
        if isinstance(declared, Coded):
            items.append(Item(item_concept, coded=value, method=method))
        else:
            items.append(Item(concept(item_concept) if isinstance(declared, NumEach) else item_concept,
                              number=float(value), unit=unit, method=method))
    return items


def _flags(demo: bool) -> list[Item]:
    yes, no = concept(CODES["yes"]), concept(CODES["no"])
    return [Item(concept(CODES["research_use"]), coded=yes),
            Item(concept(CODES["demo_weights"]), coded=yes if demo else no)]


def groups_of(response: dict) -> list[Group]:
    """The SR's measurement groups of a response: every answered reported section, then the gate."""
    results = response["results"]
    version = str(response.get("model_version", "unknown"))
    groups = []
    for key, name, report in reported_sections(results):
        section = results.get(key)
        if not section_ok(section):
            continue
        demo = is_demo(section)
        groups.append(Group(key, report.finding, str(section.get("model", name)),
                            str(section.get("model_version", "unknown"))[:64], demo,
                            tuple(_section_items(report, section) + _flags(demo)),
                            site=_text(section.get("site")), operating_point=_text(section.get("operating_point"))))
    gate = response.get("input_gate")
    if gate:
        items = [Item(concept(CODES["gate_verdict"]), coded=concept(gate_code(str(gate.get("verdict", "unknown"))))),
                 Item(concept(CODES["gate_enforced"]), coded=concept(CODES["yes" if gate.get("enforced") else "no"]))]
        if gate.get("score") is not None:
            items.append(Item(concept(CODES["gate_score"]), number=float(gate["score"]), unit=NO_UNITS))
        groups.append(Group("input-gate", concept(CODES["family_gate"]), GATE_ALGORITHM, version[:64],
                            any(g.demo for g in groups), tuple(items)))
    return groups


def priority_of(response: dict) -> Priority:
    """The answer's ``priority`` (``level``, coded ``reasons``, ``rules``); "not assessed" without one."""
    block = response.get("priority")
    if not isinstance(block, dict):
        return Priority()
    level = str(block.get("level") or NOT_ASSESSED)
    reasons = tuple(Concept(str(r.get("code", "")), str(r.get("scheme") or PRIVATE_SCHEME), str(r.get("meaning", "")))
                    for r in block.get("reasons") or [] if isinstance(r, dict) and r.get("code"))
    return Priority(level if level in PRIORITY_LEVELS else NOT_ASSESSED, reasons, str(block.get("rules") or ""))


def _site_facts(response: dict) -> tuple[str, str]:
    """The answer's site and operating point, when it names them (top level, else the sections':
    one site, and the operating points are each group's own)."""
    site, point = _text(response.get("site")), _text(response.get("operating_point"))
    for section in (response.get("results") or {}).values():
        if isinstance(section, dict):
            site = site or _text(section.get("site"))
    return site, point


def study_result(source: Dataset, response: dict) -> StudyResult:
    """The :class:`StudyResult` of one source instance and its ``cxr-study`` answer.

    Raises :class:`NotProcessed` for an answer that makes no result (a 4xx), as the SR does."""
    reason = not_processed_reason(response)
    if reason is not None:
        raise NotProcessed(reason, int(response.get("status") or 422))
    groups = groups_of(response)
    if not any(g.key != "input-gate" for g in groups):
        raise NotProcessed("no family section answered: nothing to report", status=500)
    site, point = _site_facts(response)
    return StudyResult(subject=subject_of(source), groups=tuple(groups), priority=priority_of(response),
                       model=str(response.get("model", "")), model_version=str(response.get("model_version", "unknown")),
                       site=site, operating_point=point)
