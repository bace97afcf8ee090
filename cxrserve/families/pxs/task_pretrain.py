"""``cxrserve train pxs_pretrain``: stage 1 of PXS, contrastive pre-training on weak labels.

Normal (0) versus abnormal lung (1: COVID-19 or pneumonia), adult frontal films only. Loss
(Hadsell et al., as in the seed): ``(1 - y) d^2 + y max(0, margin - d)^2`` with ``d`` the
embedding distance of a pair and ``y = 1`` for a different pair; margin 50 as in the seed.
Pairs are all pairs inside a class-balanced batch (half normal, half abnormal) and
same/different pairs are weighted 50:50, as the seed's sampler drew them. Validation: ROC
AUC of the PXS (median distance to the validation normals) for normal vs abnormal. Stage 2
(:mod:`.task`) starts from its checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cxrserve.core.transforms import build_transform
from cxrserve.families.pxs.training import (PREPROCESSING, PRETRAIN_NAME, _augmenter, _new_card,
                                            class_balanced_batches, contrastive_loss, embed_images, pair_index,
                                            pxs_against, usable, weak_label)
from cxrserve.models.siamese import euclidean
from cxrserve.training.common import ImageCache, split
from cxrserve.training.datasets import Record, patient_groups
from cxrserve.training.metrics import roc_auc
from cxrserve.training.skeleton import Run


def pretrain_records(records: Sequence[Record], exclude_scored: bool = True) -> list[Record]:
    """Adult frontal films with a weak label; ``exclude_scored`` drops every patient who
    has a severity-scored image anywhere in ``records`` (stage 2's held-out data).
    Phantoms all carry scores, so the demo recipe turns it off."""
    groups = patient_groups(records)
    scored = {g for g, r in zip(groups, records) if r.geographic_extent is not None} if exclude_scored else set()
    return [r for g, r in zip(groups, records) if g not in scored and usable(r) and weak_label(r) is not None]


def train(records: Sequence[Record], out_dir: str | Path, *, epochs: int = 4, steps_per_epoch: int | None = None,
          batch_size: int = 8, lr: float = 3e-4, margin: float = 50.0, val_fraction: float = 0.15, seed: int = 0,
          patience: int = 3, exclude_scored: bool = True, augment: bool = True, max_val: int | None = 160,
          head_gain: float = 1.0, resume: bool = False, device: str = "auto", demo: bool = False,
          version: str = "0.1.0", init: str | None = None, progress: bool = True,
          deadline: float | None = None) -> Path:
    """Stage 1: contrastive pre-training on normal vs abnormal weak labels; returns best.ckpt.

    The seed fine-tuned an ImageNet DenseNet at lr 2e-5; nothing here downloads
    weights, so the trunk starts from scratch at a higher lr. Records: see
    :func:`pretrain_records`.
    """
    run = Run.start(out_dir, device=device, seed=seed, epochs=epochs, steps_per_epoch=steps_per_epoch,
                    batch_size=batch_size, lr=lr, patience=patience, resume=resume, progress=progress,
                    deadline=deadline)
    dev = run.device
    usable_records = pretrain_records(records, exclude_scored)
    labels_all = {r.path: weak_label(r) for r in usable_records}
    if len(set(labels_all.values())) < 2:
        raise ValueError("stage 1 needs both normal and abnormal (COVID-19 / pneumonia) frontal images")
    train_set, val_set = split(usable_records, val_fraction, seed, stratify=lambda r: (r.source, weak_label(r)))
    val_set = val_set[:max_val] if max_val else val_set
    cache = ImageCache()
    transform = build_transform(PREPROCESSING)
    augmenter = _augmenter(augment, seed)
    labels = np.array([labels_all[r.path] for r in train_set])
    val_labels = np.array([labels_all[r.path] for r in val_set])

    card = _new_card(PRETRAIN_NAME, stage="pretrain", records=usable_records, demo=demo, version=version, extra={
        "margin": margin, "weak_labels": {"0": "normal", "1": "COVID-19 or pneumonia"},
        "exclude_scored": exclude_scored,
        "split": {"val_fraction": val_fraction, "seed": seed, "train": len(train_set), "val": len(val_set)},
    }, head_gain=head_gain)
    model = run.model(card, init)

    def train_batches(epoch: int):
        for idx in class_balanced_batches(labels, batch_size, seed, epoch):
            x = torch.stack([transform(augmenter(cache.image(train_set[i]))) for i in idx])
            yield x.to(dev), torch.as_tensor(labels[idx], device=dev)

    def step(model, batch):
        x, y = batch
        return contrastive_loss(model(x).float(), y, margin)

    def evaluate(model):
        emb = embed_images(model, [cache.image(r) for r in val_set], dev)
        normal = torch.as_tensor(val_labels == 0)
        anchors = emb[normal]
        same = torch.eye(len(val_set), dtype=torch.bool)[:, normal]
        scores = pxs_against(emb, anchors, same).numpy()
        i, j = pair_index(len(val_set))
        d = euclidean(emb[i], emb[j]).numpy()
        same_pair = (val_labels[i.numpy()] == val_labels[j.numpy()])
        scored = np.isfinite(scores)  # a normal with no other normal to compare against has no score
        return {"val_auc": roc_auc(val_labels[scored], scores[scored]),
                "val_same_distance": float(d[same_pair].mean()) if same_pair.any() else None,
                "val_different_distance": float(d[~same_pair].mean()) if (~same_pair).any() else None}

    return run.fit(model, card, train_batches, step, evaluate, n_train=len(train_set), monitor="val_auc",
                   warmup_steps=min(20, max(1, run.steps(len(train_set)) // 4)))
