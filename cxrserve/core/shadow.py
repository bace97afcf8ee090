"""Shadow before switch: a candidate model scores what the active one answered, never answering.

:class:`Shadow` is a pipeline observer (like the drift monitor): after the active pipeline
scored a batch, the batch's studies are queued (bounded: a full queue drops them, counted) and a
thread scores them with the candidate pipeline (the same served name from another store,
``shadow_store`` in the handler config or ``$CXRSERVE_SHADOW_STORE``). Each study's two answers
(label, first score map, status) are written side by side, keyed like the monitor's prediction
log (an HMAC, no identifiers), to ``<monitor dir>/<site>/<model>/shadow-<candidate version>.jsonl``
(rolled over at a fixed size). ``cxrserve monitor compare`` reads them; ``cxrserve monitor
promote`` / ``rollback`` switch stores and write the audit log. Nothing here can change or delay
an answer: the candidate runs after the response was made, on copies of the items.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
from pathlib import Path

from cxrserve.core import monitor as M

log = logging.getLogger(__name__)

SHADOW_ENV = "CXRSERVE_SHADOW_STORE"
_loading = threading.local()


def _answer(result) -> dict:
    from cxrserve.core.errors import CXRInputError

    if isinstance(result, CXRInputError):
        return {"status": str(result.status)}
    if not isinstance(result, dict):
        return {"status": "500"}
    return {"status": "200", "version": result.get("model_version")}


class Shadow:
    """Observer that scores each answered batch again with ``candidate`` and records both answers."""

    def __init__(self, candidate, state_dir: str | Path | None, *, queue_size: int = 32, sync: bool = False,
                 max_lines: int = 100000):
        self.candidate = candidate
        self.state_dir = Path(state_dir) if state_dir else None
        self.secret = M.monitor_secret(self.state_dir)
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.sync, self.max_lines = sync, max_lines
        self.logs: dict[tuple, M.BoundedLog] = {}
        self.recorded = self.dropped = self.errors = 0
        self.memory: list[dict] = []  # without a state folder: the last records, bounded
        self._thread = None

    def __call__(self, pipeline, items, results) -> None:
        try:
            from cxrserve.core.item import Item

            copies = [dataclasses.replace(i, gate=None, refused=dict(i.refused), shared={}, images=dict(i.images))
                      if isinstance(i, Item) else None for i in items]
            job = (M.make_records(pipeline, items, results, self.secret), copies, list(results))
        except Exception:
            self.errors += 1
            return
        if self.sync:
            self._score(*job)
            return
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="cxrserve-shadow", daemon=True)
            self._thread.start()
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            self.dropped += len(copies)

    def _run(self) -> None:
        while True:
            job = self.queue.get()
            try:
                self._score(*job)
            except Exception:
                self.errors += 1
                log.debug("shadow scoring failed", exc_info=True)
            finally:
                self.queue.task_done()

    def flush(self, timeout: float = 60.0) -> None:
        end = time.time() + timeout
        while self.queue.unfinished_tasks and time.time() < end:
            time.sleep(0.01)

    def _score(self, active: list, copies: list, results: list) -> None:
        todo = [n for n, c in enumerate(copies) if c is not None and results[n] is not None]
        cand = [None] * len(copies)
        if todo:
            outs = self.candidate.predict([copies[n] for n in todo])
            cand_recs = M.make_records(self.candidate, [copies[n] for n in todo], outs, self.secret)
            for n, rec in zip(todo, cand_recs):
                cand[n] = rec
        for rec, other in zip(active, cand):
            row = {"t": round(rec.t, 3), "key": rec.key, "site": rec.site, "active_version": rec.version,
                   "active": {"status": rec.status, "label": rec.label, "probs": rec.probs},
                   "candidate_version": str(getattr(self.candidate, "version", "unknown")),
                   "candidate": ({"status": other.status, "label": other.label, "probs": other.probs}
                                 if other else None)}
            self._write(rec, row)
            self.recorded += 1

    def _write(self, rec, row: dict) -> None:
        if self.state_dir is None:
            self.memory.append(row)
            del self.memory[:-1000]
            return
        version = row["candidate_version"] or "unknown"
        key = (rec.site, rec.model, version)
        out = self.logs.get(key)
        if out is None:
            path = self.state_dir / M.safe_name(rec.site) / M.safe_name(rec.model) / f"shadow-{M.safe_name(version)}.jsonl"
            out = self.logs[key] = M.BoundedLog(path, self.max_lines)
        out.write(row)


def attach_shadow(pipeline, config: dict | None, load) -> Shadow | None:
    """A :class:`Shadow` with the candidate ``<shadow store>/<model>.mar`` (``load``: how to load an
    archive, e.g. :func:`cxrserve.core.loading.load_pipeline`) on ``pipeline.observers``, when a
    shadow store is configured (``shadow_store`` or ``$CXRSERVE_SHADOW_STORE``) and holds that model."""
    config = dict(config or {})
    store = config.get("shadow_store") or os.environ.get(SHADOW_ENV)
    if not store or getattr(_loading, "active", False) or getattr(pipeline, "observers", None) is None:
        return None
    mar = Path(store) / f"{getattr(pipeline, 'name', '')}.mar"
    if not mar.is_file():
        return None
    try:
        _loading.active = True
        candidate = load(mar)
    except Exception:
        log.warning("shadow candidate %s not loaded", mar, exc_info=True)
        return None
    finally:
        _loading.active = False
    candidate.observers[:] = [o for o in getattr(candidate, "observers", []) if not isinstance(o, M.Monitor)]
    state = config.get("monitor_dir") or os.environ.get("CXRSERVE_MONITOR_DIR") or None
    shadow = Shadow(candidate, state)
    pipeline.observers.append(shadow)
    log.info("shadow: %s %s scores beside the active %s", candidate.name, candidate.version, pipeline.version)
    return shadow
