"""Contrastive image/report training of the CheXzero CLIP, and zero-shot AUC per finding.

CheXzero (seed 002) trains OpenAI's CLIP on MIMIC-CXR image / report-impression pairs
with the symmetric InfoNCE loss; it never sees a label. Here the pairs are

* phantoms: the generated ``report`` text of every phantom (findings, side, zone,
  devices), for the tests and the demo store;
* ``../shared/data``: the only text there is the collections' finding labels (NIH
  ``nih_finding_labels``, ieee8023 ``finding``), written out as a short report
  (:func:`report_text`). That text names the very classes the evaluation scores, so on
  real data this is weakly supervised rather than zero-shot; the model card says so.

Training choices: inputs through the ``chexzero`` preprocessing (decoded and
transformed once when there is no augmentation); token batches cut to their longest
report (exact for a causal text transformer, see :mod:`cxrserve.models.clip`);
identical reports within a batch are all positives of each other (phantom reports
repeat, and pushing a "Normal chest radiograph." image away from another one's
identical report would be a false negative); the learnable temperature is capped at
100 as in OpenAI's CLIP. ``arch`` picks ``vit-b-32`` (the seed's configuration and
CheXzero's checkpoints) or ``vit-demo`` (the same architecture, narrower and
shallower, for the CPU-trained demo store); ``init`` starts from an OpenAI-layout
checkpoint (e.g. one of CheXzero's) to fine-tune.

Evaluation (:func:`zero_shot_report`): the served scoring (prompt pair "{label}" /
"no {label}", softmax, ensemble mean) for the findings a record can be judged on:
``Lung Opacity`` (phantom extent > 0, ieee8023 expert extent > 0, or the NIH Google
2019 airspace-opacity label), ``Pneumonia``, ``COVID-19`` and ``No Finding`` (triage
label), AUC per finding, per source, with patient-cluster bootstrap intervals.
"""
from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cxrserve.core.card import ModelCard
from cxrserve.models.checkpoint import load_model
from cxrserve.training.datasets import Record, fingerprint
from cxrserve.training.bootstrap import bootstrap_ci
from cxrserve.training.jsonable import to_jsonable
from cxrserve.training.metrics import roc_auc
from cxrserve.models.clip import CLIP, VIT_B_32, clean_state_dict
from cxrserve.core.transforms import build_augment, build_transform
from cxrserve.families.zeroshot.pipeline import (CHEXPERT_LABELS, COMPONENT, NEGATIVE_TEMPLATE, POSITIVE_TEMPLATE, PREPROCESSING,
                        Tokenizer, embed_labels, pair_probabilities, trim_tokens)
from cxrserve.training.common import ImageCache, describe_data, split
from cxrserve.training.skeleton import Run, serve_records

log = logging.getLogger(__name__)

NAME = COMPONENT

#: Named configurations of the one architecture (OpenAI ``CLIP(...)`` arguments).
ARCHS: dict[str, dict] = {
    "vit-b-32": dict(VIT_B_32),
    # The same architecture sized for the CPU-trained demo store (about 80 s on 2 cores):
    # 2-layer ViT of width 128 on 32 px patches, 2-layer text transformer of width 128,
    # 128-d joint space. Widths are multiples of 64 so ``CLIP.config_from_state_dict``
    # infers the heads as for OpenAI's checkpoints. Measured in docs/MODEL_CARD.md.
    "vit-demo": dict(VIT_B_32, embed_dim=128, vision_layers=2, vision_width=128, transformer_width=128,
                     transformer_heads=2, transformer_layers=2),
}

#: Findings a record can be scored on, with the record -> truth rule (None: unknown).
_YES, _NO = {"yes", "y", "1", "true"}, {"no", "n", "0", "false"}


def opacity_present(record: Record) -> bool | None:
    if record.geographic_extent is not None:
        return record.geographic_extent > 0
    google = (record.extras.get("google2019_airspace_opacity") or "").strip().lower()
    if google in _YES:
        return True
    if google in _NO:
        return False
    return None


def _triage_is(label: str) -> Callable[[Record], bool | None]:
    def truth(record: Record) -> bool | None:
        kind = record.triage_label
        return None if kind is None else kind == label
    return truth


EVAL_TARGETS: dict[str, Callable[[Record], bool | None]] = {
    "Lung Opacity": opacity_present,
    "Pneumonia": _triage_is("pneumonia"),
    "COVID-19": _triage_is("covid19"),
    "No Finding": _triage_is("normal"),
}

_PNEUMONIA_KIND = {"pneumonia_bacterial": "Bacterial pneumonia", "pneumonia_viral": "Viral pneumonia",
                   "pneumonia_fungal": "Fungal pneumonia", "bacterial": "Bacterial pneumonia",
                   "viral": "Viral pneumonia", "fungal": "Fungal pneumonia"}


def report_text(record: Record) -> str:
    """The text paired with an image: its report, else its finding labels as a short report.

    NIH: ``"Pneumonia|Infiltration"`` -> ``"Pneumonia. Infiltration."``; ieee8023:
    ``"COVID-19."``, ``"Bacterial pneumonia (Streptococcus)."``; normals ``"No finding."``.
    Returns ``""`` when nothing is known.
    """
    if record.report.strip():
        return " ".join(record.report.split())
    nih = (record.extras.get("nih_finding_labels") or "").strip()
    if nih:
        return " ".join(f"{part.replace('_', ' ').strip()}." for part in nih.split("|") if part.strip())
    finding = " ".join((record.extras.get("finding") or record.extras.get("ieee8023_finding") or "").split())
    kind = record.triage_label
    if kind == "normal":
        return "No finding."
    if kind == "covid19":
        return f"{finding or 'COVID-19'}."
    if kind == "pneumonia":
        key = re.sub(r"\W+", "_", (record.extras.get("pneumonia_type") or record.label).strip().lower())
        if key in ("bacteria", "virus"):
            key = {"bacteria": "bacterial", "virus": "viral"}[key]
        noun = _PNEUMONIA_KIND.get(key, "Pneumonia")
        if finding and finding.lower() not in ("pneumonia", noun.lower()):
            return f"{noun} ({finding})."
        return f"{noun}."
    return f"{finding}." if finding else ""


def training_split(records: Sequence[Record], val_fraction: float = 0.2, seed: int = 0,
                   include_paediatric: bool = False) -> tuple[list[Record], list[Record]]:
    """The (train, validation) split :func:`train` makes, for held-out evaluation."""
    return split(usable_records(records, include_paediatric), val_fraction, seed)


def usable_records(records: Sequence[Record], include_paediatric: bool = False) -> list[Record]:
    out = [r for r in records if r.is_frontal is not False and report_text(r)]
    if not include_paediatric:
        out = [r for r in out if r.is_adult is not False and "kermany" not in r.source]
    return out


def sample_sentences(text: str, rng: np.random.Generator) -> str:
    """A random non-empty subset of a report's sentences, in order (impression-like snippets)."""
    sentences = [s for s in re.split(r"(?<=\.)\s+", text) if s]
    if len(sentences) <= 1:
        return text
    keep = rng.random(len(sentences)) < 0.5
    if not keep.any():
        keep[rng.integers(len(sentences))] = True
    return " ".join(s for s, k in zip(sentences, keep) if k)


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                     same_text: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on normalised embeddings; identical texts are shared positives."""
    logits = logit_scale.exp().clamp(max=100.0) * image.float() @ text.float().t()
    target = same_text.float() / same_text.float().sum(dim=1, keepdim=True)
    return 0.5 * (torch.sum(-target * F.log_softmax(logits, dim=1), dim=1).mean()
                  + torch.sum(-target * F.log_softmax(logits.t(), dim=1), dim=1).mean())


def resolve_arch(arch: str | dict) -> dict:
    if isinstance(arch, dict):
        return {**VIT_B_32, **arch}
    try:
        return dict(ARCHS[arch])
    except KeyError:
        raise KeyError(f"unknown arch {arch!r}; known: {sorted(ARCHS)} or a dict of CLIP arguments") from None


def _load_init(paths: str | Path | Sequence[str | Path]) -> dict:
    from cxrserve.families.zeroshot.importer import _read_state_dict

    path = Path(paths[0] if isinstance(paths, (list, tuple)) else paths)
    return clean_state_dict(_read_state_dict(path))


def train(records: Sequence[Record], out_dir: str | Path, *, arch: str | dict = "vit-b-32",
          init: str | Path | None = None, epochs: int = 10, steps_per_epoch: int | None = None,
          batch_size: int = 32, lr: float = 1e-4, weight_decay: float = 0.1, val_fraction: float = 0.2,
          seed: int = 0, patience: int = 4, resume: bool = False, device: str = "auto", demo: bool = False,
          version: str = "0.1.0", max_val: int | None = None, augment: bool = True,
          text_sampling: str = "report", include_paediatric: bool = False, warmup_steps: int | None = None,
          report: bool = True, progress: bool = True, deadline: float | None = None) -> Path:
    """Contrastive training on image/report pairs; returns ``best.ckpt``.

    The best epoch is the one with the lowest contrastive loss on the validation pairs:
    chosen without any label, as a zero-shot model should be; the zero-shot AUCs of
    :data:`EVAL_TARGETS` are logged beside it.

    ``text_sampling``: ``"report"`` pairs each image with its whole report,
    ``"sentences"`` with a random subset of its sentences every time it is drawn.
    ``report``: write ``eval.json`` (AUC per finding and source, bootstrap intervals) for
    the validation split with the best checkpoint.
    """
    run = Run.start(out_dir, device=device, seed=seed, epochs=epochs, steps_per_epoch=steps_per_epoch,
                    batch_size=batch_size, lr=lr, patience=patience, resume=resume, progress=progress,
                    deadline=deadline)
    dev = run.device
    usable = usable_records(records, include_paediatric)
    if len(usable) < 8:
        raise ValueError(f"need images with report text; got {len(usable)} of {len(records)} records")
    train_set, val_set = training_split(records, val_fraction, seed, include_paediatric)
    val_set = val_set[:max_val] if max_val else val_set
    cache = ImageCache()
    transform = build_transform(PREPROCESSING)

    if init and str(init).strip().lower() == "torchvision":
        raise ValueError("init=torchvision does not apply to zeroshot: its ViT-B/32 is CLIP's image tower, not "
                         "torchvision's vit_b_32 (see cxrserve.models.pretrained); use init=PATH with a CLIP checkpoint")
    init_state = _load_init(init) if init else None
    config = CLIP.config_from_state_dict(init_state) if init_state is not None else resolve_arch(arch)
    arch_name = arch if isinstance(arch, str) and init_state is None else "custom"
    card = ModelCard(
        name=NAME, architecture="clip", task="image_text", preprocessing=PREPROCESSING,
        labels=list(CHEXPERT_LABELS), arch_kwargs={**config, "members": 1}, demo=demo, version=version,
        trained_on=describe_data(usable), data_fingerprint=fingerprint(usable),
        extra={"source": "trained", "arch": arch_name, "init": Path(init).name if init else None,
               "text": "report" if all(r.report for r in usable) else "finding labels written as a report",
               "text_sampling": text_sampling,
               "prompts": {"positive": POSITIVE_TEMPLATE, "negative": NEGATIVE_TEMPLATE},
               "eval_targets": list(EVAL_TARGETS),
               "split": {"val_fraction": val_fraction, "seed": seed, "train": len(train_set), "val": len(val_set)}},
    )
    model = run.model(card)  # an init file is a CLIP checkpoint, loaded into the member as it is
    if init_state is not None:
        model.members[0].load_state_dict(init_state)
        from cxrserve.models.pretrained import sha256_file

        first = Path(init[0] if isinstance(init, (list, tuple)) else init)
        card.extra["init_source"] = {"source": "file", "file": first.name, "sha256": sha256_file(first)}
    tokenizer = Tokenizer(context_length=config["context_length"])

    def image_input(record: Record) -> torch.Tensor:
        return transform(cache.image(record))[:1]  # one grey channel; x3 at batch time

    log.info("preparing %d training and %d validation images", len(train_set), len(val_set))
    val_inputs = [image_input(r) for r in val_set]
    fixed = {r.path: image_input(r) for r in train_set} if not augment else {}
    texts = [report_text(r) for r in train_set]
    tokens = tokenizer(texts)
    augmenter = build_augment("standard", seed=seed) if augment else None
    val_truth = {label: [rule(r) for r in val_set] for label, rule in EVAL_TARGETS.items()}

    def train_batches(epoch: int):
        rng = np.random.default_rng((seed, epoch, 13))
        for idx in run.batches(len(train_set), epoch):
            if augmenter is not None:
                xs = [transform(augmenter(cache.image(train_set[i]))[0])[:1] for i in idx]
            else:
                xs = [fixed[train_set[i].path] for i in idx]
            if text_sampling == "sentences":
                tok = tokenizer([sample_sentences(texts[i], rng) for i in idx])
            else:
                tok = tokens[idx]
            tok = trim_tokens(tok)
            same = (tok[:, None, :] == tok[None, :, :]).all(dim=-1)
            yield torch.stack(xs).to(dev), tok.to(dev), same.to(dev)  # grey: see VisionTransformer.forward

    def step(model, batch):
        x, tok, same = batch
        member = model.members[0]
        image = F.normalize(member.encode_image(x), dim=-1)
        text = F.normalize(member.encode_text(tok), dim=-1)
        return contrastive_loss(image, text, member.logit_scale, same)

    val_tokens = tokenizer([report_text(r) for r in val_set])

    def validation_loss(model) -> float:
        """The training objective on validation pairs, in training-sized batches (no label used)."""
        member, losses = model.members[0], []
        for start in range(0, len(val_set) - len(val_set) % batch_size or len(val_set), batch_size):
            tok = trim_tokens(val_tokens[start : start + batch_size])
            x = torch.stack(val_inputs[start : start + batch_size]).to(dev)
            same = (tok[:, None, :] == tok[None, :, :]).all(dim=-1).to(dev)
            image = F.normalize(member.encode_image(x), dim=-1)
            text = F.normalize(member.encode_text(tok.to(dev)), dim=-1)
            losses.append(float(contrastive_loss(image, text, member.logit_scale, same)))
        return float(np.mean(losses))

    def evaluate(model):
        probs = zero_shot_eager(model, val_inputs, list(EVAL_TARGETS), tokenizer, dev)
        aucs = {}
        for j, label in enumerate(EVAL_TARGETS):
            known = [(t, p) for t, p in zip(val_truth[label], probs[:, j]) if t is not None]
            auc = roc_auc([t for t, _ in known], [p for _, p in known]) if known else None
            if auc is not None:
                aucs[label] = auc
        return {"val_loss": validation_loss(model),
                "val_auc": float(np.mean(list(aucs.values()))) if aucs else None,
                "val_auc_by_label": aucs, "val_n": len(val_set),
                "logit_scale": float(model.members[0].logit_scale.exp())}

    warmup = min(50, run.steps(len(train_set))) if warmup_steps is None else warmup_steps
    best = run.fit(model, card, train_batches, step, evaluate, n_train=len(train_set), monitor="val_loss",
                   mode="min", warmup_steps=warmup, weight_decay=weight_decay)
    if report:
        # AUC per finding and per source, with intervals, on the exact validation split.
        probs = zero_shot_eager(load_model(best, dev)[0], val_inputs, list(EVAL_TARGETS), tokenizer, dev)
        summary = zero_shot_report(val_set, probs, list(EVAL_TARGETS))
        (run.out_dir / "eval.json").write_text(json.dumps(to_jsonable(summary), indent=2) + "\n")
    return best


def zero_shot_eager(model, inputs: Sequence[torch.Tensor], labels: Sequence[str], tokenizer: Tokenizer,
                    device: torch.device, chunk: int = 32) -> np.ndarray:
    """Probabilities ``[N, labels]`` from an eager model, scored exactly as served."""
    model.eval()
    text = embed_labels(model.encode_text, tokenizer, labels, device)
    out = []
    with torch.inference_mode():
        for start in range(0, len(inputs), chunk):
            x = torch.stack(list(inputs[start : start + chunk]))
            out.append(pair_probabilities(model(x.to(device)), text).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, len(labels)))


def zero_shot_report(records: Sequence[Record], probabilities: np.ndarray, labels: Sequence[str],
                     n_boot: int = 1000) -> dict:
    """AUC per finding (all records and per source) with patient-cluster bootstrap 95 % intervals."""
    report: dict = {"n": len(records), "labels": {}}
    for j, label in enumerate(labels):
        rule = EVAL_TARGETS.get(label)
        if rule is None:
            continue
        rows = [(i, rule(r)) for i, r in enumerate(records)]
        rows = [(i, t) for i, t in rows if t is not None]
        if not rows:  # no film carries this finding's truth (or the input checks refused them all)
            report["labels"][label] = {"auc": None, "n": 0, "positives": 0, "by_source": {}}
            continue
        idx = np.array([i for i, _ in rows])
        truth = np.array([t for _, t in rows], dtype=bool)
        scores = probabilities[idx, j]
        groups = [f"{records[i].source}/{records[i].patient_id}" for i in idx]
        entry = {"auc": roc_auc(truth, scores), "n": int(len(idx)), "positives": int(truth.sum())}
        if entry["auc"] is not None:
            ci = bootstrap_ci(roc_auc, truth, scores, n=n_boot, groups=groups)
            entry["ci95"] = [ci["low"], ci["high"]]
        by_source: dict[str, list[int]] = defaultdict(list)
        for k, i in enumerate(idx):
            by_source[records[i].source].append(k)
        entry["by_source"] = {
            source: {"auc": roc_auc(truth[ks], scores[ks]), "n": len(ks), "positives": int(truth[ks].sum())}
            for source, ks in sorted(by_source.items())
        }
        report["labels"][label] = entry
    return report


def evaluate(pipeline, records: Sequence[Record], include_paediatric: bool = False) -> dict:
    """Zero-shot AUC per finding through the served ``cxr-zeroshot`` pipeline (in process)."""
    usable = [r for r in records if r.is_frontal is not False
              and (include_paediatric or (r.is_adult is not False and "kermany" not in r.source))]
    labels = list(EVAL_TARGETS)
    kept = [(r, a) for r, a in zip(usable, serve_records(pipeline, usable, {"labels": labels})) if a is not None]
    probs = np.array([[a["probabilities"][label] for label in labels] for _, a in kept])
    report = zero_shot_report([r for r, _ in kept], probs.reshape(len(kept), len(labels)), labels)
    report["rejected"] = len(usable) - len(kept)
    report["prompts"] = {"positive": POSITIVE_TEMPLATE, "negative": NEGATIVE_TEMPLATE}
    return report


def post_export(folder: Path, builder, spec: dict | None = None) -> None:
    """The text encoder and the BPE vocabulary travel with the exported image encoder (no settings)."""
    from cxrserve.families.zeroshot.importer import export_text_encoder

    export_text_encoder(builder.checkpoint(folder.name), folder)
