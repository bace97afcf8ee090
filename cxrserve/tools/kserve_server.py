"""KServe-native predictor: every pipeline in a model store, served by the ``kserve`` SDK.

``cxrserve kserve --store model_store --http-port 8090 --grpc-port 8091`` loads each
archive of the store (a ``.mar``, unpacked once into a cache folder keyed by its size
and mtime, or an already unpacked folder holding ``pipeline.json``) with
:func:`cxrserve.core.pipeline.load_pipeline`, wraps it in a :class:`CXRModel`
(``kserve.Model``) and serves them all with ``kserve.ModelServer``: the Open Inference
Protocol (v2) over REST and gRPC, without TorchServe.

Protocol (REST paths; the gRPC ``GRPCInferenceService`` has the same calls):

==================================  ==============================================================
``GET /v2/health/live``, ``ready``  server live / ready (no auth: probes)
``GET /v2``                         server metadata
``GET /v2/models/<m>[/ready]``      model metadata (inputs: ``image``, extra images, one optional
                                    input per option with its v2 datatype) / model ready
``GET /v2/models/<m>/config``       the pipeline's description: options with defaults and help,
                                    component cards, input gate (tritonclient ``get_model_config``)
``POST /v2/models/<m>/infer``       one study: ``image`` BYTES ``[1]`` (base64 in JSON, raw bytes
                                    with the binary tensor extension or gRPC), ``prior`` likewise,
                                    options as request ``parameters`` or as BOOL/BYTES/FP64 inputs
                                    (inputs win). Answer: output ``response``, BYTES ``[1]``, the
                                    model's JSON response as UTF-8 text (the same body TorchServe
                                    answers)
``GET /metrics``                    Prometheus: the SDK's request latencies plus ``cxrserve_*``
==================================  ==============================================================

Errors: a request's own input error is answered with the project's error body
(``{"error": code, "status", "message", "detail"}``) and

=====  ======================  ==========================================================
HTTP   gRPC code               when
=====  ======================  ==========================================================
400    ``INVALID_ARGUMENT``    malformed request, bad base64, bad option value
413    ``RESOURCE_EXHAUSTED``  too many bytes or pixels (gRPC's own code for an over-size
                               message; not worth retrying: the same input fails again)
415    ``INVALID_ARGUMENT``    not DICOM/PNG/JPEG (the trailing metadata tells 415)
422    ``FAILED_PRECONDITION`` a valid image that is not a frontal CXR: the request is well
                               formed, the input is not in the state the model requires
=====  ======================  ==========================================================

Over gRPC the status details are the JSON error body, and the trailing metadata carries
``cxr-http-status`` and ``cxr-error`` (the code), so 400 and 415 stay distinguishable.

Batching: concurrent requests for one model are gathered by :class:`MicroBatcher` into
one ``pipeline.predict`` call (up to the archive's ``batchSize``, waiting at most its
``maxBatchDelay`` for the batch to fill, like TorchServe); each request still gets its
own answer, and if a whole batch fails its requests are retried one by one so a bug
triggered by one input does not fail its neighbours.

Two workarounds for the SDK (kserve 0.21), both in this module:

* its REST binary-tensor decoder turns every BYTES element into a UTF-8 string, so any
  image sent with the binary extension (tritonclient's default for BYTES) fails with a
  500 that echoes the bytes. The ``infer`` routes here are registered before the SDK's
  and keep BYTES raw;
* its model-repository extension (``/v2/repository/models/<m>/load|unload``, gRPC
  ``RepositoryModelLoad/Unload``) lets any caller unload a model: refused here (403 /
  ``PERMISSION_DENIED``), like TorchServe's ``enable_model_api=false``.

Security: both servers bind ``--host`` (default 127.0.0.1; the container passes 0.0.0.0).
On a cluster the InferenceService sits behind the cluster's ingress and its
authentication (Istio ``AuthorizationPolicy`` / ``RequestAuthentication``, see
``deploy/kserve-native/``), which is how KServe predictors are secured. Off a cluster,
``--token-file`` (a file holding one token) makes every call but the health checks and
``/metrics`` need ``Authorization: Bearer <token>`` (REST header or gRPC metadata):
401 / ``UNAUTHENTICATED`` otherwise. Logs name the kind of failure, never file contents,
option values or patient data.
"""

import argparse
import asyncio
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cxrserve.core.errors import CXRInputError, MalformedInput, PayloadTooLarge

log = logging.getLogger(__name__)

#: Input errors -> gRPC status code names (see module docstring).
GRPC_CODES = {400: "INVALID_ARGUMENT", 413: "RESOURCE_EXHAUSTED", 415: "INVALID_ARGUMENT",
              422: "FAILED_PRECONDITION"}
OUTPUT_NAME = "response"
#: v2 request parameters that belong to the protocol, never options.
PROTOCOL_PARAMETERS = {"binary_data_output", "binary_data", "binary_data_size", "content_type", "headers"}
DEFAULT_MAX_BATCH = 8
DEFAULT_DELAY_MS = 5.0


def grpc_code_name(status: int) -> str:
    return GRPC_CODES.get(status, "INVALID_ARGUMENT" if 400 <= status < 500 else "INTERNAL")


# --------------------------------------------------------------------------- model store
@dataclass
class ModelSpec:
    name: str
    folder: Path
    max_batch: int = DEFAULT_MAX_BATCH
    max_delay_ms: float = DEFAULT_DELAY_MS
    device: str = "auto"


def _cache_root() -> Path:
    return Path(os.environ.get("CXRSERVE_CACHE") or Path.home() / ".cache" / "cxrserve")


def unpack_once(mar: Path, unpack_dir: Path | None = None) -> Path:
    """Unpack ``mar`` into ``unpack_dir/<name>-<key>`` unless already there; returns the folder.

    The key hashes the archive's path, size and mtime, so a rebuilt archive is unpacked
    again; unpacking goes to a temporary folder renamed into place, so two servers
    starting together do not see a half-written folder.
    """
    from cxrserve.core.files import unpack_archive

    stat = mar.stat()
    key = hashlib.sha256(f"{mar.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    root = Path(unpack_dir) if unpack_dir else _cache_root() / "kserve"
    target = root / f"{mar.stem}-{key}"
    if (target / "pipeline.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{mar.stem}-", dir=root))
    import re
    import shutil

    unpack_archive(mar, tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    # Older unpackings of this archive (rebuilt since) would pile up: 30-180 MB each.
    stale = re.compile(rf"^{re.escape(mar.stem)}-[0-9a-f]{{12}}$")
    for old in root.iterdir():
        if old != target and stale.match(old.name):
            shutil.rmtree(old, ignore_errors=True)
    return target


def _model_config(folder: Path) -> dict:
    import yaml

    path = folder / "model-config.yaml"
    manifest = folder / "MAR-INF" / "MANIFEST.json"
    if manifest.exists():
        name = json.loads(manifest.read_text())["model"].get("configFile")
        if name:
            path = folder / name
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def discover(store: str | Path, models: list[str] | None = None, unpack_dir: str | Path | None = None,
             device: str | None = None) -> list[ModelSpec]:
    """The models of ``store``: ``*.mar`` archives and unpacked folders with ``pipeline.json``."""
    store = Path(store)
    if not store.is_dir():
        raise FileNotFoundError(f"model store {store} is not a folder")
    found: dict[str, Path] = {}
    for path in sorted(store.iterdir()):
        if path.suffix == ".mar" and path.is_file():
            found.setdefault(path.stem, path)
        elif path.is_dir() and (path / "pipeline.json").exists():
            found[path.name] = path  # an unpacked folder wins over an archive of the same name
    if models:
        missing = sorted(set(models) - set(found))
        if missing:
            raise FileNotFoundError(f"not in {store}: {', '.join(missing)} (has: {', '.join(sorted(found))})")
        found = {k: v for k, v in found.items() if k in models}
    if not found:
        raise FileNotFoundError(f"no .mar archives or unpacked model folders in {store}")
    specs = []
    for name, path in found.items():
        folder = unpack_once(path, Path(unpack_dir) if unpack_dir else None) if path.suffix == ".mar" else path
        config = _model_config(folder)
        device_type = str(config.get("deviceType", "auto")).lower()
        specs.append(ModelSpec(
            name=json.loads((folder / "pipeline.json").read_text()).get("name", name),
            folder=folder,
            max_batch=max(1, int(config.get("batchSize", DEFAULT_MAX_BATCH))),
            max_delay_ms=float(config.get("maxBatchDelay", DEFAULT_DELAY_MS)),
            device=device or {"cpu": "cpu", "gpu": "cuda"}.get(device_type, "auto"),
        ))
    return specs


# --------------------------------------------------------------------------- v2 <-> pipeline
def _values(inp) -> list:
    """Elements of a kserve ``InferInput``, BYTES kept as ``bytes`` (raw) or ``str`` (JSON)."""
    import numpy as np

    if getattr(inp, "_raw_data", None) is not None:
        return [v.item() if hasattr(v, "item") else v for v in np.asarray(inp.as_numpy()).reshape(-1)]
    data = inp.data
    if data is None:
        return []
    if hasattr(data, "tolist"):
        data = data.tolist()
    out: list = []

    def flat(value):
        if isinstance(value, (list, tuple)):
            for v in value:
                flat(v)
        else:
            out.append(value)

    flat(data)
    return out


def _parameters(params) -> dict:
    """v2 request parameters (REST: plain values; gRPC: ``InferParameter`` oneofs) as options."""
    out = {}
    for key, value in (params or {}).items():
        if hasattr(value, "WhichOneof"):  # gRPC: bool / int64 / string / double / uint64
            field = value.WhichOneof("parameter_choice")
            if field is None:
                continue
            value = getattr(value, field)
        if key not in PROTOCOL_PARAMETERS:
            out[key] = value
    return out


def request_to_study(request, extra_images: tuple[str, ...]) -> tuple[dict[str, bytes], dict]:
    """A v2 ``InferRequest`` -> ``({"image": bytes, ...}, raw options)`` for ``Pipeline.make_item``.

    Reuses :func:`cxrserve.core.kserve.merge_v2_inputs` (the TorchServe envelope's parser), so
    both engines read the same requests the same way.
    """
    from cxrserve.core.kserve import IMAGE_NAMES, merge_v2_inputs

    if not hasattr(request, "inputs"):
        raise MalformedInput("send an Open Inference Protocol (v2) request to /v2/models/<model>/infer")
    entries = []
    for inp in request.inputs:
        values = _values(inp)
        if inp.name in IMAGE_NAMES or inp.name in extra_images:
            if inp.datatype != "BYTES":
                raise MalformedInput(f"input {inp.name!r} must be BYTES (the file), got {inp.datatype}")
            if len(values) != 1:
                raise MalformedInput(f"input {inp.name!r} holds {len(values)} elements: send one study per "
                                     "request (shape [1]); concurrent requests are batched by the server")
        elif len(values) != 1:
            raise MalformedInput(f"option input {inp.name!r} must hold exactly one value, got {len(values)}")
        entries.append({"name": inp.name, "datatype": inp.datatype, "data": values})
    images, options = merge_v2_inputs(entries, extra_images)
    return images, {**_parameters(getattr(request, "parameters", None)), **options}


def option_datatype(default: Any) -> str:
    if isinstance(default, bool):
        return "BOOL"
    if isinstance(default, (int, float)):
        return "FP64"
    return "BYTES"


# --------------------------------------------------------------------------- batching
class MicroBatcher:
    """Gathers concurrent submissions into one call of ``fn(list) -> list`` on one thread.

    The first waiting item opens a batch; the batch closes when it holds ``max_batch``
    items or ``max_delay`` seconds have passed since it opened. Items that arrive while
    a batch runs form the next one. ``fn`` runs on a single worker thread (a pipeline
    is not re-entrant), off the event loop.
    """

    def __init__(self, fn: Callable[[list], list], max_batch: int, max_delay_s: float, name: str = "",
                 on_batch: Callable[[int], None] | None = None):
        self.fn, self.max_batch, self.max_delay = fn, max(1, max_batch), max(0.0, max_delay_s)
        self.on_batch = on_batch
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"batch-{name}")
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    async def submit(self, item):
        loop = asyncio.get_running_loop()
        if self._queue is None or self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = loop.create_task(self._run())
        future = loop.create_future()
        await self._queue.put((item, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.max_delay
            while len(batch) < self.max_batch:
                try:
                    batch.append(queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            batch = [(item, fut) for item, fut in batch if not fut.done()]  # cancelled callers
            if not batch:
                continue
            if self.on_batch:
                self.on_batch(len(batch))
            items = [item for item, _ in batch]
            try:
                results = await loop.run_in_executor(self.executor, self.fn, items)
            except Exception as err:  # noqa: BLE001 - isolate: retry each item alone
                if len(items) == 1:
                    results = [err]
                else:
                    log.warning("batch of %d failed (%s): retrying its requests one by one", len(items),
                                type(err).__name__)
                    results = []
                    for item in items:
                        try:
                            results.append((await loop.run_in_executor(self.executor, self.fn, [item]))[0])
                        except Exception as one:  # noqa: BLE001
                            results.append(one)
            for (_, fut), result in zip(batch, results):
                if fut.done():
                    continue
                if isinstance(result, Exception) and not isinstance(result, CXRInputError):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)


# --------------------------------------------------------------------------- metrics
class Metrics:
    """``cxrserve_*`` Prometheus metrics from :func:`cxrserve.core.servemetrics.batch_metrics` records."""

    def __init__(self):
        from prometheus_client import Histogram

        self._made: dict[tuple, Any] = {}
        self.batch_size = Histogram("cxrserve_batch_size", "requests per pipeline.predict call", ["model"],
                                    buckets=(1, 2, 4, 8, 16, 32))

    def _metric(self, record, model: str):
        from prometheus_client import Counter, Histogram

        dims = tuple(k.lower() for k, _ in record.dims)
        if record.kind == "time":
            key = ("cxrserve_stage_seconds", ("model", "stage"))
        else:
            snake = "".join(("_" + c.lower()) if c.isupper() else c for c in record.name).lstrip("_")
            key = (f"cxrserve_{snake.replace('c_x_r_', '')}", ("model", *dims))
        metric = self._made.get(key)
        if metric is None:
            name, labels = key
            if record.kind == "time":
                metric = Histogram(name, "seconds per pipeline stage and batch", labels,
                                   buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
            elif record.kind == "counter":
                metric = Counter(name, f"{record.name} (see cxrserve.core.servemetrics)", labels)
            else:
                metric = Histogram(name, f"{record.name} (see cxrserve.core.servemetrics)", labels,
                                   buckets=(.05, .1, .2, .3, .4, .5, .6, .7, .8, .9, .95, 1.0, 2, 5, 10))
            self._made[key] = metric
        return metric

    def observe(self, model: str, results: list, timings: dict[str, float]) -> None:
        from cxrserve.core.servemetrics import batch_metrics

        try:
            for record in batch_metrics(results, timings):
                metric = self._metric(record, model)
                if record.kind == "time":
                    metric.labels(model, record.name[len("Stage_"):]).observe(record.value / 1000.0)
                    continue
                child = metric.labels(model, *(v for _, v in record.dims))
                if record.kind == "counter":
                    child.inc(record.value)
                else:
                    child.observe(record.value)
        except Exception:  # metrics never fail an answered request
            log.exception("could not record metrics")


_METRICS: Metrics | None = None


def metrics() -> Metrics:
    global _METRICS
    if _METRICS is None:
        _METRICS = Metrics()
    return _METRICS


# --------------------------------------------------------------------------- the model
def make_model_class():
    """``CXRModel`` is defined lazily: importing ``kserve`` parses ``sys.argv`` (see :func:`_import_kserve`)."""
    kserve = _import_kserve()
    from kserve.protocol.infer_type import InferOutput, InferResponse

    class CXRModel(kserve.Model):
        """One pipeline as a ``kserve.Model``: v2 request -> micro-batched ``pipeline.predict``."""

        def __init__(self, spec: ModelSpec, pipeline, *, max_batch: int | None = None,
                     max_delay_ms: float | None = None):
            super().__init__(spec.name)
            self.spec, self.pipeline = spec, pipeline
            self.batcher = MicroBatcher(self._predict_batch, max_batch or spec.max_batch,
                                        (spec.max_delay_ms if max_delay_ms is None else max_delay_ms) / 1000.0,
                                        spec.name, on_batch=lambda n: metrics().batch_size.labels(spec.name).observe(n))
            self.decoder = ThreadPoolExecutor(2, thread_name_prefix=f"decode-{spec.name}")
            self.ready = True

        def load(self) -> bool:
            self.ready = True
            return True

        def get_input_types(self) -> list[dict]:
            from cxrserve.core.pipeline import FULL_RESOLUTION

            inputs = [{"name": "image", "datatype": "BYTES", "shape": [1]}]
            inputs += [{"name": name, "datatype": "BYTES", "shape": [1]} for name in self.pipeline.extra_images]
            inputs += [{"name": key, "datatype": option_datatype(opt.default), "shape": [1]}
                       for key, opt in self.pipeline.OPTIONS.items()]
            inputs.append({"name": FULL_RESOLUTION, "datatype": "BOOL", "shape": [1]})  # every pipeline's
            return inputs

        def get_output_types(self) -> list[dict]:
            return [{"name": OUTPUT_NAME, "datatype": "BYTES", "shape": [1]}]

        def _predict_batch(self, items: list) -> list:
            results = self.pipeline.predict(items)
            metrics().observe(self.name, results, self.pipeline.timer.reset())
            return results

        def _make_item(self, request):
            images, options = request_to_study(request, self.pipeline.extra_images)
            return self.pipeline.make_item(images, options)

        async def predict(self, payload, headers=None):
            loop = asyncio.get_running_loop()
            try:
                item = await loop.run_in_executor(self.decoder, self._make_item, payload)
            except CXRInputError as err:
                metrics().observe(self.name, [err], {})
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


def _import_kserve():
    """``import kserve`` without letting it parse our command line (it calls ``parse_known_args``)."""
    if "kserve" in sys.modules:
        return sys.modules["kserve"]
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        import kserve
    finally:
        sys.argv = argv
    return kserve


# --------------------------------------------------------------------------- REST routes
def _error_response(err: CXRInputError, close: bool = False):
    from fastapi.responses import JSONResponse

    # close: the rest of an over-limit body is never read, so the connection cannot be reused
    return JSONResponse(status_code=err.status, content=err.to_dict(), headers={"Connection": "close"} if close else None)


def parse_binary_request(body: bytes, json_length: int, model_name: str):
    """A v2 REST request with the binary tensor extension, BYTES elements kept as bytes."""
    import orjson
    from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput

    if json_length < 0 or json_length > len(body):
        raise MalformedInput(f"Inference-Header-Content-Length {json_length} does not fit the {len(body)}-byte body")
    try:
        header = orjson.loads(body[:json_length])
        offset, inputs = json_length, []
        for spec in header["inputs"]:
            params = dict(spec.get("parameters") or {})
            inp = InferInput(name=spec["name"], shape=list(spec["shape"]), datatype=spec["datatype"],
                             parameters=params)
            if spec.get("data") is not None:
                inp.data = spec["data"]
            elif "binary_data_size" in params:
                size = int(params["binary_data_size"])
                if size < 0 or offset + size > len(body):
                    raise MalformedInput(f"input {inp.name!r}: binary_data_size {size} runs past the body")
                inp._raw_data = body[offset:offset + size]
                offset += size
            else:
                raise MalformedInput(f"input {inp.name!r} has neither data nor binary_data_size")
            inputs.append(inp)
        outputs = [RequestedOutput(name=o["name"], parameters=o.get("parameters")) for o in header.get("outputs") or []]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        if isinstance(err, CXRInputError):
            raise
        raise MalformedInput(f"malformed v2 binary request: {type(err).__name__}: {str(err)[:200]}") from None
    if offset != len(body):
        raise MalformedInput(f"{len(body) - offset} bytes after the last binary input")
    return InferRequest(model_name=model_name, infer_inputs=inputs, request_id=header.get("id"),
                        parameters=header.get("parameters"), request_outputs=outputs or None)


def install_routes(app, server, max_body: int) -> None:
    """Routes registered before the SDK's own (first match wins), and the error handler."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response

    from kserve.errors import ModelNotReady
    from kserve.protocol.rest.v2_datamodels import InferenceRequest

    app.add_exception_handler(CXRInputError, lambda request, err: _error_response(err))

    async def infer(request: Request, model_name: str, model_version: str | None = None):
        import orjson
        from kserve.protocol.infer_type import InferRequest

        dataplane = server.dataplane
        if not await dataplane.model_ready(model_name, True):
            raise ModelNotReady(model_name)
        if model_version is not None:
            served = server.registered_models.get_model(model_name).pipeline.version
            if model_version != served:
                return JSONResponse(status_code=404, content={
                    "error": f"model {model_name} version {model_version} not served (serving {served})"})
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body:
            return _error_response(PayloadTooLarge(
                f"request of {int(declared)} bytes is over this server's {max_body}-byte limit"), close=True)
        # Counted as it arrives: a chunked (or lying) upload is refused at the limit, not after
        # the whole body has been buffered.
        chunks, received = [], 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_body:
                return _error_response(PayloadTooLarge(f"request body is over the {max_body}-byte limit"),
                                       close=True)
            chunks.append(chunk)
        body = b"".join(chunks)
        del chunks
        headers = dict(request.headers)
        json_length = headers.get("inference-header-content-length")
        if json_length is not None:
            if not json_length.strip().isdigit():
                raise MalformedInput("Inference-Header-Content-Length must be a byte count")
            infer_request = parse_binary_request(body, int(json_length), model_name)
        else:
            try:
                parsed = InferenceRequest.model_validate(orjson.loads(body))
            except orjson.JSONDecodeError as err:
                raise MalformedInput(f"request body is not JSON: {err}") from None
            except Exception as err:  # pydantic ValidationError: not a v2 request
                raise MalformedInput("not an Open Inference Protocol (v2) request: "
                                     + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                                 for e in getattr(err, "errors", lambda: [])()[:5])) from None
            infer_request = InferRequest.from_inference_request(parsed, model_name)
        response, response_headers = await dataplane.infer(model_name=model_name, request=infer_request,
                                                           headers=headers)
        response, extra = dataplane.encode(model_name=model_name, response=response, headers=headers,
                                           req_attributes={})
        response_headers = {**response_headers, **extra}
        response_headers.pop("content-length", None)
        response_headers.pop("content-type", None)
        if isinstance(response, bytes):
            return Response(content=response, headers=response_headers, media_type="application/octet-stream")
        return JSONResponse(content=response, headers=response_headers)

    async def infer_version(request: Request, model_name: str, model_version: str):
        return await infer(request, model_name, model_version)

    async def config(model_name: str):
        from kserve.errors import ModelNotFound

        model = server.registered_models.get_model(model_name)
        if model is None:
            raise ModelNotFound(model_name)
        return JSONResponse(content={"name": model_name, **model.pipeline.describe(),
                                     "max_batch_size": model.batcher.max_batch,
                                     "max_batch_delay_ms": model.batcher.max_delay * 1000.0,
                                     "inputs": model.get_input_types(), "outputs": model.get_output_types()})

    async def refused(model_name: str):
        return JSONResponse(status_code=403, content={
            "error": "model control is disabled on this server: models come from --store at start"})

    app.add_api_route("/v2/models/{model_name}/infer", infer, methods=["POST"])
    app.add_api_route("/v2/models/{model_name}/versions/{model_version}/infer", infer_version, methods=["POST"])
    app.add_api_route("/v2/models/{model_name}/config", config, methods=["GET"])
    app.add_api_route("/v2/repository/models/{model_name}/load", refused, methods=["POST"])
    app.add_api_route("/v2/repository/models/{model_name}/unload", refused, methods=["POST"])


# --------------------------------------------------------------------------- token auth
#: Calls that stay open with --token-file: probes and Prometheus scraping answer nothing else.
OPEN_PATHS = {"/v2/health/live", "/v2/health/ready", "/metrics", "/"}
OPEN_GRPC = {"ServerLive", "ServerReady"}


def read_token(path: str | Path) -> str:
    lines = Path(path).read_text().strip().splitlines()
    token = lines[0].strip() if lines else ""
    if len(token) < 16:
        raise ValueError(f"{path}: the token must be at least 16 characters")
    return token


def bearer_ok(header: str | None, token: str) -> bool:
    import hmac

    if not header or not header.lower().startswith("bearer "):
        return False
    return hmac.compare_digest(header[7:].strip().encode(), token.encode())


def install_rest_auth(app, token: str) -> None:
    from fastapi.responses import JSONResponse

    @app.middleware("http")
    async def require_token(request, call_next):
        if request.url.path in OPEN_PATHS or bearer_ok(request.headers.get("authorization"), token):
            return await call_next(request)
        return JSONResponse(status_code=401, content={"error": "unauthenticated", "status": 401,
                                                      "message": "missing or wrong bearer token"})


def grpc_token_interceptor(token: str):
    import grpc
    from grpc import aio

    async def deny(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    async def deny_stream(requests, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        yield  # pragma: no cover  (makes this an async generator)

    class TokenInterceptor(aio.ServerInterceptor):
        async def intercept_service(self, continuation, details):
            method = details.method.rsplit("/", 1)[-1]
            header = dict(details.invocation_metadata or ()).get("authorization")
            if method in OPEN_GRPC or bearer_ok(header, token):
                return await continuation(details)
            if method == "ModelStreamInfer":
                return grpc.stream_stream_rpc_method_handler(deny_stream)
            return grpc.unary_unary_rpc_method_handler(deny)

    return TokenInterceptor()


# --------------------------------------------------------------------------- servers
def build_server(host: str, http_port: int, grpc_port: int, *, max_message: int, grpc_threads: int = 4,
                 token: str | None = None):
    """A ``kserve.ModelServer`` whose REST and gRPC servers bind ``host`` (the SDK binds all)."""
    kserve = _import_kserve()
    import grpc
    from grpc import aio
    from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
    from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
    from kserve.protocol.grpc.server import GRPCServer
    from kserve.protocol.grpc.servicer import InferenceServicer
    from kserve.protocol.rest.server import RESTServer

    class CXRExceptionInterceptor(ExceptionToStatusInterceptor):
        async def handle_exception(self, ex, request_or_iterator, context, method_name):
            if isinstance(ex, CXRInputError):
                code = getattr(grpc.StatusCode, grpc_code_name(ex.status))
                await context.abort(code, json.dumps(ex.to_dict()),
                                    trailing_metadata=(("cxr-http-status", str(ex.status)), ("cxr-error", ex.code)))
            await super().handle_exception(ex, request_or_iterator, context, method_name)

    class CXRServicer(InferenceServicer):
        async def RepositoryModelLoad(self, request, context):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "model control is disabled on this server")

        async def RepositoryModelUnload(self, request, context):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "model control is disabled on this server")

    class CXRGRPCServer(GRPCServer):
        async def start(self, max_workers):
            self._server = aio.server(
                ThreadPoolExecutor(max_workers=max_workers),
                interceptors=((grpc_token_interceptor(token),) if token else ())
                + (LoggingInterceptor(), CXRExceptionInterceptor()),
                options=[("grpc.max_send_message_length", max_message),
                         ("grpc.max_receive_message_length", max_message)])
            grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
                CXRServicer(self._data_plane, self._model_repository_extension), self._server)
            bound = self._server.add_insecure_port(f"{_grpc_host(host)}:{self._port}")
            if not bound:
                raise OSError(f"cannot bind gRPC to {host}:{self._port}")
            log.info("gRPC (Open Inference Protocol) on %s:%d", host, self._port)
            await self._server.start()
            await self._server.wait_for_termination()

    class CXRModelServer(kserve.ModelServer):
        def start(self, models) -> None:
            self._register_and_check_atleast_one_model_is_ready(models)
            self._rest_server = RESTServer(FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension,
                                           self.http_port, access_log_format=self.access_log_format, workers=1,
                                           grace_period=self.grace_period, event_loop=self.event_loop,
                                           timeout_keep_alive=self.timeout_keep_alive)
            self._rest_server.config.host = host
            self.servers.append(self._rest_server.start())
            self._grpc_server = CXRGRPCServer(self.grpc_port, self.dataplane, self.model_repository_extension,
                                              kwargs={}, grace_period=self.grace_period)
            self.servers.append(self._grpc_server.start(self.max_threads))
            self.setup_event_loop()
            self.register_signal_handler()
            asyncio.run(self._serve())

    server = CXRModelServer(http_port=http_port, grpc_port=grpc_port, workers=1, max_threads=grpc_threads,
                            enable_grpc=True, enable_docs_url=False, enable_latency_logging=False, grace_period=5)
    from cxrserve import __version__

    sdk = server.dataplane.metadata()["version"]
    # The SDK advertises model_repository_extension, which this server refuses (see docstring).
    server.dataplane.metadata = lambda: {"name": "cxrserve", "version": f"{__version__} (kserve {sdk})",
                                         "extensions": ["binary_tensor_data", "model_configuration"]}
    return server


def _grpc_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def load_models(specs: list[ModelSpec], *, max_batch: int | None = None, max_delay_ms: float | None = None) -> list:
    from cxrserve.core.pipeline import load_pipeline

    CXRModel = make_model_class()
    models = []
    for spec in specs:
        start = time.perf_counter()
        pipeline = load_pipeline(spec.folder, device=spec.device)
        models.append(CXRModel(spec, pipeline, max_batch=max_batch, max_delay_ms=max_delay_ms))
        log.info("%s ready on %s (backend %s, version %s) in %.1f s", spec.name, pipeline.device, pipeline.backend,
                 pipeline.version, time.perf_counter() - start)
    return models


def serve(args) -> int:
    specs = discover(args.store, args.models, args.unpack_dir, args.device)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    models = load_models(specs, max_batch=args.max_batch, max_delay_ms=args.max_batch_delay_ms)
    max_bytes = max(m.pipeline.limits.max_bytes for m in models)
    # base64 in JSON grows files by 4/3; leave room for the request's own JSON.
    max_body = max_bytes * 4 // 3 + (1 << 20)
    token = read_token(args.token_file) if args.token_file else None
    server = build_server(args.host, args.http_port, args.grpc_port, max_message=max_bytes + (1 << 20),
                          grpc_threads=args.grpc_threads, token=token)
    from kserve.model_server import app

    install_routes(app, server, max_body)
    if token:
        install_rest_auth(app, token)
    elif args.host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("serving on %s without --token-file: put the cluster's authentication in front", args.host)
    print(f"cxrserve kserve: serving {', '.join(m.name for m in models)} on http://{args.host}:{args.http_port} "
          f"(REST) and {args.host}:{args.grpc_port} (gRPC)", flush=True)
    server.start(models)
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("kserve", help="serve the store with the KServe SDK (Open Inference Protocol, "
                                             "REST + gRPC), without TorchServe")
    p.add_argument("--store", default="model_store", help="folder of .mar archives and/or unpacked model folders")
    p.add_argument("--models", nargs="+", help="serve only these (default: all in the store)")
    p.add_argument("--host", default="127.0.0.1", help="address both servers bind (0.0.0.0 in a container)")
    p.add_argument("--http-port", type=int, default=8080)
    p.add_argument("--grpc-port", type=int, default=8081)
    p.add_argument("--unpack-dir", help="where archives are unpacked once (default $CXRSERVE_CACHE/kserve, "
                                        "else ~/.cache/cxrserve/kserve)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"],
                   help="default: each archive's deviceType (cpu -> cpu, gpu -> cuda, else auto)")
    p.add_argument("--max-batch", type=int, help="requests per pipeline call (default: the archive's batchSize)")
    p.add_argument("--max-batch-delay-ms", type=float,
                   help="how long a batch waits to fill (default: the archive's maxBatchDelay)")
    p.add_argument("--token-file", help="require 'Authorization: Bearer <token>' (the file's first line) on every "
                                        "call but /v2/health/* and /metrics")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--grpc-threads", type=int, default=4)
    p.set_defaults(func=serve)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxrserve.tools.kserve_server")
    sub = parser.add_subparsers(dest="command", required=True)
    register_cli(sub)
    args = parser.parse_args(["kserve", *(argv if argv is not None else sys.argv[1:])])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
