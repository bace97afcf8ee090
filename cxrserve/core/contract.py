"""A family's input/output contract: what its networks take and give, what its responses hold.

Each family folder holds ``contract.yaml`` (found through :attr:`Family.folder`, like a MONAI
bundle's ``network_data_format``), in three parts:

* ``components``: per exported component (the folder name inside an archive), its
  preprocessing (a :data:`cxrserve.core.preprocessing.PREPROCESSING` name, as in the card), the
  tensor it reads (dtype, ``[C, H, W]`` shape, channel meanings, value range, what a uniform
  grey level becomes) and the tensors it returns (name, shape, dtype, range, and a sum or an
  L2 norm along the last axis where the network fixes one);
* ``served``: per served model, the request inputs, its options, and each response field
  (dotted path -> type, range, enum values, label keys, picture kind) with ``when`` naming
  the option or extra input that makes an optional field appear;
* ``every_response``: fields a family adds to every served model's response (the gate).

A shape dimension or a bound is a number or the name of a card fact: ``labels`` (how many
labels the card has) or ``arch_kwargs.<key>``, so one contract fits demo and real weights.

This module only parses (strictly: an unknown key is an error, so a misspelt check cannot
pass silently) and checks arrays and response dicts with numpy; loading the models is the
caller's (``tests/test_contracts.py``). No torch here, and no registry: callers pass the
:class:`~cxrserve.core.family.Family`.
"""
from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

CONTRACT_FILE = "contract.yaml"
FORMAT = 1
DTYPES = ("float32", "int64", "uint8")
FIELD_TYPES = ("number", "integer", "string", "boolean", "enum", "bbox", "labelled", "png", "sections")
PNG_PIXELS = ("binary", "rgb")
#: ``original``: the image's stored (width, height); ``picture``: that, long side at most
#: :data:`cxrserve.core.overlays.MAX_OVERLAY_SIDE` (kept here as a number: no cv2 import)
PNG_SIZES = ("original", "picture")
MAX_PICTURE_SIDE = 1024


class ContractError(ValueError):
    """A contract file that does not parse, or names a key this module does not know."""


Dim = int | str


def _keys(where: str, data: Any, required: set[str], optional: set[str]) -> dict:
    if not isinstance(data, Mapping):
        raise ContractError(f"{where}: expected a mapping, got {type(data).__name__}")
    unknown = set(data) - required - optional
    missing = required - set(data)
    if unknown or missing:
        raise ContractError(f"{where}: unknown keys {sorted(map(str, unknown))}, missing {sorted(missing)}")
    return dict(data)


def card_value(name: Dim, card: Any) -> float:
    """A number, or a card fact: ``labels`` -> len(card.labels), ``arch_kwargs.k`` -> card.arch_kwargs[k]."""
    if isinstance(name, (int, float)):
        return name
    if name == "labels":
        return len(getattr(card, "labels"))
    if isinstance(name, str) and name.startswith("arch_kwargs."):
        return getattr(card, "arch_kwargs")[name.removeprefix("arch_kwargs.")]
    raise ContractError(f"unknown dimension or bound {name!r}: a number, 'labels' or 'arch_kwargs.<key>'")


def _range(where: str, value: Any) -> tuple[Dim | None, Dim | None] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ContractError(f"{where}: a range is [low, high] (null for an open end)")
    return (value[0], value[1])


def _in_range(values: np.ndarray, bounds, card: Any, tol: float = 1e-5) -> str | None:
    low, high = (None if b is None else card_value(b, card) for b in bounds)
    finite = values[np.isfinite(values)]
    if finite.size != values.size:
        return "holds NaN or infinity"
    if low is not None and finite.size and finite.min() < low - tol:
        return f"minimum {finite.min():.6g} below {low}"
    if high is not None and finite.size and finite.max() > high + tol:
        return f"maximum {finite.max():.6g} above {high}"
    return None


# --------------------------------------------------------------------------- tensors
@dataclass(frozen=True)
class TensorSpec:
    """One network output (or input): per item, without the batch axis."""

    name: str
    shape: tuple[Dim, ...]
    dtype: str = "float32"
    range: tuple[Dim | None, Dim | None] | None = None  # None: any finite value
    sum: float | None = None  # along the last axis (softmax probabilities: 1)
    norm: float | None = None  # L2 along the last axis (normalised embeddings: 1)
    meaning: str = ""

    @classmethod
    def parse(cls, where: str, data: Any) -> "TensorSpec":
        d = _keys(where, data, {"name", "shape"}, {"dtype", "range", "sum", "norm", "meaning"})
        if d.get("dtype", "float32") not in DTYPES:
            raise ContractError(f"{where}: dtype {d['dtype']!r} not one of {DTYPES}")
        return cls(name=str(d["name"]), shape=tuple(d["shape"]), dtype=d.get("dtype", "float32"),
                   range=_range(where, d.get("range")), sum=d.get("sum"), norm=d.get("norm"),
                   meaning=str(d.get("meaning", "")))

    def resolve_shape(self, card: Any) -> tuple[int, ...]:
        return tuple(int(card_value(d, card)) for d in self.shape)

    def problems(self, array: np.ndarray, card: Any) -> list[str]:
        """What in one item's array breaks this spec (empty when it keeps it)."""
        array = np.asarray(array)
        out = []
        if tuple(array.shape) != self.resolve_shape(card):
            out.append(f"{self.name}: shape {tuple(array.shape)}, declared {self.resolve_shape(card)}")
        if array.dtype != np.dtype(self.dtype):
            out.append(f"{self.name}: dtype {array.dtype}, declared {self.dtype}")
        values = array.astype(np.float64)
        bad = _in_range(values, self.range or (None, None), card)
        if bad:
            out.append(f"{self.name}: {bad}")
        for what, target, got in (("sum", self.sum, values.sum(axis=-1) if values.ndim else values),
                                  ("L2 norm", self.norm, np.sqrt((values ** 2).sum(axis=-1)) if values.ndim else values)):
            if target is not None and not np.allclose(got, target, atol=1e-3):
                out.append(f"{self.name}: {what} along the last axis {np.ravel(got)[:4]}, declared {target}")
        return out


@dataclass(frozen=True)
class InputSpec(TensorSpec):
    """The tensor a component reads, and how a decoded grey image becomes it."""

    channels: tuple[str, ...] = ()  # what each channel is (MONAI's channel_def)
    #: a uniform image of grey level g (0-255) -> the value of every pixel (one number, or one per channel);
    #: only for linear preprocessing
    grey_levels: Mapping[int, float | tuple[float, ...]] = field(default_factory=dict)
    normalisation: str = ""

    @classmethod
    def parse(cls, where: str, data: Any) -> "InputSpec":
        d = _keys(where, data, {"shape", "value_range"},
                  {"dtype", "channels", "grey_levels", "normalisation", "meaning", "name"})
        base = TensorSpec.parse(where, {"name": d.get("name", "input"), "shape": d["shape"],
                                        "dtype": d.get("dtype", "float32"), "range": d["value_range"],
                                        "meaning": d.get("meaning", "")})
        channels = tuple(d.get("channels") or ())
        if channels and isinstance(base.shape[0], int) and len(channels) != base.shape[0]:
            raise ContractError(f"{where}: {len(channels)} channel names for {base.shape[0]} channels")
        grey = {int(k): (tuple(v) if isinstance(v, list) else float(v)) for k, v in (d.get("grey_levels") or {}).items()}
        return cls(name=base.name, shape=base.shape, dtype=base.dtype, range=base.range, meaning=base.meaning,
                   channels=channels, grey_levels=grey, normalisation=str(d.get("normalisation", "")))

    def example(self, card: Any, batch: int = 2, seed: int = 0) -> np.ndarray:
        """A batch built from the contract alone: uniform in the value range, declared shape and dtype."""
        rng = np.random.default_rng(seed)
        low, high = (card_value(b, card) for b in self.range)
        shape = (batch, *self.resolve_shape(card))
        if np.dtype(self.dtype).kind in "iu":
            return rng.integers(int(low), int(high) + 1, size=shape).astype(self.dtype)
        return rng.uniform(low, high, size=shape).astype(self.dtype)


@dataclass(frozen=True)
class ComponentContract:
    name: str  # the component's folder in an archive
    preprocessing: str | None  # None: not an image graph (a text encoder)
    input: InputSpec
    outputs: tuple[TensorSpec, ...]
    #: a program other than the component's model graph (e.g. ``text.pt``), in the folder of ``card``
    file: str | None = None
    card: str | None = None  # the component folder whose card resolves its dims (default: ``name``)

    @property
    def folder(self) -> str:
        """The component folder (inside an archive) that holds this network and its card."""
        return self.card or self.name

    @classmethod
    def parse(cls, name: str, data: Any) -> "ComponentContract":
        where = f"components.{name}"
        d = _keys(where, data, {"input", "outputs"}, {"preprocessing", "file", "card", "meaning"})
        outputs = tuple(TensorSpec.parse(f"{where}.outputs[{i}]", o) for i, o in enumerate(d["outputs"]))
        return cls(name=name, preprocessing=d.get("preprocessing"), input=InputSpec.parse(f"{where}.input", d["input"]),
                   outputs=outputs, file=d.get("file"), card=d.get("card"))

    def problems(self, outputs: tuple[np.ndarray, ...], card: Any) -> list[str]:
        """One item's outputs (a runtime's tuple, batch axis removed) against the declared ones."""
        if len(outputs) != len(self.outputs):
            return [f"{self.name}: {len(outputs)} outputs, declared {len(self.outputs)} "
                    f"({[o.name for o in self.outputs]})"]
        return [p for spec, arr in zip(self.outputs, outputs) for p in spec.problems(arr, card)]


# --------------------------------------------------------------------------- responses
@dataclass(frozen=True)
class FieldSpec:
    """One response field, by dotted path."""

    path: str
    type: str
    range: tuple[Dim | None, Dim | None] | None = None
    values: tuple[str, ...] = ()  # enum
    values_from: str | None = None  # enum values / label keys: that component's card labels
    keys: tuple[str, ...] = ()  # labelled: the default keys, in order
    sum: float | None = None  # labelled: the values add up to this
    nullable: bool = False
    when: str | None = None  # present iff this option is true / this extra input is sent
    pixels: str | None = None  # png: binary (0/255 grey) or rgb
    size: str | None = None  # png: original or picture
    meaning: str = ""

    @classmethod
    def parse(cls, where: str, path: str, data: Any) -> "FieldSpec":
        d = _keys(f"{where}.{path}", data, {"type"},
                  {"range", "values", "values_from", "keys", "sum", "nullable", "when", "pixels", "size", "meaning"})
        if d["type"] not in FIELD_TYPES:
            raise ContractError(f"{where}.{path}: type {d['type']!r} not one of {FIELD_TYPES}")
        if d["type"] == "png" and (d.get("pixels") not in PNG_PIXELS or d.get("size") not in PNG_SIZES):
            raise ContractError(f"{where}.{path}: a png needs pixels {PNG_PIXELS} and size {PNG_SIZES}")
        if d["type"] == "enum" and not (d.get("values") or d.get("values_from")):
            raise ContractError(f"{where}.{path}: an enum needs values or values_from")
        return cls(path=path, type=d["type"], range=_range(f"{where}.{path}", d.get("range")),
                   values=tuple(d.get("values") or ()), values_from=d.get("values_from"), keys=tuple(d.get("keys") or ()),
                   sum=d.get("sum"), nullable=bool(d.get("nullable", False)), when=d.get("when"),
                   pixels=d.get("pixels"), size=d.get("size"), meaning=str(d.get("meaning", "")))

    def lookup(self, response: Mapping) -> tuple[bool, Any]:
        node: Any = response
        for part in self.path.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return False, None
            node = node[part]
        return True, node

    def problems(self, response: Mapping, *, active: set[str], labels: Mapping[str, list[str]],
                 full_size: tuple[int, int] | None = None) -> list[str]:
        """This field in one response; ``active``: the options turned on and extra inputs sent;
        ``labels``: component -> card labels; ``full_size``: the image's stored (width, height)."""
        present, value = self.lookup(response)
        expected = self.when is None or self.when in active
        if not present:
            return [f"{self.path}: missing"] if expected else []
        if not expected:
            return [f"{self.path}: present without {self.when}"]
        if value is None:
            return [] if self.nullable else [f"{self.path}: null"]
        bad = self._value_problem(value, labels, full_size)
        return [f"{self.path}: {bad}"] if bad else []

    def _value_problem(self, value: Any, labels: Mapping[str, list[str]], full_size) -> str | None:
        t = self.type
        if t in ("number", "integer"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (t == "integer" and not isinstance(value, int)):
                return f"{value!r} is not a {t}"
            return _in_range(np.asarray([float(value)]), self.range or (None, None), None)
        if t == "string":
            return None if isinstance(value, str) else f"{value!r} is not a string"
        if t == "boolean":
            return None if isinstance(value, bool) else f"{value!r} is not a boolean"
        if t == "enum":
            allowed = self.values or tuple(labels[self.values_from])
            return None if value in allowed else f"{value!r} not one of {list(allowed)}"
        if t == "bbox":
            ok = (isinstance(value, list) and len(value) == 4 and all(isinstance(v, int) for v in value)
                  and 0 <= value[0] < value[2] and 0 <= value[1] < value[3])
            if ok and full_size is not None:
                ok = value[2] <= full_size[0] and value[3] <= full_size[1]
            return None if ok else f"{value!r} is not [x0, y0, x1, y1] inside the image {full_size}"
        if t == "labelled":
            if not isinstance(value, Mapping) or not value:
                return f"{value!r} is not a label -> number map"
            keys = self.keys or tuple(labels.get(self.values_from, ()))
            if keys and list(value) != list(keys):
                return f"keys {list(value)}, declared {list(keys)}"
            numbers = np.asarray([float(v) for v in value.values()])
            bad = _in_range(numbers, self.range or (None, None), None)
            if bad:
                return bad
            if self.sum is not None and not math.isclose(float(numbers.sum()), self.sum, abs_tol=1e-4):
                return f"values add up to {numbers.sum():.6f}, declared {self.sum}"
            return None
        if t == "png":
            return png_problem(value, self.pixels, self.size, full_size)
        return None  # sections: checked against each composed model's own contract by the caller


def png_problem(b64: str, pixels: str, size: str, full_size: tuple[int, int] | None) -> str | None:
    """A base64 PNG against its declared kind (binary grey 0/255 or RGB) and size."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
        img.load()
    except Exception as err:  # any decoding failure is the finding
        return f"not a PNG ({type(err).__name__})"
    arr = np.asarray(img)
    if pixels == "binary" and (arr.ndim != 2 or not set(np.unique(arr).tolist()) <= {0, 255}):
        return f"not a binary 0/255 grey mask (mode {img.mode}, values {np.unique(arr)[:6].tolist()})"
    if pixels == "rgb" and img.mode != "RGB":
        return f"mode {img.mode}, declared RGB"
    if full_size is not None:
        w, h = full_size
        if size == "picture" and max(w, h) > MAX_PICTURE_SIDE:
            scale = MAX_PICTURE_SIDE / max(w, h)
            w, h = max(1, round(w * scale)), max(1, round(h * scale))
        if img.size != (w, h):
            return f"size {img.size}, declared {(w, h)} ({size} of {full_size})"
    return None


@dataclass(frozen=True)
class OptionSpec:
    name: str
    type: str  # bool | labels | models (how the value is written)
    default: Any
    picture: bool = False
    meaning: str = ""


@dataclass(frozen=True)
class ServedContract:
    name: str
    components: tuple[str, ...]
    inputs: tuple[str, ...]  # request fields: "image", and extra images such as "prior"
    options: Mapping[str, OptionSpec]
    response: tuple[FieldSpec, ...]
    compose: bool = False  # results.<key>: each composed model's own contract

    @classmethod
    def parse(cls, name: str, data: Any) -> "ServedContract":
        where = f"served.{name}"
        d = _keys(where, data, {"components", "inputs", "response"}, {"options", "compose", "meaning"})
        options = {}
        for key, o in (d.get("options") or {}).items():
            o = _keys(f"{where}.options.{key}", o, {"type", "default"}, {"picture", "meaning"})
            options[key] = OptionSpec(key, o["type"], o["default"], bool(o.get("picture", False)), str(o.get("meaning", "")))
        response = tuple(FieldSpec.parse(f"{where}.response", p, f) for p, f in d["response"].items())
        return cls(name=name, components=tuple(d["components"]), inputs=tuple(d["inputs"]), options=options,
                   response=response, compose=bool(d.get("compose", False)))


@dataclass(frozen=True)
class Contract:
    family: str
    path: Path
    components: Mapping[str, ComponentContract]
    served: Mapping[str, ServedContract]
    every_response: tuple[FieldSpec, ...] = ()


def contract_path(family) -> Path:
    """``<family folder>/contract.yaml``."""
    return Path(family.folder) / CONTRACT_FILE


def parse_contract(data: Any, *, family: str, path: Path | str = "") -> Contract:
    d = _keys(str(path) or family, data, {"format"}, {"components", "served", "every_response"})
    if d["format"] != FORMAT:
        raise ContractError(f"{path}: format {d['format']!r}, this cxrserve reads {FORMAT}")
    components = {n: ComponentContract.parse(n, c) for n, c in (d.get("components") or {}).items()}
    served = {n: ServedContract.parse(n, s) for n, s in (d.get("served") or {}).items()}
    every = tuple(FieldSpec.parse("every_response", p, f) for p, f in (d.get("every_response") or {}).items())
    return Contract(family=family, path=Path(path), components=components, served=served, every_response=every)


def load_contract(family) -> Contract:
    """The contract of a :class:`~cxrserve.core.family.Family`; ContractError if missing or malformed."""
    import yaml

    path = contract_path(family)
    if not path.exists():
        raise ContractError(f"family {family.name!r} has no {CONTRACT_FILE} in {path.parent}")
    return parse_contract(yaml.safe_load(path.read_text()), family=family.name, path=path)
