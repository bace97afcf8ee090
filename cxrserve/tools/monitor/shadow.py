"""``cxrserve monitor compare / promote / rollback``: judge a shadow candidate, then switch stores.

``compare`` reads the shadow logs (:mod:`cxrserve.core.shadow`) of a site and model: how often
the candidate's label agrees with the active one's, how far their probabilities are apart, the
label flips, their status codes, and (with ``--labels``, matched as ``monitor feedback`` does)
each one's accuracy on the returned labels. ``promote`` puts the candidate's archive in the
active store (the active one kept in ``<store>/.previous/``), ``rollback`` puts the previous one
back; both append to ``<monitor dir>/audit.jsonl`` (who, when, which archive digests). Servers
load archives when they start: restart them after a switch.
"""
from __future__ import annotations

import getpass
import hashlib
import json
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np

from cxrserve.core import monitor as M


def compare(state: str | Path, site: str, model: str, labels: dict[str, str] | None = None) -> dict:
    base = Path(state) / M.safe_name(site) / M.safe_name(model)
    out = {}
    for path in sorted(base.glob("shadow-*.jsonl")):
        rows = M.read_log(path)
        both = [r for r in rows if r.get("candidate") and r["active"].get("label") and r["candidate"].get("label")]
        flips = Counter(f"{r['active']['label']}->{r['candidate']['label']}" for r in both
                        if r["active"]["label"] != r["candidate"]["label"])
        diffs = [abs(r["active"]["probs"].get(k, 0) - r["candidate"]["probs"].get(k, 0))
                 for r in both for k in r["active"]["probs"]]
        entry = {"studies": len(rows), "both_answered": len(both),
                 "agreement": (len(both) - sum(flips.values())) / len(both) if both else None,
                 "mean_abs_probability_difference": float(np.mean(diffs)) if diffs else None,
                 "flips": dict(flips.most_common(10)),
                 "status": {"active": dict(Counter(r["active"]["status"] for r in rows)),
                            "candidate": dict(Counter((r["candidate"] or {}).get("status", "not scored")
                                                      for r in rows))},
                 "active_versions": sorted({r["active_version"] for r in rows})}
        if labels:
            matched = [r for r in both if r["key"] in labels]
            entry["labelled"] = len(matched)
            if matched:
                entry["accuracy"] = {
                    who: sum(r[who]["label"] == labels[r["key"]] for r in matched) / len(matched)
                    for who in ("active", "candidate")}
        out[path.stem[len("shadow-"):]] = entry
    return out


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def audit(state: str | Path, entry: dict) -> None:
    path = Path(state) / "audit.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"t": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "user": getpass.getuser(), **entry}
    with path.open("a") as fh:
        fh.write(json.dumps(entry) + "\n")


def promote(store: str | Path, candidate: str | Path, model: str, state: str | Path, reason: str = "") -> dict:
    store, candidate = Path(store), Path(candidate)
    new = candidate / f"{model}.mar"
    if not new.is_file():
        raise FileNotFoundError(f"{new}: no candidate archive")
    active = store / f"{model}.mar"
    previous = store / ".previous" / f"{model}.mar"
    entry = {"action": "promote", "model": model, "from_sha256": _sha(active) if active.exists() else None,
             "to_sha256": _sha(new), "candidate_store": str(candidate), "store": str(store), "reason": reason}
    if active.exists():
        previous.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(active, previous)
    tmp = store / f".{model}.mar.tmp"
    shutil.copy2(new, tmp)
    tmp.replace(active)
    audit(state, entry)
    return entry


def rollback(store: str | Path, model: str, state: str | Path, reason: str = "") -> dict:
    store = Path(store)
    previous = store / ".previous" / f"{model}.mar"
    active = store / f"{model}.mar"
    if not previous.is_file():
        raise FileNotFoundError(f"{previous}: nothing to roll back to")
    entry = {"action": "rollback", "model": model, "from_sha256": _sha(active) if active.exists() else None,
             "to_sha256": _sha(previous), "store": str(store), "reason": reason}
    tmp = store / f".{model}.mar.tmp"
    shutil.copy2(previous, tmp)
    tmp.replace(active)
    audit(state, entry)
    return entry
