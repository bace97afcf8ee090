"""What a tool may write about a failure or a header: no DICOM value in a row, an audit line or a log.

Shared by ``cxrserve batch`` and the DICOM node, the two tools that read every header they are sent."""
from __future__ import annotations

import logging
import re


def error_text(err: BaseException, safe: tuple[type[BaseException], ...] = ()) -> str:
    """What a log line or row may say about ``err``: its type, and its message only when cxrserve wrote it.

    Other libraries quote the value they choke on (pydicom: "Unable to convert '1950/01/02'
    to 'DA' object" for a Patient's Birth Date), and a DICOM value may identify the patient.
    ``safe``: further cxrserve exception types whose messages are written to be shown.
    """
    from cxrserve.core.errors import CXRInputError
    from cxrserve.tools.client import CXRServeError

    if isinstance(err, (CXRInputError, CXRServeError, *safe)):
        return f"{type(err).__name__}: {getattr(err, 'message', None) or err}"
    return f"{type(err).__name__} (message withheld: it may quote a DICOM value)"


class WithholdQuotedValues(logging.Filter):
    """pydicom's own warnings quote the value they flag ("Invalid value for VR DA: '1950/01/02'.",
    logged when a header is read or the patient module copied): the log keeps the warning
    without the value."""

    QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = self.QUOTED.sub("'<withheld>'", record.getMessage()), ()
        return True


def withhold_dicom_values() -> None:
    """Keep DICOM values out of this process's log (batch, the node); idempotent.

    * :class:`WithholdQuotedValues` on pydicom's logger (pydicom logs on that one logger),
      and the same text that pydicom repeats as a ``UserWarning`` (stderr) silenced;
    * highdicom's INFO/DEBUG lines off: while ``--dicom-out`` builds objects they name the
      source's SOP Instance UID ("copy Patient-related attributes from dataset "1.2...""),
      which batch outputs only ever show hashed.
    """
    import warnings

    pydicom_log = logging.getLogger("pydicom")
    if not any(isinstance(f, WithholdQuotedValues) for f in pydicom_log.filters):
        pydicom_log.addFilter(WithholdQuotedValues())
    warnings.filterwarnings("ignore", message=r"Invalid value for VR", category=UserWarning)
    highdicom_log = logging.getLogger("highdicom")
    if highdicom_log.getEffectiveLevel() < logging.WARNING:
        highdicom_log.setLevel(logging.WARNING)
