"""What a model family declares: the one object the rest of the code reads.

A family is one folder under :mod:`cxrserve.families` whose ``__init__`` defines
``FAMILY = Family(...)``. Everything that used to be a hand-kept list (served
pipelines, training tasks, archives, request options with pictures, headline scores,
CLI plugins, the naive baseline) is read from these objects by
:mod:`cxrserve.families` (the registry). Names of code are dotted strings, imported only
when used, so reading the registry never imports torch, training or tools code.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


def import_object(path: str) -> Any:
    """``"package.module:Name"`` -> the object; ``"package.module"`` -> the module."""
    module, _, name = path.partition(":")
    obj = importlib.import_module(module)
    return getattr(obj, name) if name else obj


@dataclass(frozen=True)
class Served:
    """One served model (one ``.mar``) of a family."""

    name: str  # served name, e.g. "cxr-triage"
    pipeline: str  # "module:Class" of its Pipeline subclass
    components: tuple[str, ...]  # exported component folders it loads (the gate is added to every archive)
    #: dotted paths of its main numbers in a response (bench "same outputs", batch columns)
    headline: tuple[str, ...] = ()
    picture_option: str | None = None  # the request option that asks for its picture, if any
    #: components whose picture the seeds drew with autograd Grad-CAM (the naive baseline does the same)
    gradcam: tuple[str, ...] = ()
    version: str = "0.1.0"
    export_formats: tuple[str, ...] = ()  # formats to export beyond the backend in its model config
    title: str = ""  # what the viewer calls it
    seed: str = ""  # the seed system it reproduces
    #: request options the viewer sends (its pictures) and the extra inputs it offers ("prior", "labels")
    viewer_options: Mapping[str, Any] = field(default_factory=dict)
    viewer_inputs: tuple[str, ...] = ()
    #: ``"module:function"`` measuring what only this model has, for ``cxrserve bench``'s growth
    #: section: ``f(model_dir, sizes, seconds, device) -> dict`` (e.g. PXS cost vs pool size)
    bench_growth: str = ""
    #: a composed model (``cxr-study``): ships every other served model's components and serving
    #: code and answers each of them in its own section
    compose: bool = False
    #: ``"module:function"`` giving a composed model its own ``cxrserve bench`` row against the naive
    #: loop over every model it composes: ``f(store, work, *, cache, size, n, seconds, torchserve,
    #: clients, progress) -> {"rows": [...], "headline": str, ...}``
    bench_suite: str = ""

    @property
    def key(self) -> str:
        """Short name used in study sections and ``models=`` (``cxr-triage`` -> ``triage``)."""
        return self.name.removeprefix("cxr-")


@dataclass(frozen=True)
class Family:
    name: str
    package: str  # the family's package (``__name__`` of its ``__init__``)
    served: tuple[Served, ...] = ()
    #: ``cxrserve train NAME`` -> module with ``train(records, out_dir, **kw)`` / ``evaluate(pipeline, records)``
    tasks: Mapping[str, str] = field(default_factory=dict)
    #: modules with ``register_cli(subparsers)`` adding the family's own subcommands
    cli: tuple[str, ...] = ()
    #: components every archive ships in addition to its own (the input gate)
    chained_into_all: tuple[str, ...] = ()
    recipes: str = "recipes.yaml"  # ``demo:`` and ``real:`` training blocks per component
    rank: int = 100  # where its models come in listings (viewer, bench, batch columns, study sections)

    @property
    def folder(self) -> Path:
        return Path(importlib.import_module(self.package).__file__).resolve().parent

    def recipe_blocks(self, kind: str) -> dict:
        """This family's ``demo`` or ``real`` component blocks (task, hyper-parameters)."""
        import yaml

        path = self.folder / self.recipes
        if not path.exists():
            return {}
        return dict((yaml.safe_load(path.read_text()) or {}).get(kind) or {})

    def model_config_path(self, served: Served) -> Path:
        return self.folder / f"{served.name}.model-config.yaml"

    def schema_path(self, served: Served) -> Path:
        return self.folder / f"{served.name}.schema.json"
