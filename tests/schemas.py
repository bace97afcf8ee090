"""Validate responses against the JSON Schemas: the common ones in docs/schemas/, each served
model's in its family folder (found through the registry)."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

SCHEMAS = Path(__file__).resolve().parents[1] / "docs" / "schemas"


def schema_paths() -> dict[str, Path]:
    """Schema name (``cxr-triage``, ``common``, ``error``) -> file."""
    from cxrserve import families

    paths = {p.name.removesuffix(".schema.json"): p for p in SCHEMAS.glob("*.schema.json")}
    for name, (family, served) in families.served().items():
        if family.schema_path(served).exists():
            paths[name] = family.schema_path(served)
    return paths


@lru_cache(maxsize=None)
def _registry() -> Registry:
    resources = []
    for path in schema_paths().values():
        doc = json.loads(path.read_text())
        resource = Resource.from_contents(doc)
        resources.append((path.name, resource))
        resources.append((doc["$id"], resource))
    return Registry().with_resources(resources)


def validate(instance: dict, name: str) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``instance`` fits ``docs/schemas/<name>.schema.json``."""
    schema = json.loads(schema_paths()[name].read_text())
    Draft202012Validator(schema, registry=_registry()).validate(instance)
