"""What an operator does with a node's spool, running or not: its status, requeueing failed instances.

The state file can also be read directly (read-only while the node runs)::

    sqlite3 -readonly spool/state.sqlite \\
      "SELECT sop_hash, status, attempts, reason FROM instances WHERE status='failed'"
"""
from __future__ import annotations

import json
import time

from cxrserve.tools.node.config import NodeConfig
from cxrserve.tools.node.spoolfiles import AuditLog
from cxrserve.tools.node.state import State


def requeue(cfg: NodeConfig, keys: list[str] | None) -> list[tuple[str, str]]:
    """Failed instances (all, or ``keys``: hashed SOP UIDs) back into the queue of a node, running
    or not; each gets a fresh retry budget. Returns (key, what happened) pairs."""
    state = State(cfg.spool / "state.sqlite")
    audit = AuditLog(cfg.audit_path)
    out = []
    try:
        failed = {i.sop_hash: i for i in state.with_status("failed")}
        for key in (keys if keys else list(failed)):
            key = key.removeprefix("sha256:")
            if key not in failed:
                out.append((key, "not failed (nothing to do)"))
                continue
            has_results = any((cfg.spool / "results" / key).glob("*.dcm"))
            pending = state.pending_deliveries(key)
            if has_results and pending:
                state.requeue(key, scored=True)
                what = "requeued for delivery"
            elif (cfg.spool / "incoming" / f"{key}.dcm").exists():
                state.requeue(key)
                what = "requeued for scoring"
            else:
                out.append((key, "image no longer kept (retention): the sender must send it again"))
                continue
            audit.write({"event": "requeued", "instance": f"sha256:{key}", "by": "operator", "what": what})
            out.append((key, what))
    finally:
        state.close()
    return out


def status(cfg: NodeConfig, stale_s: float = 30.0) -> dict:
    """The node's health file (written every few seconds by a running node) and its state counts."""
    try:
        health = json.loads((cfg.spool / "health.json").read_text())
    except (OSError, json.JSONDecodeError):
        health = {"healthy": False, "problem": "no health file: the node is not running"}
    if health.get("checked") and time.time() - float(health["checked"]) > stale_s:
        health = {**health, "healthy": False, "problem": "health file is stale: the node is not running"}
    state = State(cfg.spool / "state.sqlite")
    try:
        health["counts"] = state.counts()
        health["failed"] = [{"instance": f"sha256:{i.sop_hash}", "reason": i.reason}
                            for i in state.with_status("failed")]
    finally:
        state.close()
    return health
