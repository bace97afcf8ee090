"""Which pipeline serves a model folder, and loading it.

A model folder (an unpacked archive, or a folder a tool assembled) carries ``pipeline.json``:
the ``"module:Class"`` that serves it, its served name, version and handler settings
(:func:`write_pipeline_spec`). The TorchServe adapter reads the class from it
(:func:`pipeline_class_of`); ``cxrserve predict``, batch scoring, the benchmark and the
KServe-native server load the whole pipeline, from a folder or a ``.mar`` (:func:`load_pipeline`).
It ships in every archive (the adapter imports it), so an archive loads with its own copy.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from cxrserve.core.runtime import pick_device
from cxrserve.core.sites import SITES_FOLDER

if TYPE_CHECKING:
    from cxrserve.core.pipeline import Pipeline

PIPELINE_SPEC = "pipeline.json"


def write_pipeline_spec(folder: str | Path, pipeline_class: str | type, *, name: str, version: str = "0.1.0",
                        handler: dict | None = None) -> Path:
    """``pipeline.json``: which class serves a model folder, its served name and handler settings."""
    if isinstance(pipeline_class, type):
        pipeline_class = f"{pipeline_class.__module__}:{pipeline_class.__qualname__}"
    path = Path(folder) / PIPELINE_SPEC
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pipeline_class": pipeline_class, "name": name, "version": version,
                                "handler": dict(handler or {})}, indent=2))
    return path


def pipeline_class_of(model_dir: str | Path) -> type[Pipeline]:
    """The class ``pipeline.json`` names (``"module:Class"``), imported from the archive's own package."""
    from cxrserve.core.family import import_object

    with open(Path(model_dir) / PIPELINE_SPEC) as fh:
        return import_object(json.load(fh)["pipeline_class"])


def load_pipeline(model_dir: str | Path, *, device: str = "auto", config: dict | None = None,
                  sites: str | Path | bool | None = None) -> Pipeline:
    """Load the pipeline of an unpacked archive or a ``.mar`` (``pipeline.json`` names its class).

    ``sites``: the folder of site profiles it serves with (:mod:`cxrserve.core.sites`); ``None``
    (default) is the ``sites/`` of the store the archive sits in, if it has one, else
    ``$CXRSERVE_SITES``; ``False`` serves without site profiles (what site calibration scores).
    """
    from cxrserve.core.family import import_object
    from cxrserve.core.files import unpack_archive

    model_dir = Path(model_dir)
    store_sites = model_dir.absolute().parent / SITES_FOLDER  # the store it was named in (links not followed)
    unpacked = None
    if model_dir.suffix == ".mar":
        import tempfile

        model_dir = unpacked = unpack_archive(model_dir, tempfile.mkdtemp(prefix=f"cxrserve-{model_dir.stem}-"))
    spec = json.loads((model_dir / PIPELINE_SPEC).read_text())
    config = dict(spec.get("handler", {}) if config is None else config)
    if sites is False:
        config["sites_dir"] = ""
    elif sites:
        config["sites_dir"] = str(sites)
    elif "sites_dir" not in config and store_sites.is_dir():
        config["sites_dir"] = str(store_sites)
    cls = import_object(spec["pipeline_class"])
    pipeline = cls(model_dir, device=pick_device(0, device), config=config)
    from cxrserve.core.monitor import attach

    attach(pipeline, config)  # the drift monitor watches every entry point (handler ``monitor: false`` turns it off)
    from cxrserve.core.shadow import attach_shadow

    attach_shadow(pipeline, config, lambda mar: load_pipeline(mar, device=device, sites=sites))  # $CXRSERVE_SHADOW_STORE
    if unpacked is not None:
        import shutil
        import weakref

        # The unpacked copy lives as long as the pipeline (components may load lazily), then goes
        # (an archive is 30 MB to 1.5 GB; the test suite alone left GBs in /tmp).
        weakref.finalize(pipeline, shutil.rmtree, unpacked, True)
    return pipeline
