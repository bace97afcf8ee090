"""The ``kserve`` SDK's ModelServer with cxrserve's routes: REST and gRPC on ``--host``.

Both servers bind ``host`` (the SDK binds all interfaces; the container passes 0.0.0.0).
What this module changes in the SDK (kserve 0.21):

* its REST binary-tensor decoder turns every BYTES element into a UTF-8 string, so any
  image sent with the binary extension (tritonclient's default for BYTES) fails with a
  500 that echoes the bytes. The ``infer`` routes here are registered before the SDK's
  and keep BYTES raw (:func:`~cxrserve.tools.kserve.protocol.parse_binary_request`);
  they also count the body as it arrives and answer 413 at the limit;
* its model-repository extension (``/v2/repository/models/<m>/load|unload``, gRPC
  ``RepositoryModelLoad/Unload``) lets any caller unload a model: refused here (403 /
  ``PERMISSION_DENIED``), like TorchServe's ``enable_model_api=false``;
* input errors become the project's error body with their HTTP status, and over gRPC
  their code (:data:`~cxrserve.tools.kserve.protocol.GRPC_CODES`) with the body as details
  and ``cxr-http-status`` / ``cxr-error`` trailing metadata;
* ``GET /v2/models/<m>/config`` (tritonclient ``get_model_config``) describes the pipeline:
  options with defaults and help, component cards, input gate, batching.
"""
# No ``from __future__ import annotations``: FastAPI reads the routes' parameter annotations
# (``request: Request``, imported inside install_routes) as objects, not strings.
import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor

from cxrserve.core.errors import CXRInputError, MalformedInput, PayloadTooLarge
from cxrserve.tools.kserve.auth import grpc_token_interceptor
from cxrserve.tools.kserve.model import import_kserve
from cxrserve.tools.kserve.protocol import grpc_code_name, parse_binary_request

log = logging.getLogger(__name__)


def error_response(err: CXRInputError, close: bool = False):
    from fastapi.responses import JSONResponse

    # close: the rest of an over-limit body is never read, so the connection cannot be reused
    return JSONResponse(status_code=err.status, content=err.to_dict(), headers={"Connection": "close"} if close else None)


def install_routes(app, server, max_body: int) -> None:
    """Routes registered before the SDK's own (first match wins), and the error handler."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response

    from kserve.errors import ModelNotReady
    from kserve.protocol.rest.v2_datamodels import InferenceRequest

    app.add_exception_handler(CXRInputError, lambda request, err: error_response(err))

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
            return error_response(PayloadTooLarge(
                f"request of {int(declared)} bytes is over this server's {max_body}-byte limit"), close=True)
        # Counted as it arrives: a chunked (or lying) upload is refused at the limit, not after
        # the whole body has been buffered.
        chunks, received = [], 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_body:
                return error_response(PayloadTooLarge(f"request body is over the {max_body}-byte limit"),
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


def build_server(host: str, http_port: int, grpc_port: int, *, max_message: int, grpc_threads: int = 4,
                 token: str | None = None):
    """A ``kserve.ModelServer`` whose REST and gRPC servers bind ``host`` (the SDK binds all)."""
    kserve = import_kserve()
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
