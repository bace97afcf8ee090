"""``cxrserve monitor feedback LABELS.csv``: realised performance per window once labels come back.

Each CSV row names a study by its ``sop_instance_uid`` (hashed here with the monitor's key, as
serving hashed it), its ``file`` (decoded here: DICOMs by their SOP Instance UID, rasters by
their pixels) or the monitor's ``key``, and gives its ``label`` (the model's label words). Rows
are matched with the monitor's prediction log of the site; matched studies are grouped in
blocks of ``window`` predictions (in the order they were served) and each block gets, per label,
sensitivity and specificity (Wilson 95 % intervals) and one-vs-rest AUC (Hanley-McNeil 95 %
interval), beside the label-free estimate of the same block. Written to
``<state>/<site>/<model>/<version>/feedback.json``; nothing identifying is written.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np

from cxrserve.core import monitor as M

Z = 1.959963984540054


def wilson(k: int, n: int) -> tuple[float | None, float | None, float | None]:
    if n == 0:
        return None, None, None
    p = k / n
    d = 1 + Z * Z / n
    c = (p + Z * Z / (2 * n)) / d
    h = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / d
    return p, max(0.0, c - h), min(1.0, c + h)


def auc(scores: np.ndarray, truth: np.ndarray) -> tuple[float | None, float | None, float | None]:
    """Mann-Whitney AUC with the Hanley-McNeil 95 % interval."""
    pos, neg = scores[truth], scores[~truth]
    n1, n0 = len(pos), len(neg)
    if not n1 or not n0:
        return None, None, None
    a = float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (n1 * n0))
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = math.sqrt(max(a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n0 - 1) * (q2 - a * a), 0) / (n1 * n0))
    return a, max(0.0, a - Z * se), min(1.0, a + Z * se)


def row_key(row: dict, secret: bytes, root: Path) -> str | None:
    if row.get("key"):
        return row["key"]
    uid = (row.get("sop_instance_uid") or "").strip()
    if uid:
        return M.study_key(secret, instance_hash=hashlib.sha256(uid.encode()).hexdigest()[:16])
    name = row.get("file") or row.get("filename")
    if name:
        from cxrserve.tools.monitor.scoring import file_key

        try:
            return file_key(root / name, secret)
        except Exception:
            return None
    return None


def streams(state: Path, site: str, model: str | None) -> list[Path]:
    base = state / M.safe_name(site)
    return sorted(p for p in base.glob("*/*") if p.is_dir() and (model is None or p.parent.name == M.safe_name(model)))


def blocks(state: Path, site: str, model: str | None, labels: dict[str, str], window: int,
           positive: str | None = None) -> dict:
    out = {}
    for folder in streams(state, site, model):
        preds = [p for p in M.read_log(folder / "predictions.jsonl") if p.get("probs")]
        rows = []
        for n in range(0, len(preds), window):
            block = preds[n:n + window]
            recs = [M.Record(site=site, model="", version="", status=p.get("status", "200"), probs=p["probs"],
                             label=p.get("label")) for p in block]
            names = sorted({k for p in block for k in p["probs"]})
            est = M.estimate(recs, names)
            matched = [(p, labels[p["key"]]) for p in block if p["key"] in labels]
            entry = {"block": n // window, "studies": len(block), "labelled": len(matched),
                     "t": block[-1]["t"], "labels": {}}
            for name in ([positive] if positive else names):
                truth = np.asarray([t == name for _, t in matched], bool)
                pred = np.asarray([p.get("label") == name for p, _ in matched], bool)
                score = np.asarray([p["probs"].get(name, 0.0) for p, _ in matched], float)
                sens = wilson(int((truth & pred).sum()), int(truth.sum()))
                spec = wilson(int((~truth & ~pred).sum()), int((~truth).sum()))
                entry["labels"][name] = {"sensitivity": sens, "specificity": spec,
                                         "auc": auc(score, truth) if len(matched) else (None, None, None),
                                         "positives": int(truth.sum()), "estimate": est.get(name, {})}
            rows.append(entry)
        out[f"{folder.parent.name}/{folder.name}"] = rows
        (folder / "feedback.json").write_text(json.dumps(rows))
    return out


def feedback(labels_csv: str | Path, state: str | Path, *, site: str = M.DEFAULT_SITE, model: str | None = None,
             root: str | Path | None = None, positive: str | None = None, window: int = 50) -> dict:
    labels_csv, state = Path(labels_csv), Path(state)
    root = Path(root) if root else labels_csv.parent
    secret = M.monitor_secret(state)
    with labels_csv.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    labels = {}
    for row in rows:
        key = row_key(row, secret, root)
        if key and row.get("label"):
            labels[key] = row["label"]
    result = blocks(state, site, model, labels, window, positive)
    matched = sum(b["labelled"] for bs in result.values() for b in bs)
    summary = {"rows": len(rows), "keys": len(labels), "matched": matched, "streams": {}}
    for name, bs in result.items():
        last = next((b for b in reversed(bs) if b["labelled"]), None)
        summary["streams"][name] = {"blocks": len(bs), "last_labelled_block": last}
    return {"summary": summary, "blocks": result}
