"""Patient-level splits: train/val(/test), repeated splits and k-fold, stratified."""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np

from cxrserve.training.datasets.grouping import patient_groups
from cxrserve.training.datasets.records import Record


# --------------------------------------------------------------------------- splits
def _strata(records: Sequence[Record], stratify: bool | Callable[[Record], Any]) -> list[Any]:
    if callable(stratify):
        return [stratify(r) for r in records]
    if stratify:
        return [(r.source, r.label) for r in records]
    return [0] * len(records)


def _assign_parts(records: Sequence[Record], fractions: Sequence[float], seed: int,
                  stratify: bool | Callable[[Record], Any]) -> list[int]:
    """Part index per record; whole patient groups go to one part.

    Greedy: groups are shuffled (seeded) and taken largest first; each goes to the part
    where it most reduces the squared gap between the part's per-stratum counts and
    their targets ``fraction * stratum total``. Ties are broken by the shuffled order.
    """
    fr = np.asarray(fractions, dtype=float)
    if np.any(fr < 0) or fr.sum() <= 0:
        raise ValueError(f"bad fractions {fractions}")
    fr = fr / fr.sum()
    groups = patient_groups(records)
    strata = _strata(records, stratify)
    s_index = {s: k for k, s in enumerate(sorted(set(strata), key=repr))}
    n_groups = max(groups) + 1 if groups else 0
    counts = np.zeros((n_groups, len(s_index)))
    for g, s in zip(groups, strata):
        counts[g, s_index[s]] += 1
    totals = counts.sum(axis=0)
    target = fr[:, None] * totals[None, :]
    current = np.zeros_like(target)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_groups)
    sizes = counts.sum(axis=1)
    order = order[np.argsort(-sizes[order], kind="stable")]
    # Weight strata by 1/total so rare labels count as much as common ones.
    w = 1.0 / np.maximum(totals, 1.0)
    # Also keep overall part sizes on target.
    size_target = fr * sizes.sum()
    size_current = np.zeros(len(fr))
    part_of_group = np.zeros(n_groups, dtype=int)
    active = fr > 0
    for g in order:
        c = counts[g]
        delta = ((c[None, :] * (2 * (current - target) + c[None, :])) * w[None, :]).sum(axis=1)
        delta += sizes[g] * (2 * (size_current - size_target) + sizes[g]) / max(sizes.sum(), 1.0)
        delta[~active] = np.inf
        p = int(np.argmin(delta))
        part_of_group[g] = p
        current[p] += c
        size_current[p] += sizes[g]
    return [int(part_of_group[g]) for g in groups]


def patient_split(
    records: Sequence[Record],
    *,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    stratify: bool | Callable[[Record], Any] = True,
) -> dict[str, list[Record]]:
    """Split records into train / val (/ test) with no patient in two parts.

    A patient is a group of :func:`patient_groups` (``(source, patient_id)`` plus
    ``links``). With ``stratify`` (default: by ``(source, label)``; or pass a callable
    ``Record -> key``) whole patients are assigned greedily so each part's stratum mix
    is close to the overall mix. Deterministic for a given seed and record order.

    Args:
        records: the records.
        val_fraction: share of images for ``val``.
        test_fraction: share for ``test``; the key is present only when > 0.
        seed: RNG seed.
        stratify: True, False, or a callable giving the stratum of a record.

    Returns:
        ``{"train": [...], "val": [...]}`` (+ ``"test"``), each in input order.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError("need 0 <= val_fraction, test_fraction and their sum < 1")
    names = ["train", "val"] + (["test"] if test_fraction > 0 else [])
    fr = [1 - val_fraction - test_fraction, val_fraction] + ([test_fraction] if test_fraction > 0 else [])
    out: dict[str, list[Record]] = {n: [] for n in names}
    if not records:
        return out
    parts = _assign_parts(records, fr, seed, stratify)
    for r, p in zip(records, parts):
        out[names[p]].append(r)
    return out


def repeated_patient_splits(
    records: Sequence[Record], n_splits: int, test_fraction: float = 0.5, seed: int = 0,
    *, stratify: bool | Callable[[Record], Any] = True,
) -> Iterator[tuple[list[Record], list[Record]]]:
    """``n_splits`` random train/test splits grouped by patient (Cohen et al. 2020 style).

    Args:
        records: the records.
        n_splits: number of splits.
        test_fraction: share of images in test (0.5: the ~50/50 splits of the paper).
        seed: base seed; split ``i`` uses a seed derived from it.
        stratify: as in :func:`patient_split`.

    Yields:
        ``(train, test)`` lists.
    """
    ss = np.random.SeedSequence(seed)
    for child in ss.spawn(n_splits):
        s = int(child.generate_state(1)[0])
        parts = _assign_parts(records, [1 - test_fraction, test_fraction], s, stratify)
        yield ([r for r, p in zip(records, parts) if p == 0], [r for r, p in zip(records, parts) if p == 1])


def patient_kfold(records: Sequence[Record], k: int, seed: int = 0, *,
                  stratify: bool | Callable[[Record], Any] = True) -> list[tuple[list[Record], list[Record]]]:
    """Grouped (and stratified) k-fold: each patient is in exactly one test fold.

    Args:
        records: the records.
        k: number of folds (>= 2).
        seed: RNG seed.
        stratify: as in :func:`patient_split`.

    Returns:
        ``k`` ``(train, test)`` pairs.
    """
    if k < 2:
        raise ValueError("k must be >= 2")
    parts = _assign_parts(records, [1.0 / k] * k, seed, stratify) if records else []
    return [
        ([r for r, p in zip(records, parts) if p != f], [r for r, p in zip(records, parts) if p == f])
        for f in range(k)
    ]
