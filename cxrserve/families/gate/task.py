"""Input gate training and evaluation: frontal CXR vs inverted CXR vs anything else.

Classes (:data:`cxrserve.models.gate.GATE_LABELS`): ``frontal_cxr`` for frontal chest
films; ``other`` for laterals, other body parts (hand, knee, pelvis, hip, tibia,
abdomen) and non-medical pictures; ``inverted_cxr`` for frontal films whose grey
values were inverted (made here from frontal images with ``255 - x``: a MONOCHROME1/2
mix-up upstream turns bone dark and lungs bright, and the models would score it
without complaint).

Data: demo store, a phantom set mixing kinds (``frontal``, ``lateral``, ``hand``,
``knee``, ``pelvis``, ``natural``); real model, the frontal films of ``../shared/data``
against its laterals, plus phantom non-chest kinds (the data has no real hands or
knees), split by patient. The real non-chest and chest DICOMs of
``dicom_samples`` are kept for held-out evaluation only (:func:`dicom_sample_records`).

The served score is P(frontal_cxr); the accept threshold is in the card
(``thresholds.accept``), overridable per archive by ``handler: gate_threshold``.
"""
from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cxrserve.core.card import ModelCard
from cxrserve.training.datasets import Record, fingerprint
from cxrserve.training.metrics import confusion_matrix, per_class_report
from cxrserve.core.pipeline import gate_verdict
from cxrserve.models.gate import GATE_LABELS
from cxrserve.core.transforms import RandomAffine, RandomIntensity, build_transform
from cxrserve.training.common import ImageCache, describe_data, split
from cxrserve.training.skeleton import Run, in_chunks

log = logging.getLogger(__name__)

NAME = "gate"
PREPROCESSING = "gate"
FRONTAL, INVERTED, OTHER = GATE_LABELS
NON_FRONTAL_KINDS = {"lateral", "hand", "knee", "pelvis", "natural", "non_chest"}


def gate_label(record: Record) -> str:
    """``frontal_cxr`` or ``other`` from a record's kind / frontal flag (inversion is synthetic)."""
    kind = (record.extras.get("kind") or "").strip().lower()
    if record.source == "dicom_samples" and "Fake_MONOCHROME1" in record.filename:
        return INVERTED  # tag says MONOCHROME1 over MONOCHROME2 pixels: decodes as a negative
    if kind in NON_FRONTAL_KINDS or record.is_frontal is False or record.label in ("non_chest", "lateral"):
        return OTHER
    if record.extras.get("gate_label"):
        return record.extras["gate_label"]
    return FRONTAL


def dicom_sample_records(data_root: str | Path) -> list[Record]:
    """``dicom_samples/`` as records: chest files are frontal, non-chest ``other``.

    ``SIIM_Fake_MONOCHROME1.dcm`` is labelled ``inverted_cxr``: its tag says MONOCHROME1
    over pixels stored MONOCHROME2, so a correct decoder shows a negative image; that is
    exactly the mix-up the ``inverted_cxr`` class exists to catch. ``derived/`` holds a
    re-encoded copy of a chest file and is left out so no image counts twice.
    """
    root = Path(data_root) / "dicom_samples"
    records = []
    with open(root / "labels.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["filename"].startswith("derived/"):
                continue
            fake_mono1 = "Fake_MONOCHROME1" in row["filename"]
            label = INVERTED if fake_mono1 else (FRONTAL if row["label"] == "chest" else OTHER)
            records.append(Record(path=root / row["filename"], source="dicom_samples", label=row["label"],
                                  patient_id=Path(row["filename"]).stem, is_frontal=row["label"] == "chest",
                                  extras={"gate_label": label, "kind": "" if row["label"] == "chest" else "non_chest"},
                                  filename=row["filename"]))
    return records


def _inverted(img: np.ndarray) -> np.ndarray:
    return 255 - img


def _gate_image(cache: ImageCache, record: Record) -> np.ndarray:
    """The uint8 grey image as served (through the server's decoder), long side <= 256."""
    return cache.image(record)


def train(records: Sequence[Record], out_dir: str | Path, *, epochs: int = 8, steps_per_epoch: int | None = None,
          batch_size: int = 32, lr: float = 2e-3, val_fraction: float = 0.2, seed: int = 0, patience: int = 4,
          resume: bool = False, device: str = "auto", demo: bool = False, version: str = "0.1.0",
          max_val: int | None = None, invert_fraction: float = 0.2, accept_threshold: float = 0.5,
          extra_negatives: Sequence[str | Path] = (), width: int = 8, augment: bool = True,
          init: str | None = None, progress: bool = True, deadline: float | None = None) -> Path:
    """Train the gate; ``extra_negatives`` adds folders (e.g. phantom kinds) to the training data.

    With ``augment`` (real data), ``invert_fraction`` of the frontal images in every
    batch are inverted and labelled ``inverted_cxr``; without it (demo), inverted copies
    of that share of the frontal images are added once. The validation set inverts
    every 5th frontal image, so its numbers are reproducible.
    """
    from cxrserve.training.common import load_records

    run = Run.start(out_dir, device=device, seed=seed, epochs=epochs, steps_per_epoch=steps_per_epoch,
                    batch_size=batch_size, lr=lr, patience=patience, resume=resume, progress=progress,
                    deadline=deadline)
    dev = run.device
    records = list(records) + (load_records(list(extra_negatives)) if extra_negatives else [])
    # Default stratification (source, label), so `cxrserve eval gate --split val` sees this very split.
    train_set, val_set = split(records, val_fraction, seed)
    val_set = val_set[:max_val] if max_val else val_set
    if len({gate_label(r) for r in train_set}) < 2:
        raise ValueError("the gate needs frontal and non-frontal images to train on")
    cache = ImageCache(max_side=256)
    transform = build_transform(PREPROCESSING)
    index = {label: i for i, label in enumerate(GATE_LABELS)}
    counts = Counter(gate_label(r) for r in train_set)
    card = ModelCard(
        name=NAME, architecture="gate_cnn", task="gate", preprocessing=PREPROCESSING, labels=list(GATE_LABELS),
        arch_kwargs={"num_classes": len(GATE_LABELS), "in_channels": 1, "width": width},
        thresholds={"accept": accept_threshold}, demo=demo, version=version,
        trained_on=describe_data(records), data_fingerprint=fingerprint(records),
        extra={"score": "P(frontal_cxr)", "invert_fraction": invert_fraction,
               "split": {"val_fraction": val_fraction, "seed": seed, "train": len(train_set), "val": len(val_set)},
               "train_counts": dict(counts)},
    )
    model = run.model(card, init)
    affine = RandomAffine(degrees=12, zoom=(0.8, 1.15), shift=0.08, seed=seed)
    intensity = RandomIntensity(seed=seed + 1)

    val_x, val_y = [], []
    for i, r in enumerate(val_set):
        img, label = _gate_image(cache, r), gate_label(r)
        if label == FRONTAL and i % 5 == 0:
            img, label = _inverted(img), INVERTED
        val_x.append(transform(img))
        val_y.append(label)
    # Class weights from the expected training mix (inversion moves frontal images across).
    n_front = counts.get(FRONTAL, 0)
    mix = {FRONTAL: n_front * (1 - invert_fraction if augment else 1.0), INVERTED: n_front * invert_fraction,
           OTHER: counts.get(OTHER, 0) + counts.get(INVERTED, 0)}
    weights = torch.tensor([len(train_set) / (len(GATE_LABELS) * max(1.0, mix[c])) for c in GATE_LABELS],
                           dtype=torch.float32, device=dev)
    card.extra["class_weights"] = weights.tolist()

    # Without augmentation every epoch sees the same tensors: compute them once, with
    # inverted copies of a fixed share of the frontal images.
    fixed: list[tuple[torch.Tensor, int]] = []
    if not augment:
        pick = np.random.default_rng((seed, 5))
        for r in train_set:
            img, label = _gate_image(cache, r), gate_label(r)
            fixed.append((transform(img), index[label]))
            if label == FRONTAL and pick.random() < invert_fraction:
                fixed.append((transform(_inverted(img)), index[INVERTED]))

    def train_batches(epoch: int):
        if fixed:
            for idx in run.batches(len(fixed), epoch):
                yield (torch.stack([fixed[i][0] for i in idx]).to(dev),
                       torch.tensor([fixed[i][1] for i in idx], device=dev))
            return
        rng = np.random.default_rng((seed, epoch, 3))
        for idx in run.batches(len(train_set), epoch):
            xs, ys = [], []
            for i in idx:
                r = train_set[i]
                img, label = intensity(affine(_gate_image(cache, r))), gate_label(r)
                if label == FRONTAL and rng.random() < invert_fraction:
                    img, label = _inverted(img), INVERTED
                xs.append(transform(img))
                ys.append(index[label])
            yield torch.stack(xs).to(dev), torch.tensor(ys, device=dev)

    def step(model, batch):
        x, y = batch
        return F.cross_entropy(model.logits(x), y, weight=weights, label_smoothing=0.05)

    def evaluate(model):
        probs = in_chunks(val_x, 64, lambda xs: model(torch.stack(xs).to(dev)).float().cpu().numpy())
        report = gate_report(val_y, probs, accept_threshold)
        return {"val_accuracy": report["accept_accuracy"], "val_macro_f1": report["macro_f1"], "val_report": report}

    n_train = len(fixed or train_set)
    return run.fit(model, card, train_batches, step, evaluate, n_train=n_train, monitor="val_accuracy",
                   warmup_steps=min(10, run.steps(n_train)))


def gate_report(truth: Sequence[str], probs: np.ndarray, threshold: float, sources: Sequence[str] | None = None) -> dict:
    """Accept/reject accuracy at ``threshold`` plus the 3-class confusion matrix.

    A prediction is "accept" when P(frontal_cxr) >= threshold; the verdict of a rejected
    image is its more likely non-frontal class.
    """
    probs = np.asarray(probs, dtype=np.float64)
    verdicts = [gate_verdict(GATE_LABELS, p, threshold) for p in probs]
    accept_truth = np.array([t == FRONTAL for t in truth])
    accept_pred = np.array([v == FRONTAL for v in verdicts])
    cm = confusion_matrix(list(truth), verdicts, list(GATE_LABELS))
    report = {
        "n": len(truth), "threshold": threshold,
        "accept_accuracy": float(np.mean(accept_truth == accept_pred)) if len(truth) else None,
        "frontal_accepted": float(np.mean(accept_pred[accept_truth])) if accept_truth.any() else None,
        "non_frontal_rejected": float(np.mean(~accept_pred[~accept_truth])) if (~accept_truth).any() else None,
        "labels": list(GATE_LABELS), "confusion_matrix": cm.tolist(), **per_class_report(cm, list(GATE_LABELS)),
    }
    if sources is not None:
        by: dict[str, dict] = {}
        for src in sorted(set(sources)):
            idx = [i for i, s in enumerate(sources) if s == src]
            t, a = accept_truth[idx], accept_pred[idx]
            by[src] = {"n": len(idx), "accept_accuracy": float(np.mean(t == a)),
                       "verdicts": dict(Counter(verdicts[i] for i in idx))}
        report["by_source"] = by
    return report


def evaluate(pipeline, records: Sequence[Record], include_inverted: bool = True) -> dict:
    """Held-out accuracy of a served pipeline's gate (``pipeline.gate``), per source.

    Every frontal record is scored as is and, with ``include_inverted``, once more
    inverted (labelled ``inverted_cxr``), so the inversion check has its own numbers.
    """
    from cxrserve.core.imageio import read_file

    gate = pipeline.gate
    if gate is None:
        raise ValueError(f"{pipeline.name} ships no gate component")
    transform = gate.transform()
    truth, sources, inputs = [], [], []
    for r in records:
        img = read_file(r.path).uint8
        label = gate_label(r)
        truth.append(label)
        sources.append(r.source)
        inputs.append(transform(img))
        if include_inverted and label == FRONTAL:
            truth.append(INVERTED)
            sources.append(f"{r.source} (inverted)")
            inputs.append(transform(_inverted(img)))
    outputs = gate.runtime.run_chunked(inputs, 64)
    probs = np.stack([o[0] for o in outputs])
    return gate_report(truth, probs, pipeline.gate_threshold, sources)
