"""Score a site's labelled folder in process with the archives that serve, and map its labels.

Every film goes through the served pipeline (decode, input checks, gate, model) exactly as a
request would. The gate is run in report-only mode so that every film gets probabilities and a
gate score; whether serving would have refused it is then decided with the archive's own rule
(enforced? threshold?), so the audit counts refusals as serving would make them and calibration
can still set a gate threshold from the scores of films the current one refuses.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxrserve.core.errors import CXRInputError
from cxrserve.tools.site.config import SiteConfigError, SiteFile, Term
from cxrserve.tools.site.models import Output, outputs

log = logging.getLogger(__name__)


@dataclass
class FamilyScores:
    output: Output
    archive: Path
    probs: np.ndarray  # (N, C), NaN where the film got no answer
    served_positive: np.ndarray  # (N, C) bool: what the served answer calls positive
    truth: np.ndarray  # (N, C): 1 positive, 0 negative, NaN unknown
    served_thresholds: dict = field(default_factory=dict)
    card_metrics: dict = field(default_factory=dict)  # the archive's own validation numbers per label
    labels: tuple[str, ...] = ()
    #: binary outputs answer in their own words: {"positive": ..., "negative": ...}
    answer_labels: dict = field(default_factory=dict)


@dataclass
class ScoreTable:
    """One row per film of the folder; nothing in here names a patient."""

    n: int
    groups: np.ndarray  # patient index per film (0..P-1), for patient-level bootstrap and folds
    frontal: np.ndarray  # bool: not marked lateral/non-frontal by the folder
    status: list[str]  # "ok" or the 4xx error code serving would answer
    http: np.ndarray  # 200 or the 4xx status
    gate_score: np.ndarray  # P(frontal) from the archive's gate, NaN without one
    gate: dict  # {"threshold", "enforced", "demo"} of the served gate, or {}
    families: dict[str, FamilyScores]
    label_counts: dict = field(default_factory=dict)  # site word -> films
    words: list[str] = field(default_factory=list)  # each film's word in the label column (site vocabulary)

    @property
    def answered(self) -> np.ndarray:
        return np.array([s == "ok" for s in self.status])


def _patient_index(records) -> np.ndarray:
    keys: dict[tuple, int] = {}
    return np.array([keys.setdefault(r.patient_key, len(keys)) for r in records], dtype=np.int64)


def map_truth(records, site: SiteFile) -> tuple[dict[str, np.ndarray], dict]:
    """Per family ``(N, C)`` truth from the site's words: 1, 0 or NaN (unknown)."""
    truth = {f: np.full((len(records), len(site.labels_of(f))), np.nan) for f in site.families}
    unmapped: Counter = Counter()
    counts: Counter = Counter()
    conflicts = 0
    columns = [(site.label_column, site.labels), *site.columns.items()]
    for i, rec in enumerate(records):
        for column, mapping in columns:
            word = rec.label if column == "label" else str(rec.extras.get(column, "") or "")
            word = word.strip()
            if not word:
                continue
            term: Term | None = mapping.get(word)
            if term is None:
                unmapped[(column, word)] += 1
                continue
            counts[f"{column}={word}"] += 1
            if term.ignore or term.family not in truth:
                continue
            out = outputs()[term.family]
            labels = site.labels_of(term.family)
            row = truth[term.family][i]
            j = labels.index(term.label)
            if term.positive and out.kind == "multiclass":
                new = np.zeros(len(labels))
                new[j] = 1.0
                known = ~np.isnan(row)
                if np.any(row[known] != new[known]):
                    conflicts += 1
                    row[:] = np.nan
                    continue
                row[:] = new
            else:
                value = 1.0 if term.positive else 0.0
                if not np.isnan(row[j]) and row[j] != value:
                    conflicts += 1
                    row[j] = np.nan
                    continue
                row[j] = value
    if unmapped:
        shown = ", ".join(f"{c}={w!r} ({n})" for (c, w), n in sorted(unmapped.items())[:20])
        raise SiteConfigError(f"the site file does not say what these values mean: {shown}; add each to "
                              "'labels' (or 'columns') as a model term or 'ignore'")
    if conflicts:
        log.warning("%d films have contradicting labels (e.g. two classes): left unknown", conflicts)
    return truth, dict(counts)


def card_metrics(pipeline, labels) -> dict:
    """The archive's own validation numbers per label (from its components' cards), if it has any."""
    out: dict[str, dict] = {}
    for part in pipeline.parts.values():
        m = part.card.metrics or {}
        report = m.get("val_report") or m.get("validation") or {}
        per = report.get("per_class") if isinstance(report, dict) else None
        if per:
            for label in labels:
                if label in per:
                    out[label] = {k: per[label].get(k) for k in ("sensitivity", "specificity", "ppv", "support")
                                  if k in per[label]}
            out["_source"] = f"{part.card.name} card: validation split of its training ({report.get('n', '?')} films)"
        for key, value in m.items():
            if "auc" in key.lower() and isinstance(value, (int, float)):
                for label in labels:
                    out.setdefault(label, {}).setdefault("auc", float(value))
                out.setdefault("_source", f"{part.card.name} card metrics")
    return out


def served_calls(output: Output, labels, probs, answers, thresholds) -> tuple[np.ndarray, dict]:
    """What each served answer calls positive, per label, and a binary output's two words.

    Multi-class: the class it answers; multi-label: probability >= its served threshold (0.5);
    binary: its coded word for the higher scores (the word it answers for the highest-scoring film).
    """
    n = probs.shape[0]
    pos = np.zeros(probs.shape, dtype=bool)
    words: dict = {}
    if output.kind == "multiclass":
        for i, a in enumerate(answers):
            if a in labels:
                pos[i, labels.index(a)] = True
    elif output.kind == "binary":
        ok = [i for i in range(n) if answers[i] is not None]
        if ok:
            top = answers[max(ok, key=lambda i: probs[i, 0])]
            other = next((w for w in output.answer_values if w != top), "")
            words = {"positive": str(top), "negative": str(other)}
            for i in ok:
                pos[i, 0] = answers[i] == top
    else:
        t = np.array([thresholds.get(c, 0.5) for c in labels])
        pos = np.nan_to_num(probs, nan=-1) >= t
    return pos, words


def _score_paths(paths, site: SiteFile, store, *, progress: bool, device: str) -> dict:
    """Score files with each family's archive: statuses, gate scores and per-family outputs."""
    from tqdm.auto import tqdm

    from cxrserve.core.loading import load_pipeline

    n = len(paths)
    status = ["ok"] * n
    http = np.full(n, 200)
    gate_score = np.full(n, np.nan)
    gate_info: dict = {}
    outs: dict = {}
    for fi, family in enumerate(site.families):
        output = outputs()[family]
        labels = site.labels_of(family)
        mar = Path(store) / f"{output.model}.mar"
        if not mar.is_file():
            raise SiteConfigError(f"{mar}: the store has no {output.model} archive (needed for {family})")
        pipeline = load_pipeline(mar, device=device, sites=False)  # what the archive itself answers
        served_enforced, served_threshold = pipeline.gate_enforced, pipeline.gate_threshold
        if pipeline.gate is not None and not gate_info:
            gate_info = {"threshold": served_threshold, "enforced": served_enforced,
                         "demo": bool(pipeline.gate.card.demo), "model": output.model}
        # report-only gate: every film is scored; serving's refusals are re-derived below
        pipeline.config["gate_enforce"] = False
        probs = np.full((n, len(labels)), np.nan)
        answers: list = [None] * n
        served_thresholds: dict = {}
        step = max(1, pipeline.limits.max_batch)
        bar = tqdm(total=n, desc=f"scoring {output.model}", unit="film", disable=not progress, dynamic_ncols=True)
        for start in range(0, n, step):
            chunk = range(start, min(n, start + step))
            # read per chunk: a site's sample may not fit in memory
            requests = [({"image": Path(paths[i]).read_bytes()}, {}) for i in chunk]
            results = pipeline.predict(pipeline.make_items(requests))
            for i, res in zip(chunk, results):
                if isinstance(res, CXRInputError):
                    if status[i] == "ok":
                        status[i], http[i] = res.code, res.status
                    continue
                gate = res.get("input_gate")
                if gate is not None:
                    if fi == 0:
                        gate_score[i] = float(gate["score"])
                    # each archive's own rule (they ship the same gate, maybe other thresholds)
                    if served_enforced and float(gate["score"]) < served_threshold and status[i] == "ok":
                        status[i], http[i] = f"gate:{gate['verdict']}", 422
                vals = output.read(res)
                missing = [c for c in labels if c not in vals]
                if missing:
                    raise SiteConfigError(f"{output.model} answers no probability for {missing}")
                probs[i] = [vals[c] for c in labels]
                answers[i] = output.answer(res)
                if not served_thresholds:
                    served_thresholds = output.served_thresholds(res)
            bar.update(len(chunk))
        bar.close()
        positive, answer_labels = served_calls(output, labels, probs, answers, served_thresholds)
        outs[family] = (output, mar, probs, positive, served_thresholds, card_metrics(pipeline, labels), labels,
                        answer_labels)
        del pipeline
    return {"status": status, "http": http, "gate_score": gate_score, "gate": gate_info, "families": outs}


def score_folder(data: str | Path, site: SiteFile, store: str | Path, *, progress: bool = True,
                 device: str = "cpu", limit_records=None) -> ScoreTable:
    """Read ``data/labels.csv`` (:func:`read_folder`), map its words and score every film.

    ``limit_records``: an optional callable ``records -> records`` (a subsample), applied
    before scoring.
    """
    from cxrserve.training.datasets import read_folder

    data = Path(data)
    if not (data / "labels.csv").is_file():
        raise SiteConfigError(f"{data}: no labels.csv (columns filename,label[,patient_id,...])")
    records = read_folder(data)
    if limit_records is not None:
        records = list(limit_records(records))
    if not records:
        raise SiteConfigError(f"{data}: no readable films in labels.csv")
    truth, counts = map_truth(records, site)
    scored = _score_paths([r.path for r in records], site, store, progress=progress, device=device)
    fams = {f: FamilyScores(o, mar, probs, pos, truth[f], thr, card, labels, words)
            for f, (o, mar, probs, pos, thr, card, labels, words) in scored["families"].items()}
    frontal = np.array([r.is_frontal is not False for r in records])
    return ScoreTable(n=len(records), groups=_patient_index(records), frontal=frontal, status=scored["status"],
                      http=scored["http"], gate_score=scored["gate_score"], gate=scored["gate"], families=fams,
                      label_counts=counts,
                      words=[(r.label if site.label_column == "label" else str(r.extras.get(site.label_column, "")))
                             .strip() for r in records])


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


def score_unlabelled(folder: str | Path, site: SiteFile, store: str | Path, *, progress: bool = True,
                     device: str = "cpu") -> dict[str, np.ndarray]:
    """Probabilities per family for a folder of unlabelled studies (its ``labels.csv`` if it has one,
    else every image file under it); only films serving would answer are kept."""
    folder = Path(folder)
    if (folder / "labels.csv").is_file():
        from cxrserve.training.datasets import read_folder

        paths = [r.path for r in read_folder(folder) if r.is_frontal is not False]
    elif folder.is_dir():
        paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        raise SiteConfigError(f"--unlabelled {folder}: not a folder")
    if not paths:
        raise SiteConfigError(f"--unlabelled {folder}: no images (.png, .jpg, .dcm)")
    scored = _score_paths(paths, site, store, progress=progress, device=device)
    ok = np.array([s == "ok" for s in scored["status"]])
    return {f: v[2][ok] for f, v in scored["families"].items()}
