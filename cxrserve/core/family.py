"""What a model family declares: the one object the rest of the code reads.

A family is one folder under :mod:`cxrserve.families` whose ``__init__`` defines
``FAMILY = Family(...)``. Everything that used to be a hand-kept list (served
pipelines, training tasks, archives, request options with pictures, headline scores,
CLI plugins, the naive baseline) is read from these objects by
:mod:`cxrserve.families` (the registry). A family also owns how its results are
*presented* (:class:`Presentation`, in its own ``presentation.py``): its DICOM SR content
and codes, its pictures and their result objects, its viewer card and inputs, the flags
the client offers. The SR writer, ``batch``, the client, the viewer and ``bench`` read
those through the registry and name no family, served model or response field.
Names of code are dotted strings, imported only when used, so reading the registry
never imports torch, training or tools code.
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


# --------------------------------------------------------------------------- presentation
#: Private DICOM coding scheme of cxrserve's own concepts (PS3.16 8.2: private designators start "99").
PRIVATE_SCHEME = "99CXRSRV"


@dataclass(frozen=True)
class Concept:
    """A coded concept (a DICOM code sequence item): code value, scheme designator, meaning."""

    value: str
    scheme: str
    meaning: str


def private(value: str, meaning: str) -> Concept:
    """A concept of cxrserve's private scheme (``docs/DICOM.md`` lists every code)."""
    return Concept(value, PRIVATE_SCHEME, meaning)


#: UCUM units of SR numbers
NO_UNITS = Concept("1", "UCUM", "no units")  # probabilities, fractions
PERCENT = Concept("%", "UCUM", "Percent")
SCORE = Concept("{score}", "UCUM", "score")


@dataclass(frozen=True)
class Num:
    """A TID 300 NUM item: the number at ``field`` (a dotted path in the model's answer)."""

    field: str
    concept: Concept
    unit: Concept
    optional: bool = False  # skipped when missing or null (a required one missing is an error)
    when: str = ""  # written only when this dotted path is present and truthy (e.g. ``change``)


@dataclass(frozen=True)
class Coded:
    """A qualitative evaluation (CODE item): the text at ``field`` coded through ``values``."""

    field: str
    concept: Concept
    values: Mapping[str, Concept]  # an answer outside it is an error, never an invented code
    when: str = ""


@dataclass(frozen=True)
class NumEach:
    """One NUM item per entry of the ``{name: number}`` mapping at ``field``; ``coder`` is
    ``"module:function"`` giving each name's concept (e.g. free-text zero-shot findings)."""

    field: str
    coder: str
    unit: Concept


@dataclass(frozen=True)
class Report:
    """A served model's measurement group (TID 1501) in the SR."""

    finding: Concept  # the group's finding type (one per served model)
    items: tuple[Num | Coded | NumEach, ...]
    lung_site: bool = True  # finding site SCT Lung (off for findings anywhere in the image)


@dataclass(frozen=True)
class Segment:
    """How a binary mask picture becomes a DICOM Segmentation (one segment)."""

    label: str  # segment label, e.g. "Lungs"
    category: Concept  # segmented property category
    type: Concept  # segmented property type
    content_label: str  # the SEG's ContentLabel (CS: capitals)
    tracking_id: str
    content_description: str
    series_description: str


@dataclass(frozen=True)
class Picture:
    """A PNG a served model answers when asked: request option, response field, result object."""

    option: str  # the request option that asks for it (the client's ``--<option>``)
    field: str  # the response field with the base64 PNG
    label: str  # what it is (Secondary Capture descriptions, the client's help)
    caption: str = ""  # the viewer's caption (default: ``label``)
    kind: str = ""  # result object kind (file ``<kind>.dcm``, part of its UIDs); "" = no DICOM object
    series_number: int = 0
    segment: Segment | None = None  # set: a Segmentation of the mask; else an RGB Secondary Capture


@dataclass(frozen=True)
class CardLine:
    """One line of the viewer card, rendered by the viewer's generic JavaScript.

    ``text`` holds ``{path}`` / ``{path:fmt}`` placeholders (dotted paths in the answer;
    ``fmt``: ``.N`` digits, ``%`` percent, ``+.N`` signed, ``max%`` the largest value of a
    mapping as percent; ``{{`` is a brace). ``kind``: ``headline``, ``fact`` (``label``:
    text), ``note`` (muted), ``bars`` (``text`` is the path of a ``{name: probability}``
    mapping), ``tag`` (text marked ``data-<last part of label>=<value at label>``).
    """

    kind: str
    text: str
    label: str = ""
    when: str = ""  # shown only when this path is present and truthy ...
    otherwise: str = ""  # ... else this muted note, if any
    sort: bool = False  # bars: highest first
    top: bool = True  # bars: highlight the highest


@dataclass(frozen=True)
class ViewerInput:
    """An extra input the viewer's form offers (a second image, or a list option)."""

    name: str  # the request field: an extra image (``kind="file"``) or an option (``kind="list"``)
    label: str
    kind: str = "file"
    placeholder: str = ""


@dataclass(frozen=True)
class Flag:
    """A boolean request option the client offers as ``--<option>`` (pictures add their own)."""

    option: str
    help: str


@dataclass(frozen=True)
class Presentation:
    """How a family's results are shown and coded, per served model (keys: served names)."""

    reports: Mapping[str, Report] = field(default_factory=dict)
    pictures: Mapping[str, tuple[Picture, ...]] = field(default_factory=dict)
    cards: Mapping[str, tuple[CardLine, ...]] = field(default_factory=dict)
    inputs: tuple[ViewerInput, ...] = ()
    flags: tuple[Flag, ...] = ()
    #: its coded concepts by key (``docs/DICOM.md``'s code table): what the SR writer and tests name
    codes: Mapping[str, Concept] = field(default_factory=dict)


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
    #: ``"module:NAME"`` of its :class:`Presentation` (``<package>.presentation:PRESENTATION``);
    #: "" = nothing to show beyond the raw answer
    presentation: str = ""

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

    def shows(self) -> Presentation:
        """Its :class:`Presentation` (imported now: the registry itself stays import-light)."""
        return import_object(self.presentation) if self.presentation else Presentation()
