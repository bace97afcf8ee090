"""Validate responses against the JSON Schemas published in docs/schemas/."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

SCHEMAS = Path(__file__).resolve().parents[1] / "docs" / "schemas"


@lru_cache(maxsize=None)
def _registry() -> Registry:
    resources = []
    for path in SCHEMAS.glob("*.schema.json"):
        doc = json.loads(path.read_text())
        resource = Resource.from_contents(doc)
        resources.append((path.name, resource))
        resources.append((doc["$id"], resource))
    return Registry().with_resources(resources)


def validate(instance: dict, name: str) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``instance`` fits ``docs/schemas/<name>.schema.json``."""
    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    Draft202012Validator(schema, registry=_registry()).validate(instance)
