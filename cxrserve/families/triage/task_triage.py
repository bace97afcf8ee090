"""COVID-19 / normal / pneumonia classifier on the lung crop (seed 001).

The crops come from the trained lung U-Net through :func:`cxrserve.families.triage.pipeline.find_lungs`
and :meth:`LungFinding.crop` -- the very functions the server runs -- so the
classifier trains on the crops it will be served. Augmentation jitters the box
(+-4 % per side) and the intensities; class weights are inverse class frequencies.
Paediatric films (Kermany) are left out unless asked for: adult and paediatric
pneumonia look different and the catalogue says to keep them apart.
"""
from __future__ import annotations

import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cxrserve.core.card import ModelCard
from cxrserve.models.checkpoint import load_model
from cxrserve.training.datasets import CLASS_LABELS, Record, fingerprint
from cxrserve.families.triage.lungs import LungFinding, analyse_lungs
from cxrserve.training.metrics import confusion_matrix, per_class_report
from cxrserve.core.runtime import TorchRuntime
from cxrserve.core.transforms import RandomIntensity, build_transform
from cxrserve.families.triage.pipeline import find_lungs
from cxrserve.training.common import ImageCache, describe_data, split
from cxrserve.training.skeleton import Run, in_chunks, serve_records

log = logging.getLogger(__name__)

NAME = "triage_classifier"
PREPROCESSING = "triage_crop"


def usable_records(records: Sequence[Record], include_paediatric: bool = False) -> list[Record]:
    out = [r for r in records if r.triage_label is not None]
    if not include_paediatric:
        out = [r for r in out if r.is_adult is not False and "kermany" not in r.source]
    return out


def training_split(records: Sequence[Record], val_fraction: float = 0.2, seed: int = 0,
                   include_paediatric: bool = False) -> tuple[list[Record], list[Record]]:
    """The (train, val) split :func:`train` uses: labelled (adult) images, by patient."""
    usable = usable_records(records, include_paediatric)
    if len({r.triage_label for r in usable}) < 2:
        raise ValueError("need at least two of covid19 / normal / pneumonia among the records")
    return split(usable, val_fraction, seed)


def jitter_crop(image: np.ndarray, finding: LungFinding, rng: np.random.Generator, amount: float = 0.04) -> np.ndarray:
    if not finding.crop_used or finding.lung_bbox is None:
        return image
    h, w = image.shape[:2]
    x0, y0, x1, y1 = finding.lung_bbox
    bw, bh = x1 - x0, y1 - y0
    dx0, dx1 = rng.uniform(-amount, amount, 2) * bw
    dy0, dy1 = rng.uniform(-amount, amount, 2) * bh
    x0, x1 = int(max(0, x0 + dx0)), int(min(w, max(x0 + dx0 + 2, x1 + dx1)))
    y0, y1 = int(max(0, y0 + dy0)), int(min(h, max(y0 + dy0 + 2, y1 + dy1)))
    return image[y0:y1, x0:x1]


def classification_report(records: Sequence[Record], predicted: Sequence[str], labels=CLASS_LABELS) -> dict:
    truth = [r.triage_label for r in records]
    cm = confusion_matrix(truth, predicted, list(labels))
    report = {"n": len(records), "labels": list(labels), "confusion_matrix": cm.tolist(),
              **per_class_report(cm, list(labels))}
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_source[r.source].append(i)
    report["by_source"] = {}
    for source, idx in sorted(by_source.items()):
        cm_s = confusion_matrix([truth[i] for i in idx], [predicted[i] for i in idx], list(labels))
        report["by_source"][source] = {"n": len(idx), "confusion_matrix": cm_s.tolist(),
                                       **per_class_report(cm_s, list(labels))}
    return report


def train(records: Sequence[Record], segmentation: str | Path, out_dir: str | Path, *, epochs: int = 30,
          steps_per_epoch: int | None = None, batch_size: int = 8, lr: float = 3e-4, val_fraction: float = 0.2,
          seed: int = 0, patience: int = 6, resume: bool = False, device: str = "auto", demo: bool = False,
          version: str = "0.1.0", include_paediatric: bool = False, crop_source: str = "predicted",
          max_val: int | None = None, augment: bool = True, dropout: float = 0.2,
          init: str | None = None, progress: bool = True, deadline: float | None = None,
          lung_findings: dict[Path, LungFinding] | None = None) -> Path:
    """Train the classifier on lung crops cut by the segmentation checkpoint ``segmentation``.

    ``crop_source="truth"`` cuts training crops from ground-truth masks where a record
    has one (same box rules); the demo recipe uses it to skip segmenting every phantom.
    ``lung_findings`` (image path -> finding, cut by the same ``segmentation`` checkpoint) are used
    instead of segmenting those films again: leave-one-site-out folds cut every film once.
    """
    run = Run.start(out_dir, device=device, seed=seed, epochs=epochs, steps_per_epoch=steps_per_epoch,
                    batch_size=batch_size, lr=lr, patience=patience, resume=resume, progress=progress,
                    deadline=deadline)
    dev = run.device
    train_set, val_set = training_split(records, val_fraction, seed, include_paediatric)
    val_set = val_set[:max_val] if max_val else val_set
    usable = train_set + val_set
    cache = ImageCache()

    seg_model, seg_card = load_model(segmentation, dev)
    findings: dict[Path, LungFinding] = {}
    if crop_source == "truth":
        for r in usable:
            if r.mask_path is not None:
                mask = cache.mask(r).astype(np.float32)
                findings[r.path] = analyse_lungs(mask, (mask.shape[1], mask.shape[0]), seg_card.thresholds)
    for r in usable:
        if r.path not in findings and lung_findings and r.path in lung_findings:
            findings[r.path] = lung_findings[r.path]
    todo = [r for r in usable if r.path not in findings]
    log.info("cutting lung crops for %d images with %s", len(todo), seg_card.name)
    findings.update(zip(
        (r.path for r in todo),
        find_lungs([cache.image(r) for r in todo], TorchRuntime(seg_model, dev), seg_card.preprocessing,
                   seg_card.thresholds),
    ))
    crop_rate = float(np.mean([findings[r.path].crop_used for r in usable]))

    counts = Counter(r.triage_label for r in train_set)
    weights = torch.tensor([len(train_set) / (len(CLASS_LABELS) * max(1, counts[c])) for c in CLASS_LABELS],
                           dtype=torch.float32, device=dev)
    card = ModelCard(
        name=NAME, architecture="resnet34_cam", task="classification", preprocessing=PREPROCESSING,
        labels=list(CLASS_LABELS), arch_kwargs={"num_classes": 3, "in_channels": 3, "dropout": dropout},
        demo=demo, version=version, trained_on=describe_data(usable), data_fingerprint=fingerprint(usable),
        extra={"segmentation": {"name": seg_card.name, "version": seg_card.version,
                                "fingerprint": seg_card.data_fingerprint},
               "crop_rate": crop_rate, "crop_source": crop_source, "class_weights": weights.tolist(),
               "split": {"val_fraction": val_fraction, "seed": seed, "train": len(train_set), "val": len(val_set)}},
    )
    model = run.model(card, init)
    transform = build_transform(PREPROCESSING)
    intensity = RandomIntensity(seed=seed)
    label_index = {c: i for i, c in enumerate(CLASS_LABELS)}
    # Without augmentation every epoch sees the same tensors: compute them once.
    inputs = {r.path: transform(findings[r.path].crop(cache.image(r))) for r in (usable if not augment else val_set)}
    val_inputs = [inputs[r.path] for r in val_set]

    def train_batches(epoch: int):
        rng = np.random.default_rng((seed, epoch, 7))
        for idx in run.batches(len(train_set), epoch):
            if augment:
                xs = [transform(intensity(jitter_crop(cache.image(train_set[i]), findings[train_set[i].path], rng)))
                      for i in idx]
            else:
                xs = [inputs[train_set[i].path] for i in idx]
            ys = [label_index[train_set[i].triage_label] for i in idx]
            yield torch.stack(xs).to(dev), torch.tensor(ys, device=dev)

    def step(model, batch):
        x, y = batch
        return F.cross_entropy(model.logits(x), y, weight=weights, label_smoothing=0.05)

    def evaluate(model):
        probs = in_chunks(val_inputs, 16, lambda xs: model(torch.stack(xs).to(dev))[0].cpu().numpy())
        pred = [CLASS_LABELS[k] for k in np.argmax(probs, 1)] if probs else []
        report = classification_report(val_set, pred)
        return {"val_macro_f1": report["macro_f1"], "val_accuracy": report["accuracy"],
                "val_balanced_accuracy": report["balanced_accuracy"], "val_report": report}

    return run.fit(model, card, train_batches, step, evaluate, n_train=len(train_set), monitor="val_macro_f1")


def evaluate(pipeline, records: Sequence[Record], include_paediatric: bool = True) -> dict:
    """Confusion matrix, sensitivity and PPV per class and per source, through the served pipeline."""
    usable = usable_records(records, include_paediatric)
    answers = serve_records(pipeline, usable)
    # An enforced input gate may refuse films (422): scored over the accepted ones, with the
    # refusals counted beside them (a refusal has no column in the confusion matrix).
    kept = [(r, a) for r, a in zip(usable, answers) if a is not None]
    refused = [r for r, a in zip(usable, answers) if a is None]
    report = classification_report([r for r, _ in kept], [a["label"] for _, a in kept])
    report["rejected"] = len(refused)
    report["rejected_by_class"] = dict(Counter(r.triage_label for r in refused))
    report["crop_rate"] = float(np.mean([bool(a and a.get("crop_used")) for a in answers])) if answers else None
    return report
