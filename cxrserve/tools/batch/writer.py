"""The rows file of ``cxrserve batch``: append-only CSV or JSONL, one final row per input, resumable."""
from __future__ import annotations

import csv
import io
import json
import os
import threading
from pathlib import Path
from typing import Iterable

from cxrserve.tools.batch.rows import CORE_COLUMNS


def is_final(status: int) -> bool:
    """A result or a 4xx about the input ends it; no answer, 401 or 5xx are re-tried on resume."""
    return status == 200 or (400 <= status < 500 and status != 401)


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
