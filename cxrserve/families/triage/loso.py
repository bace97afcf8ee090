"""Leave-one-site-out folds of the triage classifier: train on every site but one, score that one.

A classifier can learn the hospital instead of the disease (the catalogue's warning), so the
honest test of the real recipe is a site it never saw. For each held-out site this module

1. keeps out of training every film of that site **and** every film linked to one of its
   patients (``Record.links``: the same radiograph filed under another collection, e.g. the
   gb_covid re-annotations of ieee8023 films, which :data:`SITE_ALIASES` also folds into ieee8023);
2. trains the classifier with the family's ``real:`` recipe under an explicit wall-clock budget
   (``deadline``), on crops cut by one lung segmentation checkpoint (``segmentation``);
3. scores the held-out films in process with the best checkpoint on the same crops serving cuts
   (:func:`~cxrserve.families.triage.pipeline.find_lungs`, ``LungFinding.crop``, the card's
   preprocessing) and writes ``<out>/<site>/scores.npz`` (probabilities, class index, patient index:
   no identifier) and ``fold.json`` (what the fold trained on, per site, and how long).

The site-level statistics and the N-film calibration curves are computed from those files by
:mod:`cxrserve.tools.loso`, which knows no family. Paediatric films (Kermany) are not a fold: the
adult recipe leaves them out of training, so their site would only measure that choice.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cxrserve.core.runtime import TorchRuntime
from cxrserve.core.transforms import build_transform
from cxrserve.families.triage.lungs import LungFinding
from cxrserve.families.triage.pipeline import find_lungs
from cxrserve.families.triage.task_triage import usable_records
from cxrserve.models.checkpoint import load_model
from cxrserve.training.common import ImageCache, resolve_device
from cxrserve.training.datasets import CLASS_LABELS, Record

log = logging.getLogger(__name__)

#: Collections that are another collection's films (CATALOG.md): one site for leaving out.
SITE_ALIASES = {"gb_covid_segmentations": "ieee8023_jun2020"}
#: What the summary needs to read the scores: the served model's family, labels and the label a
#: sensitivity target is about (the issue's: COVID-19 sensitivity >= 0.90 at specificity >= 0.80).
META = {"family": "triage", "model": "cxr-triage", "labels": list(CLASS_LABELS), "positive": "covid19",
        "normal": "normal", "pneumonia": "pneumonia"}


def site_of(record: Record) -> str:
    return SITE_ALIASES.get(record.site, record.site)


def skipped_sites(records: Sequence[Record]) -> dict[str, str]:
    """Sites with triage labels that are not folds, with the reason."""
    adult = {site_of(r) for r in usable_records(records)}
    return {site_of(r): "paediatric films: the adult recipe never trains on them; reported apart, not a fold"
            for r in records if r.triage_label is not None and site_of(r) not in adult}


def held_out_sites(records: Sequence[Record]) -> list[str]:
    return sorted({site_of(r) for r in usable_records(records)})


def fold(records: Sequence[Record], site: str) -> tuple[list[Record], list[Record]]:
    """``(train, held_out)``: the usable films of ``site`` (not its aliases' copies of them, which
    would count a radiograph twice), and every other usable film that is not of the site or an
    alias of it and shares no patient (nor a linked patient) with it."""
    usable = usable_records(records)
    out = [r for r in usable if site_of(r) == site]
    held = [r for r in out if r.site == site]
    keys = {r.patient_key for r in out} | {k for r in out for k in r.links}
    train = [r for r in usable if site_of(r) != site and r.patient_key not in keys
             and not any(k in keys for k in r.links)]
    return train, held


def lung_findings(records: Sequence[Record], segmentation: str | Path, device: str = "auto",
                  cache: ImageCache | None = None, keep: str | Path | None = None) -> dict[Path, LungFinding]:
    """Every film's lung finding from one segmentation checkpoint, cut once for all folds.

    ``keep``: a JSON file of the boxes (what the crops need; the probability maps are dropped),
    read instead of segmenting again when it was written for the same checkpoint."""
    dev = resolve_device(device)
    model, card = load_model(segmentation, dev)
    keep = Path(keep) if keep else None
    out: dict[Path, LungFinding] = {}
    if keep and keep.is_file():
        saved = json.loads(keep.read_text())
        if saved.get("checkpoint") == str(segmentation):
            empty = np.zeros((0, 0), dtype=np.float32)
            for r in records:
                f = saved["films"].get(r.relpath)
                if f is not None:
                    out[r.path] = LungFinding(empty, empty.astype(bool), f["bbox"], f["confidence"], f["crop_used"],
                                              f["area"])
    own = cache is None
    cache = cache or ImageCache()
    runtime = TorchRuntime(model, dev)
    todo = [r for r in {r.path: r for r in records}.values() if r.path not in out]
    for i in range(0, len(todo), 64):  # chunks: the decoded images need not all be held at once
        chunk = todo[i:i + 64]
        out.update(zip((r.path for r in chunk), find_lungs([cache.image(r) for r in chunk], runtime,
                                                           card.preprocessing, card.thresholds)))
        if own:
            cache.images.clear()  # decoded images are not held for all films at once
    if keep and todo:
        films = {r.relpath: {"bbox": None if out[r.path].lung_bbox is None else [int(v) for v in out[r.path].lung_bbox], "confidence": float(out[r.path].segmentation_confidence),
                             "crop_used": bool(out[r.path].crop_used), "area": float(out[r.path].lung_area_fraction)}
                 for r in records}
        keep.write_text(json.dumps({"checkpoint": str(segmentation), "films": films}) + "\n")
    return out


def score(records: Sequence[Record], checkpoint: str | Path, findings: dict[Path, LungFinding],
          device: str = "auto", cache: ImageCache | None = None) -> np.ndarray:
    """(N, 3) probabilities of the classifier checkpoint on the films' lung crops."""
    dev = resolve_device(device)
    model, card = load_model(checkpoint, dev)
    transform = build_transform(card.preprocessing)
    cache = cache or ImageCache()
    out = []
    with torch.inference_mode():
        for i in range(0, len(records), 16):
            xs = torch.stack([transform(findings[r.path].crop(cache.image(r))) for r in records[i:i + 16]])
            out.append(model(xs.to(dev))[0].float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(CLASS_LABELS)))


def patient_index(records: Sequence[Record]) -> np.ndarray:
    """0..P-1 per film; linked patients (same radiograph under two ids) share an index."""
    parent: dict = {}

    def find(k):
        while parent.setdefault(k, k) != k:
            k = parent[k]
        return k

    for r in records:
        for k in r.links:
            parent[find(k)] = find(r.patient_key)
    ids: dict = {}
    return np.array([ids.setdefault(find(r.patient_key), len(ids)) for r in records], dtype=np.int64)


def run_fold(records: Sequence[Record], site: str, out: str | Path, *, segmentation: str | Path,
             findings: dict[Path, LungFinding], budget: float, settings: dict, device: str = "auto",
             train=None, progress: bool = False) -> dict:
    """Train without ``site`` (budget in seconds), score it, write ``scores.npz`` and ``fold.json``.

    A fold whose ``fold.json`` exists is kept as it is (the run resumes fold by fold)."""
    from cxrserve.families.triage import task_triage

    folder = Path(out) / site
    done = folder / "fold.json"
    if done.exists():
        return json.loads(done.read_text())
    train_set, held = fold(records, site)
    started = time.time()
    marker = folder / "trained.json"  # a trained fold is only scored again (e.g. after a change of what is scored)
    if marker.exists():
        best, trained = Path(folder / "run" / "best.ckpt"), json.loads(marker.read_text())["train_seconds"]
    else:
        best = (train or task_triage.train)(train_set, segmentation, folder / "run", device=device,
                                            deadline=started + budget, progress=progress,
                                            lung_findings=findings, **settings)
        trained = time.time() - started
        marker.write_text(json.dumps({"train_seconds": round(trained, 1)}) + "\n")
    scoring = time.time()
    probs = score(held, best, findings, device)
    truth = np.array([CLASS_LABELS.index(r.triage_label) for r in held], dtype=np.int64)
    np.savez(folder / "scores.npz", probs=probs, truth=truth, groups=patient_index(held))
    history = json.loads((folder / "run" / "history.json").read_text()) if (folder / "run" / "history.json").exists() else []
    info = {
        "site": site, **META,
        "held_out": {"films": len(held), "patients": int(np.unique(patient_index(held)).size),
                     "labels": dict(Counter(r.triage_label for r in held))},
        "train": {"films": len(train_set), "by_site": dict(Counter(site_of(r) for r in train_set)),
                  "labels": dict(Counter(r.triage_label for r in train_set))},
        "budget_s": budget, "train_seconds": round(trained, 1), "score_seconds": round(time.time() - scoring, 1),
        "epochs_run": len(history) if isinstance(history, list) else None,
        "settings": {k: v for k, v in settings.items()},
    }
    done.write_text(json.dumps(info, indent=2, default=str) + "\n")
    return info


TASK = "triage"
"""The training task these folds train (the LOSO tool finds this module through it)."""


def segmentation(records: Sequence[Record], out: str | Path, *, budget: float, given: str | Path | None = None,
                 settings: dict | None = None, device: str = "auto", progress: bool = False) -> dict:
    """The lung segmentation checkpoint every fold's crops are cut with: ``given``, or one trained
    here (real recipe, ``budget`` seconds) on every film with a human lung mask. It is trained once,
    not per fold: a fold whose site has masks (OpenIST, ieee8023) is cropped by a model that saw
    those masks (never its triage labels). Its Dice per source is on its own patient-level split."""
    from cxrserve.families.triage import task_lungseg
    from cxrserve.training.recipes import task_settings

    from cxrserve.models.checkpoint import load_checkpoint

    best = Path(given) if given else Path(out) / "lungseg" / "best.ckpt"
    if not given and not (best.parent / "DONE").exists():
        kwargs = {**task_settings("real", "lungseg"), **(settings or {})}
        started = time.time()
        best = task_lungseg.train(records, out_dir=best.parent, device=device, deadline=started + budget,
                                  progress=progress, resume=(best.parent / "last.ckpt").exists(), **kwargs)
    top = load_checkpoint(best)["card"].get("metrics") or {}
    return {"checkpoint": str(best), "trained_here": not given, "epochs_run": top.get("epoch"),
            "dice": top.get("val_dice"), "dice_by_source": {k: v["dice"] for k, v in top.get("val_by_source", {}).items()},
            "films_scored": top.get("val_n"), "split": "its own patient-level validation split (in-distribution)"}
