"""One pipeline as a ``kserve.Model``: v2 request -> ``make_item`` -> micro-batched ``pipeline.predict``.

A new pipeline needs nothing here: its inputs are what it declares (extra images,
``OPTIONS``), and what ``pipeline.predict`` answers is served. Decoding runs on a small
thread pool per model, off the event loop, before the batcher; a request whose input is
refused there never reaches the pipeline. Logs name the kind of failure, never file
contents, option values or patient data.
"""
from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from cxrserve.core.errors import CXRInputError
from cxrserve.tools.kserve.batcher import MicroBatcher
from cxrserve.tools.kserve.metrics import Metrics
from cxrserve.tools.kserve.protocol import OUTPUT_NAME, model_inputs, model_outputs, request_to_study
from cxrserve.tools.kserve.repository import ModelSpec

log = logging.getLogger(__name__)


def import_kserve():
    """``import kserve`` without letting it parse our command line (it calls ``parse_known_args``)."""
    if "kserve" in sys.modules:
        return sys.modules["kserve"]
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        import kserve
    finally:
        sys.argv = argv
    return kserve


def make_model_class():
    """``CXRModel`` is defined lazily: importing ``kserve`` parses ``sys.argv`` (see :func:`import_kserve`)."""
    kserve = import_kserve()
    from kserve.protocol.infer_type import InferOutput, InferResponse

    class CXRModel(kserve.Model):
        """One pipeline as a ``kserve.Model``: v2 request -> micro-batched ``pipeline.predict``."""

        def __init__(self, spec: ModelSpec, pipeline, metrics: Metrics, *, max_batch: int | None = None,
                     max_delay_ms: float | None = None):
            super().__init__(spec.name)
            self.spec, self.pipeline, self.metrics = spec, pipeline, metrics
            self.batcher = MicroBatcher(self._predict_batch, max_batch or spec.max_batch,
                                        (spec.max_delay_ms if max_delay_ms is None else max_delay_ms) / 1000.0,
                                        spec.name, on_batch=lambda n: metrics.observe_batch(spec.name, n))
            self.decoder = ThreadPoolExecutor(2, thread_name_prefix=f"decode-{spec.name}")
            self.ready = True

        def load(self) -> bool:
            self.ready = True
            return True

        def get_input_types(self) -> list[dict]:
            return model_inputs(self.pipeline)

        def get_output_types(self) -> list[dict]:
            return model_outputs()

        def _predict_batch(self, items: list) -> list:
            results = self.pipeline.predict(items)
            self.metrics.observe(self.name, results, self.pipeline.timer.reset(), self.pipeline.score_maps)
            return results

        def _make_item(self, request):
            images, options = request_to_study(request, self.pipeline.extra_images)
            return self.pipeline.make_item(images, options)

        async def predict(self, payload, headers=None):
            loop = asyncio.get_running_loop()
            try:
                item = await loop.run_in_executor(self.decoder, self._make_item, payload)
            except CXRInputError as err:
                self.metrics.observe(self.name, [err], {})
                log.info("%s: request rejected before batching: %s %s", self.name, err.status, err.code)
                raise
            result = await self.batcher.submit(item)
            if isinstance(result, CXRInputError):
                log.info("%s: request rejected: %s %s", self.name, result.status, result.code)
                raise result
            text = json.dumps(result, separators=(",", ":"))
            return InferResponse(
                response_id=getattr(payload, "id", None) or "",
                model_name=self.name,
                model_version=self.pipeline.version,
                infer_outputs=[InferOutput(name=OUTPUT_NAME, shape=[1], datatype="BYTES", data=[text])],
                use_binary_outputs=bool(getattr(payload, "use_binary_outputs", False)),
                requested_outputs=getattr(payload, "request_outputs", None),
            )

    return CXRModel


def load_models(specs: list[ModelSpec], metrics: Metrics, *, max_batch: int | None = None,
                max_delay_ms: float | None = None) -> list:
    """Each spec's pipeline, loaded and wrapped; all of them record into ``metrics``."""
    from cxrserve.core.loading import load_pipeline

    CXRModel = make_model_class()
    models = []
    for spec in specs:
        start = time.perf_counter()
        pipeline = load_pipeline(spec.folder, device=spec.device, sites=spec.sites or None)
        models.append(CXRModel(spec, pipeline, metrics, max_batch=max_batch, max_delay_ms=max_delay_ms))
        log.info("%s ready on %s (backend %s, version %s) in %.1f s", spec.name, pipeline.device, pipeline.backend,
                 pipeline.version, time.perf_counter() - start)
    return models
