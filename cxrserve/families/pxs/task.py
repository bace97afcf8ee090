"""PXS (seed 000): two-stage Siamese training, evaluation, cross-validation, demo pool.

Stage 1, ``cxrserve train pxs_pretrain`` (:func:`pretrain`): contrastive pre-training
on weak labels, normal (0) versus abnormal lung (1: COVID-19 or pneumonia), adult
frontal films only. Loss (Hadsell et al., as in the seed):
``(1 - y) d^2 + y max(0, margin - d)^2`` with ``d`` the embedding distance of a pair
and ``y = 1`` for a different pair; margin 50 as in the seed. Pairs are all pairs
inside a class-balanced batch (half normal, half abnormal) and same/different pairs
are weighted 50:50, as the seed's sampler drew them. Validation: ROC AUC of the PXS
(median distance to the validation normals) for normal vs abnormal.

Stage 2, ``cxrserve train pxs`` (:func:`train`): tuning on severity-scored images,
``MSE(d(a, b), |s_a - s_b|)`` over all pairs inside a batch. The severity target is
``extent+opacity`` by default (geographic extent 0-8 plus opacity 0-6, range 0-14):
the seed's mRALE score multiplies extent by density per lung, so the closest target
the ieee8023 raters give is one that carries both, and a PXS meant to track both
should be trained on both. ``target=extent`` or ``opacity`` trains on one. Because
distances are trained to equal score differences, PXS is in target points, which is
what the change threshold (``thresholds.change_pxs_delta``, default 1 point) is in.

Evaluation (``cxrserve eval pxs``, :func:`evaluate`): Spearman and Pearson of PXS with
geographic extent, opacity and the target (patient-level cluster bootstrap CIs), and
for same-patient pairs how the change distance ranks |severity difference| and how
often the direction agrees. A model trained with ``fold=k`` records its held-out
images in its card and is evaluated on those only. :func:`crossval` (``cxrserve pxs
crossval``) runs all folds: train, export, pool, evaluate, pool the out-of-fold numbers.

:func:`post_export` is the store hook that embeds the demo reference pool (normal
phantoms) into the exported component, so the pool travels inside the ``.mar``.
"""
from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cxrserve.core.card import ModelCard
from cxrserve.models.checkpoint import load_checkpoint
from cxrserve.training.datasets import Record, fingerprint, patient_groups, patient_kfold
from cxrserve.training.bootstrap import bootstrap_ci
from cxrserve.training.metrics import pairwise_ranking_accuracy, pearson, roc_auc, spearman
from cxrserve.models.siamese import euclidean
from cxrserve.core.transforms import build_augment, build_transform
from cxrserve.training.common import ImageCache, describe_data, split
from cxrserve.training.skeleton import Run, in_chunks

log = logging.getLogger(__name__)

NAME = "pxs"
PRETRAIN_NAME = "pxs_pretrain"
PREPROCESSING = "pxs"
ARCHITECTURE = "siamese_densenet121"
ARCH_KWARGS = {"embedding_dim": 1000, "in_channels": 3}
TARGET_RANGES = {"extent+opacity": (0.0, 14.0), "extent": (0.0, 8.0), "opacity": (0.0, 6.0)}
#: Environment variable naming the normal CXRs of the pool for non-demo weights in a store build.
POOL_ENV = "CXRSERVE_PXS_POOL"


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


# --------------------------------------------------------------------------- stage 1
def pretrain_records(records: Sequence[Record], exclude_scored: bool = True) -> list[Record]:
    """Adult frontal films with a weak label; ``exclude_scored`` drops every patient who
    has a severity-scored image anywhere in ``records`` (stage 2's held-out data).
    Phantoms all carry scores, so the demo recipe turns it off."""
    groups = patient_groups(records)
    scored = {g for g, r in zip(groups, records) if r.geographic_extent is not None} if exclude_scored else set()
    return [r for g, r in zip(groups, records) if g not in scored and usable(r) and weak_label(r) is not None]


def pretrain(records: Sequence[Record], out_dir: str | Path, *, epochs: int = 4, steps_per_epoch: int | None = None,
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


# --------------------------------------------------------------------------- stage 2
def _scored_for_training(records: Sequence[Record], target: str) -> list[Record]:
    scored = scored_records(records, target)
    if len(scored) < 4:
        raise ValueError(f"stage 2 needs severity-scored frontal images; got {len(scored)} of {len(records)} records")
    return scored


def training_split(records: Sequence[Record], val_fraction: float = 0.2, seed: int = 0,
                   target: str = "extent+opacity") -> tuple[list[Record], list[Record]]:
    """The (train, val) split of the scored images that stage 2 (:func:`train`) uses, by patient.

    The real store scores the served ``cxr-pxs`` on this held-out part (``validation.pxs_vs_extent``).
    """
    return split(_scored_for_training(records, target), val_fraction, seed, stratify=lambda r: r.label)


def train(records: Sequence[Record], out_dir: str | Path, *, pretrained: str | Path | None = None,
          target: str = "extent+opacity", epochs: int = 15, steps_per_epoch: int | None = None, batch_size: int = 8,
          lr: float = 1e-4, val_fraction: float = 0.2, seed: int = 0, patience: int = 5, fold: int | None = None,
          folds: int = 5, select: str = "best", change_threshold: float = 1.0, max_anchors: int = 32,
          normals_as_zero: int = 0, augment: bool = True, max_val: int | None = None, head_gain: float = 1.0,
          resume: bool = False,
          device: str = "auto", demo: bool = False, version: str = "0.1.0", init: str | None = None,
          progress: bool = True, deadline: float | None = None) -> Path:
    """Stage 2: MSE between pair distances and |severity differences|; returns best.ckpt.

    Data: frontal adult records with a severity score (the 73 ieee8023 images, or
    phantoms). Normal records without a score (e.g. ``openist_normal_lungmasks``) are
    validation anchors for PXS and, with ``normals_as_zero=N``, N of them also train as
    severity 0. ``fold=k`` holds out patient-level fold k of ``folds`` (recorded in the
    card, so ``cxrserve eval pxs`` scores only those images); ``select="last"`` keeps the
    last epoch instead of the best on validation (no peeking at a held-out fold).
    """
    # select="last": no early stop, the last epoch is kept (no peeking at a held-out fold)
    run = Run.start(out_dir, device=device, seed=seed, epochs=epochs, steps_per_epoch=steps_per_epoch,
                    batch_size=batch_size, lr=lr, patience=patience if select == "best" else epochs, resume=resume,
                    progress=progress, deadline=deadline)
    dev = run.device
    if fold is not None:
        scored = _scored_for_training(records, target)
        train_set, val_set = patient_kfold(scored, folds, seed=seed, stratify=False)[int(fold)]
    else:
        train_set, val_set = training_split(records, val_fraction, seed, target=target)
    val_set = val_set[:max_val] if max_val else val_set
    extra_normals = [r for r in records if usable(r) and r.triage_label == "normal" and severity(r, target) is None]
    rng = np.random.default_rng(seed)
    extra_normals = [extra_normals[i] for i in rng.permutation(len(extra_normals))]
    zero_set, extra_normals = extra_normals[:normals_as_zero], extra_normals[normals_as_zero:]
    # Validation anchors: normals never trained on (val-split normals, unscored normals).
    anchors = ([r for r in val_set if r.triage_label == "normal"] + extra_normals)[:max_anchors]
    targets = {r.path: float(severity(r, target)) for r in train_set + val_set}
    targets.update({r.path: 0.0 for r in zero_set})
    train_set = train_set + zero_set
    cache = ImageCache()
    transform = build_transform(PREPROCESSING)
    augmenter = _augmenter(augment, seed)

    parent = None
    if pretrained:
        state = load_checkpoint(pretrained, "cpu")
        pcard = ModelCard.from_dict(state["card"])
        if pcard.architecture != ARCHITECTURE:
            raise ValueError(f"{pretrained}: architecture {pcard.architecture!r}, expected {ARCHITECTURE!r}")
        parent = {"name": pcard.name, "version": pcard.version, "created": pcard.created,
                  "data_fingerprint": pcard.data_fingerprint, "trained_on": pcard.trained_on,
                  "margin": pcard.extra.get("margin"), "metrics": {k: v for k, v in pcard.metrics.items()
                                                                  if isinstance(v, (int, float))}}
    extra = {
        "target": target, "target_range": list(TARGET_RANGES[target]), "pretrained": parent,
        "normals_as_zero": len(zero_set), "select": select,
        "change_threshold_note": "PXS differences above this many target points are 'worse', below minus it "
                                 "'better'; stage 2 trains embedding distances in target points",
        "split": {"val_fraction": None if fold is not None else val_fraction, "seed": seed, "target": target,
                  "train": len(train_set), "val": len(val_set), "anchors": len(anchors)},
    }
    if fold is not None:
        extra["holdout"] = {"fold": int(fold), "folds": int(folds), "seed": seed,
                            "files": sorted(r.relpath for r in val_set)}
    card = _new_card(NAME, stage="tune", records=list(train_set), demo=demo, version=version, extra=extra,
                     thresholds={"change_pxs_delta": float(change_threshold)},
                     head_gain=pcard.arch_kwargs.get("head_gain", 1.0) if pretrained else head_gain)
    model = run.model(card, None if pretrained else init)
    if pretrained:
        model.load_state_dict(state["state_dict"])

    def train_batches(epoch: int):
        for idx in run.batches(len(train_set), epoch):
            x = torch.stack([transform(augmenter(cache.image(train_set[i]))) for i in idx])
            y = torch.tensor([targets[train_set[i].path] for i in idx], dtype=torch.float32)
            yield x.to(dev), y.to(dev)

    def step(model, batch):
        x, y = batch
        return severity_pair_loss(model(x).float(), y)

    def evaluate(model):
        emb = embed_images(model, [cache.image(r) for r in val_set], dev)
        y = np.array([targets[r.path] for r in val_set])
        i, j = pair_index(len(val_set))
        d = euclidean(emb[i], emb[j]).numpy()
        gap = np.abs(y[i.numpy()] - y[j.numpy()])
        metrics = {"val_pair_spearman": spearman(d, gap), "val_pair_mse": float(np.mean((d - gap) ** 2))}
        if anchors:
            anchor_emb = embed_images(model, [cache.image(r) for r in anchors], dev)
            same = torch.tensor([[a.path == r.path for a in anchors] for r in val_set])
            scores = pxs_against(emb, anchor_emb, same).numpy()
            metrics.update(val_pxs_spearman=spearman(scores, y), val_pxs_pearson=pearson(scores, y))
        return metrics

    if select == "last":
        monitor = "epoch"
    elif select == "best":
        monitor = "val_pxs_spearman" if anchors else "val_pair_spearman"
    else:
        raise ValueError(f"select must be 'best' or 'last', got {select!r}")
    return run.fit(model, card, train_batches, step, evaluate, n_train=len(train_set), monitor=monitor,
                   warmup_steps=min(20, max(1, run.steps(len(train_set)) // 4)))


# --------------------------------------------------------------------------- evaluation
def _correlations(x: np.ndarray, y: np.ndarray, groups: Sequence[int], n_boot: int) -> dict:
    out: dict = {"n": int(len(x))}
    for name, fn in (("spearman", spearman), ("pearson", pearson)):
        ci = bootstrap_ci(fn, x, y, n=n_boot, groups=groups, seed=0)
        out[name] = ci["estimate"]
        out[f"{name}_ci95"] = [ci["low"], ci["high"]]
    return out


def _offset(record: Record) -> float:
    try:
        return float(record.extras.get("offset", ""))
    except ValueError:
        return float("nan")


def same_patient_pairs(records: Sequence[Record]) -> list[tuple[int, int]]:
    """``(prior, later)`` index pairs of every two images of one patient.

    Earlier = smaller ``offset`` (ieee8023: days since symptom onset), else csv order
    (phantom studies of one patient are written in order).
    """
    by_group: dict[int, list[int]] = defaultdict(list)
    for idx, g in enumerate(patient_groups(records)):
        by_group[g].append(idx)
    pairs = []
    for members in by_group.values():
        members = sorted(members, key=lambda k: (np.nan_to_num(_offset(records[k]), nan=np.inf), k))
        pairs.extend((a, b) for n, a in enumerate(members) for b in members[n + 1:])
    return pairs


def change_report(distance: np.ndarray, pxs_delta: np.ndarray, target_delta: np.ndarray, threshold: float) -> dict:
    """How the change distance ranks |severity change|, and how often the direction agrees."""
    if len(distance) == 0:
        return {"pairs": 0}
    gap = np.abs(target_delta)
    changed = target_delta != 0

    def direction(delta):
        return np.where(delta > threshold, 1, np.where(delta < -threshold, -1, 0))

    return {
        "pairs": int(len(distance)),
        "distance_vs_abs_change_spearman": spearman(distance, gap),
        "distance_vs_abs_change_concordance": pairwise_ranking_accuracy(distance, gap),
        "pxs_delta_vs_change_spearman": spearman(pxs_delta, target_delta),
        "sign_agreement": float(np.mean(np.sign(pxs_delta[changed]) == np.sign(target_delta[changed])))
        if changed.any() else None,
        "direction_agreement": float(np.mean(direction(pxs_delta) == direction(target_delta))),
        "direction_threshold": threshold,
    }


def evaluate(pipeline, records: Sequence[Record], *, n_boot: int = 2000) -> dict:
    """PXS vs expert severity and same-patient change, through the served pipeline (in process)."""
    from cxrserve.core.imageio import read_file

    part = pipeline.parts["pxs"]
    card = part.card
    target = card.extra.get("target", "extent+opacity")
    scored = [r for r in scored_records(records, "extent") if r.opacity is not None]
    report: dict = {"target": target, "pool": {"size": pipeline.pool.size, "version": pipeline.pool.version,
                                                "source": pipeline.pool.provenance.get("source")}}
    holdout = card.extra.get("holdout")
    if holdout:
        keep = set(holdout["files"])
        scored = [r for r in scored if r.relpath in keep]
        report["holdout"] = {k: holdout[k] for k in ("fold", "folds", "seed")}
        if len(scored) != len(keep):
            report["holdout"]["missing"] = len(keep) - len(scored)
    else:
        report["warning"] = "model card names no held-out images: in-sample unless the data is new to the model"
    normals = [r for r in records if usable(r) and weak_label(r) == 0 and r not in scored] if not holdout else []
    evaluated = scored + normals
    if not evaluated:
        raise ValueError("no severity-scored (or normal) frontal images among the records")
    embeddings = np.stack(in_chunks(evaluated, 16, lambda part: pipeline.embed([read_file(r.path).uint8 for r in part]),
                                    desc=f"{pipeline.name}: embedding", progress=True))
    pxs, pct = pipeline.score_embeddings(embeddings)
    n = len(scored)
    extent = np.array([r.geographic_extent for r in scored], dtype=float)
    opacity = np.array([r.opacity for r in scored], dtype=float)
    tgt = np.array([severity(r, target) for r in scored], dtype=float)
    groups = patient_groups(scored)
    if n >= 3:
        report.update(n_images=n, n_patients=len(set(groups)),
                      pxs_vs_extent=_correlations(pxs[:n], extent, groups, n_boot),
                      pxs_vs_opacity=_correlations(pxs[:n], opacity, groups, n_boot),
                      pxs_vs_target=_correlations(pxs[:n], tgt, groups, n_boot))
    labels = np.array([weak_label(r) for r in evaluated], dtype=object)
    known = np.array([lab is not None for lab in labels])
    if known.any() and len(set(labels[known])) == 2:
        report["normal_vs_abnormal_auc"] = roc_auc(labels[known].astype(int), pxs[known])
    pairs = same_patient_pairs(scored)
    a = np.array([p for p, _ in pairs], dtype=int)
    b = np.array([q for _, q in pairs], dtype=int)
    distance = np.linalg.norm(embeddings[b] - embeddings[a], axis=1) if pairs else np.zeros(0)
    report["change"] = change_report(distance, pxs[b] - pxs[a], tgt[b] - tgt[a], pipeline.change_threshold)
    report["predictions"] = [
        {"file": r.relpath, "pxs": float(pxs[k]), "percentile": float(pct[k]),
         "extent": r.geographic_extent, "opacity": r.opacity, "label": r.label}
        for k, r in enumerate(evaluated)
    ]
    report["pairs"] = [
        {"prior": scored[p].relpath, "later": scored[q].relpath, "distance": float(dist),
         "pxs_delta": float(pxs[q] - pxs[p]), "target_delta": float(tgt[q] - tgt[p])}
        for (p, q), dist in zip(pairs, distance)
    ]
    return report


# --------------------------------------------------------------------------- store hook
def post_export(folder: str | Path, builder, spec: dict | None = None) -> None:
    """Embed the reference pool into an exported ``pxs`` component (store build hook).

    Demo weights: normal phantoms of the sets named in the component block's
    ``post_export`` (``sets``, ``max_images``, ``seed``). Other weights: the normal CXRs
    named by ``$CXRSERVE_PXS_POOL`` (folders / labels.csv / data roots,
    ``os.pathsep``-separated), else the normal films of the real store's ``data``.
    """
    from cxrserve.families.pxs.pool import build_pool

    folder = Path(folder)
    card = ModelCard.load(folder / "metadata.json")
    spec = dict(spec or {})
    if card.demo:
        sets = list(spec.get("sets", ["val"]))
        data = [builder.phantom_set(s) for s in sets]
        source = "cxrserve phantoms (" + ", ".join(sets) + "), label normal"
    else:
        env = os.environ.get(POOL_ENV) or os.pathsep.join(spec.get("data") or [])
        if not env:
            (folder / "metadata.json").unlink(missing_ok=True)  # not fresh: retried by the next build
            raise RuntimeError(f"{folder}: real PXS weights need a pool of real normal CXRs: set {POOL_ENV} "
                               "to a folder / labels.csv of normal frontal films")
        data = env.split(os.pathsep)
        source = None
    try:
        build_pool(folder, data, folder, max_images=spec.get("max_images", 32), seed=spec.get("seed", 0),
                   source=source, device="cpu", progress=builder.progress)
    except BaseException:
        (folder / "metadata.json").unlink(missing_ok=True)  # never leave a component that looks complete
        raise


# --------------------------------------------------------------------------- cross-validation
def crossval(records: Sequence[Record], out_dir: str | Path, *, pool_data: Sequence[str | Path],
             folds: int = 5, seed: int = 0, pool_max_images: int = 64, device: str = "auto",
             n_boot: int = 2000, progress: bool = True, **train_kwargs) -> dict:
    """Patient-level k-fold: per fold train (last epoch), export, pool, evaluate held-out; pool results.

    Each fold leaves ``fold_<k>/model`` (a pipeline folder: ``cxrserve eval pxs --model``
    re-scores it) and ``fold_<k>/eval.json``; finished folds are skipped on a rerun.
    """
    from cxrserve.core.loading import load_pipeline, write_pipeline_spec
    from cxrserve.families.pxs.pipeline import PXSPipeline
    from cxrserve.families.pxs.pool import build_pool
    from cxrserve.packaging.export import export_component

    out = Path(out_dir)
    reports = []
    for k in range(folds):
        fold_dir = out / f"fold_{k}"
        eval_path = fold_dir / "eval.json"
        if not eval_path.exists():
            ckpt = train(records, fold_dir / "train", fold=k, folds=folds, seed=seed, select="last", device=device,
                         progress=progress, resume=True, **train_kwargs)
            model_dir = fold_dir / "model"
            component = model_dir / NAME
            if not (component / "pool.json").exists():
                export_component(ckpt, component, formats=("torchscript",))
                build_pool(component, pool_data, component, max_images=pool_max_images, seed=seed, progress=progress)
            write_pipeline_spec(model_dir, PXSPipeline, name=PXSPipeline.name, handler={"backend": "torchscript"})
            pipeline = load_pipeline(model_dir, device="cpu")
            report = evaluate(pipeline, records, n_boot=n_boot)
            eval_path.write_text(json.dumps(_jsonable(report), indent=2) + "\n")
            log.info("fold %d: PXS vs extent Spearman %s, vs opacity %s", k,
                     report.get("pxs_vs_extent", {}).get("spearman"), report.get("pxs_vs_opacity", {}).get("spearman"))
        reports.append(json.loads(eval_path.read_text()))
    summary = summarize_folds(reports, n_boot=n_boot)
    summary.update(folds=folds, seed=seed, train=_jsonable(train_kwargs), pool_max_images=pool_max_images,
                   pool_data=[Path(p).name for p in pool_data])
    (out / "crossval.json").write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
    return summary


def summarize_folds(reports: Sequence[dict], n_boot: int = 2000) -> dict:
    """Out-of-fold predictions of every fold pooled, plus the per-fold spread."""
    preds = [p for r in reports for p in r["predictions"] if p["extent"] is not None]
    pairs = [p for r in reports for p in r.get("pairs", [])]
    files = [p["file"] for p in preds]
    if len(set(files)) != len(files):
        raise ValueError("an image is held out by two folds: folds must come from one patient_kfold")
    # Bootstrap clusters: patients, recovered from the same-patient pairs of the folds.
    cluster = {f: i for i, f in enumerate(files)}
    for p in pairs:
        old, new = cluster[p["later"]], cluster[p["prior"]]
        cluster = {f: (new if c == old else c) for f, c in cluster.items()}
    groups = [cluster[f] for f in files]
    pxs = np.array([p["pxs"] for p in preds])
    target = reports[0]["target"]
    extent = np.array([p["extent"] for p in preds], dtype=float)
    opacity = np.array([p["opacity"] for p in preds], dtype=float)
    tgt = {"extent": extent, "opacity": opacity, "extent+opacity": extent + opacity}[target]
    per_fold = {key: [r[key]["spearman"] for r in reports if key in r]
                for key in ("pxs_vs_extent", "pxs_vs_opacity")}
    threshold = reports[0]["change"].get("direction_threshold", 1.0)
    return {
        "target": target,
        "n_images": len(preds), "n_patients": len(set(groups)),
        "pxs_vs_extent": _correlations(pxs, extent, groups, n_boot),
        "pxs_vs_opacity": _correlations(pxs, opacity, groups, n_boot),
        "pxs_vs_target": _correlations(pxs, tgt, groups, n_boot),
        "per_fold_spearman": {k: {"values": v, "mean": float(np.mean(v)), "sd": float(np.std(v))}
                              for k, v in per_fold.items() if v},
        "change": change_report(np.array([p["distance"] for p in pairs]), np.array([p["pxs_delta"] for p in pairs]),
                                np.array([p["target_delta"] for p in pairs]), threshold),
    }


def _jsonable(obj):
    from cxrserve.training.jsonable import to_jsonable

    return to_jsonable(obj)


def register_cli(subparsers) -> None:
    """``cxrserve pxs crossval``: the model card's held-out numbers in one command."""

    p = subparsers.add_parser("pxs", help="PXS evaluation helpers")
    actions = p.add_subparsers(dest="action", required=True)
    c = actions.add_parser("crossval", help="patient-level k-fold of stage 2: train, export, pool, evaluate")
    c.add_argument("--data", nargs="+", required=True, help="labels.csv folders or a data root")
    c.add_argument("--sources", nargs="+")
    c.add_argument("--pool-data", nargs="+", required=True, help="normal CXRs for each fold's reference pool")
    c.add_argument("--out", required=True)
    c.add_argument("--folds", type=int, default=5)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--pool-max-images", type=int, default=64)
    c.add_argument("--recipe", help="stage-2 settings: 'real' (the family's real block) or a YAML file with a `pxs:` block")
    c.add_argument("--set", nargs="*", help="further train() arguments, NAME=VALUE (e.g. pretrained=runs/...)")
    c.add_argument("--device", default="auto")

    def run(args) -> int:
        from cxrserve.training.common import load_records

        from cxrserve.training.recipes import parse_settings, task_settings

        kwargs = task_settings(args.recipe, NAME)
        kwargs.update(parse_settings(args.set))
        for key in ("fold", "folds", "seed", "select"):
            kwargs.pop(key, None)
        summary = crossval(load_records(args.data, sources=args.sources), args.out, pool_data=args.pool_data,
                           folds=args.folds, seed=args.seed, pool_max_images=args.pool_max_images,
                           device=args.device, **kwargs)
        print(json.dumps(_jsonable({k: v for k, v in summary.items()}), indent=2))
        return 0

    c.set_defaults(func=run)
