"""Mortality risk (seed 004): ResNet18 on survival labels, class weights, Platt calibration.

The seed trained a ResNet18 on ieee8023's survival labels with class weights. Here:

* records: frontal adult films with a ``survival`` label (``Y``/``N``; phantoms draw
  theirs from a documented logistic model of extent, opacity and age);
* a patient-level split into train / validation (/ test), stratified by outcome, so
  no patient's films straddle parts;
* cross-entropy with inverse-frequency class weights (deaths are the minority);
* optional initialisation from another ``resnet18_cam`` checkpoint (``init_from``; the
  classifier head is re-initialised), since a few hundred films are too few to learn
  a radiograph representation from scratch;
* after training, Platt scaling of the log-odds on the validation images (class
  weights shift raw probabilities; the intercept undoes it) and a ``high_risk``
  threshold chosen on validation for a stated sensitivity (``target_sensitivity``);
* honest numbers: AUC with a cluster (by patient) bootstrap confidence interval,
  sensitivity and specificity at the threshold, Brier score and ECE, on the test part
  when there is one, with the counts of images, patients and deaths beside them.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import expit

from cxrserve.core.card import ModelCard
from cxrserve.models.checkpoint import load_checkpoint
from cxrserve.training.datasets import Record, fingerprint, patient_groups, patient_split
from cxrserve.training.bootstrap import bootstrap_ci
from cxrserve.training.metrics import (brier, expected_calibration_error, roc_auc, sensitivity_specificity_at,
                                       spearman, threshold_for_sensitivity)
from cxrserve.families.mortality.pipeline import OUTCOMES, calibrate, log_odds
from cxrserve.core.transforms import build_augment, build_transform
from cxrserve.training.common import ImageCache, batch_images, describe_data
from cxrserve.training.skeleton import Run, in_chunks, serve_records

log = logging.getLogger(__name__)

NAME = "mortality"
PREPROCESSING = "mortality"


def training_split(records: Sequence[Record], val_fraction: float = 0.2, seed: int = 0,
                   test_fraction: float = 0.0) -> tuple[list[Record], list[Record]]:
    """The (train, calibration/validation) split :func:`train` makes, for held-out evaluation."""
    parts = patient_split(usable_records(records), val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                          stratify=lambda r: r.survival)
    return parts["train"], parts["val"]


def usable_records(records: Sequence[Record]) -> list[Record]:
    """Frontal films with a survival label; paediatric collections left out."""
    return [r for r in records if r.survival is not None and r.is_frontal is not False
            and r.is_adult is not False and "kermany" not in r.source]


def died(record: Record) -> int:
    return int(record.survival == 0)


def phantom_risk(record: Record) -> float:
    """A phantom's documented death probability (its survival column is one draw from it)."""
    from cxrserve.synthetic.phantoms import death_probability

    age = record.extras.get("age")
    if record.geographic_extent is None or record.opacity is None or not age:
        raise ValueError(f"{record.relpath}: target 'phantom_risk' needs a phantom's extent, opacity and age")
    return death_probability(record.geographic_extent, record.opacity, float(age))


def fit_platt(z: np.ndarray, y: np.ndarray, l2: float = 1e-3, iterations: int = 100) -> dict:
    """Logistic regression ``P(y=1) = sigmoid(a z + b)`` by Newton's method with step halving.

    Starts from the base rate (a = 0); a small ridge on ``a`` keeps the fit finite when
    the validation images are separable (tiny data).
    """
    z = np.asarray(z, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if y.min() == y.max():
        raise ValueError("calibration needs both outcomes among the validation images")
    design = np.stack([z, np.ones_like(z)], axis=1)
    ridge = np.diag([l2 * len(z), 0.0])

    def loss(params: np.ndarray) -> float:
        u = design @ params
        return float(np.sum(np.logaddexp(0.0, u) - y * u) + 0.5 * params @ ridge @ params)

    base = y.mean()
    params = np.array([0.0, np.log(base / (1 - base))])
    current = loss(params)
    for _ in range(iterations):
        p = expit(design @ params)
        grad = design.T @ (p - y) + ridge @ params
        hess = design.T @ (design * (p * (1 - p))[:, None]) + ridge + 1e-9 * np.eye(2)
        update = np.linalg.solve(hess, grad)
        step = 1.0
        while step > 1e-6 and loss(params - step * update) > current:
            step /= 2
        params = params - step * update
        previous, current = current, loss(params)
        if previous - current < 1e-12:
            break
    return {"method": "platt", "a": float(params[0]), "b": float(params[1]), "n": int(len(z)),
            "positives": int(y.sum())}


def risk_report(y: Sequence[int], risk: Sequence[float], groups: Sequence, threshold: float,
                n_boot: int = 2000, seed: int = 0) -> dict:
    """AUC with a patient-cluster bootstrap CI, sensitivity/specificity at ``threshold``, calibration."""
    y = np.asarray(y, dtype=int)
    risk = np.asarray(risk, dtype=np.float64)
    sens, spec = sensitivity_specificity_at(y, risk, threshold)
    auc = bootstrap_ci(roc_auc, y, risk, n=n_boot, seed=seed, groups=np.asarray(groups))
    return {"n_images": int(len(y)), "n_patients": int(len(set(groups))), "deaths_images": int(y.sum()),
            "deaths_patients": int(len({g for g, v in zip(groups, y) if v})),
            "auc": auc["estimate"], "auc_ci95": [auc["low"], auc["high"]], "auc_bootstrap_valid": auc["n_valid"],
            "threshold": threshold, "sensitivity": sens, "specificity": spec,
            "brier": brier(y, risk), "ece": expected_calibration_error(y, risk)}


@torch.no_grad()
def predict_log_odds(model, inputs: Sequence[torch.Tensor], device, batch_size: int = 16) -> np.ndarray:
    model.eval()
    z = in_chunks(inputs, batch_size, lambda xs: log_odds(model(torch.stack(list(xs)).to(device))[0].float().cpu()
                                                          .numpy()))
    return np.asarray(z) if z else np.zeros(0)


def _init_backbone(model, path: str | Path) -> str:
    payload = load_checkpoint(path)
    source = ModelCard.from_dict(payload["card"])
    if source.architecture != "resnet18_cam":
        raise ValueError(f"init_from {path}: a {source.architecture} checkpoint, need resnet18_cam")
    state = {k: v for k, v in payload["state_dict"].items() if not k.startswith("fc.")}
    model.load_state_dict(state, strict=False)
    return f"{source.name} {source.version} ({source.trained_on})"


def pretrain(records: Sequence[Record], out_dir: str | Path, *, epochs: int = 5, batch_size: int = 8,
             lr: float = 1e-3, seed: int = 0, device: str = "auto", augment: bool = True, val_fraction: float = 0.15,
             max_val: int | None = 200, init: str | None = None, progress: bool = True,
             deadline: float | None = None) -> Path:
    """Pre-train the ResNet18 on COVID-19 / normal / pneumonia films of patients without a survival label.

    Every patient with a survival label is left out (whole linked groups), so nothing
    about the survival validation or test patients reaches the network this way.
    Returns the 3-class checkpoint whose backbone initialises the survival model.
    """
    from cxrserve.training.datasets import CLASS_LABELS

    run = Run.start(out_dir, device=device, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr, patience=epochs,
                    progress=progress, deadline=deadline)
    dev = run.device
    records = list(records)
    groups = patient_groups(records)
    blocked = {g for g, r in zip(groups, records) if r.survival is not None}
    usable = [r for r, g in zip(records, groups) if g not in blocked and r.triage_label is not None
              and r.is_adult is not False and "kermany" not in r.source]
    if len({r.triage_label for r in usable}) < 2:
        raise ValueError("pre-training needs at least two of covid19 / normal / pneumonia")
    parts = patient_split(usable, val_fraction=val_fraction, seed=seed)
    train_set, val_set = parts["train"], parts["val"][: max_val or None]
    cache = ImageCache()
    transform = build_transform(PREPROCESSING)
    augment_fn = build_augment("standard" if augment else "none", seed=seed)
    counts = Counter(r.triage_label for r in train_set)
    weights = torch.tensor([len(train_set) / (3 * max(1, counts[c])) for c in CLASS_LABELS], device=dev)
    card = ModelCard(name="mortality_pretrain", architecture="resnet18_cam", task="classification",
                     preprocessing=PREPROCESSING, labels=list(CLASS_LABELS),
                     arch_kwargs={"num_classes": 3, "in_channels": 3, "dropout": 0.2},
                     trained_on=describe_data(usable), data_fingerprint=fingerprint(usable))
    model = run.model(card, init)
    val_inputs = [transform(cache.image(r)) for r in val_set]
    val_y = np.array([CLASS_LABELS.index(r.triage_label) for r in val_set])

    def train_batches(epoch: int):
        for idx in run.batches(len(train_set), epoch):
            xs = [transform(augment_fn(cache.image(train_set[i]))[0]) for i in idx]
            ys = [CLASS_LABELS.index(train_set[i].triage_label) for i in idx]
            yield torch.stack(xs).to(dev), torch.tensor(ys, device=dev)

    def step(model, batch):
        x, y = batch
        return F.cross_entropy(model.logits(x).float(), y, weight=weights)

    def evaluate(model):
        pred = np.asarray(in_chunks(val_inputs, 16,
                                    lambda xs: model(torch.stack(xs).to(dev))[0].argmax(1).cpu().numpy()))
        recalls = [float((pred[val_y == k] == k).mean()) for k in range(3) if (val_y == k).any()]
        return {"val_balanced_accuracy": float(np.mean(recalls))}

    return run.fit(model, card, train_batches, step, evaluate, n_train=len(train_set),
                   monitor="val_balanced_accuracy")


def train(records: Sequence[Record], out_dir: str | Path, *, epochs: int = 20, steps_per_epoch: int | None = None,
          batch_size: int = 8, lr: float = 3e-4, val_fraction: float = 0.2, test_fraction: float = 0.0,
          seed: int = 0, patience: int = 6, resume: bool = False, device: str = "auto", demo: bool = False,
          version: str = "0.1.0", max_val: int | None = None, augment: bool = True, dropout: float = 0.2,
          target_sensitivity: float = 0.8, init_from: str | None = None, pretrain_epochs: int = 0,
          target: str = "survival", n_boot: int = 2000, init: str | None = None,
          progress: bool = True, deadline: float | None = None) -> Path:
    """Train, calibrate and threshold the mortality classifier; returns best.ckpt.

    ``pretrain_epochs > 0`` first runs :func:`pretrain` on the films of patients without
    a survival label and starts from its backbone (``init_from`` names one instead).
    ``target="phantom_risk"`` (demo only) trains on each phantom's documented death
    probability (regressing log-odds) instead of its single Bernoulli draw: a minute of training cannot
    average out the coin flips. Calibration, threshold and every reported number still
    use the drawn outcomes.
    """
    if target not in ("survival", "phantom_risk"):
        raise ValueError(f"target must be 'survival' or 'phantom_risk', got {target!r}")
    run = Run.start(out_dir, device=device, seed=seed, epochs=epochs, steps_per_epoch=steps_per_epoch,
                    batch_size=batch_size, lr=lr, patience=patience, resume=resume, progress=progress,
                    deadline=deadline)
    dev = run.device
    if pretrain_epochs and not init_from:  # seeds torch again, as this run did: same state either way
        init_from = str(pretrain(records, Path(out_dir) / "pretrain", epochs=pretrain_epochs, seed=seed,
                                 device=device, init=init, progress=progress, deadline=deadline))
    usable = usable_records(records)
    if len({died(r) for r in usable}) < 2:
        raise ValueError(f"need films of patients who died and who survived; got {len(usable)} usable records")
    parts = patient_split(usable, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                          stratify=lambda r: r.survival)
    train_set, val_set, test_set = parts["train"], parts["val"], parts.get("test", [])
    val_set = val_set[:max_val] if max_val else val_set
    cache = ImageCache()
    transform = build_transform(PREPROCESSING)
    augment_fn = build_augment("standard" if augment else "none", seed=seed)

    counts = Counter(died(r) for r in train_set)
    weights = torch.tensor([len(train_set) / (2 * max(1, counts[k])) for k in (0, 1)], dtype=torch.float32)
    groups = patient_groups(usable)
    deaths = len({g for g, r in zip(groups, usable) if died(r)})
    summary = (f"Trained on {len(train_set)} films; calibrated on {len(val_set)}; all data: {len(usable)} films "
               f"of {len(set(groups))} patients, {deaths} of whom died ({describe_data(usable)}).")
    card = ModelCard(
        name=NAME, architecture="resnet18_cam", task="classification", preprocessing=PREPROCESSING,
        labels=list(OUTCOMES), arch_kwargs={"num_classes": 2, "in_channels": 3, "dropout": dropout},
        demo=demo, version=version, trained_on=describe_data(usable), data_fingerprint=fingerprint(usable),
        extra={"class_weights": weights.tolist(), "data_summary": summary, "target": target,
               "threshold_rule": {"target_sensitivity": target_sensitivity, "chosen_on": "validation"},
               "split": {"val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed,
                         "train": len(train_set), "val": len(val_set), "test": len(test_set)}},
    )
    model = run.model(card, None if init_from else init)
    if init_from:  # the pre-trained backbone (itself started from ``init``, if given)
        card.extra["initialised_from"] = _init_backbone(model, init_from)
    inputs = {r.path: transform(cache.image(r)) for r in val_set + test_set + ([] if augment else train_set)}
    val_inputs = [inputs[r.path] for r in val_set]
    val_y = np.array([died(r) for r in val_set])
    weights = weights.to(dev)

    def train_batches(epoch: int):
        for idx in run.batches(len(train_set), epoch):
            x = batch_images(train_set, idx, inputs, transform, cache, augment_fn if augment else None)
            if target == "phantom_risk":
                y = torch.tensor([phantom_risk(train_set[i]) for i in idx], device=dev)
            else:
                y = torch.tensor([died(train_set[i]) for i in idx], device=dev)
            yield x.to(dev), y

    def step(model, batch):
        x, y = batch
        if y.is_floating_point():
            # Regress the log-odds on the true log-odds: most phantom risks lie between
            # 0.3 % and 20 %, which soft cross-entropy barely tells apart in a minute of
            # training; on the log-odds scale they are 4 units apart.
            logits = model.logits(x).float()
            return F.mse_loss(logits[:, 1] - logits[:, 0], torch.logit(y.float(), eps=1e-6))
        return F.cross_entropy(model.logits(x).float(), y, weight=weights)

    val_risk = [phantom_risk(r) for r in val_set] if target == "phantom_risk" else None

    def evaluate(model):
        z = predict_log_odds(model, val_inputs, dev)
        metrics = {"val_auc": roc_auc(val_y, z), "val_n": len(val_y), "val_deaths": int(val_y.sum())}
        if val_risk is not None:
            metrics["val_risk_spearman"] = spearman(val_risk, z)
        return metrics

    # A demo model is kept by how well it ranks what it regresses (every validation
    # phantom's true risk), not by an AUC over ~20 coin flips, which swings by 0.15
    # between neighbouring epochs.
    monitor = "val_risk_spearman" if val_risk is not None else "val_auc"
    run.fit(model, card, train_batches, step, evaluate, n_train=len(train_set), monitor=monitor)

    def calibrate_and_threshold(model, card: ModelCard) -> None:
        z_val = predict_log_odds(model, val_inputs, dev)
        card.extra["calibration"] = fit_platt(z_val, val_y)
        risk_val = calibrate(z_val, card.extra["calibration"])
        threshold = threshold_for_sensitivity(val_y, risk_val, target_sensitivity)
        card.thresholds["high_risk"] = float(threshold)
        card.metrics["validation"] = {**risk_report(val_y, risk_val, patient_groups(val_set), threshold, n_boot, seed),
                                      "note": "calibration and threshold were fitted on these images (optimistic)"}
        if test_set:
            test_y = np.array([died(r) for r in test_set])
            risk_test = calibrate(predict_log_odds(model, [inputs[r.path] for r in test_set], dev),
                                  card.extra["calibration"])
            card.metrics["test"] = risk_report(test_y, risk_test, patient_groups(test_set), threshold, n_boot, seed)
            log.info("mortality test: %s", card.metrics["test"])

    return run.amend_best(model, calibrate_and_threshold)


def evaluate(pipeline, records: Sequence[Record], n_boot: int = 2000) -> dict:
    """AUC (patient-cluster bootstrap CI) and sensitivity/specificity of a served ``cxr-mortality``."""
    usable = usable_records(records)
    kept = [(r, a) for r, a in zip(usable, serve_records(pipeline, usable)) if a is not None]
    if not kept:  # every film refused by the input checks or the gate: nothing to score
        return {"n_images": 0, "auc": None, "auc_ci95": [None, None], "rejected": len(usable)}
    films = [r for r, _ in kept]
    report = risk_report([died(r) for r in films], [a["risk"] for _, a in kept], patient_groups(films),
                         pipeline.threshold, n_boot)
    report["rejected"] = len(usable) - len(kept)
    return report
