"""Which models a store holds, for the KServe-native predictor, and each one's serving settings.

A store is a folder of ``.mar`` archives and/or unpacked model folders (``pipeline.json``
inside). An archive is unpacked once into a cache folder keyed by its path, size and
mtime (:func:`unpack_once`); its TorchServe settings (``batchSize``, ``maxBatchDelay``,
``deviceType``) come from the model config its ``MAR-INF/MANIFEST.json`` names
(:func:`model_config`), so both engines batch the same archive the same way.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cxrserve.core.sites import SITES_FOLDER

DEFAULT_MAX_BATCH = 8
DEFAULT_DELAY_MS = 5.0
DEFAULT_CONFIG = "model-config.yaml"


@dataclass
class ModelSpec:
    name: str
    folder: Path
    max_batch: int = DEFAULT_MAX_BATCH
    max_delay_ms: float = DEFAULT_DELAY_MS
    device: str = "auto"
    #: the store's site profiles (``<store>/sites``; cxrserve.core.sites), None without any
    sites: Path | None = None


def config_name(manifest: dict) -> str:
    """The model config file an archive's ``MANIFEST.json`` names (TorchServe's ``configFile``)."""
    return manifest["model"].get("configFile") or DEFAULT_CONFIG


def _cache_root() -> Path:
    return Path(os.environ.get("CXRSERVE_CACHE") or Path.home() / ".cache" / "cxrserve")


def unpack_once(mar: Path, unpack_dir: Path | None = None) -> Path:
    """Unpack ``mar`` into ``unpack_dir/<name>-<key>`` unless already there; returns the folder.

    The key hashes the archive's path, size and mtime, so a rebuilt archive is unpacked
    again; unpacking goes to a temporary folder renamed into place, so two servers
    starting together do not see a half-written folder.
    """
    from cxrserve.core.files import unpack_archive

    stat = mar.stat()
    key = hashlib.sha256(f"{mar.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    root = Path(unpack_dir) if unpack_dir else _cache_root() / "kserve"
    target = root / f"{mar.stem}-{key}"
    if (target / "pipeline.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{mar.stem}-", dir=root))
    unpack_archive(mar, tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    # Older unpackings of this archive (rebuilt since) would pile up: 30-180 MB each.
    stale = re.compile(rf"^{re.escape(mar.stem)}-[0-9a-f]{{12}}$")
    for old in root.iterdir():
        if old != target and stale.match(old.name):
            shutil.rmtree(old, ignore_errors=True)
    return target


def model_config(folder: Path) -> dict:
    """An unpacked model's TorchServe model config (``{}`` when it has none)."""
    import yaml

    path = folder / DEFAULT_CONFIG
    manifest = folder / "MAR-INF" / "MANIFEST.json"
    if manifest.exists():
        path = folder / config_name(json.loads(manifest.read_text()))
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def discover(store: str | Path, models: list[str] | None = None, unpack_dir: str | Path | None = None,
             device: str | None = None) -> list[ModelSpec]:
    """The models of ``store``: ``*.mar`` archives and unpacked folders with ``pipeline.json``."""
    store = Path(store)
    if not store.is_dir():
        raise FileNotFoundError(f"model store {store} is not a folder")
    found: dict[str, Path] = {}
    for path in sorted(store.iterdir()):
        if path.suffix == ".mar" and path.is_file():
            found.setdefault(path.stem, path)
        elif path.is_dir() and (path / "pipeline.json").exists():
            found[path.name] = path  # an unpacked folder wins over an archive of the same name
    if models:
        missing = sorted(set(models) - set(found))
        if missing:
            raise FileNotFoundError(f"not in {store}: {', '.join(missing)} (has: {', '.join(sorted(found))})")
        found = {k: v for k, v in found.items() if k in models}
    if not found:
        raise FileNotFoundError(f"no .mar archives or unpacked model folders in {store}")
    specs = []
    for name, path in found.items():
        folder = unpack_once(path, Path(unpack_dir) if unpack_dir else None) if path.suffix == ".mar" else path
        config = model_config(folder)
        device_type = str(config.get("deviceType", "auto")).lower()
        specs.append(ModelSpec(
            name=json.loads((folder / "pipeline.json").read_text()).get("name", name),
            folder=folder,
            max_batch=max(1, int(config.get("batchSize", DEFAULT_MAX_BATCH))),
            max_delay_ms=float(config.get("maxBatchDelay", DEFAULT_DELAY_MS)),
            device=device or {"cpu": "cpu", "gpu": "cuda"}.get(device_type, "auto"),
            sites=(store / SITES_FOLDER) if (store / SITES_FOLDER).is_dir() else None,
        ))
    return specs
