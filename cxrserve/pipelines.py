"""Import every served pipeline so :data:`cxrserve.pipeline.PIPELINES` knows them all."""
from __future__ import annotations

import importlib

SERVED_MODULES = ("triage", "pxs", "severity", "mortality", "zeroshot")

for _module in SERVED_MODULES:
    try:
        importlib.import_module(f"cxrserve.{_module}")
    except ModuleNotFoundError as _err:  # a model family not built into this package version
        if _err.name != f"cxrserve.{_module}":
            raise
