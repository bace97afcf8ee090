"""Network legs of the node: C-STORE and STOW-RS delivery, prior lookup (C-FIND + C-GET)."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from cxrserve.tools.node.config import Destination, QueryRetrieve

log = logging.getLogger(__name__)

#: C-STORE statuses that mean "stored" (0x0000 success; 0xB000/0xB006/0xB007 warnings: stored with coercion).
STORED = {0x0000, 0xB000, 0xB006, 0xB007}
FRONTAL = {"PA", "AP", ""}
PRIOR_MODALITIES = {"CR", "DX"}


class DeliveryError(RuntimeError):
    pass


class PriorSkipped(Exception):
    """No prior is looked up or used, for a reason the audit log records (never a value)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


#: Characters that C-FIND treats as matching syntax in a PatientID (PS3.4 C.2.2.2): "*"
#: and "?" are wildcards, "\\" separates values (a list match). No escape exists, so an
#: identifier holding one can only be refused, never sent.
QUERY_SPECIAL = set("*?\\")


def query_safe_id(value, what: str) -> str:
    """``value`` if it can be sent as a single-value, exact-match query key, else PriorSkipped."""
    if isinstance(value, Sequence) and not isinstance(value, str):  # pydicom's MultiValue: "A\\B" parsed into two values
        raise PriorSkipped(f"{what} holds several values: a query would match other patients")
    value = "" if value is None else str(value)
    if not value.strip():
        raise PriorSkipped(f"no {what}")
    if QUERY_SPECIAL & set(value):
        raise PriorSkipped(f"{what} holds wildcard or multi-value characters: a query would match other patients")
    return value


def _norm(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip().upper()


def same_patient(source: Dataset, prior: Dataset) -> str | None:
    """None when ``prior`` is the source's patient, else what differs (a field name, no value).

    PatientID must be equal; IssuerOfPatientID, PatientBirthDate and PatientSex must be
    equal wherever both carry them (an ID is unique only within its issuer, and a PACS
    holding two hospitals' records can repeat one).
    """
    if str(prior.get("PatientID", "") or "") != str(source.get("PatientID", "") or ""):
        return "PatientID"
    for keyword in ("IssuerOfPatientID", "PatientBirthDate", "PatientSex"):
        a, b = _norm(source, keyword), _norm(prior, keyword)
        if a and b and a != b:
            return keyword
    return None


def _ae(ae_title: str, timeout: float):
    from pynetdicom import AE

    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    return ae


def cstore(objects: list[Dataset], dest: Destination, calling_ae: str) -> None:
    """Send every object in one association; raises DeliveryError unless all are stored."""
    ae = _ae(calling_ae, dest.timeout_s)
    for uid in sorted({str(ds.SOPClassUID) for ds in objects}):
        ae.add_requested_context(uid, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    assoc = ae.associate(dest.host, int(dest.port), ae_title=dest.ae_title)
    if not assoc.is_established:
        raise DeliveryError(f"association with {dest.ae_title}@{dest.host}:{dest.port} not established")
    try:
        for ds in objects:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code not in STORED:
                raise DeliveryError(f"C-STORE of a {ds.Modality} object answered "
                                    f"{'no status' if code is None else hex(code)}")
    finally:
        assoc.release()


def stowrs(objects: list[Dataset], dest: Destination) -> None:
    from dicomweb_client.api import DICOMwebClient
    from requests import HTTPError, RequestException

    kwargs = {}
    if dest.username:
        import requests

        session = requests.Session()
        session.auth = (dest.username, dest.password)
        kwargs["session"] = session
    # the destination's own timeout (dicomweb-client's default is 20 s whatever was configured)
    client = DICOMwebClient(url=dest.url, timeout=dest.timeout_s, **kwargs)
    client.set_http_retry_params(retry=False)
    try:
        client.store_instances(objects)
    except (HTTPError, RequestException, OSError) as err:
        raise DeliveryError(f"STOW-RS to {dest.name}: {err}") from err


def deliver(objects: list[Dataset], dest: Destination, calling_ae: str) -> None:
    if dest.kind == "cstore":
        cstore(objects, dest, calling_ae)
    else:
        stowrs(objects, dest)


# --------------------------------------------------------------------------- priors
@dataclass
class Prior:
    data: bytes
    study_date: str


def _find(assoc, query: Dataset, model) -> list[Dataset]:
    out = []
    for status, identifier in assoc.send_c_find(query, model):
        if status and status.Status in (0xFF00, 0xFF01) and identifier is not None:
            out.append(identifier)
    return out


def _values(value) -> set[str]:
    """A CS value as a set: one value comes back as a str, several as a MultiValue."""
    if value is None or value == "":
        return set()
    if isinstance(value, str):
        return {v for v in value.split("\\") if v}
    return {str(v) for v in value}


def find_prior(source: Dataset, qr: QueryRetrieve, calling_ae: str, max_bytes: int = 64 * 2**20) -> Prior | None:
    """The patient's most recent earlier frontal CR/DX image, by C-FIND then C-GET, or None.

    "Earlier" is (StudyDate, StudyTime) before the source's study, another Study
    Instance UID; the study must list CR or DX in ModalitiesInStudy. Within it, the
    first CR/DX instance with a frontal (or absent) ViewPosition that is not one of the
    node's own results, and that is the same patient (:func:`same_patient`), is taken.

    Raises :class:`PriorSkipped` when the source's identifiers cannot be queried safely
    (wildcards, several values) or every candidate belongs to someone else.
    """
    from io import BytesIO

    from pynetdicom import build_role, evt
    from pynetdicom.sop_class import (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
                                      DigitalXRayImageStorageForProcessing, PatientRootQueryRetrieveInformationModelFind,
                                      PatientRootQueryRetrieveInformationModelGet, SecondaryCaptureImageStorage)

    patient_id = query_safe_id(source.get("PatientID"), "PatientID")
    issuer = source.get("IssuerOfPatientID")
    issuer = query_safe_id(issuer, "IssuerOfPatientID") if issuer not in (None, "") else ""
    current = (str(source.get("StudyDate", "") or ""), str(source.get("StudyTime", "") or ""))
    if not current[0]:
        return None
    ae = _ae(calling_ae, qr.timeout_s)
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelGet)
    storage = [ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
               DigitalXRayImageStorageForProcessing, SecondaryCaptureImageStorage]
    for uid in storage:
        ae.add_requested_context(uid)
    roles = [build_role(uid, scp_role=True) for uid in storage]
    got: list[Dataset] = []
    mismatch: list[str] = []

    def on_store(event):
        from cxrserve.core.bounded import dcmread

        try:  # the node receives into a file (chunked); a deflated prior is inflated with a cap
            raw = Path(event.dataset_path).read_bytes()
        except AttributeError:
            raw = event.encoded_dataset(include_meta=True)
        try:
            got.append(dcmread(raw, max_bytes=max_bytes))
        except Exception as err:  # noqa: BLE001 - a prior we cannot read is no prior
            log.warning("prior instance refused (%s)", type(err).__name__)
            return 0xA700
        return 0x0000

    assoc = ae.associate(qr.host, qr.port, ae_title=qr.ae_title, ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    if not assoc.is_established:
        raise DeliveryError(f"query/retrieve association with {qr.ae_title}@{qr.host}:{qr.port} not established")
    try:
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.PatientID = patient_id
        if issuer:
            q.IssuerOfPatientID = issuer
        q.StudyInstanceUID = ""
        q.StudyDate = f"-{current[0]}"
        q.StudyTime = ""
        q.ModalitiesInStudy = ""
        studies = []
        for ident in _find(assoc, q, PatientRootQueryRetrieveInformationModelFind):
            uid = str(ident.get("StudyInstanceUID", ""))
            when = (str(ident.get("StudyDate", "") or ""), str(ident.get("StudyTime", "") or ""))
            mods = _values(ident.get("ModalitiesInStudy"))
            if "PatientID" in ident and str(ident.PatientID or "") != patient_id:
                mismatch.append("PatientID")  # a PACS that matched loosely: never this patient's study
                continue
            if uid and uid != str(source.StudyInstanceUID) and when < current and (not mods or mods & PRIOR_MODALITIES):
                studies.append((when, uid))
        for _, study_uid in sorted(studies, reverse=True):
            s = Dataset()
            s.QueryRetrieveLevel = "SERIES"
            s.PatientID = patient_id
            s.StudyInstanceUID = study_uid
            s.SeriesInstanceUID = ""
            s.Modality = ""
            s.SeriesNumber = ""
            for series in _find(assoc, s, PatientRootQueryRetrieveInformationModelFind):
                if str(series.get("Modality", "")) not in PRIOR_MODALITIES:
                    continue
                g = Dataset()
                g.QueryRetrieveLevel = "SERIES"
                g.PatientID = patient_id
                g.StudyInstanceUID = study_uid
                g.SeriesInstanceUID = series.SeriesInstanceUID
                got.clear()
                for _status, _ident in assoc.send_c_get(g, PatientRootQueryRetrieveInformationModelGet):
                    pass
                for ds in got:
                    view = str(ds.get("ViewPosition", "") or "").upper()
                    if view in FRONTAL and str(ds.get("Manufacturer", "")) != "cxrserve":
                        differs = same_patient(source, ds)
                        if differs:
                            mismatch.append(differs)
                            continue
                        buf = BytesIO()
                        ds.save_as(buf, enforce_file_format=True)
                        return Prior(buf.getvalue(), str(series.get("StudyDate", "") or ""))
        if mismatch:
            raise PriorSkipped(f"candidate priors belong to another patient ({', '.join(sorted(set(mismatch)))} "
                               "differs)")
        return None
    finally:
        assoc.release()
