"""``cxrserve monitor bench``: serving throughput with and without the monitor, in one process.

The same files are decoded and scored in batches (``make_items`` + ``predict``, what every entry
point runs) in alternating rounds: without a monitor, then with one (state on disk, a fitted
reference, so every ``step`` studies a window is scored in its thread). Prints studies/s of each
round and the ratio of the medians (ABBA order), and the monitor's own cost timed directly (record
extraction per study, window scoring every ``step`` studies) as a share of a study's serving
time; numbers to read, not a pass/fail test.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from cxrserve.core import monitor as M
from cxrserve.tools.monitor.scoring import labelled, load, score_files


def _round(pipeline, payloads, batch: int, monitor=None) -> float:
    start = time.perf_counter()
    for n in range(0, len(payloads), batch):
        items = pipeline.make_items([({"image": p}, {}) for p in payloads[n:n + batch]])
        results = pipeline.predict(items)
        if monitor is not None and monitor not in (getattr(pipeline, "observers", None) or ()):
            monitor(pipeline, items, results)  # what Pipeline.predict's observer call does
    if monitor is not None:
        monitor.flush()
    return len(payloads) / (time.perf_counter() - start)


def run(args) -> dict:
    pipeline = load(args.store, args.model)
    observers = getattr(pipeline, "observers", None)
    if observers is not None:
        observers[:] = [o for o in observers if not isinstance(o, M.Monitor)]
    paths = [p for p, _ in labelled(args.data)][: args.n]
    payloads = [Path(p).read_bytes() for p in paths]
    with tempfile.TemporaryDirectory() as tmp:
        ref = M.fit_reference(score_files(pipeline, paths), window=min(50, len(paths) // 2), resamples=300)
        ref.save(Path(tmp) / M.DEFAULT_SITE / M.safe_name(pipeline.name) / "reference.json")
        monitor = M.Monitor(tmp, window=ref.window)
        _round(pipeline, payloads[: args.batch], args.batch)  # warm up
        base, mon = [], []
        for r in range(args.rounds):  # ABBA order: a machine getting busier or quieter favours neither
            for with_monitor in ((False, True) if r % 2 == 0 else (True, False)):
                if with_monitor:
                    mon.append(_round(pipeline, payloads, args.batch, monitor))
                else:
                    base.append(_round(pipeline, payloads, args.batch))
        items = pipeline.make_items([({"image": p}, {}) for p in payloads[: args.batch]])
        results = pipeline.predict(items)
        t0 = time.perf_counter()
        M.make_records(pipeline, items, results, monitor.secret)
        per_study_ms = (time.perf_counter() - t0) / len(items) * 1000
        window_ms = []
        recs = M.make_records(pipeline, items, results, monitor.secret) * (ref.window // len(items) + 1)
        for _ in range(20):
            t0 = time.perf_counter()
            ref.scores(recs[: ref.window])
            window_ms.append((time.perf_counter() - t0) * 1000)
    b, m = statistics.median(base), statistics.median(mon)
    return {"model": pipeline.name, "studies": len(payloads), "batch": args.batch, "rounds": args.rounds,
            "baseline_studies_per_s": [round(x, 2) for x in base], "monitored_studies_per_s": [round(x, 2) for x in mon],
            "ratio_of_medians": round(m / b, 4), "overhead_percent": round((1 - m / b) * 100, 2),
            "record_ms_per_study": round(per_study_ms, 3), "window_score_ms": round(statistics.median(window_ms), 2),
            "direct_cost_percent": round((per_study_ms + statistics.median(window_ms) / ref.step) / (1000.0 / b) * 100, 3),
            "dropped": monitor.dropped, "errors": monitor.errors}
