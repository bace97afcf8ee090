"""Fingerprints and summaries of record sets (cards record what a model saw)."""
from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from typing import Any, Iterable, Sequence

from cxrserve.training.datasets.grouping import patient_groups
from cxrserve.training.datasets.records import Record


# --------------------------------------------------------------------------- bookkeeping
def fingerprint(records: Iterable[Record]) -> str:
    """Short stable hash of the records' ``(source/filename, label, file size)``.

    Independent of record order and of where the data lives on disk; changes when an
    image is added, removed, relabelled or replaced by one of another size.

    Args:
        records: the records.

    Returns:
        16 hex characters.
    """
    lines = []
    for r in records:
        try:
            size = r.path.stat().st_size
        except OSError:
            size = -1
        lines.append(f"{r.relpath}\t{r.label}\t{size}")
    h = hashlib.sha256("\n".join(sorted(lines)).encode("utf-8"))
    return h.hexdigest()[:16]


def summarize(records: Sequence[Record]) -> dict:
    """Counts for logs and checkpoint metadata.

    Args:
        records: the records.

    Returns:
        ``{"images", "patients", "labels", "triage_labels", "sources": {source: {images,
        patients, labels, masks, severity, survival, frontal, lateral, adult,
        paediatric}}}``; ``patients`` counts linked groups once.
    """
    groups = patient_groups(records)
    by_source: dict[str, dict[str, Any]] = {}
    src_groups: dict[str, set[int]] = defaultdict(set)
    for r, g in zip(records, groups):
        s = by_source.setdefault(r.source, {
            "images": 0, "patients": 0, "labels": Counter(), "masks": 0, "severity": 0,
            "survival": Counter(), "frontal": 0, "lateral": 0, "adult": 0, "paediatric": 0,
        })
        s["images"] += 1
        s["labels"][r.label] += 1
        s["masks"] += r.mask_path is not None
        s["severity"] += r.geographic_extent is not None and r.opacity is not None
        if r.survival is not None:
            s["survival"][{1: "survived", 0: "died"}[r.survival]] += 1
        s["frontal"] += r.is_frontal is True
        s["lateral"] += r.is_frontal is False
        s["adult"] += r.is_adult is True
        s["paediatric"] += r.is_adult is False
        src_groups[r.source].add(g)
    for name, s in by_source.items():
        s["patients"] = len(src_groups[name])
        s["labels"] = dict(sorted(s["labels"].items()))
        s["survival"] = dict(sorted(s["survival"].items()))
    return {
        "images": len(records),
        "patients": len(set(groups)),
        "labels": dict(sorted(Counter(r.label for r in records).items())),
        "triage_labels": dict(sorted(Counter(str(r.triage_label) for r in records).items())),
        "sources": dict(sorted(by_source.items())),
    }
