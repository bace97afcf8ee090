"""Lung segmentation: U-Net/ResNet34, cross-entropy + soft Dice, Dice per source.

Seed 001 trained on Shenzhen/Montgomery masks with flips, rotation <= 10 degrees and
zoom 0.5-1.1; here: every record with a ground-truth lung mask (openist hand-drawn,
ieee8023 V7 Labs / radiologist polygons, phantoms' exact masks), rotation <= 10
degrees, zoom 0.9-1.1 and intensity jitter, no flips (the heart is on one side).
Dice is measured at the original image size, as a user sees the mask.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from cxrserve.core.card import ModelCard
from cxrserve.training.datasets import Record, fingerprint
from cxrserve.families.triage.lungs import DEFAULT_THRESHOLDS, mask_to_image_size
from cxrserve.training.metrics import dice
from cxrserve.core.transforms import build_augment, build_transform
from cxrserve.training.common import ImageCache, describe_data, split
from cxrserve.training.skeleton import Run, in_chunks

log = logging.getLogger(__name__)

NAME = "lungseg"
PREPROCESSING = "lungseg"


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    prob = torch.softmax(logits, dim=1)[:, 1]
    inter = (prob * target).sum(dim=(1, 2))
    return (1 - (2 * inter + eps) / (prob.sum(dim=(1, 2)) + target.sum(dim=(1, 2)) + eps)).mean()


def predict_probabilities(model, images: Sequence[np.ndarray], device, batch_size: int = 16) -> list[np.ndarray]:
    """Lung probability maps (model resolution) for uint8 images, eager model."""
    transform = build_transform(PREPROCESSING)

    def lung_maps(part: Sequence[np.ndarray]) -> np.ndarray:
        return model(torch.stack([transform(img) for img in part]).to(device))[:, 0].float().cpu().numpy()

    with torch.no_grad():
        return in_chunks(images, batch_size, lung_maps)


def dice_by_source(records: Sequence[Record], probabilities: Sequence[np.ndarray], cache: ImageCache,
                   threshold: float = 0.5) -> dict:
    by_source: dict[str, list[float]] = defaultdict(list)
    for record, prob in zip(records, probabilities):
        truth = cache.mask(record)
        pred = mask_to_image_size(prob, (truth.shape[1], truth.shape[0]), threshold)
        by_source[record.source].append(dice(pred, truth))
    every = [d for values in by_source.values() for d in values]
    return {
        "dice": float(np.mean(every)) if every else None,
        "n": len(every),
        "by_source": {s: {"dice": float(np.mean(v)), "dice_median": float(np.median(v)), "n": len(v)}
                      for s, v in sorted(by_source.items())},
    }


def training_split(records: Sequence[Record], val_fraction: float = 0.2, seed: int = 0,
                   ) -> tuple[list[Record], list[Record]]:
    """The (train, val) split :func:`train` uses: frontal images with masks, by patient, per source."""
    usable = [r for r in records if r.mask_path is not None and r.is_frontal is not False]
    if len(usable) < 4:
        raise ValueError(f"need images with lung masks; got {len(usable)} of {len(records)} records")
    return split(usable, val_fraction, seed, stratify=lambda r: r.source)


def train(records: Sequence[Record], out_dir: str | Path, *, epochs: int = 30, steps_per_epoch: int | None = None,
          batch_size: int = 8, lr: float = 1e-3, val_fraction: float = 0.2, seed: int = 0, patience: int = 6,
          resume: bool = False, device: str = "auto", demo: bool = False, version: str = "0.1.0",
          max_val: int | None = None, init: str | None = None, progress: bool = True,
          deadline: float | None = None) -> Path:
    """Train the lung U-Net on records that have ground-truth masks; returns best.ckpt."""
    run = Run.start(out_dir, device=device, seed=seed, epochs=epochs, steps_per_epoch=steps_per_epoch,
                    batch_size=batch_size, lr=lr, patience=patience, resume=resume, progress=progress,
                    deadline=deadline)
    train_set, val_set = training_split(records, val_fraction, seed)
    usable = train_set + val_set
    val_set = val_set[:max_val] if max_val else val_set
    cache = ImageCache()
    transform = build_transform(PREPROCESSING)
    augment = build_augment("standard", seed=seed)
    size = 224

    card = ModelCard(
        name=NAME, architecture="unet_resnet34", task="segmentation", preprocessing=PREPROCESSING,
        labels=["background", "lung"], arch_kwargs={"in_channels": 1, "num_classes": 2},
        thresholds=dict(DEFAULT_THRESHOLDS), demo=demo, version=version,
        trained_on=describe_data(usable), data_fingerprint=fingerprint(usable),
        extra={"split": {"val_fraction": val_fraction, "seed": seed, "train": len(train_set), "val": len(val_set)}},
    )
    model = run.model(card, init)

    def train_batches(epoch: int):
        for idx in run.batches(len(train_set), epoch):
            xs, ys = [], []
            for i in idx:
                img, mask = augment(cache.image(train_set[i]), cache.mask(train_set[i]).astype(np.uint8))
                xs.append(transform(img))
                ys.append(torch.from_numpy(cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)).long())
            yield torch.stack(xs).to(run.device), torch.stack(ys).to(run.device)

    def step(model, batch):
        x, y = batch
        logits = model.logits(x)
        return F.cross_entropy(logits, y) + soft_dice_loss(logits, y.float())

    def evaluate(model):
        probs = predict_probabilities(model, [cache.image(r) for r in val_set], run.device)
        report = dice_by_source(val_set, probs, cache, card.thresholds["mask"])
        return {"val_dice": report["dice"], "val_n": report["n"], "val_by_source": report["by_source"]}

    return run.fit(model, card, train_batches, step, evaluate, n_train=len(train_set), monitor="val_dice")


def evaluate(pipeline, records: Sequence[Record], cache: ImageCache | None = None) -> dict:
    """Dice per source of a served ``cxr-lungseg``/``cxr-triage`` pipeline (in process)."""
    from cxrserve.families.triage.pipeline import find_lungs

    cache = cache or ImageCache(max_side=None)
    usable = [r for r in records if r.mask_path is not None]
    seg = pipeline.parts["lungseg"]
    findings = find_lungs([cache.image(r) for r in usable], seg.runtime, seg.card.preprocessing,
                          seg.card.thresholds, pipeline.limits.max_batch)
    return dice_by_source(usable, [f.probability for f in findings], cache, seg.card.thresholds.get("mask", 0.5))
