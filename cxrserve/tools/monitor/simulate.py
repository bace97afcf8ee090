"""``cxrserve monitor simulate``: how fast the alert fires on a shifted stream, how often it fires
on an in-distribution one, and how the label-free estimate tracks realised sensitivity.

Every collection is scored once in process (records cached under ``--work``); the reference is
fitted on part of the in-distribution collection (split by patient where it has a patient column)
and streams are resampled from the held-out part, then from a shifted collection.
"""
from __future__ import annotations

import csv
import json
import time
from collections import deque
from pathlib import Path

import numpy as np

from cxrserve.core import monitor as M
from cxrserve.tools.monitor.scoring import labelled, load, score_files

PATIENT_COLUMNS = ("patient_id", "patientid", "kermany_patient_key")


def _patients(folder: Path) -> dict[str, str]:
    table = folder / "labels.csv"
    if not table.exists():
        return {}
    with table.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    col = next((c for c in PATIENT_COLUMNS if rows and c in rows[0]), None)
    return {r["filename"]: (r[col] if col else r["filename"]) for r in rows}


def collection(data: Path, name: str, pipeline, work: Path) -> list[tuple[M.Record, str, str]]:
    """``(record, label, patient)`` per file of ``data/name`` (cached in ``work``)."""
    cache = work / "records" / f"{pipeline.name}-{name}.jsonl"
    folder = data / name
    rows = labelled(folder)
    patients = _patients(folder)
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        t = time.time()
        recs = score_files(pipeline, [p for p, _ in rows])
        with cache.open("w") as fh:
            for rec, (path, label) in zip(recs, rows):
                fh.write(json.dumps({"rec": rec.to_dict(), "label": label,
                                     "patient": patients.get(str(path.relative_to(folder)), str(path))}) + "\n")
        print(f"scored {name}: {len(recs)} files in {time.time() - t:.0f} s")
    out = []
    for line in cache.open():
        d = json.loads(line)
        out.append((M.Record.from_dict(d["rec"]), d["label"], d["patient"]))
    return out


def split_by_patient(rows, fraction: float, rng) -> tuple[list, list]:
    patients = sorted({p for _, _, p in rows})
    rng.shuffle(patients)
    keep = set(patients[: int(len(patients) * fraction)])
    return [r for r in rows if r[2] in keep], [r for r in rows if r[2] not in keep]


class Runner:
    """A stream scored the way :class:`Monitor` scores one: a window, evaluated every ``step`` studies."""

    def __init__(self, ref: M.Reference):
        self.ref = ref
        self.window: deque = deque(maxlen=ref.window)
        self.seen = 0
        self.alert = False

    def push(self, rec: M.Record) -> tuple[bool, bool] | None:
        """(alert now, onset) after an evaluation, else None."""
        self.window.append(rec)
        self.seen += 1
        if self.seen % self.ref.step or len(self.window) < self.window.maxlen:
            return None
        alert = self.ref.scores(list(self.window))["combined"] > self.ref.threshold
        onset = alert and not self.alert
        self.alert = alert
        return alert, onset


def false_alarms(ref: M.Reference, pool: list[M.Record], studies: int, rng) -> dict:
    """Alert onsets on one long stream resampled from in-distribution records."""
    runner = Runner(ref)
    onsets = evaluations = alerting = 0
    for i in rng.integers(0, len(pool), studies):
        out = runner.push(pool[i])
        if out is not None:
            evaluations += 1
            alerting += out[0]
            onsets += out[1]
    return {"studies": studies, "evaluations": evaluations, "onsets": onsets,
            "per_10k_studies": onsets / studies * 1e4, "windows_alerting": alerting}


def delay(ref: M.Reference, pool: list[M.Record], shifted: list[M.Record], rng, *, trials: int, lead: int,
          horizon: int) -> dict:
    """Studies after the switch until the alert's onset, over ``trials`` random streams."""
    delays, early = [], 0
    for _ in range(trials):
        runner = Runner(ref)
        for i in rng.integers(0, len(pool), lead):
            out = runner.push(pool[i])
            early += bool(out and out[1])
        found = None
        order = rng.permutation(len(shifted))
        for n in range(horizon):
            out = runner.push(shifted[order[n % len(order)]])
            if out and out[0]:
                found = n + 1
                break
        delays.append(found)
    hit = [d for d in delays if d is not None]
    return {"trials": trials, "detected": len(hit), "median": float(np.median(hit)) if hit else None,
            "p90": float(np.percentile(hit, 90)) if hit else None, "max": max(hit) if hit else None,
            "within_50": sum(d <= 50 for d in hit) / trials, "alarms_before_switch": early}


LABEL_MAP = {"covid": "covid19", "viral pneumonia": "pneumonia", "bacterial pneumonia": "pneumonia"}


def tracking(ref: M.Reference, windows: list[list[tuple[M.Record, str, str]]], label: str) -> list[dict]:
    """Label-free expected sensitivity of ``label`` against the realised one, per window."""
    out = []
    for win in windows:
        recs = [r for r, _, _ in win]
        truth = np.asarray([LABEL_MAP.get(t, t) == label for _, t, _ in win])
        pred = np.asarray([r.label == label for r in recs])
        est = M.estimate(recs, [label]).get(label, {})
        out.append({"estimated": est.get("sensitivity"), "realised": float((truth & pred).sum() / truth.sum())
                    if truth.sum() else None, "positives": int(truth.sum()), "n": len(win)})
    return out


def run(args) -> dict:
    data, work = Path(args.data), Path(args.work)
    rng = np.random.default_rng(args.seed)
    pipeline = load(args.store, args.model)
    base = collection(data, args.reference, pipeline, work)
    fit_rows, held = split_by_patient(base, args.fit_fraction, rng)
    t = time.time()
    ref = M.fit_reference([r for r, _, _ in fit_rows], window=args.window, step=args.step,
                          target_rate=args.target_rate, resamples=args.resamples, seed=args.seed,
                          groups=[p for _, _, p in fit_rows], exclude=args.exclude)
    fit_s = time.time() - t
    pool = [r for r, _, _ in held]
    report: dict = {"model": pipeline.name, "version": pipeline.version, "reference": args.reference,
                    "reference_studies": len(fit_rows), "held_out_studies": len(held), "window": ref.window,
                    "step": ref.step, "target_rate": ref.target_rate, "threshold": ref.threshold,
                    "fit_seconds": round(fit_s, 1),
                    "excluded_signals": list(args.exclude), "signals": sorted(ref.null)}
    t = time.time()
    report["false_alarms"] = false_alarms(ref, pool, args.fa_studies, rng)
    report["false_alarms"]["seconds"] = round(time.time() - t, 1)
    report["shifts"] = {}
    for name in args.shifted:
        rows = collection(data, name, pipeline, work)
        report["shifts"][name] = delay(ref, pool, [r for r, _, _ in rows], rng, trials=args.trials,
                                       lead=args.lead, horizon=args.horizon)
        # which signals move most once the window is all shifted
        sample = [rows[i][0] for i in rng.integers(0, len(rows), ref.window)]
        scores = ref.scores(sample)
        report["shifts"][name]["top_signals"] = dict(sorted(scores.items(), key=lambda kv: -kv[1])[:5])
        if args.track_label:
            wins = []  # pure windows: held-out in-distribution ones, then shifted ones
            for part in (held, rows):
                order = rng.permutation(len(part))
                wins += [[part[i] for i in order[k:k + ref.window]]
                         for k in range(0, len(order) - ref.window + 1, ref.window)]
            track = tracking(ref, wins, args.track_label)
            pairs = [(w["estimated"], w["realised"]) for w in track if w["realised"] is not None and w["estimated"] is not None]
            if pairs:
                e, r = np.asarray(pairs).T
                report["shifts"][name]["estimate_vs_realised"] = {
                    "label": args.track_label, "windows": len(pairs), "mean_abs_error": float(np.abs(e - r).mean()),
                    "correlation": float(np.corrcoef(e, r)[0, 1]) if len(pairs) > 2 and e.std() and r.std() else None,
                    "mean_estimated": float(e.mean()), "mean_realised": float(r.mean())}
    return report
