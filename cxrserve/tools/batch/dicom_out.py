"""``cxrserve batch --dicom-out``: the study's DICOM result objects of each DICOM input."""
from __future__ import annotations

import io
import logging
from pathlib import Path

from cxrserve.tools.batch.inputs import BatchInput
from cxrserve.tools.privacy import error_text

log = logging.getLogger(__name__)


def write_dicom_results(item: BatchInput, data: bytes, result: dict, dicom_out: Path | None) -> None:
    """``--dicom-out``: SR + SEG + heatmap SCs of a DICOM input's cxr-study result, under
    ``dicom_out/<hashed SOP UID>/`` (:mod:`cxrserve.tools.dicom_results`); nothing for other inputs."""
    if dicom_out is None or item.format != "dicom":
        return
    import pydicom

    from cxrserve.tools.dicom_results import NotProcessed, build_results, write_results

    try:
        objects = build_results(pydicom.dcmread(io.BytesIO(data), force=True), result)
        write_results(objects, Path(dicom_out) / item.input_id.split(":", 1)[-1])
    except Exception as err:  # noqa: BLE001 - the row is still written; neighbours unaffected
        log.warning("%s: no DICOM result objects: %s", item.input_id, error_text(err, safe=(NotProcessed,)))
