"""Severity (Cohen et al. 2020, seed 003): pre-train an 18-output DenseNet, fit linear maps.

Two stages, as in the paper:

1. **Pre-training** of :class:`~cxrserve.models.xrv.XRVDenseNet` (torchxrayvision's
   layout and label space) with a masked binary cross-entropy on whatever findings a
   record states (:func:`xrv_targets`). Slots no record labels keep the name ``''``
   in the card, as torchxrayvision does for heads a model lacks. Patients with a
   severity score are kept out of pre-training (``exclude_scored``), as the paper's
   feature extractor never saw its COVID-19 images.
2. **Linear maps** from the pre-sigmoid "Lung Opacity" output to geographic extent
   and opacity, fitted by least squares on the severity-scored images and stored in
   the card (``extra["score_maps"]``) with the clamp ranges.

:func:`table1` repeats the paper's Table 1 on patient-level random ~50/50 splits:
linear regression on the lung-opacity output (1 feature), the four pneumonia-related
outputs, every trained output, and the 1024 intermediate features, beside the "no data"
baseline (predict the training mean), reporting Pearson r, R2, MAE and MSE as mean
and standard deviation over splits.

The demo recipe pre-trains on phantoms (exact opacity facts) and fits the maps on
other phantoms, evaluating on held-out ones.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cxrserve.core.card import ModelCard
from cxrserve.training.datasets import Record, fingerprint, patient_groups, repeated_patient_splits
from cxrserve.training.metrics import mae, mse, pearson, r2, roc_auc, spearman
from cxrserve.models.xrv import XRV_PATHOLOGIES
from cxrserve.core.transforms import build_augment, build_transform
from cxrserve.training.common import ImageCache, batch_images, describe_data, split
from cxrserve.training.skeleton import Run, serve_records

log = logging.getLogger(__name__)

NAME = "severity"
PREPROCESSING = "xrv"
SCORES = ("geographic_extent", "opacity")
SCORE_RANGES = {"geographic_extent": (0.0, 8.0), "opacity": (0.0, 6.0)}
LUNG_OPACITY = "Lung Opacity"
#: The paper's hand-picked "4 outputs" (findings frequent in pneumonia).
FOUR_OUTPUTS = ("Lung Opacity", "Pneumonia", "Infiltration", "Consolidation")
#: CheXpert's label hierarchy: these findings are airspace opacities.
OPACITY_FINDINGS = ("Pneumonia", "Consolidation", "Infiltration", "Edema", "Atelectasis")
_INDEX = {name: i for i, name in enumerate(XRV_PATHOLOGIES)}
_NIH_FINDINGS = XRV_PATHOLOGIES[:14]  # ChestX-ray14's labels are the first 14 slots


# --------------------------------------------------------------------------- targets
def _is_phantom(record: Record) -> bool:
    return "opacity_right" in record.extras and "involvement_right" in record.extras


def xrv_targets(record: Record) -> np.ndarray:
    """18 targets in torchxrayvision's order: 1, 0, or NaN where the record says nothing.

    * phantoms (exact facts): Lung Opacity = any opacity; Consolidation = a lung graded
      >= 2; Infiltration = a lung graded 1 (ground glass); Pneumonia = covid19 or
      pneumonia. Phantoms draw no other finding, so the other slots stay unknown.
    * NIH ChestX-ray14: its 14 findings (all 0 for "No Finding"); Lung Opacity from
      Google's airspace-opacity adjudication where present, else 1 when an opacity
      finding is listed (CheXpert's hierarchy), 0 for "No Finding".
    * normal films of other collections: every slot 0.
    * COVID-19 and other pneumonia (ieee8023): Pneumonia = 1 and Lung Opacity = 1.
    """
    t = np.full(len(XRV_PATHOLOGIES), np.nan, dtype=np.float32)
    ex = record.extras
    if _is_phantom(record):
        grades = [int(float(ex.get("opacity_right") or 0)), int(float(ex.get("opacity_left") or 0))]
        t[_INDEX["Lung Opacity"]] = float(max(grades) > 0)
        t[_INDEX["Consolidation"]] = float(max(grades) >= 2)
        t[_INDEX["Infiltration"]] = float(1 in grades)
        t[_INDEX["Pneumonia"]] = float(record.label in ("covid19", "pneumonia"))
        return t
    findings = ex.get("nih_finding_labels")
    if findings:
        names = {f.strip() for f in findings.split("|")}
        for name in _NIH_FINDINGS:
            t[_INDEX[name]] = float(name in names)
        google = (ex.get("google2019_airspace_opacity") or "").strip().upper()
        if google in ("YES", "NO"):
            t[_INDEX["Lung Opacity"]] = float(google == "YES")
        elif names & set(OPACITY_FINDINGS):
            t[_INDEX["Lung Opacity"]] = 1.0
        elif "No Finding" in names:
            t[_INDEX["Lung Opacity"]] = 0.0
        return t
    triage = record.triage_label
    if triage == "normal":
        t[:] = 0.0
    elif triage in ("covid19", "pneumonia"):
        t[_INDEX["Pneumonia"]] = 1.0
        t[_INDEX["Lung Opacity"]] = 1.0
    return t


def is_scored(record: Record) -> bool:
    return record.geographic_extent is not None and record.opacity is not None and record.is_frontal is not False


def pretraining_records(records: Sequence[Record], exclude_scored: bool = True,
                        include_paediatric: bool = False) -> list[Record]:
    """Frontal records with at least one known target; without the scored patients if asked."""
    records = list(records)
    blocked: set[int] = set()
    if exclude_scored:
        groups = patient_groups(records)
        blocked = {g for g, r in zip(groups, records) if is_scored(r)}
    else:
        groups = [0] * len(records)
    out = []
    for r, g in zip(records, groups):
        if r.is_frontal is False or g in blocked:
            continue
        if not include_paediatric and (r.is_adult is False or "kermany" in r.source):
            continue
        if np.isfinite(xrv_targets(r)).any():
            out.append(r)
    return out


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    known = torch.isfinite(targets)
    if not known.any():
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[known].float(), targets[known])


# --------------------------------------------------------------------------- features
@torch.no_grad()
def extract(model, inputs: Sequence[torch.Tensor], device, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Pre-sigmoid outputs (N x 18) and intermediate features (N x 1024), fp32, eval mode."""
    model.eval()
    logits, feats = [], []
    for i in range(0, len(inputs), batch_size):
        x = torch.stack(list(inputs[i : i + batch_size])).to(device)
        f = model.embed(x)
        feats.append(f.float().cpu().numpy())
        logits.append(model.classifier(f).float().cpu().numpy())
    return np.concatenate(logits), np.concatenate(feats)


def fit_linear(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Least squares ``y ~ x w + b`` (minimum-norm when under-determined, as sklearn's)."""
    x = np.asarray(x, dtype=np.float64).reshape(len(y), -1)
    design = np.hstack([x, np.ones((len(y), 1))])
    coef, *_ = np.linalg.lstsq(design, np.asarray(y, dtype=np.float64), rcond=None)
    return coef[:-1], float(coef[-1])


def score_map(inputs: Sequence[str], weights: np.ndarray, intercept: float, score: str) -> dict:
    return {"inputs": list(inputs), "weights": [float(w) for w in weights], "intercept": float(intercept),
            "range": list(SCORE_RANGES[score])}


def fit_score_maps(logits: np.ndarray, labels: Sequence[str], records: Sequence[Record],
                   inputs: Sequence[str] = (LUNG_OPACITY,)) -> dict:
    """Card ``score_maps``: least-squares maps from the named outputs to both scores."""
    cols = [list(labels).index(name) for name in inputs]
    maps = {}
    for score in SCORES:
        y = np.array([getattr(r, score) for r in records], dtype=np.float64)
        w, b = fit_linear(logits[:, cols], y)
        maps[score] = score_map(inputs, w, b, score)
    return maps


def apply_map(spec: dict, logits: np.ndarray, labels: Sequence[str]) -> np.ndarray:
    cols = [list(labels).index(name) for name in spec["inputs"]]
    return np.clip(logits[:, cols] @ np.asarray(spec["weights"]) + spec["intercept"], *spec["range"])


def regression_report(truth: Sequence[float], predicted: Sequence[float]) -> dict:
    return {"n": len(truth), "mae": mae(truth, predicted), "mse": mse(truth, predicted),
            "pearson": pearson(truth, predicted), "spearman": spearman(truth, predicted),
            "r2": r2(truth, predicted)}


# --------------------------------------------------------------------------- Table 1
#: Cohen et al. 2020, Table 1 (50 random splits; mean and standard deviation).
PAPER_TABLE1 = {
    "opacity": {
        "lung_opacity": {"pearson": (0.78, 0.04), "r2": (0.58, 0.09), "mae": (0.78, 0.05), "mse": (0.86, 0.11)},
        "four_outputs": {"pearson": (0.78, 0.04), "r2": (0.58, 0.09), "mae": (0.76, 0.05), "mse": (0.87, 0.12)},
        "all_outputs": {"pearson": (0.73, 0.09), "r2": (0.44, 0.16), "mae": (0.86, 0.11), "mse": (1.15, 0.33)},
        "features": {"pearson": (0.66, 0.08), "r2": (0.25, 0.21), "mae": (1.01, 0.09), "mse": (1.54, 0.28)},
        "no_data": {"pearson": (0.0, 0.0), "r2": (-0.08, 0.10), "mae": (1.24, 0.10), "mse": (2.26, 0.36)},
    },
    "geographic_extent": {
        "lung_opacity": {"pearson": (0.80, 0.05), "r2": (0.60, 0.09), "mae": (1.14, 0.11), "mse": (2.06, 0.34)},
        "four_outputs": {"pearson": (0.79, 0.05), "r2": (0.57, 0.10), "mae": (1.19, 0.11), "mse": (2.17, 0.37)},
        "all_outputs": {"pearson": (0.76, 0.08), "r2": (0.47, 0.16), "mae": (1.32, 0.17), "mse": (2.73, 0.89)},
        "features": {"pearson": (0.74, 0.08), "r2": (0.43, 0.16), "mae": (1.36, 0.13), "mse": (2.88, 0.58)},
        "no_data": {"pearson": (0.0, 0.0), "r2": (-0.08, 0.10), "mae": (2.00, 0.17), "mse": (5.60, 0.95)},
    },
}


def table1(logits: np.ndarray, features: np.ndarray, labels: Sequence[str], records: Sequence[Record],
           n_splits: int = 50, seed: int = 0, test_fraction: float = 0.5) -> dict:
    """Cohen et al.'s Table 1 on ``records`` (one row of ``logits``/``features`` each).

    Variants: ``lung_opacity`` (1 output), ``four_outputs``, ``all_outputs`` (every
    trained head, i.e. non-empty label), ``features`` (1024), ``no_data`` (train mean).
    Predictions are clamped to the score ranges, as served.
    """
    labels = list(labels)
    trained = [i for i, name in enumerate(labels) if name]
    variants = {
        "lung_opacity": logits[:, [labels.index(LUNG_OPACITY)]],
        "four_outputs": logits[:, [labels.index(n) for n in FOUR_OUTPUTS if n in labels]],
        "all_outputs": logits[:, trained],
        "features": features,
        "no_data": np.zeros((len(records), 0)),
    }
    index = {id(r): i for i, r in enumerate(records)}
    per_split: dict = {score: {name: [] for name in variants} for score in SCORES}
    for train, test in repeated_patient_splits(list(records), n_splits, test_fraction=test_fraction, seed=seed,
                                               stratify=False):
        tr = np.array([index[id(r)] for r in train])
        te = np.array([index[id(r)] for r in test])
        for score in SCORES:
            y = np.array([getattr(r, score) for r in records], dtype=np.float64)
            low, high = SCORE_RANGES[score]
            for name, x in variants.items():
                w, b = fit_linear(x[tr], y[tr])
                pred = np.clip(x[te] @ w + b, low, high) if x.shape[1] else np.full(len(te), b)
                per_split[score][name].append(
                    {"mae": mae(y[te], pred), "mse": mse(y[te], pred),
                     "pearson": pearson(y[te], pred) if x.shape[1] else 0.0, "r2": r2(y[te], pred)})
    out: dict = {"n_images": len(records), "n_patients": len(set(patient_groups(list(records)))),
                 "n_splits": n_splits, "test_fraction": test_fraction, "seed": seed,
                 "n_parameters": {name: x.shape[1] + 1 for name, x in variants.items()}, "scores": {}}
    for score in SCORES:
        out["scores"][score] = {}
        for name in variants:
            rows = per_split[score][name]
            out["scores"][score][name] = {
                metric: {"mean": float(np.mean([r[metric] for r in rows if r[metric] is not None])),
                         "std": float(np.std([r[metric] for r in rows if r[metric] is not None]))}
                for metric in ("pearson", "r2", "mae", "mse")
            }
    return out


def table1_markdown(report: dict) -> str:
    """Our Table 1 beside the paper's, as a Markdown table (mean ± sd over splits)."""
    names = {"lung_opacity": '"lung opacity" output', "four_outputs": "4 outputs",
             "all_outputs": "all trained outputs", "features": "intermediate features (1024)",
             "no_data": "no data (train mean)"}
    lines = ["| score | features | # params | Pearson (ours / paper) | R2 (ours / paper) | MAE (ours / paper) | MSE (ours / paper) |",
             "|---|---|---|---|---|---|---|"]
    for score in ("opacity", "geographic_extent"):
        for name, label in names.items():
            ours = report["scores"][score][name]
            paper = PAPER_TABLE1[score][name]
            cells = [f"{ours[m]['mean']:.2f}±{ours[m]['std']:.2f} / {paper[m][0]:.2f}±{paper[m][1]:.2f}"
                     for m in ("pearson", "r2", "mae", "mse")]
            lines.append(f"| {score} | {label} | {report['n_parameters'][name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- training
def _saliency_defaults() -> dict:
    from cxrserve.families.severity.pipeline import load_template

    return dict(load_template()["extra"]["saliency"])


def train(records: Sequence[Record], out_dir: str | Path, *, epochs: int = 12, steps_per_epoch: int | None = None,
          batch_size: int = 8, lr: float = 1e-3, val_fraction: float = 0.15, seed: int = 0, patience: int = 4,
          resume: bool = False, device: str = "auto", demo: bool = False, version: str = "0.1.0",
          max_val: int | None = None, max_fit: int | None = None, augment: bool = True,
          exclude_scored: bool = True, include_paediatric: bool = False, n_splits: int = 50,
          init: str | None = None, progress: bool = True, deadline: float | None = None) -> Path:
    """Pre-train the 18-output DenseNet, then fit the severity maps; returns best.ckpt.

    With ``exclude_scored`` (real data) the maps are fitted on every scored image and
    Table 1 is computed on them; without it (demo phantoms, where every image is
    scored) they are fitted on scored training images (``max_fit``) and measured on
    the validation images.
    """
    run = Run.start(out_dir, device=device, seed=seed, epochs=epochs, steps_per_epoch=steps_per_epoch,
                    batch_size=batch_size, lr=lr, patience=patience, resume=resume, progress=progress,
                    deadline=deadline)
    dev = run.device
    records = list(records)
    pretrain = pretraining_records(records, exclude_scored, include_paediatric)
    if len(pretrain) < 8:
        raise ValueError(f"need labelled frontal images for pre-training; got {len(pretrain)}")
    train_set, val_set = split(pretrain, val_fraction, seed)
    val_set = val_set[:max_val] if max_val else val_set
    targets = {r.path: torch.from_numpy(xrv_targets(r)) for r in train_set + val_set}
    known = torch.stack([targets[r.path] for r in train_set])
    has_both = [bool((known[:, k] == 1).any() and (known[:, k] == 0).any()) for k in range(len(XRV_PATHOLOGIES))]
    labels = [name if ok else "" for name, ok in zip(XRV_PATHOLOGIES, has_both)]
    if not labels[XRV_PATHOLOGIES.index(LUNG_OPACITY)]:
        raise ValueError("no positive and negative 'Lung Opacity' targets in the pre-training data")
    # Untrained heads are masked out of the loss, so '' slots never learn from noise.
    head_mask = torch.tensor(has_both)
    cache = ImageCache()
    transform = build_transform(PREPROCESSING)
    augment_fn = build_augment("standard" if augment else "none", seed=seed)
    if exclude_scored:
        scored = [r for r in records if is_scored(r)]
        fit_set, eval_set = scored, []
    else:
        fit_set = [r for r in train_set if is_scored(r)][: max_fit or None]
        eval_set = [r for r in val_set if is_scored(r)]
    if len(fit_set) < 3:
        raise ValueError(f"need severity-scored images to fit the maps; got {len(fit_set)}")

    card = ModelCard(
        name=NAME, architecture="xrv_densenet121", task="regression", preprocessing=PREPROCESSING,
        labels=labels, arch_kwargs={"num_classes": len(XRV_PATHOLOGIES), "in_channels": 1, "op_threshs": False},
        demo=demo, version=version, trained_on=describe_data(pretrain + fit_set),
        data_fingerprint=fingerprint(pretrain + fit_set),
        extra={"saliency": _saliency_defaults(),
               "pretraining": {"images": len(pretrain), "train": len(train_set), "val": len(val_set),
                               "exclude_scored": exclude_scored, "val_fraction": val_fraction, "seed": seed,
                               "positives": {n: int((known[:, k] == 1).sum()) for k, n in enumerate(labels) if n}},
               "fit": {"images": len(fit_set), "inputs": [LUNG_OPACITY]}},
    )
    model = run.model(card, init)
    inputs: dict[Path, torch.Tensor] = {}
    precompute = val_set + ([] if augment else train_set)
    for r in precompute:
        inputs[r.path] = transform(cache.image(r))
    val_inputs = [inputs[r.path] for r in val_set]
    val_targets = torch.stack([targets[r.path] for r in val_set]).numpy()

    def train_batches(epoch: int):
        for idx in run.batches(len(train_set), epoch):
            x = batch_images(train_set, idx, inputs, transform, cache, augment_fn if augment else None)
            ys = torch.stack([targets[train_set[i].path] for i in idx])
            yield x.to(dev), ys.to(dev)

    def step(model, batch):
        x, y = batch
        y = torch.where(head_mask.to(y.device), y, torch.full_like(y, float("nan")))
        return masked_bce(model.logits(x), y)

    def evaluate(model):
        logits, _ = extract(model, val_inputs, dev)
        aucs = {}
        for k, name in enumerate(labels):
            ok = np.isfinite(val_targets[:, k])
            if name and ok.sum() and 0 < val_targets[ok, k].sum() < ok.sum():
                aucs[name] = roc_auc(val_targets[ok, k], logits[ok, k])
        return {"val_auc_mean": float(np.mean(list(aucs.values()))) if aucs else None,
                "val_auc_lung_opacity": aucs.get(LUNG_OPACITY), "val_auc": aucs}

    n_steps = run.steps(len(train_set))
    run.fit(model, card, train_batches, step, evaluate, n_train=len(train_set), monitor="val_auc_mean",
            warmup_steps=min(20, max(1, epochs * n_steps // 8)))

    def fit_maps(model, card: ModelCard) -> None:
        """Stage 2: linear maps on the best pre-trained network, stored in its card."""
        fit_logits, fit_feats = extract(model, [inputs.get(r.path) if r.path in inputs else transform(cache.image(r))
                                                for r in fit_set], dev)
        card.extra["score_maps"] = fit_score_maps(fit_logits, labels, fit_set)
        card.extra["fit"]["on_training_images"] = {
            s: regression_report([getattr(r, s) for r in fit_set],
                                 apply_map(card.extra["score_maps"][s], fit_logits, labels))
            for s in SCORES}
        if eval_set:
            ev_logits, _ = extract(model, [inputs[r.path] for r in eval_set], dev)
            card.metrics["severity_val"] = {
                s: regression_report([getattr(r, s) for r in eval_set],
                                     apply_map(card.extra["score_maps"][s], ev_logits, labels))
                for s in SCORES}
        if exclude_scored:
            card.metrics["table1"] = table1(fit_logits, fit_feats, labels, fit_set, n_splits=n_splits, seed=seed)
            log.info("Table 1 (ours / paper):\n%s", table1_markdown(card.metrics["table1"]))
        log.info("severity maps: %s", card.extra["score_maps"])

    return run.amend_best(model, fit_maps)


# --------------------------------------------------------------------------- evaluation
def evaluate(pipeline, records: Sequence[Record]) -> dict:
    """Extent and opacity of a served ``cxr-severity`` against the scored records."""
    scored = [r for r in records if is_scored(r)]
    kept = [(r, a) for r, a in zip(scored, serve_records(pipeline, scored)) if a is not None]
    report = {"n": len(kept), "rejected": len(scored) - len(kept)}
    for s in SCORES:
        report[s] = regression_report([getattr(r, s) for r, _ in kept], [a[s] for _, a in kept])
    return report
