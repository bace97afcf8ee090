"""DICOM result objects from a ``cxr-study`` response: SR (TID 1500), SEGs of masks, SCs of heatmaps.

>>> objs = build_results(source_ds, study_response)      # list[pydicom.Dataset]
>>> write_results(objs, "out/")                            # one .dcm per object

Every object is placed in the source's study (Study Instance UID, patient and study
modules copied from the source by highdicom) in a new series. Series and SOP Instance
UIDs are derived from the source SOP Instance UID, the response's model version and the
object kind (:func:`result_uid`), so scoring the same instance with the same models again
produces the same UIDs: a PACS replaces (or ignores) the second copy instead of holding
two result sets.

Objects (``kind`` -> what):

* ``sr``: Comprehensive SR, TID 1500 Measurement Report referencing the source image;
  one measurement group (TID 1501) per section whose family declares a ``Report``, each
  with its TID 4019 algorithm identification (name, version, parameters: weights
  demo/trained, research use only), plus one group for the input gate verdict.
* one object per declared result picture present in the response (``Picture.kind``): a
  binary Segmentation at the source geometry for a mask (``Picture.segment``), else an
  RGB Secondary Capture labelled in SeriesDescription, ImageComments and
  DerivationDescription.

What each family's section becomes (its NUM and CODE items, codes, pictures, series
numbers) is declared in its folder (``presentation.py``) and read through the registry;
this module holds only what every report shares (:data:`SHARED_CODES`, the gate group,
the research-use statement). Codes: :data:`CODES` (``docs/DICOM.md``).

Responses that are a 4xx error body (decode or gate rejection, lateral, non-chest) make
no objects: :func:`not_processed_reason` says why, for the caller's audit log.
"""
from __future__ import annotations

import base64
import hashlib
import io
import logging
import re
from contextlib import contextmanager
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.coding import Code

from cxrserve.core.family import (NO_UNITS, PRIVATE_SCHEME, Coded, Concept, Num, NumEach, Picture, Report,
                                  import_object)

log = logging.getLogger(__name__)

PRIVATE_SCHEME_NAME = "cxrserve result concepts"
PRIVATE_SCHEME_VERSION = "1"
MANUFACTURER = "cxrserve"
RESEARCH_NOTICE = ("RESEARCH USE ONLY: produced by cxrserve AI models that are not cleared or approved "
                   "for clinical use; not for diagnosis or treatment decisions.")

#: Series number of the SR; each picture's result object declares its own (``Picture.series_number``).
SR_SERIES_NUMBER = 9901


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
}


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


def series_numbers() -> dict[str, int]:
    """Result kind -> series number: the SR's, then each declared picture object's (registry order)."""
    from cxrserve import families

    return {"sr": SR_SERIES_NUMBER, **{kind: p.series_number for kind, (_, p) in families.result_pictures().items()}}


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


# --------------------------------------------------------------------------- helpers
def result_uid(source_sop_uid: str, model_version: str, kind: str, what: str = "sop") -> str:
    """A 2.25 UID from sha256(source SOP UID, model version, kind, what): stable across runs.

    (``pydicom.uid.generate_uid(prefix=None)`` ignores its entropy sources, so the
    UUID-sized integer is derived here, as PS3.5 B.2 allows for 2.25 UIDs.)"""
    text = "\x1f".join(["cxrserve-results-v1", str(source_sop_uid), str(model_version), kind, what])
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big") >> 1)


def gate_code(verdict: str) -> Code:
    if verdict in GATE_VERDICTS:
        return GATE_VERDICTS[verdict]
    slug = re.sub(r"[^A-Z0-9]", "", verdict.upper())[:10] or "UNKNOWN"
    return _p(f"GATE{slug}", verdict.replace("_", " ")[:64])


def not_processed_reason(response: dict) -> str | None:
    """Why a response makes no objects (a 4xx error body), or None when it is a result."""
    status = response.get("status")
    if "error" in response and isinstance(status, int) and status >= 400:
        return f"{status} {response.get('error')}: {response.get('message', '')}"
    if not isinstance(response.get("results"), dict):
        return "not a composed model's response (no 'results')"
    return None


def _section_ok(section) -> bool:
    return isinstance(section, dict) and "error" not in section


def _is_demo(section: dict) -> bool:
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


# --------------------------------------------------------------------------- SR
def _algorithm(name: str, section: dict):
    import highdicom as hd

    params = [f"weights: {'demo' if _is_demo(section) else 'trained'}", "research use only: yes"]
    return hd.sr.AlgorithmIdentification(name=section.get("model", name),
                                         version=str(section.get("model_version", "unknown"))[:64],
                                         parameters=params, family=CODES["ai"], manufacturer=MANUFACTURER)


def _m(name: Code, value, unit: Code, algorithm):
    import highdicom as hd

    return hd.sr.Measurement(name=name, value=float(value), unit=unit, algorithm_id=algorithm)


def _q(name: Code, value: Code):
    import highdicom as hd

    return hd.sr.QualitativeEvaluation(name=name, value=value)


_MISSING = object()


def _at(section: dict, path: str, default=_MISSING):
    """The value at a dotted path of a section; a missing step is ``default``, or a KeyError without one."""
    value = section
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            if default is _MISSING:
                raise KeyError(f"{path!r} missing from the answer")
            return default
        value = value[part]
    return value


def _family_items(report: Report, s: dict, algorithm) -> tuple[list, list]:
    """(measurements, qualitative evaluations) of one section, as its family's report declares."""
    m, q = [], []
    for item in report.items:
        if getattr(item, "when", "") and not _at(s, item.when, None):
            continue
        if isinstance(item, Num):
            value = _at(s, item.field, None) if item.optional else _at(s, item.field)
            if not (item.optional and value is None):
                m.append(_m(code(item.concept), value, code(item.unit), algorithm))
        elif isinstance(item, Coded):
            q.append(_q(code(item.concept), code(item.values[_at(s, item.field)])))
        elif isinstance(item, NumEach):
            coder = import_object(item.coder)
            for name, value in (_at(s, item.field, None) or {}).items():
                m.append(_m(code(coder(name)), value, code(item.unit), algorithm))
    q.append(_q(CODES["research_use"], CODES["yes"]))
    q.append(_q(CODES["demo_weights"], CODES["yes"] if _is_demo(s) else CODES["no"]))
    return m, q


def build_sr(source: Dataset, response: dict) -> Dataset:
    """The TID 1500 Measurement Report (Comprehensive SR) of one response."""
    import highdicom as hd

    sop = str(source.SOPInstanceUID)
    version = str(response.get("model_version", "unknown"))
    results = response["results"]
    image_ref = hd.sr.SourceImageForMeasurementGroup.from_source_image(source)
    groups = []
    for key, name, report in reported_sections(results):
        section = results.get(key)
        if not _section_ok(section):
            continue
        algorithm = _algorithm(name, section)
        measurements, qualitative = _family_items(report, section, algorithm)
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=result_uid(sop, version, "sr", f"track-{key}"),
                                                         identifier=f"cxrserve {key}"),
            finding_type=code(report.finding), algorithm_id=algorithm,
            finding_sites=[hd.sr.FindingSite(CODES["lung"])] if report.lung_site else None,
            measurements=measurements or None, qualitative_evaluations=qualitative or None,
            source_images=[image_ref]))
    gate = response.get("input_gate")
    if gate:
        gate_alg = hd.sr.AlgorithmIdentification(name="cxr-input-gate", version=version[:64],
                                                 parameters=[f"threshold: {gate.get('threshold')}",
                                                             "research use only: yes"],
                                                 family=CODES["ai"], manufacturer=MANUFACTURER)
        gate_q = [_q(CODES["gate_verdict"], gate_code(str(gate.get("verdict", "unknown")))),
                  _q(CODES["gate_enforced"], CODES["yes"] if gate.get("enforced") else CODES["no"])]
        gate_m = ([_m(CODES["gate_score"], gate["score"], code(NO_UNITS), gate_alg)]
                  if gate.get("score") is not None else None)
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=result_uid(sop, version, "sr", "track-gate"),
                                                         identifier="cxrserve input gate"),
            finding_type=CODES["family_gate"], algorithm_id=gate_alg, measurements=gate_m,
            qualitative_evaluations=gate_q, source_images=[image_ref]))
    if not groups:
        raise NotProcessed("no family section answered: nothing to report", status=500)
    observer = hd.sr.ObserverContext(
        observer_type=Code("121007", "DCM", "Device"),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=result_uid("cxrserve-device", "", "device"), name="cxrserve", manufacturer_name=MANUFACTURER,
            model_name=str(response.get("model", "cxrserve"))[:64]))
    context = hd.sr.ObservationContext(observer_device_context=observer)
    try:  # TID 4020 image library: highdicom needs the projection facts (ImagerPixelSpacing)
        report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=CODES["procedure"],
                                         imaging_measurements=groups, referenced_images=[source])
    except (AttributeError, ValueError, TypeError) as err:  # e.g. a secondary capture of a film
        log.debug("SR without image library: %s", err)
        report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=CODES["procedure"],
                                         imaging_measurements=groups)
    # TID 1500 row 12-14: the Qualitative Evaluations container, here a TEXT item with
    # the research-use statement, so every viewer that renders the SR tree shows it.
    root = report[0]
    text = hd.sr.TextContentItem(name=CODES["research_statement"], value=RESEARCH_NOTICE,
                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container = hd.sr.ContainerContentItem(name=CODES["qualitative_container"],
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence([text])
    root.ContentSequence.append(container)
    sr = hd.sr.ComprehensiveSR(
        evidence=[source], content=report[0], series_instance_uid=result_uid(sop, version, "sr", "series"),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=result_uid(sop, version, "sr"), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
        series_description="AI results (cxrserve) - RESEARCH USE ONLY")
    _add_coding_scheme(sr)
    return sr


def _add_coding_scheme(ds: Dataset) -> None:
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = PRIVATE_SCHEME_NAME
    item.CodingSchemeVersion = PRIVATE_SCHEME_VERSION
    item.CodingSchemeResponsibleOrganization = "cxrserve project (docs/DICOM.md)"
    ds.CodingSchemeIdentificationSequence = DicomSequence([item])


def _pictures(response: dict, segmentations: bool) -> list[tuple[str, str, dict, Picture]]:
    """``(kind, section key, section, picture)`` of the declared result pictures present in the response."""
    from cxrserve import families

    out = []
    for kind, (name, picture) in families.result_pictures().items():
        key = families.get_served(name)[1].key
        section = response["results"].get(key)
        if (picture.segment is not None) == segmentations and _section_ok(section) and section.get(picture.field):
            out.append((kind, key, section, picture))
    return out


# --------------------------------------------------------------------------- SEG
def build_segs(source: Dataset, response: dict) -> list[Dataset]:
    """One binary Segmentation at the source geometry per mask picture present in the response."""
    return [_seg(source, response, kind, key, section, picture)
            for kind, key, section, picture in _pictures(response, segmentations=True)]


def _seg(source: Dataset, response: dict, kind: str, key: str, section: dict, picture: Picture) -> Dataset:
    import highdicom as hd

    segment = picture.segment
    mask = mask_from_png(section[picture.field])
    rows, cols = int(source.Rows), int(source.Columns)
    if mask.shape != (rows, cols):
        raise ValueError(f"{segment.label} mask is {mask.shape[1]}x{mask.shape[0]}, the source image {cols}x{rows}")
    sop = str(source.SOPInstanceUID)
    version = str(response.get("model_version", "unknown"))
    algorithm = hd.AlgorithmIdentificationSequence(
        name=section.get("model", key), family=CODES["ai"],
        version=str(section.get("model_version", "unknown"))[:64],
        parameters={"weights": "demo" if _is_demo(section) else "trained", "research_use_only": "yes"})
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label=segment.label, segmented_property_category=code(segment.category),
        segmented_property_type=code(segment.type), algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=result_uid(sop, version, kind, "track"), tracking_id=segment.tracking_id)
    geometry = source
    if "PixelSpacing" in source and "SliceThickness" not in source:
        # highdicom turns a projection film's PixelSpacing into a Pixel Measures item without
        # the SliceThickness that item needs (its own reader and segread refuse it): the mask is
        # at the source's rows x columns, so the SEG needs no spacing of its own
        import copy

        geometry = copy.copy(source)
        del geometry.PixelSpacing
    seg = hd.seg.Segmentation(
        source_images=[geometry], pixel_array=mask[None].astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[description],
        series_instance_uid=result_uid(sop, version, kind, "series"), series_number=picture.series_number,
        sop_instance_uid=result_uid(sop, version, kind), instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name=str(section.get("model", key)), software_versions=str(section.get("model_version", "unknown"))[:64],
        device_serial_number="0", content_label=segment.content_label, omit_empty_frames=False,
        content_description=segment.content_description, series_description=segment.series_description)
    if "PatientOrientation" not in seg:
        seg.PatientOrientation = list(_orientation(source))
    return seg


# --------------------------------------------------------------------------- SC
def build_heatmaps(source: Dataset, response: dict) -> list[Dataset]:
    """One Secondary Capture per declared picture (not a mask) present in the response."""
    import highdicom as hd

    out = []
    sop = str(source.SOPInstanceUID)
    version = str(response.get("model_version", "unknown"))
    orientation = _orientation(source)
    for kind, key, section, picture in _pictures(response, segmentations=False):
        label = picture.label
        pixels = decode_png(section[picture.field])
        if pixels.ndim == 2:
            pixels = np.stack([pixels] * 3, axis=-1)
        pixels = np.ascontiguousarray(pixels[..., :3].astype(np.uint8))
        what = f"{label} ({section.get('model', key)} {section.get('model_version', '')})".strip()
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source, pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
            coordinate_system="PATIENT", series_instance_uid=result_uid(sop, version, kind, "series"),
            series_number=picture.series_number, sop_instance_uid=result_uid(sop, version, kind), instance_number=1,
            manufacturer=MANUFACTURER, patient_orientation=orientation, transfer_syntax_uid="1.2.840.10008.1.2.1",
            series_description=f"AI {label} - RESEARCH USE ONLY"[:64])
        sc.ImageComments = f"{what}. {RESEARCH_NOTICE}"[:10240]
        sc.DerivationDescription = f"{label}: AI explanation map over the source image"[:1024]
        sc.BurnedInAnnotation = "NO"
        sc.BodyPartExamined = str(source.get("BodyPartExamined", "") or "CHEST")  # unpaired: no Laterality
        sc.ImageType = ["DERIVED", "SECONDARY"]
        sc.ConversionType = "WSD"
        src = Dataset()
        src.ReferencedSOPClassUID = source.SOPClassUID
        src.ReferencedSOPInstanceUID = source.SOPInstanceUID
        sc.SourceImageSequence = DicomSequence([src])
        out.append(sc)
    return out


# --------------------------------------------------------------------------- all
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


def _orientation(source: Dataset) -> tuple[str, str]:
    """Source PatientOrientation, else the conventional display of a frontal CXR (rows to the
    patient's left, columns to the feet)."""
    value = source.get("PatientOrientation")
    return (str(value[0]), str(value[1])) if value and len(value) == 2 else ("L", "F")


def build_results(source: Dataset, response: dict) -> list[Dataset]:
    """SR, SEG and heatmap SCs for one source instance; raises :class:`NotProcessed` for a 4xx."""
    reason = not_processed_reason(response)
    if reason is not None:
        raise NotProcessed(reason, int(response.get("status") or 422))
    source = clean_source(source)
    objects = [build_sr(source, response)]
    objects.extend(build_segs(source, response))
    objects.extend(build_heatmaps(source, response))
    return objects


def kind_of(ds: Dataset) -> str:
    """The result kind of an object made here (from its Series Number)."""
    for kind, number in series_numbers().items():
        if int(ds.get("SeriesNumber", 0) or 0) == number:
            return kind
    return "unknown"


def write_results(objects: list[Dataset], out_dir: str | Path, *, fsync: bool = False) -> list[Path]:
    """Write each object as ``<kind>.dcm`` under ``out_dir`` (atomically; optionally fsynced)."""
    import os

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in objects:
        path = out_dir / f"{kind_of(ds)}.dcm"
        tmp = path.with_suffix(".tmp")
        # 0600: result objects carry the patient's name, ID and birth date
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        paths.append(path)
    if fsync:
        fd = os.open(out_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return paths
