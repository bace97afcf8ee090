"""Drift and performance monitoring behind every entry point (issue 23).

One :class:`Monitor` per process watches what a :class:`~cxrserve.core.pipeline.Pipeline`
takes in and gives out: attached as a pipeline observer (``observer(pipeline, items,
results)``, called after scoring), it turns each study into a small :class:`Record` (no
identifiers: DICOM header mix, image statistics, a compact image embedding, headline scores,
label, status, a keyed hash for matching returned labels) and keeps, per site and model
version, a rolling window of the last ``window`` studies. Every ``step`` studies the window
is compared with the site's :class:`Reference`:

* categorical mixes (header fields, size bin, label, status): total variation distance (PSI,
  :func:`psi`, was tried first: its log ratio gives rare categories heavy tails, 2x the false alarms);
* continuous values (image statistics, gate score, each headline score): two-sample KS;
* the embedding: MMD² with an RBF kernel (median bandwidth) in the reference's PCA space;

each statistic is standardised against its null distribution (windows resampled from a
calibration half of the reference data, never the half the statistics compare against), the
combined score is the largest standardised signal, and the alert threshold on it is set from a
target false-alarm rate per study by resampling too (:func:`fit_reference`; an exponential tail
fitted over the top decile of resampled combined scores).

The label-free performance estimate per window is confidence based: with calibrated
probabilities ``p``, expected sensitivity of label ``L`` is ``sum p_L 1[pred=L] / sum p_L`` and
expected specificity ``sum (1-p_L) 1[pred!=L] / sum (1-p_L)``.

Cost and safety: the observer extracts the record synchronously from a strided copy of the
image (no model runs) and hands it to a bounded queue; a daemon thread scores windows and
writes bounded files. A full queue drops the record (counted); any exception is swallowed and
counted. Nothing here can fail or hold up a request. Only numpy and the standard library
(core layer).
"""
from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

# What one study becomes and how windows are judged live in their own modules; their names are
# the monitor's public API too (tools and tests use ``monitor.Reference``, ``monitor.Record``, ...).
from cxrserve.core.drift import (REFERENCE_FILE, REFERENCE_FORMAT, Reference, category_counts, estimate,  # noqa: F401
                                 fit_reference, ks, mmd2, psi, tvd)
from cxrserve.core.drift_embedding import apply_embeddings, pending_embeddings  # noqa: F401 (tests)
from cxrserve.core.drift_record import (DEFAULT_SITE, EMBED_DIMS, EMBED_SIDE, HEADER_FIELDS, IMAGE_STATS,  # noqa: F401
                                        MAX_SCORES, Record, image_features, make_records, study_key)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- state files
class BoundedLog:
    """A JSON-lines file that rolls over to ``.1`` at ``max_lines`` (so at most twice that on disk)."""

    def __init__(self, path: Path, max_lines: int):
        self.path, self.max_lines = path, max_lines
        self.lines = sum(1 for _ in path.open()) if path.exists() else 0

    def write(self, obj: dict) -> None:
        if self.lines >= self.max_lines:
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            self.lines = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(obj, separators=(",", ":")) + "\n")
        self.lines += 1


def read_log(path: Path) -> list[dict]:
    """Both generations of a :class:`BoundedLog`, oldest first."""
    out = []
    for p in (path.with_name(path.name + ".1"), path):
        if p.exists():
            for line in p.open():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return out


def monitor_secret(state_dir: Path | None) -> bytes:
    """The key study hashes are made with: ``<state_dir>/secret`` (made once, mode 600), else per process."""
    if state_dir is None:
        return secrets.token_bytes(32)
    path = Path(state_dir) / "secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
    return path.read_bytes()


def safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80] or "_"


# --------------------------------------------------------------------------- the monitor
@dataclass
class Stream:
    """One site x model x version: its rolling window and latest scores."""

    site: str
    model: str
    version: str
    window: deque
    reference: Reference | None = None
    seen: int = 0
    windows: int = 0
    scores: dict[str, float] = field(default_factory=dict)
    alert: bool = False
    alerts: int = 0
    estimate: dict = field(default_factory=dict)
    log: BoundedLog | None = None
    predictions: BoundedLog | None = None


class Monitor:
    """The observer every entry point attaches (``pipeline.observers.append(monitor)``).

    ``state_dir``: where window summaries, the prediction log for returned labels, the hash key
    and per-site references live (None: memory only). ``references``: ``{(site, model): path}``
    or ``{site: path}``; else ``<profile dir>/monitor/<model>.json`` of the item's site profile,
    ``<model_dir>/monitor_reference.json`` in the archive, then ``<state_dir>/<site>/<model>/reference.json``.
    """

    def __init__(self, state_dir: str | Path | None = None, *, window: int = 50, step: int = 5,
                 queue_size: int = 1024, references: dict | None = None, sync: bool = False,
                 max_log_lines: int = 20000, max_streams: int = 64):
        self.state_dir = Path(state_dir) if state_dir else None
        self.window_size, self.step = window, step
        self.references = dict(references or {})
        self.max_log_lines, self.max_streams = max_log_lines, max_streams
        self.secret = monitor_secret(self.state_dir)
        self.streams: dict[tuple[str, str, str], Stream] = {}
        self.lock = threading.Lock()
        self.observed = self.dropped = self.errors = 0
        self.sync = sync
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._model_dirs: dict[str, Path] = {}
        self._profile_dirs: dict[str, Path] = {}

    # -- the observer (request path): extract, enqueue, never raise
    def __call__(self, pipeline, items, results) -> None:
        try:
            model_dir = getattr(pipeline, "model_dir", None)
            if model_dir is not None:
                self._model_dirs.setdefault(str(getattr(pipeline, "name", "")), Path(model_dir))
            for item in items:
                site = getattr(item, "site", None)
                if getattr(site, "path", None) is not None and getattr(site, "name", None):
                    folder = Path(site.path)  # the profile's profile.json (or its folder)
                    self._profile_dirs.setdefault(site.name, folder.parent if folder.suffix == ".json" else folder)
            records = make_records(pipeline, items, results, self.secret, embed=False)
            # the gate's preprocessing here (a resize), its network on the monitor's thread
            pending = pending_embeddings(pipeline, items, records)
        except Exception:
            self.errors += 1
            log.debug("monitor could not read a batch", exc_info=True)
            return
        if self.sync:
            self._embed_and_consume(records, pending)
            return
        self._ensure_thread()
        try:
            self.queue.put_nowait((records, pending))
        except queue.Full:
            self.dropped += len(records)

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="cxrserve-monitor", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            records, pending = self.queue.get()
            try:
                self._embed_and_consume(records, pending)
            except Exception:
                self.errors += 1
                log.debug("monitor could not score a window", exc_info=True)
            finally:
                self.queue.task_done()

    def _embed_and_consume(self, records, pending) -> None:
        try:
            apply_embeddings(records, *pending)
        except Exception:  # the thumbnails stay: the embedding signal then waits for a like reference
            self.errors += 1
            log.debug("monitor could not embed a batch", exc_info=True)
        self.consume(records)

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until queued records are scored (tests, CLI)."""
        end = time.time() + timeout
        while self.queue.unfinished_tasks and time.time() < end:
            time.sleep(0.01)

    # -- scoring (worker thread)
    def _reference_for(self, site: str, model: str) -> Reference | None:
        candidates = [self.references.get((site, model)), self.references.get(site)]
        if site in self._profile_dirs:
            candidates.append(self._profile_dirs[site] / "monitor" / f"{model}.json")
        if model in self._model_dirs and site == DEFAULT_SITE:
            candidates.append(self._model_dirs[model] / REFERENCE_FILE)
        if self.state_dir is not None:
            candidates.append(self.state_dir / safe_name(site) / safe_name(model) / "reference.json")
        for path in candidates:
            if path is not None and Path(path).is_file():
                try:
                    return Reference.load(path)
                except Exception:
                    self.errors += 1
                    log.warning("monitor reference %s unreadable", path)
        return None

    def _stream(self, rec: Record) -> Stream | None:
        key = (rec.site, rec.model, rec.version)
        stream = self.streams.get(key)
        if stream is None:
            if len(self.streams) >= self.max_streams:
                return None
            ref = self._reference_for(rec.site, rec.model)
            size = ref.window if ref is not None else self.window_size
            stream = Stream(rec.site, rec.model, rec.version, deque(maxlen=size), ref)
            if self.state_dir is not None:
                base = self.state_dir / safe_name(rec.site) / safe_name(rec.model) / safe_name(rec.version)
                stream.log = BoundedLog(base / "windows.jsonl", self.max_log_lines)
                stream.predictions = BoundedLog(base / "predictions.jsonl", self.max_log_lines * 5)
            with self.lock:
                self.streams[key] = stream
        return stream

    def consume(self, records: list[Record]) -> None:
        for rec in records:
            self.observed += 1
            stream = self._stream(rec)
            if stream is None:
                self.dropped += 1
                continue
            stream.window.append(rec)
            stream.seen += 1
            if stream.predictions is not None and rec.key:
                stream.predictions.write({"key": rec.key, "t": round(rec.t, 3), "w": stream.windows,
                                          "label": rec.label, "probs": {k: round(v, 5) for k, v in rec.probs.items()},
                                          "status": rec.status})
            step = stream.reference.step if stream.reference else self.step
            if stream.seen % step == 0 and len(stream.window) == stream.window.maxlen:
                self._score(stream)

    def _score(self, stream: Stream) -> None:
        window = list(stream.window)
        ref = stream.reference
        labels = ref.labels if ref else sorted({k for r in window for k in r.probs})
        stream.estimate = estimate(window, labels)
        if ref is not None:
            stream.scores = ref.scores(window, outputs=ref.version == stream.version)
            alert = stream.scores["combined"] > ref.threshold
            if alert and not stream.alert:
                stream.alerts += 1
            stream.alert = alert
        stream.windows += 1
        if stream.log is not None:
            stream.log.write({"t": round(time.time(), 3), "w": stream.windows, "seen": stream.seen,
                              "scores": {k: round(v, 4) for k, v in stream.scores.items()},
                              "threshold": ref.threshold if ref else None, "alert": stream.alert,
                              "estimate": stream.estimate,
                              "header": {f: category_counts(r.header.get(f) for r in window if r.header)
                                         for f in HEADER_FIELDS},
                              "labels": category_counts(r.label for r in window),
                              "status": category_counts(r.status for r in window)})

    # -- what the metrics endpoints export
    def snapshot(self) -> list[dict]:
        """Latest state per site x model (the newest version seen), for the metrics endpoints."""
        with self.lock:
            streams = list(self.streams.values())
        out = []
        for s in streams:
            out.append({"site": s.site, "model": s.model, "version": s.version, "seen": s.seen,
                        "scores": dict(s.scores), "alert": s.alert, "alerts": s.alerts,
                        "threshold": s.reference.threshold if s.reference else None,
                        "estimate": {k: dict(v) for k, v in s.estimate.items()}})
        return out


# --------------------------------------------------------------------------- attaching
#: Monitors made in this process (the metrics endpoints export them all).
MONITORS: list[Monitor] = []
_SHARED: dict[str, Monitor] = {}


def attach(pipeline, config: dict | None = None) -> Monitor | None:
    """Attach the process's monitor to ``pipeline`` (its ``observers`` list) unless
    ``monitor: false`` in the handler config or ``CXRSERVE_MONITOR=0``.

    Settings: ``monitor_dir`` (else ``$CXRSERVE_MONITOR_DIR``, else memory only),
    ``monitor_window``, ``monitor_reference`` (a reference for site ``default``). Returns the
    monitor (not attached when the pipeline has no ``observers``: the caller calls it), or None
    when monitoring is off.
    """
    config = dict(config or {})
    enabled = str(config.get("monitor", os.environ.get("CXRSERVE_MONITOR", "1"))).strip().lower()
    if enabled in ("0", "false", "no", "off"):
        return None
    try:
        state = config.get("monitor_dir") or os.environ.get("CXRSERVE_MONITOR_DIR") or ""
        key = str(state)
        monitor = _SHARED.get(key)
        if monitor is None:
            monitor = Monitor(state or None, window=int(config.get("monitor_window", 50)))
            _SHARED[key] = monitor
            MONITORS.append(monitor)
        if config.get("monitor_reference"):
            monitor.references[(DEFAULT_SITE, str(getattr(pipeline, "name", "")))] = Path(config["monitor_reference"])
        observers = getattr(pipeline, "observers", None)
        if observers is not None and monitor not in observers:
            observers.append(monitor)
        return monitor
    except Exception:
        log.warning("monitor not attached", exc_info=True)
        return None


def monitor_of(pipeline) -> Monitor | None:
    for obs in getattr(pipeline, "observers", None) or ():
        if isinstance(obs, Monitor):
            return obs
    return None
