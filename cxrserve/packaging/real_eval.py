"""A real build's evaluation: each archive, in process through its served pipeline, on the
patient-level validation split its training held out (rebuilt from the split settings in its card
with the task's ``training_split``), with the task's ``evaluate``; plus the per-film classifier pass
the acceptance bars need. Used by :mod:`cxrserve.packaging.real_store`."""
from __future__ import annotations

import inspect
from pathlib import Path

from cxrserve import families


def checkpoint_card(ckpt: Path):
    from cxrserve.core.card import ModelCard
    from cxrserve.models.checkpoint import load_checkpoint

    return ModelCard.from_dict(load_checkpoint(ckpt)["card"])


def _numbers(metrics: dict) -> dict:
    """The JSON-ready part of a card's metrics (best epoch on its validation split)."""
    from cxrserve.training.jsonable import to_jsonable

    return to_jsonable({k: v for k, v in (metrics or {}).items() if not k.startswith("_")})


def cut_validation(records, card, limit):
    want = card.extra.get("split", {}).get("val")
    records = list(records)[:want] if want is not None and want < len(records) else list(records)
    return records[:limit] if limit else records


def evaluate_archive(builder, name: str) -> dict:
    """Served-pipeline metrics on the archive's own patient-level validation split (``builder``: the
    :class:`~cxrserve.packaging.real_store.RealStoreBuilder` that trained it)."""
    from cxrserve.core.loading import load_pipeline
    from cxrserve.families import get_task

    # the archive's own model: its last component before the shared gate (cxr-triage: the classifier)
    main = families.get_served(name)[1].components[-1]  # composed models are not evaluated here
    card = checkpoint_card(builder.checkpoint(main))
    sp = card.extra.get("split", {})
    result = {"archive": name, "component": main, "version": card.version, "trained_on": card.trained_on,
              "split": sp, "training_validation": _numbers(card.metrics)}
    records = builder.records()
    task = get_task(builder.components_cfg[main]["task"])
    vf, seed = sp.get("val_fraction"), sp.get("seed", 0)
    val = None
    if hasattr(task, "training_split") and vf is not None:
        # split settings beyond the fraction and seed (mortality's test_fraction, PXS's target) as recorded
        accepted = inspect.signature(task.training_split).parameters
        extra = {k: v for k, v in sp.items() if k in accepted and k not in ("val_fraction", "seed", "records")}
        _, val = task.training_split(records, val_fraction=vf, seed=seed, **extra)
        method = f"{task.__name__}.training_split(val_fraction={vf}, seed={seed})"
    else:
        method = "training-time validation only (see training_validation)"
    result["validation_method"] = method
    if val is not None:
        val = cut_validation(val, card, builder.max_eval)
        pipeline = load_pipeline(builder.store / f"{name}.mar", device=builder.eval_device)
        result["validation"] = task.evaluate(pipeline, val)
        result["validation_n"] = len(val)
        if main in builder.classifiers:  # the bars need per-film answers the task's report does not keep
            result["acceptance"] = classifier_pass(pipeline, val, **builder.classifiers[main])
    return result


def classifier_pass(pipeline, records, *, truth: str, label: str, probabilities: str, chunk: int = 16) -> dict:
    """Every labelled validation film through the served classifier with the gate reporting only (the
    gate is judged on its own bars), then :func:`acceptance.classifier_evidence` by patient. ``truth``:
    the record attribute with the true label; ``label``/``probabilities``: the answer's fields."""
    from cxrserve.core.imageio import read_file
    from cxrserve.core.item import Item
    from cxrserve.packaging import acceptance
    from cxrserve.training.datasets import patient_groups

    def truth_of(record):
        return getattr(record, truth)

    records = [r for r in records if truth_of(r) is not None]
    pipeline.config["gate_enforce"] = False
    labels = list(pipeline.parts[list(pipeline.parts)[-1]].card.labels)  # the classifier: last component
    kept, predicted, scores = [], [], []
    for start in range(0, len(records), chunk):
        part = records[start : start + chunk]
        for r, out in zip(part, pipeline.predict([Item(xray=read_file(r.path), options=pipeline.parse_options({}))
                                                  for r in part])):
            if isinstance(out, dict):  # a film the input checks refuse has no answer to score
                kept.append(r)
                predicted.append(out[label])
                scores.append([out[probabilities][name] for name in labels])
    evidence = acceptance.classifier_evidence([truth_of(r) for r in kept], predicted, scores, labels,
                                              patient_groups(kept))
    evidence["unscored"] = len(records) - len(kept)
    return evidence


# --------------------------------------------------------------------------- card fragment
