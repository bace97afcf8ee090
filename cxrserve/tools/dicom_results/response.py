"""Reading a ``cxr-study`` response: which sections answered, what they report, their pictures."""
from __future__ import annotations

import base64
import io

import numpy as np

from cxrserve.core.family import Picture, Report

def reported_sections(results: dict) -> list[tuple[str, str, Report]]:
    """``(section key, served name, report)`` of the response's sections that the SR codes, in
    the family registry's order (what the SR lists first); a section without a report is skipped."""
    from cxrserve import families

    out = []
    for name, (_, served) in families.served().items():
        report = families.report(name)
        if served.key in results and report is not None:
            out.append((served.key, name, report))
    return out


class NotProcessed(Exception):
    """The input was not processed (4xx response): no result objects; ``reason`` for the audit log."""

    def __init__(self, reason: str, status: int = 422):
        super().__init__(reason)
        self.reason, self.status = reason, status


def not_processed_reason(response: dict) -> str | None:
    """Why a response makes no objects (a 4xx error body), or None when it is a result."""
    status = response.get("status")
    if "error" in response and isinstance(status, int) and status >= 400:
        return f"{status} {response.get('error')}: {response.get('message', '')}"
    if not isinstance(response.get("results"), dict):
        return "not a composed model's response (no 'results')"
    return None


def section_ok(section) -> bool:
    return isinstance(section, dict) and "error" not in section


def is_demo(section: dict) -> bool:
    return any(str(w).startswith("DEMO MODEL") for w in section.get("warnings", []) or [])


def decode_png(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def mask_from_png(b64: str) -> np.ndarray:
    """The 0/255 lung mask PNG -> bool HxW."""
    arr = decode_png(b64)
    if arr.ndim == 3:
        arr = arr[..., 0]
    return arr > 127


_MISSING = object()


def at(section: dict, path: str, default=_MISSING):
    """The value at a dotted path of a section; a missing step is ``default``, or a KeyError without one."""
    value = section
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            if default is _MISSING:
                raise KeyError(f"{path!r} missing from the answer")
            return default
        value = value[part]
    return value


def result_pictures(response: dict, segmentations: bool) -> list[tuple[str, str, dict, Picture]]:
    """``(kind, section key, section, picture)`` of the declared result pictures present in the response."""
    from cxrserve import families

    out = []
    for kind, (name, picture) in families.result_pictures().items():
        key = families.get_served(name)[1].key
        section = response["results"].get(key)
        if (picture.segment is not None) == segmentations and section_ok(section) and section.get(picture.field):
            out.append((kind, key, section, picture))
    return out


#: A section's values as served before its site profile calibrated them (``cxrserve.core.sites``).
UNCALIBRATED = "uncalibrated"


def report_values(report: Report, section: dict):
    """Each item a section's report declares, with its value: ``(declared, concept, value, unit,
    method)``, the one walk the SR and the HL7/FHIR messages share.

    ``value`` is the number (``Num``, ``NumEach``) or the answer's concept (``Coded``); ``unit`` is
    None for a coded item. A section calibrated with a site profile (it has ``uncalibrated``) gives
    each item calibration changed twice, ``method`` ``"site_calibrated"`` then ``"uncalibrated"``
    (keys of the shared code table); everything else once, with ``method`` None.
    """
    from cxrserve.core.family import Coded, Num, NumEach, import_object

    before = section.get(UNCALIBRATED)
    views = [(section, None)]
    if isinstance(before, dict) and before:
        views = [(section, set(before)), ({**section, **before}, set(before))]
    for index, (view, changed) in enumerate(views):
        for item in report.items:
            if getattr(item, "when", "") and not at(view, item.when, None):
                continue
            touched = changed is not None and item.field.split(".")[0] in changed
            if index and not touched:
                continue  # the uncalibrated pass gives only what calibration changed
            method = ("uncalibrated" if index else "site_calibrated") if touched else None
            if isinstance(item, Num):
                value = at(view, item.field, None) if item.optional else at(view, item.field)
                if not (item.optional and value is None):
                    yield item, item.concept, value, item.unit, method
            elif isinstance(item, Coded):
                yield item, item.concept, item.values[at(view, item.field)], None, method
            elif isinstance(item, NumEach):
                coder = import_object(item.coder)
                for name, value in (at(view, item.field, None) or {}).items():
                    yield item, coder(name), value, item.unit, method
