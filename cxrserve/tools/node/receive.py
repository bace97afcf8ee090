"""The node's Storage SCP: who may associate, and what is acknowledged.

C-STORE success is answered only for an instance that is fsynced to the spool *and* that
the node can process (:meth:`Node.can_keep`); everything else gets a refusal status so
the sender keeps it. Data sets arrive in a temporary file (pynetdicom's chunked
receive), are size-checked, and a deflated one is inflated with a byte cap
(:mod:`cxrserve.core.bounded`) before its header is read.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

import pydicom

from cxrserve.core.bounded import DECODABLE_TRANSFER_SYNTAXES, inflate_dataset
from cxrserve.core.errors import PayloadTooLarge
from cxrserve.core.input_checks import RADIOGRAPH_SOP_CLASSES
from cxrserve.tools.node.spoolfiles import fsync_dir, private_write

log = logging.getLogger(__name__)

#: What the node negotiates: exactly what the scorer's decoder takes (one list each).
ACCEPTED_SOP_CLASSES = RADIOGRAPH_SOP_CLASSES
TRANSFER_SYNTAXES = list(DECODABLE_TRANSFER_SYNTAXES)

# C-STORE / C-ECHO statuses (PS3.4 B.2.3, PS3.7 C)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700      # refused: the sender keeps the instance and retries
CANNOT_UNDERSTAND = 0xC000
DUPLICATE_INSTANCE = 0x0111
PROCESSING_FAILURE = 0x0110


def sop_hash(uid: str) -> str:
    """sha256 of the SOP Instance UID, first 16 hex (as ``cxrserve batch`` keys DICOM inputs)."""
    return hashlib.sha256(str(uid).encode("utf-8")).hexdigest()[:16]


def _server_class(node: "StorageSCP"):
    """pynetdicom's threaded server with a per-address connection limit, checked on accept
    (before an association thread exists), so one host's idle sockets cannot take every
    association slot from the modalities."""
    from pynetdicom.transport import ThreadedAssociationServer

    class PerPeerLimitedServer(ThreadedAssociationServer):
        def verify_request(self, request, client_address) -> bool:
            peer = client_address[0]
            open_now = sum(1 for a in self.active_associations
                           if getattr(a.requestor.address_info, "address", None) == peer)
            if open_now >= node.cfg.associations.per_peer:
                node.audit.write_limited(("connection", peer), {
                    "event": "connection_refused", "peer": peer,
                    "reason": f"more than {node.cfg.associations.per_peer} open connections from this address"},
                    node.cfg.associations.audit_every_s)
                return False
            return True

    return PerPeerLimitedServer


def identity_of(ds) -> str:
    """What makes an instance that instance, hashed: a resend matches, a reused UID does not."""
    parts = [str(ds.get(k, "") or "") for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID",
                                                 "PatientID", "Rows", "Columns")]
    return hashlib.sha256("\x00".join(parts).encode("utf-8", "replace")).hexdigest()[:16]


class StorageSCP:
    """The association server of one :class:`~cxrserve.tools.node.service.Node`."""

    def __init__(self, node):
        self.node = node
        self.server = None

    def start(self) -> None:
        from pynetdicom import _config

        _config.STORE_RECV_CHUNKED_DATASET = True  # received data sets go to a file, not memory
        ae, handlers = self.application_entity()
        cfg = self.node.cfg
        # start_server(block=False) as pynetdicom does it, with the per-peer limited server class
        self.server = ae.make_server((cfg.host, cfg.port), evt_handlers=handlers, server_class=_server_class(self.node))
        threading.Thread(target=self.server.serve_forever, name="cxrserve-node-acceptor", daemon=True).start()
        ae._servers.append(self.server)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()

    def application_entity(self):
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import Verification

        a = self.node.cfg.associations
        ae = AE(ae_title=self.node.cfg.ae_title)
        ae.require_calling_aet = list(self.node.cfg.allowed_calling_aes)
        ae.require_called_aet = a.require_called_aet
        ae.add_supported_context(Verification)
        for uid in ACCEPTED_SOP_CLASSES:
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        ae.maximum_associations = a.maximum
        ae.acse_timeout = a.acse_timeout_s
        ae.network_timeout = a.network_timeout_s
        handlers = [(evt.EVT_C_STORE, self.on_store), (evt.EVT_C_ECHO, self.on_echo),
                    (evt.EVT_REJECTED, self.on_rejected)]
        return ae, handlers

    def on_echo(self, event) -> int:
        return SUCCESS if self.node.can_keep() is None else PROCESSING_FAILURE

    def on_rejected(self, event) -> None:
        assoc = event.assoc
        calling = str(getattr(assoc.requestor, "ae_title", "")).strip()
        called = str(getattr(assoc.acceptor, "ae_title", "") or "").strip()
        requested = ""
        primitive = getattr(assoc.requestor, "primitive", None)
        if primitive is not None:
            requested = str(getattr(primitive, "called_ae_title", "") or "").strip()
        if calling not in [a.strip() for a in self.node.cfg.allowed_calling_aes]:
            reason = "calling AE title not in allowed_calling_aes"
        elif self.node.cfg.associations.require_called_aet and requested and requested != called:
            reason = "called AE title is not this node's ae_title"
        else:
            reason = f"association limit reached ({self.node.cfg.associations.maximum})"
        peer = getattr(assoc.requestor.address_info, "address", "") if assoc.requestor.address_info else ""
        # AE titles and addresses name systems, not patients
        record = {"event": "association_refused", "calling_ae": calling, "peer": peer, "reason": reason}
        if requested and requested != called:
            record["called_ae"] = requested
        self.node.audit.write_limited(("assoc", peer, calling, reason), record, self.node.cfg.associations.audit_every_s)

    def _refuse(self, status: int, reason: str) -> int:
        self.node.audit.write_limited(("store", reason), {"event": "store_refused", "status": f"0x{status:04X}",
                                                     "reason": reason}, self.node.cfg.associations.audit_every_s)
        log.warning("C-STORE refused: %s", reason)
        return status

    def on_store(self, event) -> int:
        try:
            return self._store(event)
        except Exception as err:  # noqa: BLE001 - never success for what was not kept
            log.error("C-STORE failed: %s", type(err).__name__)
            return OUT_OF_RESOURCES

    def _store(self, event) -> int:
        start = time.perf_counter()
        received = Path(event.dataset_path)
        size = received.stat().st_size
        if size > self.node.cfg.max_dataset_bytes + 65536:  # + the file meta pynetdicom wrote before it
            return self._refuse(OUT_OF_RESOURCES, f"data set over max_dataset_bytes ({self.node.cfg.max_dataset_bytes})")
        problem = self.node.can_keep(size)
        if problem:
            return self._refuse(OUT_OF_RESOURCES, problem)
        data = received.read_bytes()
        try:
            data = inflate_dataset(data, self.node.cfg.max_dataset_bytes)  # deflated: bounded, stored inflated
        except PayloadTooLarge:
            return self._refuse(OUT_OF_RESOURCES, f"inflated data set over max_dataset_bytes "
                                                  f"({self.node.cfg.max_dataset_bytes})")
        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            uid = str(ds.get("SOPInstanceUID", "") or "").strip()
        except Exception as err:  # noqa: BLE001 - an unreadable header: refuse, the sender keeps it
            return self._refuse(CANNOT_UNDERSTAND, f"unreadable data set ({type(err).__name__})")
        if not uid:
            return self._refuse(CANNOT_UNDERSTAND, "no SOP Instance UID")
        key, identity = sop_hash(uid), identity_of(ds)
        known = self.node.state.get(key)
        if known is not None and known.identity and known.identity != identity:
            return self._refuse(DUPLICATE_INSTANCE, "SOP Instance UID already used by a different instance")
        if known is not None and known.status != "failed":
            return SUCCESS  # a resend of an instance already spooled: one result set per instance
        path = self.node.incoming / f"{key}.dcm"
        tmp = self.node.incoming / f"{key}.part"
        try:
            private_write(tmp, data)
            os.replace(tmp, path)
            fsync_dir(self.node.incoming)
            if known is not None:  # a resend of a failed instance: try it again from the start
                self.node.state.requeue(key)
            else:
                calling = str(getattr(event.assoc.requestor, "ae_title", "") or "")
                self.node.state.add(key, identity, self.node.site_of(calling))
            self.node.state.set_timings(key, json.dumps({"spool_ms": round(1000 * (time.perf_counter() - start), 1)}))
        except (OSError, sqlite3.Error) as err:
            log.error("spooling failed: %s", type(err).__name__)
            return OUT_OF_RESOURCES
        self.node.wake.set()
        return SUCCESS
