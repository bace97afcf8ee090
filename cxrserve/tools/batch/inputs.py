"""What ``cxrserve batch`` scores: folders, globs and CSVs of paths, each file keyed for resume.

A DICOM input is keyed by a hash of its SOP Instance UID read from its header (one row
per SOP instance), and its path is shown hashed unless asked otherwise; any other file
by its path relative to the inputs' common folder.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator


@dataclass
class BatchInput:
    path: Path
    file: str  # what the output row shows (relative path, or its hash for DICOM)
    input_id: str  # stable key for resume/dedupe: "sop:<hash>" for DICOM, else "path:<relative path>"
    format: str = ""


def short_hash(text: str) -> str:
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
        shown = rel if dicom_paths == "clear" else f"sha256:{short_hash(rel)}"
        input_id = f"sop:{short_hash(sop)}" if sop else f"file:{short_hash(rel)}"
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
