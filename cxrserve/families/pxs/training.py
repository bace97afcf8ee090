"""What both PXS training stages share: which records they read and their severity targets,
the in-batch pair losses, embedding images as served, and the component's card.

Stage 1 (:mod:`.task_pretrain`) and stage 2 (:mod:`.task`) differ only in their data and loss.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from cxrserve.core.card import ModelCard
from cxrserve.core.transforms import build_augment, build_transform
from cxrserve.models.siamese import euclidean
from cxrserve.training.common import describe_data
from cxrserve.training.datasets import Record, fingerprint
from cxrserve.training.skeleton import in_chunks

NAME = "pxs"
PRETRAIN_NAME = "pxs_pretrain"
PREPROCESSING = "pxs"
ARCHITECTURE = "siamese_densenet121"
ARCH_KWARGS = {"embedding_dim": 1000, "in_channels": 3}
TARGET_RANGES = {"extent+opacity": (0.0, 14.0), "extent": (0.0, 8.0), "opacity": (0.0, 6.0)}


# --------------------------------------------------------------------------- records
def usable(record: Record) -> bool:
    """Adult frontal films (paediatric Kermany films stay out, as the catalogue asks)."""
    return record.is_frontal is not False and record.is_adult is not False and "kermany" not in record.source


def weak_label(record: Record) -> int | None:
    """0 normal, 1 abnormal lung (COVID-19 / pneumonia), None for anything else."""
    return {"normal": 0, "covid19": 1, "pneumonia": 1}.get(record.triage_label or "")


def severity(record: Record, target: str = "extent+opacity") -> float | None:
    if target not in TARGET_RANGES:
        raise ValueError(f"unknown target {target!r}; choose one of {sorted(TARGET_RANGES)}")
    extent, opacity = record.geographic_extent, record.opacity
    if target == "extent":
        return extent
    if target == "opacity":
        return opacity
    return None if extent is None or opacity is None else extent + opacity


def scored_records(records: Sequence[Record], target: str = "extent+opacity") -> list[Record]:
    """Frontal films with a severity score: all 73 of ieee8023, including one child's film
    (scored by the same raters; the adult-only rule is for stage 1's weak labels)."""
    return [r for r in records if r.is_frontal is not False and severity(r, target) is not None]


# --------------------------------------------------------------------------- losses
def pair_index(n: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    i, j = torch.triu_indices(n, n, offset=1, device=device)
    return i, j


def contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Contrastive loss over all in-batch pairs, same and different pairs weighted 50:50."""
    i, j = pair_index(len(labels), embeddings.device)
    d = euclidean(embeddings[i], embeddings[j])
    same = labels[i] == labels[j]
    terms = []
    if same.any():
        terms.append(d[same].pow(2).mean())
    if (~same).any():
        terms.append((margin - d[~same]).clamp(min=0).pow(2).mean())
    return torch.stack(terms).mean()


def severity_pair_loss(embeddings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """MSE between every in-batch pair's embedding distance and its |severity difference|."""
    i, j = pair_index(len(targets), embeddings.device)
    return torch.nn.functional.mse_loss(euclidean(embeddings[i], embeddings[j]), (targets[i] - targets[j]).abs())


# --------------------------------------------------------------------------- plumbing
def embed_images(model: torch.nn.Module, images: Sequence[np.ndarray], device, batch_size: int = 16) -> torch.Tensor:
    """Eager fp32 embeddings (as served) of uint8 images; N x D on the CPU."""
    transform = build_transform(PREPROCESSING)
    with torch.no_grad():
        out = in_chunks(images, batch_size, lambda part: model(torch.stack([transform(img) for img in part])
                                                               .to(device)).float().cpu())
    return torch.stack(out) if out else torch.zeros(0, ARCH_KWARGS["embedding_dim"])


def pxs_against(embeddings: torch.Tensor, anchors: torch.Tensor, same: torch.Tensor | None = None) -> torch.Tensor:
    """Median distance to the anchors; ``same[i, k]`` True leaves anchor k out for item i."""
    from cxrserve.families.pxs.pipeline import distances

    d = distances(embeddings, anchors)
    if same is not None:
        d = d.masked_fill(same, float("nan"))
    return torch.nanquantile(d, 0.5, dim=1)


def class_balanced_batches(labels: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Batches of half normal, half abnormal; the smaller class is cycled through."""
    rng = np.random.default_rng((seed, epoch, 1))
    half = max(1, batch_size // 2)
    n_batches = max(1, len(labels) // batch_size)
    picks = []
    for value in (0, 1):
        pool = np.flatnonzero(labels == value)
        need = n_batches * half
        reps = [rng.permutation(pool) for _ in range(-(-need // len(pool)))]
        picks.append(np.concatenate(reps)[:need].reshape(n_batches, half))
    return [rng.permutation(np.concatenate([a, b])) for a, b in zip(*picks)]


def _new_card(name: str, *, stage: str, records: Sequence[Record], demo: bool, version: str, extra: dict,
              thresholds: dict | None = None, head_gain: float = 1.0) -> ModelCard:
    return ModelCard(
        name=name, architecture=ARCHITECTURE, task="embedding", preprocessing=PREPROCESSING,
        arch_kwargs={**ARCH_KWARGS, "head_gain": float(head_gain)}, thresholds=dict(thresholds or {}),
        demo=demo, version=version,
        trained_on=describe_data(records), data_fingerprint=fingerprint(records),
        extra={"stage": stage, **extra},
    )


def _augmenter(augment: bool, seed: int):
    if not augment:
        return lambda img: img
    aug = build_augment("standard", seed=seed)
    return lambda img: aug(img)[0]
