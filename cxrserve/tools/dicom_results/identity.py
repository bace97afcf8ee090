"""Which result object is which: stable UIDs and series numbers by kind."""
from __future__ import annotations

import hashlib

from pydicom.dataset import Dataset

#: Series number of the SR; each picture's result object declares its own (``Picture.series_number``).
SR_SERIES_NUMBER = 9901


def series_numbers() -> dict[str, int]:
    """Result kind -> series number: the SR's, then each declared picture object's (registry order)."""
    from cxrserve import families

    return {"sr": SR_SERIES_NUMBER, **{kind: p.series_number for kind, (_, p) in families.result_pictures().items()}}


def result_uid(source_sop_uid: str, model_version: str, kind: str, what: str = "sop") -> str:
    """A 2.25 UID from sha256(source SOP UID, model version, kind, what): stable across runs.

    (``pydicom.uid.generate_uid(prefix=None)`` ignores its entropy sources, so the
    UUID-sized integer is derived here, as PS3.5 B.2 allows for 2.25 UIDs.)"""
    text = "\x1f".join(["cxrserve-results-v1", str(source_sop_uid), str(model_version), kind, what])
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big") >> 1)


def kind_of(ds: Dataset) -> str:
    """The result kind of an object made here (from its Series Number)."""
    for kind, number in series_numbers().items():
        if int(ds.get("SeriesNumber", 0) or 0) == number:
            return kind
    return "unknown"
