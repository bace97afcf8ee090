"""TorchServe adapter: BaseHandler's template around a :class:`~cxrserve.core.pipeline.Pipeline`.

``initialize`` loads the pipeline once per worker (device from TorchServe's
``gpu_id``, settings from ``model-config.yaml``'s ``handler:`` block); ``preprocess``
turns each TorchServe request into an :class:`Item` or a typed error; ``inference``
scores the valid ones as one batch; ``postprocess`` sets each request's own HTTP
status, so a bad file gets its 4xx and its batch neighbours still get 200.

Requests may be a raw body (``curl -T study.dcm``), multipart form fields
(``-F image=@study.dcm -F prior=@prior.dcm -F heatmap=true``), a JSON object with
base64 files (``{"image": "...", "heatmap": true}``), with options also as ``X-CXR-<option>``
headers (TorchServe never passes query strings to handlers), or KServe v2 inputs
(``service_envelope=kservev2``, see :mod:`cxrserve.core.kserve`).
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
from typing import Any

from ts.torch_handler.base_handler import BaseHandler

from cxrserve.core.errors import HTTP_PHRASES, CXRInputError, MalformedInput
from cxrserve.core.item import Item
from cxrserve.core.loading import pipeline_class_of
from cxrserve.core.pipeline import Pipeline
from cxrserve.core.runtime import pick_device
from cxrserve.core.ts_kservev2 import teach_envelope

log = logging.getLogger(__name__)

IMAGE_FIELDS = ("image", "data", "body", "file")
#: Options may also come as HTTP headers ``X-CXR-<option>`` (TorchServe drops query
#: strings before the handler), e.g. ``curl -H "X-CXR-Heatmap: true" -T study.dcm``.
HEADER_PREFIX = "x-cxr-"


def _as_bytes(value: Any) -> bytes | None:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return None


def _b64(value: Any, name: str) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str):
        raise MalformedInput(f"field {name!r} must be a file or a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as err:
        raise MalformedInput(f"field {name!r} is not valid base64: {err}") from err


def split_request(request: dict, extra_images: tuple[str, ...] = ()) -> tuple[dict[str, bytes], dict]:
    """One TorchServe request dict -> ``({"image": bytes, "prior": bytes}, options)``.

    Raises:
        MalformedInput: no image, or a JSON body with a bad base64 field.
    """
    images: dict[str, bytes] = {}
    options: dict = {}
    fields = dict(request)
    body = fields.get("body", fields.get("data"))
    if isinstance(body, (bytes, bytearray)) and body[:1] == b"{":
        # Some clients post JSON without the content-type TorchServe parses on.
        try:
            body = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass  # not JSON after all: treat as file bytes
    if isinstance(body, dict):
        fields.pop("body", None)
        fields.pop("data", None)
        for key, value in body.items():
            if key in IMAGE_FIELDS or key in extra_images:
                images["image" if key in IMAGE_FIELDS else key] = _b64(value, key)
            else:
                options[key] = value
    for key, value in fields.items():
        raw = _as_bytes(value)
        if key in IMAGE_FIELDS and raw is not None:
            images.setdefault("image", raw)
        elif key in extra_images and raw is not None:
            images[key] = raw
        else:
            options[key] = value
    return images, options


class CXRHandler(BaseHandler):
    """Serves the pipeline class the archive's ``pipeline.json`` names (or ``pipeline_class``)."""

    pipeline_class: type[Pipeline] | None = None

    def initialize(self, context) -> None:
        properties = context.system_properties
        model_dir = properties.get("model_dir")
        config = dict((getattr(context, "model_yaml_config", None) or {}).get("handler", {}) or {})
        gpu_id = properties.get("gpu_id")
        device = pick_device(gpu_id, "auto" if gpu_id is not None else "cpu")
        threads = int(config.get("torch_threads", 0) or 0)
        if threads:
            import torch

            torch.set_num_threads(threads)
        # Under service_envelope=kservev2 TorchServe's envelope would answer a v2 binary request 503
        # before this handler runs (see ts_kservev2); taught here, once per worker, not on import.
        teach_envelope()
        cls = self.pipeline_class or pipeline_class_of(model_dir)
        self.pipeline = cls(model_dir, device=device, config=config)
        self._attach_monitor(config)
        self.context = context
        self.initialized = True
        log.info("%s ready on %s (backend %s, version %s)", self.pipeline.name, device,
                 self.pipeline.backend, self.pipeline.version)

    def _header_options(self, idx: int) -> dict:
        try:
            headers = self.context.get_all_request_header(idx) or {}
        except (AttributeError, IndexError, KeyError, TypeError):
            return {}
        return {k[len(HEADER_PREFIX):].lower(): v for k, v in headers.items()
                if isinstance(k, str) and isinstance(v, str) and k.lower().startswith(HEADER_PREFIX)}

    def preprocess(self, requests: list[dict]) -> list[Item | CXRInputError]:
        from cxrserve.core import kserve

        if kserve.is_v2_batch(requests):
            # service_envelope=kservev2: the entries are one study's named inputs.
            try:
                images, options = kserve.merge_v2_inputs(requests, self.pipeline.extra_images)
                return [self.pipeline.make_item(images, {**self._header_options(0), **options})]
            except CXRInputError as err:
                return [err]
        parsed: list[tuple[dict, dict] | CXRInputError] = []
        for idx, request in enumerate(requests):
            try:
                images, options = split_request(request, self.pipeline.extra_images)
                parsed.append((images, {**self._header_options(idx), **options}))
            except CXRInputError as err:
                parsed.append(err)
        return self.pipeline.make_items(parsed)

    def _attach_monitor(self, config: dict) -> None:
        """The drift monitor (:mod:`cxrserve.core.monitor`) as a pipeline observer, and a shadow
        candidate (:mod:`cxrserve.core.shadow`) when a shadow store is configured."""
        from cxrserve.core import monitor

        try:
            monitor.attach(self.pipeline, config)
            from cxrserve.core.loading import load_pipeline
            from cxrserve.core.shadow import attach_shadow

            # a candidate of the same model from $CXRSERVE_SHADOW_STORE scores beside it, never answering
            device = "cpu" if self.pipeline.device.type == "cpu" else "auto"
            attach_shadow(self.pipeline, config, lambda mar: load_pipeline(mar, device=device))
        except Exception:
            log.warning("drift monitor not attached", exc_info=True)

    def inference(self, items: list[Item | CXRInputError], *args, **kwargs) -> list[dict | CXRInputError]:
        return self.pipeline.predict(items)

    def postprocess(self, results: list[dict | CXRInputError]) -> list[dict]:
        responses = []
        for idx, result in enumerate(results):
            if isinstance(result, CXRInputError):
                self.context.set_response_status(result.status, HTTP_PHRASES.get(result.status, "Error"), idx)
                # Log the kind of failure, never file contents or header values.
                log.info("request %d rejected: %s %s", idx, result.status, result.code)
                responses.append(result.to_dict())
            else:
                responses.append(result)
        self._emit_metrics(results)
        return responses

    def _emit_metrics(self, results) -> None:
        """Stage timings, requests by status, gate rejections, score histograms, drift gauges (servemetrics)."""
        from cxrserve.core.monitor import MONITORS
        from cxrserve.core.servemetrics import batch_metrics, emit, monitor_metrics

        metrics = getattr(self.context, "metrics", None)
        timings = self.pipeline.timer.reset()
        if metrics is None:
            return
        try:
            emit(metrics, batch_metrics(results, timings, self.pipeline.score_maps))
        except Exception:  # metrics must never fail a request that was answered
            log.exception("could not emit metrics")
        try:
            emit(metrics, monitor_metrics(MONITORS))
        except Exception:
            log.exception("could not emit drift metrics")

    def describe_handle(self) -> dict:
        return self.pipeline.describe()
