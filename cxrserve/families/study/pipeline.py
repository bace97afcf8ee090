"""``cxr-study``: one request, every model family, one decode.

A :class:`StudyPipeline` is composed from the family registry (:mod:`cxrserve.families`,
``Served(compose=True)``): every other served model is a *family* of the study, keyed by
its served name without ``cxr-`` (``lungseg``, ``triage``, ``pxs``, ``severity``,
``mortality``, ``zeroshot`` today). Each family pipeline is instantiated on the
study's unpacked archive (its components are sub-folders named by component) with
that family's own handler settings (copied from its ``model-config`` into the study's
at build time, see :meth:`StudyPipeline.archive_config`), and the families share one
dict of loaded components, so the lung U-Net and the input gate are loaded once.

Per batch of studies the worker runs the stages of :class:`~cxrserve.core.pipeline.Pipeline`
once for all families:

1. decodes each file once (:meth:`Pipeline.decode_request`; the files of a batch in
   parallel threads, :meth:`make_items`);
2. screens and gates each image once (:meth:`Pipeline.screen_items`,
   :meth:`Pipeline.run_gate`): a main image that fails is the usual 4xx for the whole
   request; a failing ``prior`` is refused and fails only the families that read it
   (:meth:`Pipeline.refusal`, i.e. ``pxs``);
3. calls each selected family's :meth:`Pipeline.score` once on the screened studies;
   lungseg and triage share the lung findings through ``Item.shared`` (one U-Net pass
   per study);
4. answers ``results.<family>`` = exactly that family's own endpoint body (its
   ``base_response`` fills the common fields), or that family's error body with the
   status its endpoint would have given; the request is still 200.

Pictures (heatmaps, overlays, masks: options declared ``picture=True``) are off unless
asked, by ``pictures=true`` or by the family option itself (``heatmap=true``, or
``mortality.overlay=true`` when two families share an option name).
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

import torch

from cxrserve.core.errors import CXRInputError, MalformedInput
from cxrserve.core.options import Option, parse_bool
from cxrserve.core.item import Item, request_image
from cxrserve.core.pipeline import GATE_COMPONENT, Pipeline
from cxrserve.core.priority import STORE_DEFAULT, PriorityRuleError, Rule, assess, parse_rules, site_source

log = logging.getLogger(__name__)

STUDY = "cxr-study"
SERVED_PREFIX = "cxr-"
#: Handler settings that belong to the study as a whole (one decode, one gate), never to a family.
STUDY_SETTINGS = ("max_bytes", "max_pixels", "gate_threshold", "gate_enforce", "decode_threads", "sites_dir")
#: The study's worklist priority rules (``handler.priority``): the study's, never a family's.
PRIORITY = "priority"


def family_key(served_name: str) -> str:
    """``cxr-triage`` -> ``triage`` (the section name in a study response)."""
    return served_name[len(SERVED_PREFIX):] if served_name.startswith(SERVED_PREFIX) else served_name


def family_classes() -> dict[str, type[Pipeline]]:
    """Every served model of the registry the study composes, by family key, in registry order.

    Inside a study archive the registry finds exactly the families the archive ships.
    """
    from cxrserve import families
    from cxrserve.core.family import import_object

    return {families.get_served(name)[1].key: import_object(families.get_served(name)[1].pipeline)
            for name in families.composed(STUDY)}


def parse_models(value: Any) -> tuple[str, ...] | None:
    """Option ``models``: a comma list (or JSON-ish list) of family keys; empty = all."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        value = value.strip().strip("[]").replace('"', "").replace("'", "").split(",")
    if not isinstance(value, (list, tuple)):
        raise ValueError("expected a comma-separated list of model families")
    keys = []
    for raw in value:
        key = family_key(str(raw).strip())
        if key and key not in keys:
            keys.append(key)
    return tuple(keys) or None


def section_error(code: str, status: int, message: str) -> dict:
    return {"error": code, "status": status, "message": message}


@dataclass
class StudyItem(Item):
    """One study request: ``options`` are the study's own (``models``, ``pictures``)."""

    #: each selected family's parsed options, or its 400 (which fails only its section)
    family_options: dict[str, dict | CXRInputError] = field(default_factory=dict)
    decode_ms: float = 0.0


class StudyPipeline(Pipeline):
    """Every family on one decode; see the module docstring."""

    name = STUDY
    components = ()
    OPTIONS = {
        "models": Option(parse_models, None, "comma-separated families to run (default: all), e.g. triage,severity"),
        "pictures": Option(parse_bool, False, "every picture of every family (heatmap, saliency, overlays, mask)"),
    }

    def __init__(self, model_dir: str | Path, *, device: torch.device | None = None,
                 config: dict | None = None, shared: dict | None = None):
        super().__init__(model_dir, device=device, config=config, shared={} if shared is None else shared)

    # ----------------------------------------------------------------- loading
    def setup(self) -> None:
        shared = self._shared_components
        if self.gate is not None:
            shared[GATE_COMPONENT] = self.gate  # every family reports the verdict of this one gate
        family_configs = self.config.get("families") or {}
        common = {k: v for k, v in self.config.items() if k not in ("families", PRIORITY)}
        study_only = {k: v for k, v in self.config.items() if k in STUDY_SETTINGS}
        self.families: dict[str, Pipeline] = {}
        self.unavailable: dict[str, str] = {}
        for key, cls in family_classes().items():
            config = {**(family_configs[key] if key in family_configs else common), **study_only}
            try:
                self.families[key] = cls(self.model_dir, device=self.device, config=config, shared=shared)
            except Exception as err:  # one family that cannot load must not take the study down
                # (the archive's folder on this server is no business of the client's)
                reason = str(err).replace(str(self.model_dir), "<archive>")
                self.unavailable[key] = f"{cls.name} could not be loaded: {type(err).__name__}: {reason}"
                log.error("study: family %s unavailable: %s", key, self.unavailable[key])
        self.keys = list(family_classes())
        self.extra_images = tuple(dict.fromkeys(n for f in self.families.values() for n in f.extra_images))
        self.score_maps = tuple(dict.fromkeys(m for f in self.families.values() for m in f.score_maps))
        # The study's own card: every distinct component its families loaded (shared ones once).
        self.parts = {}
        for fam in self.families.values():
            for name, part in fam.parts.items():
                self.parts.setdefault(name, part)
        self.decode_threads = int(self.config.get("decode_threads", 0) or min(8, os.cpu_count() or 1))
        # worklist priority: the archive's default rules; a site profile's own replace them
        self.priority_rules = parse_rules(self.config.get(PRIORITY), f"handler.{PRIORITY}")
        self._site_rules: dict[str, tuple[Rule, ...]] = {}

    @classmethod
    def archive_config(cls, model_config: dict, family_configs: dict[str, dict]) -> dict:
        """The study's model-config with each family's ``handler:`` block under ``handler.families``.

        ``family_configs`` maps served name -> that archive's model-config; called by the
        store builder, so every family runs with the settings (backend, limits, caches)
        its own endpoint has, and nothing is kept by hand twice.
        """
        config = dict(model_config)
        handler = dict(config.get("handler") or {})
        families = dict(handler.get("families") or {})
        for name, family_config in family_configs.items():
            key = family_key(name)
            if key not in families:
                families[key] = dict(family_config.get("handler") or {})
        handler["families"] = families
        config["handler"] = handler
        return config

    # ----------------------------------------------------------------- metadata
    def describe(self) -> dict:
        info = super().describe()
        info["families"] = {}
        for key in self.keys:
            fam = self.families.get(key)
            if fam is None:
                info["families"][key] = {"available": False, "error": self.unavailable[key]}
                continue
            info["families"][key] = {
                "available": True, "model": fam.name, "model_version": fam.version, "backend": fam.backend,
                "components": {name: {"version": p.card.version, "demo": p.card.demo}
                               for name, p in fam.parts.items()},
                "options": {k: {"default": o.default, "help": o.help, "picture": o.picture}
                            for k, o in fam.OPTIONS.items()},
            }
        return info

    # ----------------------------------------------------------------- requests
    def family_options(self, key: str, raw: dict, pictures: bool) -> dict:
        """One family's options from the request: ``<key>.<option>`` beats ``<option>``."""
        fam = self.families[key]
        prefix = key + "."
        mine = {k: v for k, v in raw.items() if "." not in k}
        mine.update({k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)})
        for name, option in fam.OPTIONS.items():
            if option.picture and mine.get(name) is None:
                mine[name] = pictures  # pictures only when asked, whatever the family's default
        return fam.parse_options(mine)

    def make_item(self, images: dict[str, bytes], raw_options: dict) -> StudyItem:
        request_image(images)  # no image is said first, before any option, as by every endpoint
        options = self.parse_options(raw_options)
        models = options["models"] or tuple(self.keys)
        unknown = [m for m in models if m not in self.keys]
        if unknown:
            raise MalformedInput(f"invalid value for option 'models': unknown {unknown}; known: {self.keys}",
                                 detail={"field": "models"})
        options["models"] = models
        # one decode for all families; an extra image only when a selected family reads it
        wanted = {n for m in models if m in self.families for n in self.families[m].extra_images}
        decoded = self.decode_request(images, raw_options, [n for n in self.extra_images if n in wanted])
        family_options: dict[str, dict | CXRInputError] = {}
        for key in models:
            if key in self.families:
                try:
                    family_options[key] = self.family_options(key, raw_options, options["pictures"])
                except CXRInputError as err:
                    family_options[key] = err
        return StudyItem(xray=decoded.xray, options=options, images=decoded.images, refused=decoded.refused,
                         family_options=family_options, decode_ms=round(decoded.seconds * 1000, 2),
                         site=self.resolve_site(raw_options))

    def make_items(self, requests: Iterable[tuple[dict, dict] | CXRInputError]) -> list[Item | CXRInputError]:
        """Decode a batch of requests ``(images, options)`` in parallel threads (errors pass through)."""
        requests = list(requests)
        if len(requests) <= 1 or self.decode_threads <= 1:
            return [self.make_one(r) for r in requests]
        with ThreadPoolExecutor(min(self.decode_threads, len(requests)), thread_name_prefix="cxr-decode") as pool:
            return list(pool.map(self.make_one, requests))

    # ----------------------------------------------------------------- scoring
    def predict(self, items: list[StudyItem | CXRInputError]) -> list[dict | CXRInputError]:
        # Screened and gated once for every family; a refused prior stays on the item (no admit):
        # it fails only the sections of the families that read it.
        items = self.screen_items(items)
        start = time.perf_counter()
        items = self.run_gate(items)
        gate_ms = (time.perf_counter() - start) * 1000 if self.gate is not None else 0.0
        todo = [i for i, item in enumerate(items) if isinstance(item, Item)]
        sections: dict[int, dict] = {i: {} for i in todo}
        family_ms: dict[str, float] = {}
        for key in self.keys:
            wanted = [i for i in todo if key in items[i].options["models"]]
            if not wanted:
                continue
            if key not in self.families:
                for i in wanted:
                    sections[i][key] = section_error("model_unavailable", 503, self.unavailable[key])
                continue
            family_ms[key] = self._run_family(key, [(i, items[i]) for i in wanted], sections)
        results: list[dict | CXRInputError] = list(items)  # type: ignore[arg-type]
        for i in todo:
            item = items[i]
            out = self.base_response(item)
            if item.site is not None:  # each calibrated section names its operating point too
                out["site"] = item.site.name
            out["results"] = {key: sections[i][key] for key in self.keys if key in sections[i]}
            out[PRIORITY] = self.priority(item, out["results"])
            timings = {"decode": item.decode_ms, "gate": round(gate_ms, 2)}
            timings.update({key: round(ms, 2) for key, ms in family_ms.items() if key in out["results"]})
            out["timings_ms"] = timings
            results[i] = out
        self.observe(items, results)
        return results

    def priority(self, item: StudyItem, results: dict) -> dict:
        """The study's worklist priority (:mod:`cxrserve.core.priority`): by the request's site
        profile's ``priority`` block when it has one, else by the archive's default rules."""
        site = item.site
        block = (getattr(site, "raw", None) or {}).get(PRIORITY) if site is not None else None
        if block is None:
            return assess(results, self.priority_rules, STORE_DEFAULT)
        if site.name not in self._site_rules:
            try:
                self._site_rules[site.name] = parse_rules(block, f"site {site.name}: {PRIORITY}")
            except PriorityRuleError as err:  # checked by `site calibrate`: a hand-edited profile
                log.error("study: %s; its studies are not assessed", err)
                self._site_rules[site.name] = ()
        return assess(results, self._site_rules[site.name], site_source(site.name))

    def _run_family(self, key: str, batch: list[tuple[int, StudyItem]], sections: dict[int, dict]) -> float:
        """Score one family once on its share of the batch, each section as its endpoint answers; its wall ms."""
        fam = self.families[key]
        runnable: list[tuple[int, Item]] = []
        for i, item in batch:
            options = item.family_options[key]
            refused = fam.refusal(item)  # e.g. pxs when the prior failed: that endpoint's 4xx
            if isinstance(options, CXRInputError):
                sections[i][key] = options.to_dict()
            elif refused is not None:
                sections[i][key] = refused.to_dict()
            else:
                # the family's own options and images; ``shared`` stays one dict (one lung pass)
                images = {n: x for n, x in item.images.items() if n in fam.extra_images}
                runnable.append((i, replace(item, options=options, images=images)))
        if not runnable:
            return 0.0
        start = time.perf_counter()
        try:
            outputs = fam.score([it for _, it in runnable])
        except Exception as err:  # a family's failure stays in its section (its endpoint: a 500)
            log.exception("study: family %s failed on a batch of %d", key, len(runnable))
            outputs = [section_error("internal_error", 500, f"{fam.name} failed: {type(err).__name__}")] * len(runnable)
        seconds = time.perf_counter() - start
        for (i, _), out in zip(runnable, outputs):
            sections[i][key] = out.to_dict() if isinstance(out, CXRInputError) else out
        for stage, value in fam.timer.reset().items():
            self.timer.add(f"{key}_{stage}", value)
        return seconds * 1000
