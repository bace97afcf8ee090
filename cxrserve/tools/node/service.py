"""The DICOM node: Storage SCP -> durable spool -> scoring -> result objects -> destinations.

Guarantees:

* **nothing acknowledged is lost**: a received instance is written to
  ``spool/incoming/<hash>.dcm`` and the file and its folder are fsynced before the
  C-STORE success status is returned; a failure to spool answers 0xA700 (out of
  resources) so the sender keeps it and retries;
* **refused at association**: calling AE titles not in ``allowed_calling_aes``
  (pynetdicom's ``require_calling_aet``); only CR, DX (for presentation and for
  processing), SC and Verification are negotiated, so a CT is refused by the sender's
  presentation context;
* **finished after a crash**: on start, every spooled or scored instance without its
  deliveries is picked up again (spooled files without a state row too);
* **delivered once**: each destination of an instance is marked delivered in the state
  file as soon as its send succeeds and never sent again; the result UIDs are derived
  from the source SOP UID and model version, so the only possible resend (a crash
  between the PACS's success and that commit) lands on the same SOP Instance UIDs and
  the PACS keeps one copy.
* **audit**: one JSON line per instance in the audit log when it reaches a final
  state (``done``, ``not_processed`` with the reason, ``failed``): hashed SOP UID,
  outcome, destinations, timings; never a patient identifier or a clear UID.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path

import pydicom

from cxrserve.tools.dicom_results import NotProcessed, build_results, not_processed_reason, write_results
from cxrserve.tools.node.config import NodeConfig
from cxrserve.tools.node.state import State

log = logging.getLogger(__name__)

ACCEPTED_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR",
    "1.2.840.10008.5.1.4.1.1.1.1": "DX for presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DX for processing",
    "1.2.840.10008.5.1.4.1.1.7": "SC",
}
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.1.99",
]


def sop_hash(uid: str) -> str:
    """sha256 of the SOP Instance UID, first 16 hex (as ``cxrserve batch`` keys DICOM inputs)."""
    return hashlib.sha256(str(uid).encode("utf-8")).hexdigest()[:16]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AuditLog:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.lock = threading.Lock()
        if path.exists() and path.stat().st_size:
            with open(path, "rb+") as fh:  # a line torn by a crash stays alone on its line
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")

    def logged_outcomes(self) -> set[tuple[str, str]]:
        """(instance, outcome) pairs already in the log (read at start-up only)."""
        out = set()
        if self.path.exists():
            with open(self.path, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a torn last line from a crash
                    if record.get("event") == "instance":
                        out.add((record.get("instance"), record.get("outcome")))
        return out

    def write(self, record: dict) -> None:
        line = json.dumps({"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **record}, sort_keys=True)
        with self.lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())


class Node:
    def __init__(self, cfg: NodeConfig, scorer=None):
        self.cfg = cfg
        self.incoming = cfg.spool / "incoming"
        self.results = cfg.spool / "results"
        for folder in (self.incoming, self.results):
            folder.mkdir(parents=True, exist_ok=True)
        self.state = State(cfg.spool / "state.sqlite")
        self.audit = AuditLog(cfg.audit_path)
        self._scorer = scorer
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self.server = None
        self.worker = None

    # ------------------------------------------------------------------ SCP
    def _ae(self):
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.cfg.ae_title)
        ae.require_calling_aet = list(self.cfg.allowed_calling_aes)
        ae.add_supported_context(Verification)
        for uid in ACCEPTED_SOP_CLASSES:
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        ae.maximum_associations = 8
        handlers = [(evt.EVT_C_STORE, self.on_store), (evt.EVT_C_ECHO, lambda event: 0x0000),
                    (evt.EVT_REJECTED, self.on_rejected)]
        return ae, handlers

    def on_rejected(self, event) -> None:
        calling = str(getattr(event.assoc.requestor, "ae_title", "")).strip()
        # An AE title is not a patient identifier; it names the refused sender.
        self.audit.write({"event": "association_refused", "calling_ae": calling,
                          "reason": "calling AE title not in allowed_calling_aes"})

    def on_store(self, event) -> int:
        start = time.perf_counter()
        try:
            ds = event.dataset
            uid = str(ds.SOPInstanceUID)
        except Exception:  # noqa: BLE001 - an undecodable header: refuse, the sender keeps it
            log.warning("C-STORE with an unreadable data set refused")
            return 0xC000
        key = sop_hash(uid)
        known = self.state.get(key)
        if known is not None and known.status != "failed":
            return 0x0000  # a resend of an instance already spooled: one result set per instance
        path = self.incoming / f"{key}.dcm"
        tmp = self.incoming / f"{key}.part"
        try:
            with open(tmp, "wb") as fh:
                fh.write(event.encoded_dataset(include_meta=True))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            _fsync_dir(self.incoming)
            if known is not None:  # a resend of a failed instance: try it again from the start
                self.state.requeue(key)
            else:
                self.state.add(key)
            self.state.set_timings(key, json.dumps({"spool_ms": round(1000 * (time.perf_counter() - start), 1)}))
        except OSError as err:
            log.error("spooling failed: %s", err.strerror)
            return 0xA700
        self.wake.set()
        return 0x0000

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.recover()
        ae, handlers = self._ae()
        self.server = ae.start_server((self.cfg.host, self.cfg.port), block=False, evt_handlers=handlers)
        self.worker = threading.Thread(target=self._work, name="cxrserve-node-worker", daemon=True)
        self.worker.start()
        log.info("DICOM node %s listening on %s:%d (allowed callers: %s)", self.cfg.ae_title, self.cfg.host,
                 self.cfg.port, ", ".join(self.cfg.allowed_calling_aes))

    def stop(self) -> None:
        self.stop_event.set()
        self.wake.set()
        if self.server is not None:
            self.server.shutdown()
        if self.worker is not None:
            self.worker.join(timeout=300)
        self.state.close()

    def recover(self) -> None:
        """Register spooled files without a state row (a crash between fsync and commit)."""
        for path in sorted(self.incoming.glob("*.dcm")):
            if self.state.add(path.stem):
                log.info("recovered spooled instance %s", path.stem)
        for part in self.incoming.glob("*.part"):
            part.unlink(missing_ok=True)  # never acknowledged: the sender still has it
        unaudited = self.state.unaudited_final()
        if unaudited:  # a crash between the audit line and its flag: never write the line twice
            logged = self.audit.logged_outcomes()
            for inst in unaudited:
                if (f"sha256:{inst.sop_hash}", inst.status) in logged:
                    self.state.mark_audited(inst.sop_hash)
                else:
                    self._audit_final(inst.sop_hash)

    @property
    def scorer(self):
        if self._scorer is None:
            from cxrserve.tools.node.scoring import make_scorer

            self._scorer = make_scorer(self.cfg.scorer)
        return self._scorer

    # ------------------------------------------------------------------ worker
    def _work(self) -> None:
        try:
            self.scorer  # load models before the first instance
        except Exception:
            log.exception("scorer failed to load; instances stay spooled")
        while not self.stop_event.is_set():
            busy = False
            for inst in self.state.due("scored"):
                busy = True
                self.deliver(inst.sop_hash)
                if self.stop_event.is_set():
                    return
            for inst in self.state.due("spooled", limit=1):
                busy = True
                self.process(inst.sop_hash)
                if self.stop_event.is_set():
                    return
            if not busy:
                self.wake.wait(self.cfg.poll_s)
                self.wake.clear()

    def _timings(self, key: str) -> dict:
        inst = self.state.get(key)
        try:
            return json.loads(inst.timings) if inst else {}
        except json.JSONDecodeError:
            return {}

    def process(self, key: str) -> None:
        """Score one spooled instance and write its result objects (durably); or record why not."""
        path = self.incoming / f"{key}.dcm"
        timings = self._timings(key)
        try:
            data = path.read_bytes()
            source = pydicom.dcmread(path, stop_before_pixels=True)
        except (OSError, pydicom.errors.InvalidDicomError) as err:
            self._final(key, "failed", f"spooled file unreadable: {err}", timings)
            return
        prior = None
        if self.cfg.query_retrieve is not None:
            t0 = time.perf_counter()
            try:
                from cxrserve.tools.node.dimse import find_prior

                found = find_prior(source, self.cfg.query_retrieve, self.cfg.ae_title)
                prior = found.data if found else None
                timings["prior"] = "found" if found else "none"
            except Exception as err:  # noqa: BLE001 - a PACS query failure must not block scoring
                log.warning("prior lookup failed: %s", err)
                timings["prior"] = "lookup failed"
            timings["prior_ms"] = round(1000 * (time.perf_counter() - t0), 1)
        t0 = time.perf_counter()
        try:
            response = self.scorer.score(data, prior)
        except Exception as err:  # noqa: BLE001 - transient: retry with back-off
            self._retry(key, f"scoring unavailable: {err}")
            return
        timings["score_ms"] = round(1000 * (time.perf_counter() - t0), 1)
        reason = not_processed_reason(response)
        if reason is not None:
            self._final(key, "not_processed", reason, timings)
            return
        t0 = time.perf_counter()
        try:
            objects = build_results(source, response)
        except NotProcessed as err:
            self._final(key, "not_processed", err.reason, timings)
            return
        except Exception as err:  # noqa: BLE001 - a response we cannot encode: kept for an operator
            log.exception("building result objects failed")
            self._final(key, "failed", f"building result objects: {type(err).__name__}: {err}", timings)
            return
        write_results(objects, self.results / key, fsync=True)
        timings["build_ms"] = round(1000 * (time.perf_counter() - t0), 1)
        timings["objects"] = len(objects)
        self.state.set_status(key, "scored", timings=json.dumps(timings),
                              destinations=[d.name for d in self.cfg.destinations])
        self.deliver(key)

    def _retry(self, key: str, reason: str) -> None:
        inst = self.state.get(key)
        attempts = self.state.retry_later(key, self.cfg.retry.delay(inst.attempts + 1), reason)
        log.warning("instance %s: %s (try %d of %d)", key, reason, attempts, self.cfg.retry.attempts)
        if attempts >= self.cfg.retry.attempts:
            self._final(key, "failed", reason, self._timings(key))

    def deliver(self, key: str) -> None:
        folder = self.results / key
        objects = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
        timings = self._timings(key)
        by_name = {d.name: d for d in self.cfg.destinations}
        failures = []
        for name, attempts in self.state.pending_deliveries(key):
            dest = by_name.get(name)
            if dest is None:
                failures.append(f"{name}: no longer configured")
                continue
            t0 = time.perf_counter()
            try:
                from cxrserve.tools.node.dimse import deliver

                deliver(objects, dest, self.cfg.ae_title)
            except Exception as err:  # noqa: BLE001 - retried with back-off
                n = self.state.delivery_failed(key, name, str(err))
                failures.append(f"{name}: {err}")
                log.warning("instance %s: delivery to %s failed (try %d): %s", key, name, n, err)
                if n >= self.cfg.retry.attempts:
                    self._final(key, "failed", "; ".join(failures), timings)
                    return
                continue
            self.state.delivered(key, name)
            timings[f"deliver_{name}_ms"] = round(1000 * (time.perf_counter() - t0), 1)
        if failures:
            pending = self.state.pending_deliveries(key)
            attempts = max((a for _, a in pending), default=1)
            self.state.set_timings(key, json.dumps(timings))
            self.state.retry_later(key, self.cfg.retry.delay(attempts), "; ".join(failures))
            return
        self._final(key, "done", "", timings)

    def _final(self, key: str, status: str, reason: str, timings: dict) -> None:
        self.state.set_status(key, status, reason=reason, timings=json.dumps(timings))
        if not self.cfg.keep_spooled_images and status in ("done", "not_processed"):
            (self.incoming / f"{key}.dcm").unlink(missing_ok=True)
        self._audit_final(key)

    def _audit_final(self, key: str) -> None:
        inst = self.state.get(key)
        if inst is None:
            return
        try:
            timings = json.loads(inst.timings)
        except json.JSONDecodeError:
            timings = {}
        record = {"event": "instance", "instance": f"sha256:{key}", "outcome": inst.status,
                  "deliveries": self.state.deliveries(key), "timings": timings,
                  "total_s": round(time.time() - inst.received, 3)}
        if inst.reason:
            record["reason"] = inst.reason
        self.audit.write(record)
        self.state.mark_audited(key)


def run(cfg: NodeConfig, scorer=None) -> int:
    """Run until SIGTERM/SIGINT; in-flight work finishes its current step first."""
    import signal

    logging.getLogger("highdicom").setLevel(logging.WARNING)  # it logs every copied module at INFO
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    node = Node(cfg, scorer)
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    node.start()
    print(f"cxrserve node {cfg.ae_title} on {cfg.host}:{cfg.port}; spool {cfg.spool}", flush=True)
    while not stop.wait(1.0):
        pass
    node.stop()
    print("cxrserve node stopped", flush=True)
    return 0
