"""Training recipes and ``--set NAME=VALUE`` settings: read here, once.

A recipe is ``demo`` or ``real`` (every family's ``recipes.yaml`` blocks, through the
registry) or a YAML file of the same shape as a family's ``real:`` block (one mapping
per task), for a hospital's own settings.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import yaml

from cxrserve.core.options import parse_pairs

#: Keys of a demo component block that the store builder reads; the rest go to ``train()``.
STORE_KEYS = ("task", "depends", "data", "post_export")
#: Keys of a real block that say how a real store assembles the component, never ``train()`` arguments.
META_KEYS = ("budget_weight", "negatives", "targets")


def typed(value):
    """``"3"`` -> 3, ``"[a, b]"`` -> list, ``"true"`` -> True; other text stays text."""
    if not isinstance(value, str):
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def parse_settings(values: Iterable[str] | None) -> dict:
    """``--set epochs=3 segmentation=runs/lungseg/best.ckpt`` -> typed keyword arguments."""
    return {k: typed(v) for k, v in parse_pairs(values).items()}


def task_settings(recipe: str | Path | None, task: str) -> dict:
    """The settings ``recipe`` gives ``task``: ``real`` / ``demo`` (the families') or a YAML file."""
    if not recipe:
        return {}
    from cxrserve import families

    if str(recipe) == "real":
        return {k: v for k, v in (families.recipe_components("real").get(task) or {}).items() if k not in META_KEYS}
    if str(recipe) == "demo":
        blocks = [b for b in families.recipe_components("demo").values() if b.get("task") == task]
        return {k: v for k, v in (blocks[0] if blocks else {}).items() if k not in STORE_KEYS}
    return dict((yaml.safe_load(Path(recipe).read_text()) or {}).get(task) or {})
