"""The registry of model families: one folder each, found here, listed nowhere else.

Every sub-package of :mod:`cxrserve.families` with a ``FAMILY`` is a family; packages
outside it join with :func:`register` (or the ``CXRSERVE_FAMILIES`` environment
variable, comma-separated package names, for other processes). The CLI, the store
builder (demo and real), ``bench``, the viewer, the study model and the tests read this registry; adding
a family is adding a folder. How each served model's answer is shown and coded (SR content,
result objects, viewer card and inputs, client flags) is read here too, from each family's
``Presentation`` (:func:`report`, :func:`pictures`, :func:`card`, :func:`viewer_inputs`,
:func:`flags`, :func:`concepts`).
"""
from __future__ import annotations

import importlib
import os
import pkgutil
from types import ModuleType

from cxrserve.core.family import (CardLine, Concept, Family, Picture, Report, Served, ViewerInput,
                                  import_object)

_EXTRA: dict[str, Family] = {}
_FOUND: dict[str, Family] | None = None


def _discover() -> dict[str, Family]:
    global _FOUND
    if _FOUND is None:
        found: dict[str, Family] = {}
        names = [f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__) if m.ispkg]
        names += [n for n in os.environ.get("CXRSERVE_FAMILIES", "").split(",") if n.strip()]
        for package in names:
            family = getattr(importlib.import_module(package.strip()), "FAMILY", None)
            if isinstance(family, Family):
                found[family.name] = family
        _FOUND = found
    return {**_FOUND, **_EXTRA}


def register(family: Family) -> Family:
    """Add a family from another package (a hospital's own model, a test's throwaway one)."""
    if family.name in _discover() and _discover()[family.name] != family:
        raise KeyError(f"family {family.name!r} registered twice")
    _EXTRA[family.name] = family
    return family


def unregister(name: str) -> None:
    _EXTRA.pop(name, None)


def families() -> dict[str, Family]:
    return dict(sorted(_discover().items(), key=lambda kv: (kv[1].rank, kv[0])))


def served() -> dict[str, tuple[Family, Served]]:
    """Served name (``cxr-triage``) -> (family, served model), every family."""
    return {s.name: (f, s) for f in families().values() for s in f.served}


def default_served() -> str:
    """What clients ask when no model is named: the first served model of the registry's order."""
    return next(iter(served()))


def get_served(name: str) -> tuple[Family, Served]:
    table = served()
    try:
        return table[name]
    except KeyError:
        raise KeyError(f"unknown served model {name!r}; known: {sorted(table)}") from None


def chained_components() -> tuple[str, ...]:
    """Components every archive ships (the input gate)."""
    return tuple(c for f in families().values() for c in f.chained_into_all)


def archive_components(name: str) -> tuple[str, ...]:
    """What ``<name>.mar`` ships: its own components (a composed model: every other's), then the chained ones."""
    _, s = get_served(name)
    own = [c for other in composed(name) for c in get_served(other)[1].components] if s.compose else s.components
    return tuple(dict.fromkeys((*own, *chained_components())))


def composed_model() -> str | None:
    """The served model that answers for every other (``cxr-study``), if the registry has one."""
    return next((n for n, (_, s) in served().items() if s.compose), None)


def composed(name: str) -> tuple[str, ...]:
    """The served models a composed model answers for (empty for a plain one)."""
    _, s = get_served(name)
    return tuple(n for n, (_, o) in served().items() if not o.compose) if s.compose else ()


def composed_pipelines(name: str) -> tuple[str, ...]:
    """Pipeline classes whose serving code a model's archive must carry besides its own."""
    return tuple(get_served(n)[1].pipeline for n in composed(name))


def tasks() -> dict[str, str]:
    """Training task name -> module path, every family."""
    out: dict[str, str] = {}
    for f in families().values():
        for name, module in f.tasks.items():
            if name in out:
                raise KeyError(f"task {name!r} declared by two families")
            out[name] = module
    return out


def get_task(name: str) -> ModuleType:
    table = tasks()
    try:
        return importlib.import_module(table[name])
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {sorted(table)}") from None


def pipeline_class(name: str):
    return import_object(get_served(name)[1].pipeline)


def recipe_components(kind: str) -> dict[str, dict]:
    """Every family's ``demo`` or ``real`` component blocks, merged (one name, one block)."""
    out: dict[str, dict] = {}
    for f in families().values():
        for name, block in f.recipe_blocks(kind).items():
            if name in out:
                raise KeyError(f"recipe component {name!r} declared by two families")
            out[name] = block
    return out


def preprocessings() -> dict:
    """Every named preprocessing pipeline: the core's and each family's (a family registers its
    own when its package is imported, :mod:`cxrserve.core.preprocessing`)."""
    from cxrserve.core.preprocessing import PREPROCESSING

    families()  # imports every family's package, which registers its pipelines
    return dict(sorted(PREPROCESSING.items()))


def cli_modules() -> tuple[str, ...]:
    return tuple(m for f in families().values() for m in f.cli)


# --------------------------------------------------------------------------- presentation
def report(name: str) -> Report | None:
    """The SR measurement group a served model's answer becomes, or None (not in the SR)."""
    family, _ = get_served(name)
    return family.shows().reports.get(name)


def pictures(name: str) -> tuple[Picture, ...]:
    """The pictures a served model can answer (option, response field, result object)."""
    family, _ = get_served(name)
    return tuple(family.shows().pictures.get(name, ()))


def result_pictures() -> dict[str, tuple[str, Picture]]:
    """Result object kind -> (served name, picture), every family, registry order; kinds and
    series numbers are unique (a PACS tells result series apart by them)."""
    out: dict[str, tuple[str, Picture]] = {}
    numbers: dict[int, str] = {}
    for name in served():
        for picture in pictures(name):
            if not picture.kind:
                continue
            if picture.kind in out or picture.series_number in numbers:
                raise KeyError(f"result kind {picture.kind!r} / series {picture.series_number} declared twice")
            out[picture.kind] = (name, picture)
            numbers[picture.series_number] = picture.kind
    return out


def card(name: str) -> tuple[CardLine, ...]:
    """The viewer card lines of a served model (empty: the viewer lists the raw fields)."""
    family, _ = get_served(name)
    return tuple(family.shows().cards.get(name, ()))


def viewer_inputs() -> dict[str, ViewerInput]:
    """Extra inputs the viewer's form may offer, by request field, every family."""
    out: dict[str, ViewerInput] = {}
    for f in families().values():
        for entry in f.shows().inputs:
            out.setdefault(entry.name, entry)
    return out


def flags() -> dict[str, str]:
    """Boolean request options the client offers as ``--<option>`` -> help: every picture's
    option (with the models that have it) and each family's own flags."""
    out: dict[str, list[str]] = {}
    for name in served():
        for picture in pictures(name):
            out.setdefault(picture.option, []).append(name)
    helps = {option: f"ask for the {option} PNG ({', '.join(names)})" for option, names in out.items()}
    for f in families().values():
        for flag in f.shows().flags:
            helps.setdefault(flag.option, flag.help)
    return helps


def concepts() -> dict[str, Concept]:
    """Every family's coded concepts by key (the code table of ``docs/DICOM.md``); a key means one concept."""
    out: dict[str, Concept] = {}
    for f in families().values():
        for key, concept in f.shows().codes.items():
            if out.setdefault(key, concept) != concept:
                raise KeyError(f"concept {key!r} declared twice with different codes")
    return out
