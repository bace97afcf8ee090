"""Training and evaluation, one module per served model family.

Each module exposes ``train(...)`` (checkpoint with its card) and ``evaluate(...)``
(metrics dict, JSON-ready); the CLI maps ``cxrserve train NAME`` / ``cxrserve eval
NAME`` onto them. Shared plumbing (records, image cache, batching) is in
:mod:`cxrserve.tasks.common`.
"""
from __future__ import annotations

import importlib
from types import ModuleType

#: ``cxrserve train NAME`` -> module with ``train(records, out_dir, **kwargs)``.
TASKS = {
    "lungseg": "cxrserve.tasks.lungseg",
    "triage": "cxrserve.tasks.triage",
    "severity": "cxrserve.tasks.severity",
    "mortality": "cxrserve.tasks.mortality",
    "gate": "cxrserve.tasks.gate",
    "pxs_pretrain": "cxrserve.tasks.pxs_pretrain",
    "pxs": "cxrserve.tasks.pxs",
    "zeroshot": "cxrserve.tasks.zeroshot",
}


def get_task(name: str) -> ModuleType:
    try:
        return importlib.import_module(TASKS[name])
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)}") from None
