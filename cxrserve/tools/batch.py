"""``cxrserve batch``: score a folder, a glob or a CSV of paths; one output row per input.

    cxrserve batch studies/ --model cxr-triage --out triage.csv               # REST
    cxrserve batch 'scans/**/*.dcm' --model cxr-pxs --out pxs.jsonl --grpc   # gRPC
    cxrserve batch list.csv --model cxr-triage --out t.csv --in-process model_store/cxr-triage.mar
    cxrserve batch studies/ --model cxr-study --out study.csv   # a composed model: <key>_<field> columns

Guarantees:

* **one row per input**, a result or an error with its HTTP status and message; files
  that cannot be read or decoded get a row too;
* **resume**: rerunning the same command skips inputs that already have a final row
  (a result or a 4xx), re-scores those that failed for transient reasons (connection,
  5xx), and never writes a second row for an input; rows are appended and flushed one
  by one, a torn last line from a kill is cut off on resume;
* **no identifiers in clear**: a DICOM input is keyed by a hash of its SOP Instance UID
  (one row per SOP instance: a second file holding the same instance is reported as a
  duplicate), and its path is written as a hash unless ``--dicom-paths clear``;
* bounded concurrency (``--concurrency`` requests in flight), a tqdm progress bar, and a
  summary (counts, errors by kind, throughput) printed and saved as
  ``<out>.summary.json``.

Backends: REST, gRPC or a KServe v2 endpoint through :class:`cxrserve.tools.client.CXRClient`, or in-process through
:func:`cxrserve.core.pipeline.load_pipeline` (same pipeline code as the TorchServe handlers,
no server needed). The transient-failure policy: the client retries 503/507 and
connection errors; on top, a request that still fails with a 5xx is tried again up to
``--attempts`` times (a worker that died mid-request is restarted by TorchServe).
"""
from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import logging
import os
import re
import sys
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".dic", ""}
#: Default requests in flight: TorchServe batches 4 per worker (export/model-config); twice
#: that keeps a full batch queued while one runs (measured in docs/PERFORMANCE.md).
REMOTE_CONCURRENCY = 8
IN_PROCESS_CONCURRENCY = 2
CORE_COLUMNS = ("input_id", "file", "format", "status", "error", "message", "model", "model_version",
                "gate_verdict", "gate_score", "seconds", "result")


def is_final(status: int) -> bool:
    """A result or a 4xx about the input ends it; no answer, 401 or 5xx are re-tried on resume."""
    return status == 200 or (400 <= status < 500 and status != 401)


# --------------------------------------------------------------------------- inputs
@dataclass
class BatchInput:
    path: Path
    file: str  # what the output row shows (relative path, or its hash for DICOM)
    input_id: str  # stable key for resume/dedupe: "sop:<hash>" for DICOM, else "path:<relative path>"
    format: str = ""


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def expand_inputs(specs: Iterable[str | Path], csv_column: str = "path") -> list[Path]:
    """Folders (recursive), glob patterns and CSV files of paths -> sorted, de-duplicated files."""
    return list(iter_inputs(specs, csv_column))


def iter_inputs(specs: Iterable[str | Path], csv_column: str = "path") -> Iterator[Path]:
    """:func:`expand_inputs` as a stream: files are found while earlier ones are scored.

    Same order (folders walked in sorted order, depth first like ``sorted(rglob)``); only
    the set of paths already yielded is kept, for de-duplication.
    """
    seen: set[str] = set()
    for spec in specs:
        spec = str(spec)
        path = Path(spec)
        if path.is_dir():
            found: Iterable[Path] = _walk_sorted(path)
        elif path.is_file() and path.suffix.lower() == ".csv":
            found = _csv_paths(path, csv_column)
        elif path.is_file():
            found = [path]
        else:
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise FileNotFoundError(f"{spec}: no such file, folder or glob match")
            found = (Path(m) for m in matches if Path(m).is_file())
        for f in found:
            key = os.path.abspath(f)
            if key not in seen:
                seen.add(key)
                yield f


def _walk_sorted(folder: Path) -> Iterator[Path]:
    """Files under ``folder`` in ``sorted(folder.rglob("*"))`` order, one directory at a time."""
    entries = sorted(folder.iterdir())
    for entry in entries:
        if entry.is_file() and not entry.name.startswith("."):
            yield entry
        if entry.is_dir():
            yield from _walk_sorted(entry)


def _csv_paths(path: Path, column: str) -> Iterator[Path]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        col = column if column in fields else (fields[0] if fields else None)
        if col is None:
            return
        for r in reader:
            p = (r.get(col) or "").strip()
            if p:
                yield Path(p) if Path(p).is_absolute() else path.parent / p


def common_root(paths: Iterable[Path]) -> Path | None:
    """Deepest folder holding every path (one pass, constant memory)."""
    root: str | None = None
    for p in paths:
        parent = str(p.resolve().parent)
        root = parent if root is None else os.path.commonpath([root, parent])
    return Path(root) if root is not None else None


def describe_input(path: Path, root: Path | None, dicom_paths: str = "hash") -> BatchInput:
    """Key one file: DICOM by hashed SOP Instance UID (read from the header only)."""
    try:
        rel = str(path.resolve().relative_to(root)) if root else str(path)
    except ValueError:
        rel = str(path)
    fmt, sop = _peek(path)
    if fmt == "dicom":
        shown = rel if dicom_paths == "clear" else f"sha256:{_short_hash(rel)}"
        input_id = f"sop:{_short_hash(sop)}" if sop else f"file:{_short_hash(rel)}"
        return BatchInput(path, shown, input_id, fmt)
    return BatchInput(path, rel, f"path:{rel}", fmt)


def _peek(path: Path) -> tuple[str, str]:
    """``(format, SOPInstanceUID or "")`` from the first bytes; never raises."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return "", ""
    if head.startswith(b"\x89PNG"):
        return "png", ""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg", ""
    if head[128:132] == b"DICM" or head.startswith(b"DICM") or (
            len(head) > 8 and head[:2] in (b"\x08\x00", b"\x02\x00") and head[3:4] == b"\x00"):
        try:
            from cxrserve.core import bounded
            from cxrserve.core.imageio import MAX_BYTES

            if path.stat().st_size > MAX_BYTES:  # its decode answers 413; keyed by its path hash
                return "dicom", ""
            # bounded: a deflated header would otherwise be inflated whole, however large
            ds = bounded.dcmread(path.read_bytes(), max_bytes=MAX_BYTES, stop_before_pixels=True,
                                 specific_tags=["SOPInstanceUID"])
            return "dicom", str(ds.get("SOPInstanceUID", "") or "")
        except Exception:  # a broken header still gets a row, keyed by its path hash
            return "dicom", ""
    return "", ""


# --------------------------------------------------------------------------- output
class RowWriter:
    """Append-only CSV or JSONL with one row per input; resumable."""

    def __init__(self, path: str | Path, overwrite: bool = False, columns: Iterable[str] = ()):
        self.path = Path(path)
        self.columns = list(CORE_COLUMNS) + [c for c in columns if c not in CORE_COLUMNS]
        self.kind = "jsonl" if self.path.suffix.lower() in (".jsonl", ".ndjson", ".json") else "csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: dict[str, dict] = {}
        self.retried = 0
        if overwrite and self.path.exists():
            self.path.unlink()
        if self.path.exists():
            self._load()
        new = not self.path.exists() or self.path.stat().st_size == 0
        self.fh = open(self.path, "a", newline="", encoding="utf-8")
        self.lock = threading.Lock()
        if self.kind == "csv":
            self.csv = csv.DictWriter(self.fh, fieldnames=self.columns, extrasaction="ignore")
            if new:
                self.csv.writeheader()
                self.fh.flush()

    def _load(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]  # a torn last line (killed mid-write)
        rows = self._parse(data)
        keep = [r for r in rows if is_final(int(r.get("status") or 0))]
        self.retried = len(rows) - len(keep)
        # Last row wins (there is only ever one final row per input). Only what resume
        # needs is kept (not the results), so memory does not grow with the results.
        self.done = {r["input_id"]: _done_entry(r) for r in keep}
        if len(keep) != len(rows) or len(data) != self.path.stat().st_size:
            self._rewrite(keep)

    def _parse(self, data: bytes) -> list[dict]:
        text = data.decode("utf-8", "replace")
        if self.kind == "jsonl":
            rows = []
            for line in text.splitlines():
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue
            return rows
        return list(csv.DictReader(io.StringIO(text)))

    def _rewrite(self, rows: list[dict]) -> None:
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            if self.kind == "csv":
                w = csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)
            else:
                fh.writelines(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        tmp.replace(self.path)

    def write(self, row: dict) -> None:
        with self.lock:
            if self.kind == "csv":
                flat = dict(row)
                flat["result"] = json.dumps(row["result"], sort_keys=True) if row.get("result") is not None else ""
                self.csv.writerow(flat)
            else:
                self.fh.write(json.dumps(row, sort_keys=True) + "\n")
            self.fh.flush()
            self.done[row["input_id"]] = _done_entry(row)

    def close(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()


def _done_entry(row: dict) -> dict:
    return {"file": row.get("file", ""), "status": row.get("status", "")}


# --------------------------------------------------------------------------- scoring
def strip_pictures(result: dict) -> dict:
    """Drop base64 PNG fields (heatmaps, masks): rows stay small; use ``predict`` for pictures."""
    return {k: (strip_pictures(v) if isinstance(v, dict) else v) for k, v in result.items()
            if not k.endswith("_png")}


def make_row(item: BatchInput, *, status: int, result: dict | None = None, error: str = "", message: str = "",
             seconds: float = 0.0) -> dict:
    gate = (result or {}).get("input_gate") or {}
    row = {
        "input_id": item.input_id, "file": item.file, "format": item.format or (result or {}).get("input", {}).get("format", ""),
        "status": status, "error": error, "message": message,
        "model": (result or {}).get("model", ""), "model_version": (result or {}).get("model_version", ""),
        "gate_verdict": gate.get("verdict", ""), "gate_score": gate.get("score", ""),
        "seconds": round(seconds, 4), "result": strip_pictures(result) if result is not None else None,
    }
    if isinstance((result or {}).get("results"), dict):  # a composed model: every family's main numbers
        row.update(headline_values(result))
    return row


def error_text(err: BaseException, safe: tuple[type[BaseException], ...] = ()) -> str:
    """What a log line or row may say about ``err``: its type, and its message only when cxrserve wrote it.

    Other libraries quote the value they choke on (pydicom: "Unable to convert '1950/01/02'
    to 'DA' object" for a Patient's Birth Date), and a DICOM value may identify the patient.
    ``safe``: further cxrserve exception types whose messages are written to be shown.
    """
    from cxrserve.core.errors import CXRInputError
    from cxrserve.tools.client import CXRServeError

    if isinstance(err, (CXRInputError, CXRServeError, *safe)):
        return f"{type(err).__name__}: {getattr(err, 'message', None) or err}"
    return f"{type(err).__name__} (message withheld: it may quote a DICOM value)"


class WithholdQuotedValues(logging.Filter):
    """pydicom's own warnings quote the value they flag ("Invalid value for VR DA: '1950/01/02'.",
    logged when ``--dicom-out`` copies the patient module): the batch log keeps the warning
    without the value."""

    QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = self.QUOTED.sub("'<withheld>'", record.getMessage()), ()
        return True


def withhold_dicom_values() -> None:
    """Keep DICOM values out of the batch log; idempotent.

    * :class:`WithholdQuotedValues` on pydicom's logger (pydicom logs on that one logger),
      and the same text that pydicom repeats as a ``UserWarning`` (stderr) silenced;
    * highdicom's INFO/DEBUG lines off: while ``--dicom-out`` builds objects they name the
      source's SOP Instance UID ("copy Patient-related attributes from dataset "1.2...""),
      which batch outputs only ever show hashed.
    """
    import warnings

    pydicom_log = logging.getLogger("pydicom")
    if not any(isinstance(f, WithholdQuotedValues) for f in pydicom_log.filters):
        pydicom_log.addFilter(WithholdQuotedValues())
    warnings.filterwarnings("ignore", message=r"Invalid value for VR", category=UserWarning)
    highdicom_log = logging.getLogger("highdicom")
    if highdicom_log.getEffectiveLevel() < logging.WARNING:
        highdicom_log.setLevel(logging.WARNING)


def write_dicom_results(item: BatchInput, data: bytes, result: dict, dicom_out: Path | None) -> None:
    """``--dicom-out``: SR + SEG + heatmap SCs of a DICOM input's cxr-study result, under
    ``dicom_out/<hashed SOP UID>/`` (:mod:`cxrserve.tools.dicom_results`); nothing for other inputs."""
    if dicom_out is None or item.format != "dicom":
        return
    import pydicom

    from cxrserve.tools.dicom_results import NotProcessed, build_results, write_results

    try:
        objects = build_results(pydicom.dcmread(io.BytesIO(data), force=True), result)
        write_results(objects, Path(dicom_out) / item.input_id.split(":", 1)[-1])
    except Exception as err:  # noqa: BLE001 - the row is still written; neighbours unaffected
        log.warning("%s: no DICOM result objects: %s", item.input_id, error_text(err, safe=(NotProcessed,)))


class RemoteScorer:
    """Score one input over REST or gRPC (thread-safe)."""

    def __init__(self, client, model: str, options: dict, attempts: int = 3, dicom_out: Path | None = None):
        self.client, self.model, self.options, self.attempts = client, model, options, attempts
        self.dicom_out = dicom_out

    def __call__(self, item: BatchInput) -> dict:
        from cxrserve.tools.client import AuthenticationError, CXRServeError, InputRejected

        start = time.perf_counter()
        try:
            data = item.path.read_bytes()
        except OSError as err:
            return make_row(item, status=400, error="unreadable", message=f"cannot read file: {err.strerror}")
        last: Exception | None = None
        for attempt in range(self.attempts):
            try:
                result = self.client.predict(self.model, data, options=self.options)
                write_dicom_results(item, data, result, self.dicom_out)
                return make_row(item, status=200, result=result, seconds=time.perf_counter() - start)
            except InputRejected as err:
                return make_row(item, status=err.status, error=err.code, message=err.message,
                                seconds=time.perf_counter() - start)
            except AuthenticationError:
                raise  # every input would fail the same way: stop the run
            except CXRServeError as err:  # 5xx or unavailable after the client's own retries
                last = err
                time.sleep(min(8.0, 0.5 * 2**attempt))
        status = getattr(last, "status", 0) or 0
        return make_row(item, status=status if status >= 500 else 503,
                        error=getattr(last, "code", "error"), message=getattr(last, "message", "no answer"),
                        seconds=time.perf_counter() - start)


class InProcessScorer:
    """Score chunks of inputs with a pipeline loaded in this process (no server)."""

    def __init__(self, pipeline, options: dict, dicom_out: Path | None = None):
        self.pipeline, self.options, self.dicom_out = pipeline, options, dicom_out
        self.lock = threading.Lock()  # one forward pass at a time; threads overlap file reading

    def score_many(self, items: list[BatchInput]) -> list[dict]:
        from cxrserve.core.errors import CXRInputError

        start = time.perf_counter()
        prepared, rows, read = [], {}, []
        for i, item in enumerate(items):
            try:
                read.append((i, item.path.read_bytes()))
            except OSError as err:
                rows[i] = make_row(item, status=400, error="unreadable", message=f"cannot read file: {err.strerror}")
        if hasattr(self.pipeline, "make_items"):  # cxr-study: the chunk's files decoded in parallel
            decoded = self.pipeline.make_items([({"image": data}, self.options) for _, data in read])
        else:
            decoded = []
            for _, data in read:
                try:
                    decoded.append(self.pipeline.make_item({"image": data}, self.options))
                except CXRInputError as err:
                    decoded.append(err)
        for (i, _), entry in zip(read, decoded):
            if isinstance(entry, CXRInputError):
                rows[i] = make_row(items[i], status=entry.status, error=entry.code, message=entry.message)
            else:
                prepared.append((i, entry))
        if prepared:
            with self.lock:
                outputs = self.pipeline.predict([p for _, p in prepared])
                self.pipeline.timer.reset()
            each = (time.perf_counter() - start) / max(1, len(items))
            for (i, _), out in zip(prepared, outputs):
                if isinstance(out, CXRInputError):
                    rows[i] = make_row(items[i], status=out.status, error=out.code, message=out.message, seconds=each)
                else:
                    write_dicom_results(items[i], dict(read)[i], out, self.dicom_out)
                    rows[i] = make_row(items[i], status=200, result=out, seconds=each)
        return [rows[i] for i in range(len(items))]


# --------------------------------------------------------------------------- driver
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
                dup = BatchInput(item.path, item.file, f"dup:{_short_hash(item.file)}", item.format)
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


# --------------------------------------------------------------------------- headline columns
def section_headlines(model: str) -> dict[str, tuple[str, ...]]:
    """Section key -> dotted paths of its main numbers (``Served.headline``), for each model a
    composed model answers for (empty for a plain or unknown model)."""
    from cxrserve import families

    if model not in families.served():
        return {}
    return {families.get_served(n)[1].key: families.get_served(n)[1].headline for n in families.composed(model)}


def headline_columns(model: str) -> list[str]:
    """Extra CSV columns of a composed model's rows: per section ``<key>_status`` and its headline fields."""
    columns = []
    for key, headline in section_headlines(model).items():
        columns.append(f"{key}_status")
        columns.extend(f"{key}_{path.replace('.', '_')}" for path in headline)
    return columns


def _lookup(section: dict, path: str):
    value = section
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return ""
        value = value[part]
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def headline_values(result: dict) -> dict:
    """The :func:`headline_columns` of one composed answer (``""`` where a section did not answer)."""
    from cxrserve import families

    row = {}
    sections = result.get("results") or {}
    model = result.get("model") if result.get("model") in families.served() else families.composed_model()
    for key, headline in section_headlines(model or "").items():
        section = sections.get(key)
        row[f"{key}_status"] = "" if section is None else int(section.get("status", 200))
        for path in headline:
            row[f"{key}_{path.replace('.', '_')}"] = "" if section is None or "error" in section \
                else _lookup(section, path)
    return row


def _rows(result) -> list[dict]:
    return result if isinstance(result, list) else [result]


# --------------------------------------------------------------------------- CLI
def cmd_batch(args) -> int:
    from cxrserve.tools.client import CXRClient, protocol_of

    options = {}
    for text in args.option or []:
        if "=" not in text:
            raise SystemExit(f"--option expects NAME=VALUE, got {text!r}")
        key, value = text.split("=", 1)
        options[key.strip()] = value
    # Two streaming passes over the inputs (a 10,000-file list is never held with its data):
    # the first finds the folder row paths are shown relative to, and counts them.
    count = 0

    def counted():
        nonlocal count
        for p in iter_inputs(args.inputs, args.csv_column):
            count += 1
            yield p

    root = common_root(counted())
    inputs = iter_inputs(args.inputs, args.csv_column)
    scorer = in_process = None
    dicom_out = Path(args.dicom_out) if args.dicom_out else None
    if dicom_out is not None:
        from cxrserve import families

        if args.model != families.composed_model():
            raise SystemExit(f"--dicom-out needs --model {families.composed_model()} (the SR holds every family's results)")
        options.setdefault("pictures", "true")  # the lung mask and heatmaps for the SEG and SCs
    if args.in_process:
        from cxrserve.core.pipeline import load_pipeline

        model = Path(args.in_process)
        if model.is_dir() and (model / f"{args.model}.mar").exists():
            model = model / f"{args.model}.mar"
        pipeline = load_pipeline(model, device=args.device)
        pipeline.parse_options(options)  # a bad value fails now, not on every input
        in_process = InProcessScorer(pipeline, options, dicom_out=dicom_out)
    else:
        client = CXRClient(args.url, protocol=protocol_of(args), token=args.token,
                           key_file=args.key_file, management_url=args.management_url, timeout=args.timeout)
        scorer = RemoteScorer(client, args.model, options, attempts=args.attempts, dicom_out=dicom_out)
    from cxrserve.tools.client import AuthenticationError

    try:
        concurrency = args.concurrency or (IN_PROCESS_CONCURRENCY if in_process else REMOTE_CONCURRENCY)
        summary = run_batch(inputs, args.out, scorer=scorer, in_process=in_process, concurrency=concurrency,
                            root=root, dicom_paths=args.dicom_paths, overwrite=args.overwrite,
                            progress=not args.no_progress, total=count, columns=headline_columns(args.model))
    except AuthenticationError as err:
        print(f"error: {err.message} (401). Rows so far are kept; rerun to resume.")
        return 2
    print(summary.text())
    print(f"rows: {args.out}   summary: {args.out}.summary.json")
    return 0 if summary.errors == 0 else 1


def register_cli(subparsers) -> None:
    from cxrserve.tools.client import add_connection_args

    p = subparsers.add_parser("batch", help="score a folder / glob / CSV of files into CSV or JSONL (resumable)")
    p.add_argument("inputs", nargs="+", help="folders (recursive), glob patterns, files, or CSVs of paths")
    p.add_argument("--model", required=True, help="served model name (`cxrserve families` lists them)")
    p.add_argument("--out", required=True, help="results file: .csv or .jsonl (appended to on resume)")
    p.add_argument("--option", action="append", help="model option NAME=VALUE for every input (repeatable)")
    p.add_argument("--concurrency", type=int, default=None,
                   help=f"requests in flight (default {REMOTE_CONCURRENCY} over REST/gRPC/KServe: enough to "
                        f"fill the server's batches of 4 with the next batch queued; {IN_PROCESS_CONCURRENCY} "
                        "chunks with --in-process)")
    p.add_argument("--attempts", type=int, default=3, help="tries per input on 5xx (a worker restarting)")
    p.add_argument("--in-process", metavar="MODEL", help="no server: a .mar, an unpacked archive or a store folder")
    p.add_argument("--device", default="auto", help="with --in-process: cpu | cuda | auto")
    p.add_argument("--csv-column", default="path", help="column of file paths in an input CSV (default: path)")
    p.add_argument("--dicom-paths", choices=["hash", "clear"], default="hash",
                   help="DICOM file paths often name the patient: written hashed unless 'clear'")
    p.add_argument("--overwrite", action="store_true", help="start afresh instead of resuming")
    p.add_argument("--dicom-out", metavar="DIR", help="with a composed model (the study): write the SR, SEGs and "
                   "SCs of every DICOM input under DIR/<hashed SOP UID>/ (docs/DICOM.md)")
    p.add_argument("--no-progress", action="store_true")
    add_connection_args(p)
    p.set_defaults(func=cmd_batch)


if __name__ == "__main__":  # pragma: no cover
    from cxrserve.tools.cli import main

    sys.exit(main(["batch", *sys.argv[1:]]))
