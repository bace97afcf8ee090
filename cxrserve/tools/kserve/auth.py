"""Bearer-token authentication for the predictor off a cluster (``--token-file``).

On a cluster the InferenceService sits behind the cluster's ingress and its
authentication (Istio ``AuthorizationPolicy`` / ``RequestAuthentication``, see
``deploy/kserve-native/``), which is how KServe predictors are secured. Off a cluster,
``--token-file`` (a file holding one token) makes every call but the health checks and
``/metrics`` need ``Authorization: Bearer <token>`` (REST header or gRPC metadata):
401 / ``UNAUTHENTICATED`` otherwise.
"""
from __future__ import annotations

from pathlib import Path

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
