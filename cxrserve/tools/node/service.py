"""The DICOM node: Storage SCP -> durable spool -> scoring -> result objects -> destinations.

Guarantees:

* **nothing acknowledged is lost**: a received instance is written to
  ``spool/incoming/<hash>.dcm`` and the file and its folder are fsynced before the
  C-STORE success status is returned. Success is answered only while the node can keep
  it: a worker is running, the spool and results folders can be written, the file
  system keeps ``min_free_bytes`` and the data set is at most ``max_dataset_bytes``
  (a deflated one inflated with that cap, :mod:`cxrserve.core.bounded`); otherwise
  0xA700 (out of resources), so the sender keeps it and retries. Data sets are received
  into a temporary file (pynetdicom's chunked receive), never whole in memory;
* **one worker that cannot die silently**: any failure while processing or delivering an
  instance goes to that instance (retried with back-off when it can pass, ``failed``
  with the exception type when it cannot); a dead worker is restarted by a supervisor,
  and while none runs C-STORE is refused and C-ECHO answers 0x0110 (processing failure);
  ``spool/health.json`` says the same for ``cxrserve node status``;
* **refused at association**: calling AE titles not in ``allowed_calling_aes``
  (pynetdicom's ``require_calling_aet``), called AE titles other than ``ae_title``
  (``require_called_aet``); at most ``associations.per_peer`` open connections from one
  address and an A-ASSOCIATE-RQ within ``acse_timeout_s``, so idle sockets cannot hold
  every slot; each refusal is audited with its real reason, repeated ones once a period;
* **only what the decoder reads**: the radiograph SOP classes of
  :mod:`cxrserve.core.input_checks` and the transfer syntaxes of
  :mod:`cxrserve.core.bounded` (one list each, shared with the scorer), so a CT is
  refused by the sender's presentation context and a JPEG-LS CR is taken;
* **one instance per UID**: a resend of an instance is acknowledged once; a *different*
  instance with a SOP Instance UID already used (another study, series, patient or
  matrix), or with none, is refused (0x0111 / 0xC000) with an audit line;
* **finished after a crash**: on start, every spooled or scored instance without its
  deliveries is picked up again (spooled files without a state row too);
* **delivered once**: each destination of an instance (PACS, HL7 MLLP, FHIR) has its own
  state row, written before the first send, with its own retries and back-off; it is
  marked delivered as soon as its send succeeds (C-STORE success, an ACK AA/CA, a
  transaction-response of 200/201s) and never sent again; the result UIDs, the HL7
  message control ID and the FHIR identifiers are derived from the source SOP UID and
  model version, so the only possible resend (a crash between the receiver's success and
  that commit) lands on the same SOP Instance UIDs (the PACS keeps one copy), carries the
  same MSH-10 (the receiver sees a duplicate) and the same conditional creates
  (``ifNoneExist``: the FHIR server creates nothing twice). The HL7 and FHIR messages are
  written and fsynced with the objects before the instance is ``scored`` (docs/HL7_FHIR.md).
* **audit**: one JSON line per instance in the audit log when it reaches a final
  state (``done``, ``not_processed`` with the reason, ``failed``): hashed SOP UID,
  outcome, destinations, timings; never a patient identifier or a clear UID, and for
  errors the exception type with a fixed message, never its text (which can quote a
  header value);
* **patient data kept no longer than needed, readable only by the service account**:
  the spool is 0700, files in it 0600; result objects are deleted once every
  destination has them, a received image once it is finished (unless
  ``keep_spooled_images``), and a failed instance's files after ``retention_days``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

import pydicom

from cxrserve.core.bounded import dcmread
from cxrserve.core.errors import CXRInputError
from cxrserve.tools.dicom_results import NotProcessed, build_results, not_processed_reason, write_results
from cxrserve.tools.node.config import MESSAGE_KINDS, ConfigError, NodeConfig
from cxrserve.tools.node.messages import deliver_message, messages_missing, write_messages
from cxrserve.tools.node.receive import StorageSCP
from cxrserve.tools.node.spoolfiles import AuditLog, private_dir
from cxrserve.tools.node.state import State

log = logging.getLogger(__name__)

#: Failures that can pass by themselves (retried with back-off); anything else is a
#: property of the instance or a bug and fails it at once.
TRANSIENT = (OSError, MemoryError, sqlite3.OperationalError, ConnectionError, TimeoutError)
HEALTH_EVERY_S = 5.0  # health.json: its write probes the disk and counts the state table
SUPERVISE_EVERY_S = 1.0  # a dead worker is noticed (and C-STORE refused) within this
JANITOR_EVERY_S = 3600.0


def failure_reason(stage: str, err: BaseException) -> str:
    """A fixed message per stage and the exception's type: its text can quote a header value."""
    from cxrserve.tools.node.dimse import DeliveryError
    from cxrserve.tools.node.scoring import ScoringUnavailable

    if isinstance(err, (ScoringUnavailable, DeliveryError)):
        return f"{stage}: {err}"  # cxrserve's own messages: statuses, AE titles, hosts
    if isinstance(err, OSError) and err.errno is not None:
        return f"{stage}: {type(err).__name__} ({os.strerror(err.errno)})"
    return f"{stage}: {type(err).__name__}"


def site_map(cfg: NodeConfig) -> dict[str, str]:
    """Calling AE title -> site: the ``ae_titles`` of the profiles in ``sites_dir`` (for an
    in-process scorer, default: the ``sites/`` beside its archive), then ``sites:`` in node.yaml,
    which wins. One AE title claimed by two profiles is a configuration error."""
    from cxrserve.core.sites import SITES_FOLDER, SiteBook

    folder = cfg.sites_dir
    if folder is None and cfg.scorer.kind == "in_process" and cfg.scorer.archive:
        folder = Path(cfg.scorer.archive).parent / SITES_FOLDER
    out: dict[str, str] = {}
    if folder is not None and Path(folder).is_dir():
        for name, profile in SiteBook.load(folder).profiles.items():
            for ae in profile.ae_titles:
                if out.get(ae, name) != name:
                    raise ConfigError(f"calling AE title {ae!r} is claimed by the profiles of {out[ae]!r} and "
                                      f"{name!r}: map it in node.yaml's sites:")
                out[ae] = name
    out.update(cfg.sites)
    return out


class Node:
    def __init__(self, cfg: NodeConfig, scorer=None):
        self.cfg = cfg
        private_dir(cfg.spool)
        self.incoming = private_dir(cfg.spool / "incoming")
        self.results = private_dir(cfg.spool / "results")
        self.health_path = cfg.spool / "health.json"
        self.state = State(cfg.spool / "state.sqlite")
        self.audit = AuditLog(cfg.audit_path)
        self._scorer = scorer
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self.scp = StorageSCP(self)
        self.worker = None
        self.supervisor = None
        self.worker_starts = 0
        self._last_janitor = 0.0
        self.site_of_ae = site_map(cfg)

    def site_of(self, calling_ae: str) -> str:
        """The site whose profile answers studies from ``calling_ae`` ("" = none: the store's default)."""
        return self.site_of_ae.get(calling_ae.strip(), "")

    # ------------------------------------------------------------------ health
    @property
    def worker_alive(self) -> bool:
        return self.worker is not None and self.worker.is_alive()

    def can_keep(self, size: int = 0) -> str | None:
        """None when a received instance of ``size`` bytes can be kept and processed, else why not."""
        if self.stop_event.is_set():
            return "the node is stopping"
        if not self.worker_alive:
            return "no worker is running"
        try:
            if shutil.disk_usage(self.cfg.spool).free < self.cfg.min_free_bytes + size:
                return "the spool's disk is nearly full"
            for folder in (self.incoming, self.results):  # a real write: root passes every access() check
                fd, probe = tempfile.mkstemp(dir=folder, prefix=".probe-")
                os.close(fd)
                os.unlink(probe)
        except OSError as err:
            return f"the spool cannot be written ({os.strerror(err.errno) if err.errno else type(err).__name__})"
        return None

    def health(self) -> dict:
        problem = self.can_keep()
        return {"healthy": problem is None, "problem": problem or "", "worker_alive": self.worker_alive,
                "worker_starts": self.worker_starts, "checked": time.time(), "counts": self.state.counts()}

    def _write_health(self) -> None:
        tmp = self.health_path.with_suffix(".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(self.health(), fh)
            os.replace(tmp, self.health_path)
        except (OSError, sqlite3.Error) as err:  # health reporting never stops the node
            log.warning("health file not written: %s", type(err).__name__)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        from cxrserve.tools.privacy import withhold_dicom_values

        # the node reads every instance's header, and pydicom's warnings quote the offending
        # value (a name, a birth date): as in batch, none of that may reach its log
        withhold_dicom_values()
        self.recover()
        self._start_worker()
        self.scp.start()
        self._write_health()
        self.supervisor = threading.Thread(target=self._supervise, name="cxrserve-node-supervisor", daemon=True)
        self.supervisor.start()
        log.info("DICOM node %s listening on %s:%d (allowed callers: %s)", self.cfg.ae_title, self.cfg.host,
                 self.cfg.port, ", ".join(self.cfg.allowed_calling_aes))

    def _start_worker(self) -> None:
        self.worker = threading.Thread(target=self._work, name="cxrserve-node-worker", daemon=True)
        self.worker_starts += 1
        self.worker.start()

    def _supervise(self) -> None:
        """Restart a dead worker; keep health.json current."""
        last_health = time.monotonic()
        while not self.stop_event.wait(SUPERVISE_EVERY_S):
            if not self.worker_alive and not self.stop_event.is_set():
                log.error("worker died; restarting it")
                try:
                    self.audit.write({"event": "worker_restarted", "starts": self.worker_starts})
                except OSError:
                    pass
                self._start_worker()
            if time.monotonic() - last_health >= HEALTH_EVERY_S:
                self._write_health()
                last_health = time.monotonic()

    def stop(self) -> None:
        self.stop_event.set()
        self.wake.set()
        self.scp.stop()
        if self.supervisor is not None:
            self.supervisor.join(timeout=30)
        if self.worker is not None:
            self.worker.join(timeout=300)
        self._write_health()
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
        except Exception as err:  # noqa: BLE001 - retried per instance; the node keeps receiving
            log.error("scorer failed to load (%s); instances stay spooled and are retried", type(err).__name__)
        pause = self.cfg.poll_s
        while not self.stop_event.is_set():
            try:
                busy = self._work_once()
                pause = self.cfg.poll_s
            except Exception as err:  # noqa: BLE001 - e.g. the state file itself failing: back off, never die
                log.error("worker step failed (%s); retrying in %.0f s", type(err).__name__, pause)
                busy = False
                pause = min(60.0, pause * 2)
            if not busy:
                self.wake.wait(pause)
                self.wake.clear()

    def _work_once(self) -> bool:
        busy = False
        if time.time() - self._last_janitor >= JANITOR_EVERY_S:
            self._last_janitor = time.time()
            self.expire()
        for inst in self.state.due("scored"):
            busy = True
            self._guarded("delivering results", self.deliver, inst.sop_hash)
            if self.stop_event.is_set():
                return busy
        for inst in self.state.due("spooled", limit=1):
            busy = True
            self._guarded("processing", self.process, inst.sop_hash)
            if self.stop_event.is_set():
                return busy
        return busy

    def _guarded(self, stage: str, step, key: str) -> None:
        """Run one instance's step; its failure goes to that instance, never to the worker."""
        try:
            step(key)
        except TRANSIENT as err:
            self._retry(key, failure_reason(stage, err))
        except Exception as err:  # noqa: BLE001 - a property of this instance (or a bug): fail it
            log.error("instance %s: %s failed (%s)", key, stage, type(err).__name__)
            self._final(key, "failed", failure_reason(stage, err), self._timings(key))

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
            source = dcmread(data, max_bytes=self.cfg.max_dataset_bytes, stop_before_pixels=True)
        except FileNotFoundError:
            self._final(key, "failed", "spooled file missing", timings)
            return
        except (pydicom.errors.InvalidDicomError, CXRInputError):
            self._final(key, "failed", "spooled file unreadable", timings)
            return
        prior = None
        if self.cfg.query_retrieve is not None:
            t0 = time.perf_counter()
            from cxrserve.tools.node.dimse import PriorSkipped, find_prior

            try:
                found = find_prior(source, self.cfg.query_retrieve, self.cfg.ae_title, self.cfg.max_dataset_bytes)
                prior = found.data if found else None
                timings["prior"] = "found" if found else "none"
            except PriorSkipped as skipped:  # a reason made here: no field values
                timings["prior"] = f"skipped: {skipped.reason}"
            except Exception as err:  # noqa: BLE001 - a PACS query failure must not block scoring
                log.warning("prior lookup failed: %s", type(err).__name__)
                timings["prior"] = f"lookup failed ({type(err).__name__})"
            timings["prior_ms"] = round(1000 * (time.perf_counter() - t0), 1)
        t0 = time.perf_counter()
        from cxrserve.tools.node.scoring import ScoringUnavailable

        try:
            inst = self.state.get(key)
            site = {"site": inst.site} if inst is not None and inst.site else {}
            response = self.scorer.score(data, prior, **site)
        except Exception as err:  # noqa: BLE001 - the scorer down, loading or crashing: retried with back-off
            reason = failure_reason("scoring unavailable", err if isinstance(err, ScoringUnavailable) else
                                    ScoringUnavailable(type(err).__name__))
            self.state.set_timings(key, json.dumps(timings))
            self._retry(key, reason)
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
            log.error("building result objects failed (%s)", type(err).__name__)
            self._final(key, "failed", failure_reason("building result objects", err), timings)
            return
        out = private_dir(self.results / key)
        try:  # the HL7 / FHIR destinations' messages, from the same answer (written before "scored")
            messages = write_messages(out, source, response, self.cfg.destinations, self.cfg.ae_title)
        except OSError:
            raise
        except Exception as err:  # noqa: BLE001 - a message that does not validate: kept for an operator
            log.error("building HL7/FHIR messages failed (%s)", type(err).__name__)
            self._final(key, "failed", failure_reason("building HL7/FHIR messages", err), timings)
            return
        write_results(objects, out, fsync=True)  # fsyncs the folder too (the messages' entries)
        timings["build_ms"] = round(1000 * (time.perf_counter() - t0), 1)
        timings["objects"] = len(objects)
        if messages:
            timings["messages"] = messages
        self.state.set_status(key, "scored", timings=json.dumps(timings),
                              destinations=[d.name for d in self.cfg.destinations])
        self.deliver(key)

    def _retry(self, key: str, reason: str) -> None:
        inst = self.state.get(key)
        if inst is None:
            return
        attempts = self.state.retry_later(key, self.cfg.retry.delay(inst.attempts + 1), reason)
        log.warning("instance %s: %s (try %d)", key, reason, attempts)
        if self.cfg.retry.exhausted(attempts, inst.received, time.time()):
            self._final(key, "failed", reason, self._timings(key))

    def deliver(self, key: str) -> None:
        """Send the instance's results to each pending destination that is due; each destination
        keeps its own attempts and back-off, and is marked delivered only after its acceptance."""
        folder = self.results / key
        paths = sorted(folder.glob("*.dcm"))
        due = self.state.pending_due(key)
        if not paths or messages_missing(folder, [d for d, _, _ in due], self.cfg.destinations):
            # results gone (deleted by hand, a spool from another node or version): score again
            self.state.set_status(key, "spooled", reason="result objects missing; scoring again")
            return
        objects = None
        timings = self._timings(key)
        by_name = {d.name: d for d in self.cfg.destinations}
        inst = self.state.get(key)
        failures = []
        now = time.time()
        for name, attempts, next_try in due:
            dest = by_name.get(name)
            if dest is None:
                failures.append(f"{name}: no longer configured")
                continue
            if next_try > now:  # this destination is backing off; the others go on
                continue
            t0 = time.perf_counter()
            try:
                if dest.kind in MESSAGE_KINDS:
                    deliver_message(folder, dest)
                else:
                    from cxrserve.tools.node.dimse import deliver

                    if objects is None:
                        objects = [pydicom.dcmread(p) for p in paths]
                    deliver(objects, dest, self.cfg.ae_title)
            except Exception as err:  # noqa: BLE001 - retried with back-off
                reason = failure_reason(f"delivery to {name}", err)
                n = self.state.delivery_failed(key, name, reason, self.cfg.retry.delay(attempts + 1))
                failures.append(reason)
                log.warning("instance %s: %s (try %d)", key, reason, n)
                if self.cfg.retry.exhausted(n, inst.received, time.time()):
                    self._final(key, "failed", "; ".join(failures), timings)
                    return
                continue
            self.state.delivered(key, name)
            timings[f"deliver_{name}_ms"] = round(1000 * (time.perf_counter() - t0), 1)
        pending = self.state.pending_due(key)
        if pending:
            self.state.set_timings(key, json.dumps(timings))
            when = max(time.time() + 0.05, min(t for _, _, t in pending))
            self.state.wait_until(key, when, "; ".join(failures) or "waiting for a destination's next try")
            return
        self._final(key, "done", "", timings)

    def _final(self, key: str, status: str, reason: str, timings: dict) -> None:
        self.state.set_status(key, status, reason=reason, timings=json.dumps(timings))
        if status in ("done", "not_processed"):
            shutil.rmtree(self.results / key, ignore_errors=True)  # every destination has them
            if not self.cfg.keep_spooled_images:
                (self.incoming / f"{key}.dcm").unlink(missing_ok=True)
        self._audit_final(key)

    def expire(self) -> None:
        """Delete what retention allows no longer: a failed instance's image and results, a kept image."""
        cutoff = time.time() - self.cfg.retention_days * 86400
        for inst in self.state.received_before(("failed", "done", "not_processed"), cutoff):
            image, results = self.incoming / f"{inst.sop_hash}.dcm", self.results / inst.sop_hash
            if image.exists() or results.exists():
                image.unlink(missing_ok=True)
                shutil.rmtree(results, ignore_errors=True)
                self.audit.write({"event": "expired", "instance": f"sha256:{inst.sop_hash}",
                                  "outcome": inst.status, "retention_days": self.cfg.retention_days})

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

    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # highdicom's: Node.start (tools.privacy)
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
