"""Patient groups: same patient, and near-duplicate images linked as one patient."""
from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from cxrserve.training.datasets.records import Record

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- patient grouping
def patient_groups(records: Sequence[Record]) -> list[int]:
    """Group index per record: ``(source, patient_id)`` keys merged through ``links``.

    Args:
        records: the records.

    Returns:
        one int per record; equal ints mean the same person.
    """
    parent: dict[tuple[str, str], tuple[str, str]] = {}

    def find(k: tuple[str, str]) -> tuple[str, str]:
        parent.setdefault(k, k)
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for r in records:
        a = find(r.patient_key)
        for other in r.links:
            b = find(tuple(other))  # type: ignore[arg-type]
            if a != b:
                parent[max(a, b)] = min(a, b)
                a = find(a)
    ids: dict[tuple[str, str], int] = {}
    return [ids.setdefault(find(r.patient_key), len(ids)) for r in records]


def _thumbnail(path: Path, size: int) -> np.ndarray | None:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        return None
    t = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
    t -= t.mean()
    norm = float(np.linalg.norm(t))
    return t / norm if norm > 0 else t


def find_duplicates(records: Sequence[Record], *, threshold: float = 0.985, size: int = 16) -> list[tuple[int, int, float]]:
    """Near-identical images: correlation of ``size`` x ``size`` grey thumbnails >= threshold.

    At the default settings on ``../shared/data`` this finds the ieee8023 /
    gb_covid_segmentations overlap, ieee8023 images filed under two patient ids, and a
    byte-identical Kermany pair, with no cross-collection false positives. It cannot
    tell a duplicate from two very similar films of one patient, which is harmless for
    splitting.

    Args:
        records: the records (images are read from disk).
        threshold: minimum Pearson correlation of the thumbnails.
        size: thumbnail side in pixels.

    Returns:
        ``(i, j, correlation)`` with ``i < j`` indexes into ``records``.
    """
    thumbs = [_thumbnail(r.path, size) for r in records]
    ok = [i for i, t in enumerate(thumbs) if t is not None]
    if len(ok) < 2:
        return []
    mat = np.stack([thumbs[i] for i in ok])
    pairs: list[tuple[int, int, float]] = []
    block = 1024
    for start in range(0, len(ok), block):
        sim = mat[start:start + block] @ mat.T
        rows, cols = np.nonzero(sim >= threshold)
        for a, b in zip(rows.tolist(), cols.tolist()):
            ia = start + a
            if ia < b:
                pairs.append((ok[ia], ok[b], float(sim[a, b])))
    return pairs


def link_duplicates(records: Sequence[Record], pairs: Iterable[tuple[int, int, float]] | None = None,
                    **kwargs: Any) -> list[Record]:
    """Return copies of the records whose ``links`` join the patients of duplicate images.

    Args:
        records: the records.
        pairs: ``(i, j, ...)`` index pairs; default :func:`find_duplicates` (``kwargs``
            are passed on to it).

    Returns:
        a new list; records that gained links are replaced, others are the same objects.
    """
    if pairs is None:
        pairs = find_duplicates(records, **kwargs)
    extra: dict[int, set[tuple[str, str]]] = defaultdict(set)
    n_cross = 0
    for i, j, *_ in pairs:
        a, b = records[i].patient_key, records[j].patient_key
        if a != b:
            extra[i].add(b)
            extra[j].add(a)
            n_cross += 1
    if n_cross:
        log.info("linked %d duplicate image pairs across patient ids", n_cross)
    out = list(records)
    for i, keys in extra.items():
        keys = set(out[i].links) | keys
        out[i] = dataclasses.replace(out[i], links=tuple(sorted(keys)))
    return out
