"""Scoring files in process into monitor records (references, simulations, benchmarks)."""
from __future__ import annotations

import csv
from pathlib import Path

from cxrserve.core import monitor as M


def load(store: str | Path, model: str, device: str = "cpu"):
    """The served pipeline of ``<store>/<model>.mar``, without the process's monitor."""
    from cxrserve.core.loading import load_pipeline

    pipeline = load_pipeline(Path(store) / f"{model}.mar", device=device)
    # scored here to build references and streams: the process's own monitor stays out of it
    pipeline.observers[:] = [o for o in pipeline.observers if not isinstance(o, M.Monitor)]
    return pipeline


def labelled(folder: str | Path) -> list[tuple[Path, str]]:
    """``(path, label)`` rows of a data folder's ``labels.csv`` (first two columns), or its images."""
    folder = Path(folder)
    table = folder / "labels.csv"
    if table.exists():
        with table.open(newline="") as fh:
            rows = list(csv.reader(fh))
        return [(folder / r[0], r[1]) for r in rows[1:] if len(r) >= 2 and (folder / r[0]).is_file()]
    return [(p, "") for p in sorted(folder.rglob("*"))
            if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".dcm")]


def score_files(pipeline, paths, *, site=None, secret: bytes = b"", batch: int = 8,
                progress: bool = False) -> list[M.Record]:
    """One record per file, in order (a file that fails to decode is a 4xx record)."""
    out: list[M.Record] = []
    paths = list(paths)
    for start in range(0, len(paths), batch):
        chunk = paths[start:start + batch]
        requests = [({"image": Path(p).read_bytes()}, {}) for p in chunk]
        items = pipeline.make_items(requests)
        for item in items:
            if site is not None and not isinstance(item, Exception):
                item.site = site
        results = pipeline.predict(items)
        out.extend(M.make_records(pipeline, items, results, secret))
        if progress:
            print(f"  {min(start + batch, len(paths))}/{len(paths)}", end="\r", flush=True)
    return out


def file_key(path: str | Path, secret: bytes) -> str:
    """The key the monitor gives a file: its SOP Instance UID hash (DICOM) or strided pixels."""
    from cxrserve.core.imageio import decode
    from cxrserve.core.pipeline import DECODE_FLOOR

    xray = decode(Path(path).read_bytes(), target=DECODE_FLOOR)
    _, _, _, digest = M.image_features(xray)
    return M.study_key(secret, xray, pixel_digest=digest)
