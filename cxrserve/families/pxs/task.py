"""``cxrserve train pxs`` / ``cxrserve eval pxs``: stage 2 of PXS, evaluation, and the store hook.

Training (:func:`train`): tuning on severity-scored images, starting from stage 1
(:mod:`.task_pretrain`), ``MSE(d(a, b), |s_a - s_b|)`` over all pairs inside a batch. The
severity target is ``extent+opacity`` by default (geographic extent 0-8 plus opacity 0-6,
range 0-14): the seed's mRALE score multiplies extent by density per lung, so the closest
target the ieee8023 raters give is one that carries both, and a PXS meant to track both
should be trained on both. ``target=extent`` or ``opacity`` trains on one. Because
distances are trained to equal score differences, PXS is in target points, which is
what the change threshold (``thresholds.change_pxs_delta``, default 1 point) is in.

Evaluation (``cxrserve eval pxs``, :func:`evaluate`): Spearman and Pearson of PXS with
geographic extent, opacity and the target (patient-level cluster bootstrap CIs), and
for same-patient pairs how the change distance ranks |severity difference| and how
often the direction agrees. A model trained with ``fold=k`` records its held-out
images in its card and is evaluated on those only (all folds at once: :mod:`.crossval`).

:func:`post_export` is the store hook that embeds the demo reference pool (normal
phantoms) into the exported component, so the pool travels inside the ``.mar``.
"""
from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cxrserve.core.card import ModelCard
from cxrserve.core.transforms import build_transform
from cxrserve.families.pxs.training import (ARCHITECTURE, NAME, PREPROCESSING, TARGET_RANGES, _augmenter, _new_card,
                                            embed_images, pair_index, pxs_against, scored_records, severity,
                                            severity_pair_loss, usable, weak_label)
from cxrserve.models.checkpoint import load_checkpoint
from cxrserve.models.siamese import euclidean
from cxrserve.training.bootstrap import bootstrap_ci
from cxrserve.training.common import ImageCache, split
from cxrserve.training.datasets import Record, patient_groups, patient_kfold
from cxrserve.training.metrics import pairwise_ranking_accuracy, pearson, roc_auc, spearman
from cxrserve.training.skeleton import Run, in_chunks

log = logging.getLogger(__name__)

#: Environment variable naming the normal CXRs of the pool for non-demo weights in a store build.
POOL_ENV = "CXRSERVE_PXS_POOL"


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
def correlations(x: np.ndarray, y: np.ndarray, groups: Sequence[int], n_boot: int) -> dict:
    """Spearman and Pearson of ``x`` with ``y``, each with its patient-bootstrap 95 % interval."""
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
                      pxs_vs_extent=correlations(pxs[:n], extent, groups, n_boot),
                      pxs_vs_opacity=correlations(pxs[:n], opacity, groups, n_boot),
                      pxs_vs_target=correlations(pxs[:n], tgt, groups, n_boot))
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
