"""The ``cxrserve batch`` driver: stream the inputs, keep a bounded number in flight, write
each row as it comes, and summarise the run (``<out>.summary.json``)."""
from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from cxrserve.tools.batch.inputs import BatchInput, describe_input, short_hash
from cxrserve.tools.privacy import withhold_dicom_values
from cxrserve.tools.batch.rows import make_row
from cxrserve.tools.batch.scorers import InProcessScorer
from cxrserve.tools.batch.writer import RowWriter


@dataclass
class Summary:
    total: int = 0
    already_done: int = 0
    retried_from_previous_run: int = 0
    duplicates: int = 0
    scored: int = 0
    ok: int = 0
    errors: int = 0
    errors_by_kind: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    concurrency: int = 0
    peak_rss_mb: float = 0.0
    latency_p50: float = 0.0
    latency_p95: float = 0.0

    @property
    def throughput(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {"total_inputs": self.total, "already_done": self.already_done,
                "retried_from_previous_run": self.retried_from_previous_run,
                "duplicate_sop_instances": self.duplicates, "scored_now": self.scored, "ok": self.ok,
                "errors": self.errors, "errors_by_kind": dict(self.errors_by_kind),
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "seconds": round(self.seconds, 2), "throughput_per_s": round(self.throughput, 3),
                "concurrency": self.concurrency, "latency_p50_s": round(self.latency_p50, 4),
                "latency_p95_s": round(self.latency_p95, 4), "peak_rss_mb": round(self.peak_rss_mb, 1)}

    def text(self) -> str:
        lines = [f"{self.total} inputs: {self.ok} ok, {self.errors} errors this run, "
                 f"{self.already_done} already done, {self.duplicates} duplicate SOP instances",
                 f"{self.scored} scored in {self.seconds:.1f} s: {self.throughput:.2f} inputs/s with "
                 f"{self.concurrency} in flight, latency p50 {self.latency_p50:.3f} s p95 {self.latency_p95:.3f} s, "
                 f"peak RSS {self.peak_rss_mb:.0f} MB"]
        if self.errors_by_kind:
            lines.append("errors by kind: " + ", ".join(f"{k} {v}" for k, v in self.errors_by_kind.most_common()))
        return "\n".join(lines)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_batch(inputs: Iterable[Path], out: str | Path, *, scorer: Callable[[BatchInput], dict] | None = None,
              in_process: InProcessScorer | None = None, concurrency: int = 4, chunk: int = 8,
              root: Path | None = None, dicom_paths: str = "hash", overwrite: bool = False,
              progress: bool = True, stop_after: int | None = None, total: int | None = None,
              columns: Iterable[str] = ()) -> Summary:
    """Score ``inputs`` into ``out``; returns the summary. ``stop_after`` (tests) stops early.

    ``inputs`` is consumed as a stream (a list or :func:`iter_inputs`): each file is
    keyed and read only when a request slot is free, at most ``2 x concurrency`` units
    are queued, and rows are written as they come, so memory stays flat whatever the
    number of inputs (only the keys of finished inputs are kept, for resume and
    de-duplication). ``total``: the input count for the progress bar, when known.
    """
    import itertools

    from tqdm.auto import tqdm

    withhold_dicom_values()
    writer = RowWriter(out, overwrite=overwrite, columns=columns)
    summary = Summary(retried_from_previous_run=writer.retried)
    seen: dict[str, str] = {}  # input_id -> file that holds it in this run
    if total is None and isinstance(inputs, (list, tuple)):
        total = len(inputs)
    bar = tqdm(total=total, desc="scoring", unit="study", disable=not progress, dynamic_ncols=True)
    latencies: list[float] = []

    def plan() -> Iterator[BatchInput]:
        """Inputs still to score, in order; rows for duplicates are written on the way."""
        for path in inputs:
            summary.total += 1
            item = describe_input(path, root, dicom_paths)
            owner = writer.done.get(item.input_id, {}).get("file") or seen.get(item.input_id)
            if owner is None:
                seen[item.input_id] = item.file
                yield item
            elif owner == item.file:
                summary.already_done += 1
                bar.update(1)
            else:
                # A second file holding the same SOP instance: one row per file, one result
                # per instance, so this file's row points at the instance's row.
                dup = BatchInput(item.path, item.file, f"dup:{short_hash(item.file)}", item.format)
                summary.duplicates += 1
                if dup.input_id in writer.done:
                    summary.already_done += 1
                else:
                    writer.write(make_row(dup, status=409, error="duplicate_sop_instance",
                                          message=f"same SOP instance as {item.input_id}, scored once"))
                bar.update(1)

    def record(row: dict) -> None:
        writer.write(row)
        summary.scored += 1
        summary.statuses[int(row["status"])] += 1
        latencies.append(float(row.get("seconds") or 0.0))
        if row["status"] == 200:
            summary.ok += 1
        else:
            summary.errors += 1
            summary.errors_by_kind[f"{row['status']} {row['error']}"] += 1
        bar.update(1)

    todo: Iterator[BatchInput] = plan()
    if stop_after is not None:
        todo = itertools.islice(todo, stop_after)
    start = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            if in_process is not None:
                units: Iterator = iter(lambda: list(itertools.islice(todo, chunk)), [])
                submit = lambda unit: pool.submit(in_process.score_many, unit)  # noqa: E731
            else:
                units = todo
                submit = lambda unit: pool.submit(scorer, unit)  # noqa: E731
            pending = set()
            # At most 2 x concurrency units queued: a folder of 100,000 files never makes
            # 100,000 futures, and an interruption loses only what is in flight.
            for unit in units:
                pending.add(submit(unit))
                if len(pending) >= 2 * max(1, concurrency):
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        for row in _rows(fut.result()):
                            record(row)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    for row in _rows(fut.result()):
                        record(row)
    finally:
        summary.seconds = time.perf_counter() - start
        summary.concurrency = concurrency
        summary.peak_rss_mb = _peak_rss_mb()
        if latencies:
            ordered = sorted(latencies)
            summary.latency_p50 = ordered[len(ordered) // 2]
            summary.latency_p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        bar.close()
        writer.close()
        Path(str(out) + ".summary.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    return summary


def _rows(result) -> list[dict]:
    return result if isinstance(result, list) else [result]
