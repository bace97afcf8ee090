"""The codes every cxrserve SR shares, and the lookup of each family's (``Presentation.codes``)."""
from __future__ import annotations

import re
from collections.abc import Mapping

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.coding import Code

from cxrserve.core.family import PRIVATE_SCHEME, Concept

PRIVATE_SCHEME_NAME = "cxrserve result concepts"
PRIVATE_SCHEME_VERSION = "1"
MANUFACTURER = "cxrserve"
RESEARCH_NOTICE = ("RESEARCH USE ONLY: produced by cxrserve AI models that are not cleared or approved "
                   "for clinical use; not for diagnosis or treatment decisions.")



def _p(value: str, meaning: str) -> Code:
    return Code(value, PRIVATE_SCHEME, meaning)


def code(concept: Concept) -> Code:
    return Code(concept.value, concept.scheme, concept.meaning)


#: Concepts every report uses, whichever families answered. Each family's own concepts
#: are in its ``presentation.py`` (``Presentation.codes``, read through the registry).
SHARED_CODES = {
    "procedure": Code("399208008", "SCT", "Plain chest X-ray"),
    "lung": Code("39607008", "SCT", "Lung"),
    "ai": Code("123110", "DCM", "Artificial Intelligence"),
    "yes": Code("373066001", "SCT", "Yes"),
    "no": Code("373067005", "SCT", "No"),
    "gate_verdict": _p("CXR0050", "Input gate verdict"),
    "gate_score": _p("CXR0051", "Probability of frontal chest radiograph"),
    "gate_enforced": _p("CXR0053", "Input gate enforced"),
    "research_use": _p("CXR0090", "Research use only"),
    "demo_weights": _p("CXR0091", "Demo model weights"),
    "research_statement": _p("CXR0092", "Research use statement"),
    "qualitative_container": Code("C0034375", "UMLS", "Qualitative Evaluations"),
    "family_gate": _p("CXR0106", "Input quality gate"),
    # site calibration (a section served with a site profile): TID 300 Measurement Method values
    "site_calibrated": _p("CXR0093", "Site-calibrated model output"),
    "uncalibrated": _p("CXR0094", "Model output before site calibration"),
    # worklist priority (cxrserve.core.priority): CODE items of the Qualitative Evaluations container
    "priority": _p("CXR0110", "Worklist priority"),
    "priority_reason": _p("CXR0114", "Worklist priority reason"),
    "priority_rules": _p("CXR0115", "Worklist priority rules"),
}
#: Values of ``priority`` (:data:`cxrserve.core.priority.LEVELS`).
PRIORITY_LEVELS = {"urgent": _p("CXR0111", "Urgent"), "routine": _p("CXR0112", "Routine"),
                   "not assessed": _p("CXR0113", "Priority not assessed")}


class _Codes(Mapping):
    """:data:`SHARED_CODES` and every registered family's codes, by key (the registry is read
    at each lookup, so a family registered later is found)."""

    def _table(self) -> dict[str, Code]:
        from cxrserve import families

        return {**SHARED_CODES, **{key: code(c) for key, c in families.concepts().items()}}

    def __getitem__(self, key: str) -> Code:
        return self._table()[key]

    def __iter__(self):
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


#: Every concept the SR uses, shared and per family (``docs/DICOM.md``'s code table).
CODES: Mapping[str, Code] = _Codes()
GATE_VERDICTS = {"frontal_cxr": _p("CXR0052", "Frontal chest radiograph")}


def gate_code(verdict: str) -> Code:
    if verdict in GATE_VERDICTS:
        return GATE_VERDICTS[verdict]
    slug = re.sub(r"[^A-Z0-9]", "", verdict.upper())[:10] or "UNKNOWN"
    return _p(f"GATE{slug}", verdict.replace("_", " ")[:64])


def add_coding_scheme(ds: Dataset) -> None:
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = PRIVATE_SCHEME_NAME
    item.CodingSchemeVersion = PRIVATE_SCHEME_VERSION
    item.CodingSchemeResponsibleOrganization = "cxrserve project (docs/DICOM.md)"
    ds.CodingSchemeIdentificationSequence = DicomSequence([item])
