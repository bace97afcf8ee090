"""Durable per-instance state of the node: spooled -> scored -> delivered (per destination).

One SQLite file in the spool folder (WAL, ``synchronous=FULL``: a committed transition
survives a crash or power cut). Rows are keyed by the hashed SOP Instance UID; the clear
UID never leaves the spooled file itself.

Instance status: ``spooled`` (file fsynced, not scored), ``scored`` (result objects
written and fsynced, deliveries pending), ``done`` (every destination delivered),
``not_processed`` (a 4xx from the scorer: lateral, non-chest, gate rejection; no objects),
``failed`` (gave up after the retry budget, or a permanent error; kept for an operator,
``cxrserve node requeue`` sends it round again). Each destination of a scored instance (a
PACS, an HL7 MLLP receiver, a FHIR server) has its own row: ``pending`` or ``delivered``, its
own attempt count and its own ``next_try`` (one receiver down does not hold back the others'
deliveries); the row exists before the first send and turns ``delivered`` only after the
receiver's acceptance, and a delivered destination is never sent again.

``identity`` is a hash of what makes an instance *that* instance (study, series, SOP
class, patient, matrix): a resend of the same SOP Instance UID with the same identity is
the same instance, a different one is refused as a duplicate UID instead of being acked
and dropped.

The operator's view, read-only while the node runs::

    sqlite3 -readonly spool/state.sqlite \
      "SELECT sop_hash, status, attempts, reason FROM instances WHERE status='failed'"
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
  sop_hash TEXT PRIMARY KEY,
  status TEXT NOT NULL,
  received REAL NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  next_try REAL NOT NULL DEFAULT 0,
  reason TEXT NOT NULL DEFAULT '',
  timings TEXT NOT NULL DEFAULT '{}',
  audited INTEGER NOT NULL DEFAULT 0,
  identity TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS deliveries (
  sop_hash TEXT NOT NULL,
  destination TEXT NOT NULL,
  status TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  next_try REAL NOT NULL DEFAULT 0,
  delivered REAL,
  reason TEXT NOT NULL DEFAULT '',
  PRIMARY KEY (sop_hash, destination)
);
-- the worker asks for due instances of a status every poll; the table is never pruned
CREATE INDEX IF NOT EXISTS instances_by_status ON instances (status, received);
"""


@dataclass
class Instance:
    sop_hash: str
    status: str
    received: float
    attempts: int
    next_try: float
    reason: str
    timings: str
    audited: int
    identity: str = ""
    site: str = ""  # the site its calling AE title maps to ("" = none named)


class State:
    def __init__(self, path):
        self.path = str(path)
        self.lock = threading.Lock()
        # created 0600 first: SQLite gives its -wal and -shm files the database file's mode
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(self.path, 0o600)
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(instances)")}
        if "identity" not in columns:  # a spool from before duplicate-UID checks
            self.db.execute("ALTER TABLE instances ADD COLUMN identity TEXT NOT NULL DEFAULT ''")
        if "site" not in columns:  # a spool from before sites
            self.db.execute("ALTER TABLE instances ADD COLUMN site TEXT NOT NULL DEFAULT ''")

    @contextmanager
    def tx(self):
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def close(self) -> None:
        with self.lock:
            self.db.close()

    # ------------------------------------------------------------------ instances
    def add(self, sop_hash: str, identity: str = "", site: str = "") -> bool:
        """Register a spooled instance; False when it is already known (a resend)."""
        with self.tx() as db:
            cur = db.execute("INSERT OR IGNORE INTO instances (sop_hash, status, received, identity, site) "
                             "VALUES (?, 'spooled', ?, ?, ?)", (sop_hash, time.time(), identity, site))
            return cur.rowcount == 1

    def requeue(self, sop_hash: str, *, scored: bool = False) -> bool:
        """A failed instance sent again (or requeued by the operator): a fresh retry budget,
        from its result objects when they are still there (``scored``), else from the image."""
        with self.tx() as db:
            cur = db.execute("UPDATE instances SET status=?, attempts=0, next_try=0, reason='', audited=0, "
                             "received=? WHERE sop_hash=? AND status='failed'",
                             ("scored" if scored else "spooled", time.time(), sop_hash))
            db.execute("UPDATE deliveries SET attempts=0, next_try=0 WHERE sop_hash=? AND status='pending'",
                       (sop_hash,))
            return cur.rowcount == 1

    def with_status(self, status: str) -> list[Instance]:
        with self.lock:
            rows = self.db.execute("SELECT * FROM instances WHERE status=? ORDER BY received", (status,)).fetchall()
        return [Instance(*r) for r in rows]

    def received_before(self, statuses: tuple[str, ...], before: float) -> list[Instance]:
        marks = ",".join("?" * len(statuses))
        with self.lock:
            rows = self.db.execute(f"SELECT * FROM instances WHERE status IN ({marks}) AND received<?",
                                   (*statuses, before)).fetchall()
        return [Instance(*r) for r in rows]

    def get(self, sop_hash: str) -> Instance | None:
        with self.lock:
            row = self.db.execute("SELECT * FROM instances WHERE sop_hash=?", (sop_hash,)).fetchone()
        return Instance(*row) if row else None

    def due(self, status: str, now: float | None = None, limit: int = 16) -> list[Instance]:
        now = time.time() if now is None else now
        with self.lock:
            rows = self.db.execute("SELECT * FROM instances WHERE status=? AND next_try<=? ORDER BY received LIMIT ?",
                                   (status, now, limit)).fetchall()
        return [Instance(*r) for r in rows]

    def set_status(self, sop_hash: str, status: str, *, reason: str = "", timings: str | None = None,
                   destinations: list[str] | None = None) -> None:
        with self.tx() as db:
            if timings is None:
                db.execute("UPDATE instances SET status=?, reason=?, next_try=0 WHERE sop_hash=?",
                           (status, reason, sop_hash))
            else:
                db.execute("UPDATE instances SET status=?, reason=?, timings=?, next_try=0 WHERE sop_hash=?",
                           (status, reason, timings, sop_hash))
            for dest in destinations or []:
                db.execute("INSERT OR IGNORE INTO deliveries (sop_hash, destination, status) VALUES (?, ?, 'pending')",
                           (sop_hash, dest))

    def retry_later(self, sop_hash: str, delay: float, reason: str) -> int:
        with self.tx() as db:
            db.execute("UPDATE instances SET attempts=attempts+1, next_try=?, reason=? WHERE sop_hash=?",
                       (time.time() + delay, reason, sop_hash))
            return db.execute("SELECT attempts FROM instances WHERE sop_hash=?", (sop_hash,)).fetchone()[0]

    def set_timings(self, sop_hash: str, timings: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE instances SET timings=? WHERE sop_hash=?", (timings, sop_hash))

    def mark_audited(self, sop_hash: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE instances SET audited=1 WHERE sop_hash=?", (sop_hash,))

    def unaudited_final(self) -> list[Instance]:
        with self.lock:
            rows = self.db.execute("SELECT * FROM instances WHERE audited=0 AND status IN "
                                   "('done', 'not_processed', 'failed')").fetchall()
        return [Instance(*r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self.lock:
            return dict(self.db.execute("SELECT status, COUNT(*) FROM instances GROUP BY status").fetchall())

    # ------------------------------------------------------------------ deliveries
    def pending_deliveries(self, sop_hash: str) -> list[tuple[str, int]]:
        with self.lock:
            return self.db.execute("SELECT destination, attempts FROM deliveries WHERE sop_hash=? AND status='pending'",
                                   (sop_hash,)).fetchall()

    def deliveries(self, sop_hash: str) -> dict[str, str]:
        with self.lock:
            return dict(self.db.execute("SELECT destination, status FROM deliveries WHERE sop_hash=?",
                                        (sop_hash,)).fetchall())

    def delivered(self, sop_hash: str, destination: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE deliveries SET status='delivered', delivered=?, attempts=attempts+1 "
                       "WHERE sop_hash=? AND destination=?", (time.time(), sop_hash, destination))

    def pending_due(self, sop_hash: str) -> list[tuple[str, int, float]]:
        """``(destination, attempts, next_try)`` of the instance's pending deliveries."""
        with self.lock:
            return self.db.execute("SELECT destination, attempts, next_try FROM deliveries WHERE sop_hash=? AND "
                                   "status='pending' ORDER BY destination", (sop_hash,)).fetchall()

    def wait_until(self, sop_hash: str, when: float, reason: str) -> None:
        """The instance's next look at ``when`` (its destinations' own back-off), attempts unchanged."""
        with self.tx() as db:
            db.execute("UPDATE instances SET next_try=?, reason=? WHERE sop_hash=?", (when, reason, sop_hash))

    def delivery_failed(self, sop_hash: str, destination: str, reason: str, delay: float = 0.0) -> int:
        with self.tx() as db:
            db.execute("UPDATE deliveries SET attempts=attempts+1, reason=?, next_try=? WHERE sop_hash=? AND "
                       "destination=?", (reason, time.time() + delay, sop_hash, destination))
            return db.execute("SELECT attempts FROM deliveries WHERE sop_hash=? AND destination=?",
                              (sop_hash, destination)).fetchone()[0]
