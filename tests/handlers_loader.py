"""Load an archive's TorchServe handler class in process, as TorchServe's worker would."""
from __future__ import annotations

import importlib.util
import inspect
import json
import sys
from pathlib import Path

from tsutil import HandlerContext


def handler_class(model_dir: str | Path):
    """The single class defined by the handler file named in the archive's manifest."""
    model_dir = Path(model_dir)
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    path = model_dir / manifest["model"]["handler"]
    name = f"_handler_{path.stem}_{abs(hash(str(model_dir)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved  # the handler puts its folder first; keep the test process clean
    classes = [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == name]
    assert len(classes) == 1, f"{path} must define exactly one class, found {classes}"
    return classes[0]


def handler_for(pipeline, headers: list[dict] | None = None):
    """A handler instance around an already loaded pipeline, and its context."""
    handler = handler_class(pipeline.model_dir)()
    context = HandlerContext(str(pipeline.model_dir), headers=headers or [])
    handler.pipeline = pipeline
    handler.context = context
    handler.initialized = True
    return handler, context


def initialized_handler(model_dir: str | Path, config: dict | None = None, headers: list[dict] | None = None):
    """A handler initialised by its own ``initialize`` from ``model_dir`` (what a worker does)."""
    handler = handler_class(model_dir)()
    context = HandlerContext(str(model_dir), model_yaml_config={"handler": config or {}}, headers=headers or [])
    handler.initialize(context)
    return handler, context
