"""Files shared by every layer: streamed content hashes, safe archive extraction."""
from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in blocks (weights files are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def unpack_archive(mar: str | Path, dest: str | Path) -> Path:
    """Extract a ``.mar`` (a zip) safely: refuse entries that escape ``dest`` (ZipSlip)."""
    import zipfile

    dest = Path(dest).resolve()
    with zipfile.ZipFile(mar) as zf:
        for member in zf.namelist():
            target = (dest / member).resolve()
            if dest != target and dest not in target.parents:
                raise ValueError(f"archive entry escapes the target folder: {member}")
        zf.extractall(dest)
    return dest
