"""Network legs of the node: C-STORE and STOW-RS delivery, prior lookup (C-FIND + C-GET)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from pydicom.dataset import Dataset

from cxrserve.tools.node.config import Destination, QueryRetrieve

log = logging.getLogger(__name__)

#: C-STORE statuses that mean "stored" (0x0000 success; 0xB000/0xB006/0xB007 warnings: stored with coercion).
STORED = {0x0000, 0xB000, 0xB006, 0xB007}
FRONTAL = {"PA", "AP", ""}
PRIOR_MODALITIES = {"CR", "DX"}


class DeliveryError(RuntimeError):
    pass


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
    client = DICOMwebClient(url=dest.url, **kwargs)
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


def find_prior(source: Dataset, qr: QueryRetrieve, calling_ae: str) -> Prior | None:
    """The patient's most recent earlier frontal CR/DX image, by C-FIND then C-GET, or None.

    "Earlier" is (StudyDate, StudyTime) before the source's study, another Study
    Instance UID; the study must list CR or DX in ModalitiesInStudy. Within it, the
    first CR/DX instance with a frontal (or absent) ViewPosition that is not one of the
    node's own results is taken.
    """
    from io import BytesIO

    from pynetdicom import build_role, evt
    from pynetdicom.sop_class import (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
                                      DigitalXRayImageStorageForProcessing, PatientRootQueryRetrieveInformationModelFind,
                                      PatientRootQueryRetrieveInformationModelGet, SecondaryCaptureImageStorage)

    patient_id = str(source.get("PatientID", "") or "")
    if not patient_id:
        return None
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

    def on_store(event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        got.append(ds)
        return 0x0000

    assoc = ae.associate(qr.host, qr.port, ae_title=qr.ae_title, ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    if not assoc.is_established:
        raise DeliveryError(f"query/retrieve association with {qr.ae_title}@{qr.host}:{qr.port} not established")
    try:
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.PatientID = patient_id
        q.StudyInstanceUID = ""
        q.StudyDate = f"-{current[0]}"
        q.StudyTime = ""
        q.ModalitiesInStudy = ""
        studies = []
        for ident in _find(assoc, q, PatientRootQueryRetrieveInformationModelFind):
            uid = str(ident.get("StudyInstanceUID", ""))
            when = (str(ident.get("StudyDate", "") or ""), str(ident.get("StudyTime", "") or ""))
            mods = _values(ident.get("ModalitiesInStudy"))
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
                        buf = BytesIO()
                        ds.save_as(buf, enforce_file_format=True)
                        return Prior(buf.getvalue(), str(series.get("StudyDate", "") or ""))
        return None
    finally:
        assoc.release()
