"""The served-model template shared by TorchServe handlers, the CLI and batch jobs.

A :class:`Pipeline` is one served model (``cxr-triage``, ``cxr-pxs``, ...): it loads
its components (each a folder with ``metadata.json`` and ``model.pt``/``model.onnx``)
once, then scores a list of decoded studies at a time. Its contract:

* ``predict(items)`` returns one entry per item, a response ``dict`` or a
  :class:`~cxrserve.core.errors.CXRInputError`; an item's failure never touches its
  neighbours. It runs four public stages, each with typed input and output, which a
  composed model (``cxr-study``) calls itself: :meth:`Pipeline.decode_request`
  (-> :class:`Decoded`), :meth:`Pipeline.screen_items`, :meth:`Pipeline.run_gate` and
  :meth:`Pipeline.score` (the model's own ``_predict``);
* every response starts from :meth:`Pipeline.base_response` (model, version,
  warnings, input facts), so the fields common to all models are written once;
* request options are declared per pipeline in ``OPTIONS`` and parsed here, so a bad
  option value is a 400 naming the option.
* before any model runs, every image is screened: model-free input checks
  (:mod:`cxrserve.core.input_checks`), DICOM header facts
  (:func:`~cxrserve.core.imageio.check_frontal_chest_header`), then the learned input gate
  when the archive ships a ``gate`` component (:meth:`Pipeline.run_gate`): its verdict
  is in every response, and below its threshold the request is a 422. A main image that
  fails is its request's answer; an extra image (``prior``) that fails is set aside
  (:attr:`Item.refused`) and fails whatever reads it (:meth:`Pipeline.refusal`): a whole
  single-model request, one section of a study.

The data the stages pass (:class:`~cxrserve.core.item.Item`, :class:`~cxrserve.core.item.Decoded`)
is in :mod:`cxrserve.core.item`; which class serves a model folder, and loading it, in
:mod:`cxrserve.core.loading`. Handlers are thin adapters from TorchServe requests to
:class:`Item` lists (:mod:`cxrserve.core.serving`); ``cxrserve predict`` and
``cxrserve batch --in-process`` call the same pipelines without a server.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable

import torch

from cxrserve.core.card import ModelCard
from cxrserve.core.errors import CXRInputError, MalformedInput, NotFrontalCXR
from cxrserve.core.options import Option, parse_bool
from cxrserve.core.imageio import MAX_BYTES, MAX_PIXELS, XRay, check_frontal_chest_header, decode
from cxrserve.core.item import MAIN_IMAGE, Decoded, Item, request_image
from cxrserve.core.runtime import Runtime, load_runtime
from cxrserve.core.site_profile import ArchiveBinding, component_digest, folder_digests
from cxrserve.core.sites import SITE_OPTION, SiteBook, SiteOutput, SiteProfileRefused, apply_to_answer, sites_folder
from cxrserve.core.stagetimer import StageTimer
from cxrserve.core.transforms import build_transform
from cxrserve.core.input_checks import check_input

log = logging.getLogger(__name__)

#: Folder name of the input gate inside an archive (see :meth:`Pipeline.run_gate`).
GATE_COMPONENT = "gate"
#: The gate's accepting label.
FRONTAL = "frontal_cxr"
#: Every pipeline decodes to at least this shorter side (the largest need of any served family,
#: the triage crop's): every endpoint and cxr-study then decode a file to the same pixels, so a
#: study's sections equal the endpoints' answers number for number.
DECODE_FLOOR = 1024
#: Request option of every pipeline: decode at full resolution (pictures drawn at full size).
FULL_RESOLUTION = "full_resolution"
FULL_RESOLUTION_HELP = ("decode every pixel of the file (slower); by default only the resolution the "
                        "models read is decoded and pictures are drawn on that copy, then scaled")
SITE_HELP = ("the hospital site whose calibration profile decides the answer (cxrserve site install); "
             "default: the store's default site, else none (the archive's own rule)")


def gate_verdict(labels, probs, threshold: float) -> str:
    """The gate's rule, the one copy: ``frontal_cxr`` when P(frontal) >= threshold, else the
    likeliest other label (e.g. ``inverted_cxr``, ``not_frontal_cxr``)."""
    probs = [float(p) for p in probs]
    labels = list(labels)
    if probs[labels.index(FRONTAL)] >= threshold:
        return FRONTAL
    others = {label: p for label, p in zip(labels, probs) if label != FRONTAL}
    return max(others, key=others.get)


@dataclass
class Limits:
    max_bytes: int = MAX_BYTES
    max_pixels: int = MAX_PIXELS
    max_batch: int = 16


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
    #: response fields holding a ``{label: score}`` map: the serving metrics histogram each
    #: score (``core.servemetrics``); top-level floats are scores without being declared
    score_maps: ClassVar[tuple[str, ...]] = ()
    #: where its answer keeps what a site profile recalibrates (None: a site changes nothing)
    SITE_OUTPUT: ClassVar[SiteOutput | None] = None

    def __init__(self, model_dir: str | Path, *, device: torch.device | None = None,
                 config: dict | None = None, shared: dict | None = None):
        self.model_dir = Path(model_dir)
        # Loaded components keyed by (folder, backend, threads, device): pipelines built with the
        # same dict (the families of ``cxr-study``) load each component once.
        self._shared_components = shared
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
        #: callables ``observer(pipeline, items, results)`` told of every scored batch (monitoring);
        #: one that raises is logged and never fails the requests it watched
        self.observers: list = []
        self.setup()
        self.sites = self._load_sites()

    def _load_sites(self) -> SiteBook:
        """The store's site profiles, bound to this model's components (see :mod:`cxrserve.core.sites`)."""
        folder = sites_folder(self.config)
        if folder is None or not folder.is_dir():
            return SiteBook.empty()
        return SiteBook.load(folder, self.name, self.binding)

    def binding(self) -> ArchiveBinding:
        """What a site profile for this model is bound to: its name, version and a digest over the
        cards and weights of the components it reads (the gate included: a profile sets its threshold)."""
        folders = {name: part.path for name, part in self.parts.items()}
        if self.gate is not None:
            folders.setdefault(GATE_COMPONENT, self.gate.path)
        return ArchiveBinding(model=self.name, version=self.version, content_sha256=component_digest(folder_digests(folders)))

    def _load_gate(self) -> Component | None:
        """The archive's input gate (a ``gate`` component folder), if it ships one.

        Every served pipeline screens with it; it is not in ``components`` because it
        is shared by all models and optional for archives built before it existed.
        """
        shared_gate = (self._shared_components or {}).get(GATE_COMPONENT)
        if shared_gate is not None:  # pipelines composed into one (cxr-study) share one gate
            return shared_gate
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
        backend = "torchscript" if name in self.autograd_components else self.backend
        threads = int(self.config.get("threads", 0))
        key = (str(path.resolve()), backend, threads, str(self.device))
        if self._shared_components is not None and key in self._shared_components:
            return self._shared_components[key]
        card = ModelCard.load(path / "metadata.json")
        runtime = load_runtime(path, backend, self.device, threads, self.config.get("ort_memory"))
        component = Component(card, runtime, path)
        if self._shared_components is not None:
            self._shared_components[key] = component
        return component

    def setup(self) -> None:
        """Per-model work done once at load (pools, text embeddings, transforms)."""

    @property
    def decode_target(self) -> int | None:
        """Shorter side studies are decoded to (None: full size), see :mod:`cxrserve.core.fastdecode`.

        ``handler: decode_size`` in the model config: ``auto`` (default: what the
        components' preprocessing needs, :func:`~cxrserve.core.fastdecode.decode_need`, and at
        least :data:`DECODE_FLOOR`), ``full``, or a pixel count.
        """
        value = str(self.config.get("decode_size", "auto")).strip().lower()
        if value == "full":
            return None
        if value == "auto":
            from cxrserve.core.fastdecode import decode_need

            cards = [p.card for p in self.parts.values()] + ([self.gate.card] if self.gate else [])
            return max(decode_need(cards), DECODE_FLOOR)
        return int(value)

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
            "options": {**{k: {"default": o.default, "help": o.help} for k, o in self.OPTIONS.items()},
                        FULL_RESOLUTION: {"default": False, "help": FULL_RESOLUTION_HELP},
                        SITE_OPTION: {"default": self.sites.default, "help": SITE_HELP}},
            "decode_size": self.decode_target or "full",
            "components": {k: p.card.to_dict() for k, p in self.parts.items()},
            "input_gate": ({"threshold": self.gate_threshold, "card": self.gate.card.to_dict()}
                           if self.gate is not None else None),
            "sites": self.sites.describe(),
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

    def decode_request(self, images: dict[str, bytes], raw_options: dict, names: Iterable[str]) -> Decoded:
        """Stage 1: decode the main image and the extra images ``names`` a request carries.

        Every image is decoded at the size the models read (:attr:`decode_target`) unless the
        request asks for ``full_resolution``. Raises the 4xx of a missing or undecodable main
        image or a bad ``full_resolution``; an extra image that cannot be decoded is returned
        in :attr:`Decoded.refused`.
        """
        main = request_image(images)
        try:
            # also as the header X-CXR-Full-Resolution (header names use dashes)
            full = parse_bool(raw_options.get(FULL_RESOLUTION, raw_options.get("full-resolution", False)))
        except (TypeError, ValueError) as err:
            raise MalformedInput(f"invalid value for option {FULL_RESOLUTION!r}: {err}") from err
        target = None if full else self.decode_target
        start = time.perf_counter()
        try:
            xray = decode(main, max_bytes=self.limits.max_bytes, max_pixels=self.limits.max_pixels, target=target)
            extra, refused = {}, {}
            for name in names:
                if images.get(name) is not None:
                    try:
                        extra[name] = decode(images[name], max_bytes=self.limits.max_bytes,
                                             max_pixels=self.limits.max_pixels, target=target)
                    except CXRInputError as err:
                        refused[name] = err
        finally:
            seconds = time.perf_counter() - start
            self.timer.add("decode", seconds)
        return Decoded(xray, extra, refused, seconds)

    def make_item(self, images: dict[str, bytes], raw_options: dict) -> Item:
        """Decode a request's files and options; raises CXRInputError (4xx)."""
        decoded = self.decode_request(images, raw_options, self.extra_images)
        item = Item(xray=decoded.xray, images=decoded.images, refused=decoded.refused)
        refused = self.refusal(item)
        if refused is not None:  # a file that cannot be read is said before a bad option
            raise refused
        item.options = self.parse_options(raw_options)
        item.site = self.resolve_site(raw_options)
        return item

    def resolve_site(self, raw_options: dict):
        """The site profile a request names (option ``site``), or the store's default, or None.
        Raises 400 for a site the store does not have, 409 for a refused profile."""
        return self.sites.resolve(raw_options.get(SITE_OPTION))

    def make_items(self, requests) -> list[Item | CXRInputError]:
        """A batch of ``(images, options)`` requests (errors pass through) -> items, one by one.

        A pipeline that can do better (``cxr-study`` decodes a batch's files in threads)
        overrides this; the TorchServe adapter and batch scoring always call it.
        """
        return [self.make_one(r) for r in requests]

    def make_one(self, request) -> Item | CXRInputError:
        """One ``(images, options)`` request -> its item, or its 4xx (an error passes through)."""
        if isinstance(request, CXRInputError):
            return request
        try:
            return self.make_item(*request)
        except CXRInputError as err:
            return err

    # ----------------------------------------------------------------- scoring
    def screen_items(self, items: list[Item | CXRInputError]) -> list[Item | CXRInputError]:
        """Stage 2: reject what is certainly not a frontal CXR before any model runs (422).

        Each image gets the model-free and header checks (:meth:`screen_image`). A main image
        that fails makes its item that error; a failing extra image is refused
        (:meth:`Item.refuse`). Errors pass through.
        """
        out: list[Item | CXRInputError] = []
        for item in items:
            if isinstance(item, Item):
                try:
                    self.screen_image(item.xray)
                except CXRInputError as err:
                    item = err
                else:
                    for name, image in list(item.images.items()):
                        try:
                            self.screen_image(image)
                        except CXRInputError as err:
                            item.refuse(name, err)
            out.append(item)
        return out

    def screen(self, item: Item) -> None:
        """Stage 2 for one item that must pass whole: raises its first failing image's 422."""
        (result,) = self.screen_items([item])
        if isinstance(result, CXRInputError):
            raise result
        if item.refused:
            raise next(iter(item.refused.values()))

    @staticmethod
    def screen_image(image: XRay) -> None:
        """One image's model-free and header checks (422), the one copy every pipeline runs.

        Model-free rules first (:func:`cxrserve.core.input_checks.check_input`: DICOM type,
        size, blank, colour), then the DICOM header's body part and view.
        """
        check_input(image)
        check_frontal_chest_header(image)

    def refusal(self, item: Item) -> CXRInputError | None:
        """What this pipeline answers an item whose extra image it reads was refused (else None)."""
        return next((item.refused[name] for name in self.extra_images if name in item.refused), None)

    def admit(self, items: list[Item | CXRInputError]) -> list[Item | CXRInputError]:
        """Items with a refused image this pipeline reads become that image's error."""
        out: list[Item | CXRInputError] = []
        for item in items:
            refused = self.refusal(item) if isinstance(item, Item) else None
            out.append(item if refused is None else refused)
        return out

    def predict(self, items: list[Item | CXRInputError]) -> list[dict | CXRInputError]:
        """Score a batch; entries that are already errors pass through untouched."""
        items = self.admit(self.screen_items(items))
        items = self.admit(self.run_gate(items))
        todo = [i for i, item in enumerate(items) if isinstance(item, Item)]
        results: list[dict | CXRInputError] = list(items)  # type: ignore[arg-type]
        if todo:
            for i, out in zip(todo, self.score([items[i] for i in todo])):  # type: ignore[misc]
                results[i] = out
        self.observe(items, results)
        return results

    def observe(self, items: list, results: list) -> None:
        """Tell every observer of a scored batch; an observer never fails or changes an answer."""
        for observer in self.observers:
            try:
                observer(self, items, results)
            except Exception:
                log.exception("observer %r failed (the answers stand)", observer)

    def run_gate(self, items: list[Item | CXRInputError]) -> list[Item | CXRInputError]:
        """Stage 3: score every image of ``items`` with the input gate in one pass.

        Sets ``item.gate`` (verdict, score, threshold, enforced) for the main image. When
        the gate is enforced, an image below its threshold gets a 422
        :class:`NotFrontalCXR` naming it (``detail.field``): the main image's becomes its
        item's answer, an extra image (``prior``) is refused. Errors pass through; without a
        gate the items are returned as they are.
        """
        out = list(items)
        todo = [(n, item) for n, item in enumerate(items) if isinstance(item, Item)]
        if not todo or self.gate is None:
            return out
        gate, threshold, enforced = self.gate, self.gate_threshold, self.gate_enforced
        labels = list(gate.card.labels)
        transform = gate.transform()
        keys = [(n, item, name, xray) for n, item in todo
                for name, xray in ((MAIN_IMAGE, item.xray), *item.images.items())]
        with self.timer.stage("preprocess_gate"):
            inputs = [transform(xray.uint8) for *_, xray in keys]
        with self.timer.stage("model_gate"):
            outputs = gate.runtime.run_chunked(inputs, self.limits.max_batch)
        for (n, item, name, _), output in zip(keys, outputs):
            probs = [float(p) for p in output[0]]
            score = probs[labels.index(FRONTAL)]
            cut = self.site_gate_threshold(item, threshold)
            verdict = gate_verdict(labels, probs, cut)
            report = {"verdict": verdict, "score": round(score, 4), "threshold": cut, "enforced": enforced}
            if name == MAIN_IMAGE:
                item.gate = report
            if enforced and verdict != FRONTAL:
                what = "the image" if name == MAIN_IMAGE else f"the {name} image"
                reason = ("looks photometrically inverted (bone dark, lungs bright): check the "
                          "PhotometricInterpretation (MONOCHROME1/2) of the source"
                          if verdict == "inverted_cxr" else "does not look like a frontal chest radiograph")
                err = NotFrontalCXR(f"input gate: {what} {reason} (score {score:.3f} < threshold {cut:g})",
                                    detail={"input_gate": report, "field": name})
                if name == MAIN_IMAGE:
                    out[n] = err
                else:
                    item.refuse(name, err)
        return out

    @staticmethod
    def site_gate_threshold(item: Item, served: float) -> float:
        """The gate threshold for ``item``: its site's (``cxrserve site calibrate`` sets one that
        refuses at most 2 % of the site's frontal films), else the served one."""
        site = getattr(item, "site", None)
        gate = site.gate if site is not None else None
        return float(gate["threshold"]) if gate and gate.get("threshold") is not None else served

    def score(self, items: list[Item]) -> list[dict | CXRInputError]:
        """Stage 4: this model's answers for screened, gated items, one per item (``_predict``),
        then each item's site profile applied (:meth:`apply_site`)."""
        outputs = self._predict(items)
        if len(outputs) != len(items):
            raise RuntimeError(f"{type(self).__name__}._predict returned {len(outputs)} results for {len(items)} items")
        return [self.apply_site(item, out) for item, out in zip(items, outputs)]

    def apply_site(self, item: Item, answer: dict | CXRInputError) -> dict | CXRInputError:
        """``answer`` under the item's site profile (unchanged without one, see :mod:`cxrserve.core.sites`).

        A profile refused for this model (made for other weights) fails this answer with its 409,
        which in ``cxr-study`` fails only this model's section.
        """
        profile = item.site
        if profile is None or not isinstance(answer, dict):
            return answer
        if profile.name in self.sites.refused:
            return SiteProfileRefused(self.sites.refused[profile.name])
        return apply_to_answer(answer, profile, self.name, self.SITE_OUTPUT)

    def _predict(self, items: list[Item]) -> list[dict | CXRInputError]:
        """The model itself: a subclass's one method to write (``base_response`` + its fields)."""
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
