"""``cxrserve batch --hl7-out DIR --fhir-out DIR``: the HL7 ORU^R01 and the FHIR R4 transaction
Bundle of each DICOM input's study result (``docs/HL7_FHIR.md``), as files.

``DIR/<hashed SOP UID>.hl7`` (ER7, segments ended by CR, validated by hl7apy in strict mode)
and ``DIR/<hashed SOP UID>.json`` (validated with fhir.resources), 0600: they carry the
patient's identifiers, which is where those belong, and nowhere else (rows and logs name the
input by its hash). An image file (PNG, JPEG) has no patient or study to address a result to:
no message. An answer that makes no result (a 4xx) makes no message either.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

from cxrserve.tools.batch.inputs import BatchInput
from cxrserve.tools.privacy import error_text

log = logging.getLogger(__name__)


def write_messages(item: BatchInput, data: bytes, result: dict, hl7_out: Path | None, fhir_out: Path | None) -> None:
    if (hl7_out is None and fhir_out is None) or item.format != "dicom":
        return
    import pydicom

    from cxrserve.tools.dicom_results import NotProcessed
    from cxrserve.tools.hl7fhir import bundle_text, write_private
    from cxrserve.tools.hl7fhir.fhir import build_bundle, validate_bundle
    from cxrserve.tools.hl7fhir.hl7 import build_oru, validate
    from cxrserve.tools.hl7fhir.results import study_result

    stem = item.input_id.split(":", 1)[-1]
    try:
        study = study_result(pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True), result)
        if hl7_out is not None:
            text = build_oru(study)
            validate(text)
            write_private(Path(hl7_out) / f"{stem}.hl7", text)
        if fhir_out is not None:
            bundle = build_bundle(study)
            validate_bundle(bundle)
            write_private(Path(fhir_out) / f"{stem}.json", bundle_text(bundle))
    except Exception as err:  # noqa: BLE001 - the row is still written; neighbours unaffected
        log.warning("%s: no HL7/FHIR message: %s", item.input_id, error_text(err, safe=(NotProcessed,)))
