"""The served-model template shared by TorchServe handlers, the CLI and batch jobs.

A :class:`Pipeline` is one served model (``cxr-triage``, ``cxr-pxs``, ...): it loads
its components (each a folder with ``metadata.json`` and ``model.pt``/``model.onnx``)
once, then scores a list of decoded studies at a time. Its contract:

* ``predict(items)`` returns one entry per item, a response ``dict`` or a
  :class:`~cxrserve.errors.CXRInputError`; an item's failure never touches its
  neighbours;
* every response starts from :meth:`Pipeline.base_response` (model, version,
  warnings, input facts), so the fields common to all models are written once;
* request options are declared per pipeline in ``OPTIONS`` and parsed here, so a bad
  option value is a 400 naming the option.
* before any model runs, every image is screened: DICOM header facts
  (:func:`~cxrserve.imageio.check_frontal_chest_header`), then the learned input gate
  when the archive ships a ``gate`` component (:meth:`Pipeline.run_gate`): its verdict
  is in every response, and below its threshold the request is a 422.

Handlers are thin adapters from TorchServe requests to :class:`Item` lists
(:mod:`cxrserve.serving`); ``cxrserve predict`` and ``cxrserve batch --in-process``
call the same pipelines without a server.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from .card import ModelCard
from .errors import CXRInputError, MalformedInput, NotFrontalCXR
from .imageio import MAX_BYTES, MAX_PIXELS, XRay, check_frontal_chest_header, decode
from .runtime import Runtime, load_runtime, pick_device
from .transforms import build_transform

log = logging.getLogger(__name__)

#: Folder name of the input gate inside an archive (see :meth:`Pipeline.run_gate`).
GATE_COMPONENT = "gate"


# --------------------------------------------------------------------------- options
def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false, got {text[:40]!r}")


def parse_float(value: Any) -> float:
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    return float(value)


@dataclass(frozen=True)
class Option:
    parse: Callable[[Any], Any]
    default: Any
    help: str = ""


@dataclass
class Item:
    """One study to score: the decoded image, named extra images, parsed options."""

    xray: XRay
    options: dict = field(default_factory=dict)
    images: dict[str, XRay] = field(default_factory=dict)  # e.g. {"prior": XRay}
    gate: dict | None = None  # input gate verdict for the main image, set by Pipeline.predict


@dataclass
class Limits:
    max_bytes: int = MAX_BYTES
    max_pixels: int = MAX_PIXELS
    max_batch: int = 16


class StageTimer:
    """Wall-clock seconds per named stage for the batch in flight (exported as metrics)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def reset(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out


@dataclass
class Component:
    card: ModelCard
    runtime: Runtime
    path: Path
    _transform: Any = field(default=None, repr=False, compare=False)

    def transform(self):
        """The card's preprocessing, built once: transforms are stateless and thread-safe."""
        if self._transform is None:
            self._transform = build_transform(self.card.preprocessing)
        return self._transform


# --------------------------------------------------------------------------- pipeline
class Pipeline:
    name: ClassVar[str] = ""
    components: ClassVar[tuple[str, ...]] = ()
    #: components that must stay differentiable (TorchScript even when backend=onnx)
    autograd_components: ClassVar[tuple[str, ...]] = ()
    extra_images: ClassVar[tuple[str, ...]] = ()
    OPTIONS: ClassVar[dict[str, Option]] = {}

    def __init__(self, model_dir: str | Path, *, device: torch.device | None = None,
                 config: dict | None = None):
        self.model_dir = Path(model_dir)
        self.config = dict(config or {})
        self.device = device or torch.device("cpu")
        self.limits = Limits(
            max_bytes=int(self.config.get("max_bytes", MAX_BYTES)),
            max_pixels=int(self.config.get("max_pixels", MAX_PIXELS)),
            max_batch=int(self.config.get("max_batch", 16)),
        )
        self.backend = self.config.get("backend", "torchscript")
        self.timer = StageTimer()
        self.parts: dict[str, Component] = {}
        for name in self.components:
            self.parts[name] = self._load_component(name)
        self.gate = self._load_gate()
        self.setup()

    def _load_gate(self) -> Component | None:
        """The archive's input gate (a ``gate`` component folder), if it ships one.

        Every served pipeline screens with it; it is not in ``components`` because it
        is shared by all models and optional for archives built before it existed.
        """
        if "gate" in self.components or not (self.model_dir / GATE_COMPONENT / "metadata.json").exists():
            return self.parts.get("gate")
        return self._load_component(GATE_COMPONENT)

    @property
    def gate_threshold(self) -> float:
        """Accept when P(frontal CXR) >= this: ``handler: gate_threshold`` else the gate card's."""
        if "gate_threshold" in self.config:
            return float(self.config["gate_threshold"])
        return float(self.gate.card.thresholds.get("accept", 0.5)) if self.gate else 0.0

    @property
    def gate_enforced(self) -> bool:
        """Reject (422) below the threshold? ``handler: gate_enforce`` (true | false | auto).

        ``auto`` (default) enforces a gate trained on real radiographs and only reports
        the verdict of a demo gate: one trained on phantoms alone cannot judge real
        films, and the demo models answer real films with a DEMO warning anyway.
        """
        value = self.config.get("gate_enforce", "auto")
        if str(value).strip().lower() == "auto":
            return self.gate is not None and not self.gate.card.demo
        return parse_bool(value)

    def _load_component(self, name: str) -> Component:
        path = self.model_dir / name
        card = ModelCard.load(path / "metadata.json")
        backend = "torchscript" if name in self.autograd_components else self.backend
        runtime = load_runtime(path, backend, self.device, int(self.config.get("threads", 0)))
        return Component(card, runtime, path)

    def setup(self) -> None:
        """Per-model work done once at load (pools, text embeddings, transforms)."""

    # ----------------------------------------------------------------- metadata
    @property
    def version(self) -> str:
        cards = [p.card for p in self.parts.values()]
        return "+".join(sorted({c.version for c in cards})) if cards else "unknown"

    @property
    def demo(self) -> bool:
        return any(p.card.demo for p in self.parts.values())

    def base_response(self, item: Item) -> dict:
        warnings = list(item.xray.warnings)
        seen = set(warnings)
        for part in self.parts.values():
            for w in part.card.warnings:
                if w not in seen:
                    warnings.append(w)
                    seen.add(w)
        response = {
            "model": self.name,
            "model_version": self.version,
            "warnings": warnings,
            "input": item.xray.info(),
        }
        if item.gate is not None:
            response["input_gate"] = dict(item.gate)
            if item.gate["verdict"] != "frontal_cxr":
                warnings.append(f"input gate ({'demo, ' if self.gate.card.demo else ''}not enforced): "
                                f"{item.gate['verdict']} (score {item.gate['score']:.3f} < {item.gate['threshold']:g})")
        return response

    def describe(self) -> dict:
        return {
            "model": self.name,
            "model_version": self.version,
            "demo": self.demo,
            "backend": self.backend,
            "device": str(self.device),
            "options": {k: {"default": o.default, "help": o.help} for k, o in self.OPTIONS.items()},
            "components": {k: p.card.to_dict() for k, p in self.parts.items()},
            "input_gate": ({"threshold": self.gate_threshold, "card": self.gate.card.to_dict()}
                           if self.gate is not None else None),
        }

    # ----------------------------------------------------------------- requests
    def parse_options(self, raw: dict) -> dict:
        options = {}
        for key, option in self.OPTIONS.items():
            if key in raw and raw[key] is not None:
                try:
                    options[key] = option.parse(raw[key])
                except (TypeError, ValueError) as err:
                    raise MalformedInput(f"invalid value for option {key!r}: {err}") from err
            else:
                options[key] = option.default
        return options

    def make_item(self, images: dict[str, bytes], raw_options: dict) -> Item:
        """Decode a request's files and options; raises CXRInputError (4xx)."""
        main = images.get("image")
        if main is None:
            raise MalformedInput("no image in the request: post the file as the body or as form field 'image'")
        with self.timer.stage("decode"):
            xray = decode(main, max_bytes=self.limits.max_bytes, max_pixels=self.limits.max_pixels)
            extra = {
                name: decode(images[name], max_bytes=self.limits.max_bytes, max_pixels=self.limits.max_pixels)
                for name in self.extra_images
                if images.get(name) is not None
            }
        return Item(xray=xray, options=self.parse_options(raw_options), images=extra)

    # ----------------------------------------------------------------- scoring
    def screen(self, item: Item) -> None:
        """Reject what is certainly not a frontal CXR before any model runs (422)."""
        check_frontal_chest_header(item.xray)
        for image in item.images.values():
            check_frontal_chest_header(image)

    def predict(self, items: list[Item | CXRInputError]) -> list[dict | CXRInputError]:
        """Score a batch; entries that are already errors pass through untouched."""
        results: list[dict | CXRInputError | None] = [None] * len(items)
        todo: list[int] = []
        for i, item in enumerate(items):
            if isinstance(item, CXRInputError):
                results[i] = item
                continue
            try:
                self.screen(item)
                todo.append(i)
            except CXRInputError as err:
                results[i] = err
        if todo and self.gate is not None:
            verdicts = self.run_gate([items[i] for i in todo])
            kept = []
            for i, err in zip(todo, verdicts):
                if err is None:
                    kept.append(i)
                else:
                    results[i] = err
            todo = kept
        if todo:
            outputs = self._predict([items[i] for i in todo])
            if len(outputs) != len(todo):
                raise RuntimeError(f"{type(self).__name__}._predict returned {len(outputs)} results for {len(todo)} items")
            for i, out in zip(todo, outputs):
                results[i] = out
        return results  # type: ignore[return-value]

    def run_gate(self, items: list[Item]) -> list[CXRInputError | None]:
        """Score every image of ``items`` with the input gate in one pass.

        Sets ``item.gate`` (verdict, score, threshold, enforced) for the main image and
        returns, per item, ``None`` (accepted, or gate not enforced) or a 422
        :class:`NotFrontalCXR` naming the image that failed (``image`` or an extra image
        such as ``prior``).
        """
        gate, threshold, enforced = self.gate, self.gate_threshold, self.gate_enforced
        labels = list(gate.card.labels)
        transform = gate.transform()
        keys = [(n, name, xray) for n, it in enumerate(items)
                for name, xray in (("image", it.xray), *it.images.items())]
        with self.timer.stage("preprocess_gate"):
            inputs = [transform(xray.uint8) for _, _, xray in keys]
        with self.timer.stage("model_gate"):
            outputs = gate.runtime.run_chunked(inputs, self.limits.max_batch)
        errors: list[CXRInputError | None] = [None] * len(items)
        for (n, name, _), out in zip(keys, outputs):
            probs = [float(p) for p in out[0]]
            score = probs[labels.index("frontal_cxr")]
            if score >= threshold:
                verdict = "frontal_cxr"
            else:
                others = {label: p for label, p in zip(labels, probs) if label != "frontal_cxr"}
                verdict = max(others, key=others.get)
            report = {"verdict": verdict, "score": round(score, 4), "threshold": threshold, "enforced": enforced}
            if name == "image":
                items[n].gate = report
            if enforced and verdict != "frontal_cxr" and errors[n] is None:
                what = "the image" if name == "image" else f"the {name} image"
                reason = ("looks photometrically inverted (bone dark, lungs bright): check the "
                          "PhotometricInterpretation (MONOCHROME1/2) of the source"
                          if verdict == "inverted_cxr" else "does not look like a frontal chest radiograph")
                errors[n] = NotFrontalCXR(
                    f"input gate: {what} {reason} (score {score:.3f} < threshold {threshold:g})",
                    detail={"input_gate": report, "field": name})
        return errors

    def _predict(self, items: list[Item]) -> list[dict | CXRInputError]:
        raise NotImplementedError

    def run(self, part: str, inputs: list[torch.Tensor]):
        """Run component ``part`` on per-item tensors in chunks, timing it."""
        with self.timer.stage(f"model_{part}"):
            return self.parts[part].runtime.run_chunked(inputs, self.limits.max_batch)

    def predict_bytes(self, data: bytes, options: dict | None = None, **images: bytes) -> dict:
        """Convenience for the CLI and tests: one file in, one response (raises on 4xx)."""
        item = self.make_item({"image": data, **images}, options or {})
        result = self.predict([item])[0]
        if isinstance(result, CXRInputError):
            raise result
        return result


PIPELINES: dict[str, type[Pipeline]] = {}


def register_pipeline(cls: type[Pipeline]) -> type[Pipeline]:
    if cls.name in PIPELINES:
        raise KeyError(f"pipeline {cls.name!r} registered twice")
    PIPELINES[cls.name] = cls
    return cls


def load_pipeline(model_dir: str | Path, name: str | None = None, *, device: str = "auto",
                  config: dict | None = None) -> Pipeline:
    """Load a pipeline from an unpacked archive or a store folder (reads ``pipeline.json``)."""
    import json

    from . import pipelines  # noqa: F401  (registers every pipeline)

    model_dir = Path(model_dir)
    if model_dir.suffix == ".mar":
        import tempfile

        from .export import unpack_archive

        model_dir = unpack_archive(model_dir, tempfile.mkdtemp(prefix=f"cxrserve-{model_dir.stem}-"))
    if name is None:
        name = json.loads((model_dir / "pipeline.json").read_text())["pipeline"]
    if config is None and (model_dir / "pipeline.json").exists():
        config = json.loads((model_dir / "pipeline.json").read_text()).get("handler", {})
    try:
        cls = PIPELINES[name]
    except KeyError:
        raise KeyError(f"unknown pipeline {name!r}; known: {sorted(PIPELINES)}") from None
    return cls(model_dir, device=pick_device(0, device), config=config)
