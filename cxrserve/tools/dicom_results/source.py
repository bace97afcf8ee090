"""The source instance's header as result objects may copy it: values valid for their VR."""
from __future__ import annotations

import logging
import re
from contextlib import contextmanager

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset


#: Value representations whose values are checked (and repaired or blanked) before a
#: source's header is copied into result objects; UIDs are left alone (never guessed).
CHECKED_VRS = {"DA", "TM", "DT", "AS", "CS", "PN", "LO", "SH", "LT", "ST", "IS", "DS", "AE"}
#: Type 2 attributes of the patient and study modules highdicom copies: present (empty when unknown)
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "AccessionNumber", "ReferringPhysicianName", "StudyID")
SEX_WORDS = {"F": "F", "FEMALE": "F", "W": "F", "WOMAN": "F", "M": "M", "MALE": "M", "MAN": "M", "O": "O",
             "OTHER": "O"}


def _repaired(keyword: str, vr: str, value):
    """A conforming form of ``value`` for its VR (or the PatientSex enumeration), or None."""
    import datetime

    text = str(value).strip()
    if keyword == "PatientSex":
        return SEX_WORDS.get(text.upper())
    if vr == "DA":  # 1950/01/02, 1950-01-02, 1950.01.02 (the DICOM 2 era's and people's forms)
        match = re.fullmatch(r"(\d{4})[-/.]?(\d{2})[-/.]?(\d{2})", text)
        if match:
            try:
                return datetime.date(*map(int, match.groups())).strftime("%Y%m%d")
            except ValueError:
                return None
        return None
    if vr == "TM":
        compact = text.replace(":", "")
        return compact if re.fullmatch(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?", compact) else None
    if vr == "AS":
        if text.isdigit() and len(text) <= 3:
            return f"{int(text):03d}Y"
        return text if re.fullmatch(r"\d{3}[DWMY]", text) else None
    return None


def _conforms(keyword: str, vr: str, value) -> bool:
    from pydicom import config
    from pydicom.multival import MultiValue
    from pydicom.valuerep import validate_value

    if keyword == "PatientSex":
        return str(value) in ("M", "F", "O")
    try:
        for item in (value if isinstance(value, MultiValue) else [value]):
            validate_value(vr, item if isinstance(item, (int, float, bytes)) else str(item), config.RAISE)
    except (ValueError, TypeError):
        return False
    return True


def clean_source(source: Dataset) -> Dataset:
    """A header-only copy of the source whose copied values are valid for their VR.

    Real files carry errors that the result objects would inherit (a validator flags
    them, and highdicom refuses some outright, which used to lose the whole result):
    a Patient's Age of ``68`` is written ``068Y``, a birth date ``1950/01/02`` becomes
    ``19500102``, PatientSex ``female`` becomes ``F``, a pixel spacing of ``0\\0`` is
    dropped; any other value that does not conform to its VR is blanked (Type 2) or
    dropped, never guessed. Missing Type 2 patient/study attributes are added empty.
    """
    import copy
    import warnings

    ds = copy.copy(source)  # shallow: the pixel data is not touched
    # pydicom's warnings quote the offending value (a birth date, a name): never into a log
    with warnings.catch_warnings(), _pydicom_log_quiet():
        warnings.simplefilter("ignore")
        _conform_values(ds)
        for keyword in TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, None)
        for keyword in ("PixelSpacing", "ImagerPixelSpacing"):  # "0\\0" (NEMA WG04 films) is no spacing
            value = ds.get(keyword)
            try:
                if value is not None and (len(value) != 2 or any(float(v) <= 0 for v in value)):
                    delattr(ds, keyword)
            except (TypeError, ValueError):
                delattr(ds, keyword)
    return ds


@contextmanager
def _pydicom_log_quiet():
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _conform_values(ds: Dataset) -> None:
    for elem in list(ds):
        if elem.VR not in CHECKED_VRS or elem.tag.group in (0x0002, 0x7FE0) or elem.is_private:
            continue
        try:
            value = elem.value
        except Exception:  # noqa: BLE001 - a value pydicom cannot even convert: treated as invalid
            value, ok = None, False
        else:
            ok = value in (None, "") or _conforms(elem.keyword, elem.VR, value)
        if ok:
            continue
        fixed = _repaired(elem.keyword, elem.VR, value) if value is not None else None
        if fixed is not None and _conforms(elem.keyword, elem.VR, fixed):
            ds[elem.tag] = DataElement(elem.tag, elem.VR, fixed)
        elif elem.keyword in TYPE2_COPIED:
            ds[elem.tag] = DataElement(elem.tag, elem.VR, None)
        else:
            del ds[elem.tag]


def orientation(source: Dataset) -> tuple[str, str]:
    """Source PatientOrientation, else the conventional display of a frontal CXR (rows to the
    patient's left, columns to the feet)."""
    value = source.get("PatientOrientation")
    return (str(value[0]), str(value[1])) if value and len(value) == 2 else ("L", "F")
