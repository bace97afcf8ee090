"""HL7 v2.5.1 ORU^R01 and FHIR R4 results of a ``cxr-study`` answer, beside the DICOM objects.

>>> result = study_result(source_ds, study_response)     # the SR's coded items, patient, priority
>>> oru = build_oru(result)                               # ER7 text, validated by validate()
>>> bundle = build_bundle(result)                         # transaction Bundle, validate_bundle()

Both are built from the items the SR codes (:mod:`.results`, the families' declarations read
through the registry), so the PACS, the RIS and the FHIR server get the same findings, codes
and priority. Delivery: :func:`.mllp.send` (ACK/NAK), :func:`.fhir.post_bundle` (conditional
creates); the DICOM node keeps one delivery row per destination and instance
(``docs/HL7_FHIR.md``). Patient identifiers go into these messages and nowhere else.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from cxrserve.tools.hl7fhir.fhir import build_bundle, validate_bundle
from cxrserve.tools.hl7fhir.hl7 import build_oru, validate
from cxrserve.tools.hl7fhir.results import StudyResult, study_result

__all__ = ["StudyResult", "build_bundle", "build_oru", "study_result", "validate", "validate_bundle",
           "write_private"]


def write_private(path: str | Path, text: str, *, fsync: bool = False) -> Path:
    """Write ``text`` atomically, 0600 (the messages carry the patient's identifiers)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8",
                   newline="") as fh:
        fh.write(text)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def bundle_text(bundle: dict) -> str:
    return json.dumps(bundle, indent=1, ensure_ascii=False) + "\n"
