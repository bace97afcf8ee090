"""``CXRClient``: one ``predict`` call over TorchServe's REST or gRPC API or KServe v2.

* **Token**: from :class:`~cxrserve.tools.client.credentials.Credentials`; a call the
  server refuses for its token is tried once more after the token was refreshed, and only
  then fails with :class:`~cxrserve.tools.client.errors.AuthenticationError`.
* **Retries** with exponential backoff on 503/507 (gRPC ``UNAVAILABLE`` /
  ``RESOURCE_EXHAUSTED``) and on connection errors only; a 4xx is an answer about the
  input and is never retried.
* **Requests**: files go as the raw body with ``Content-Type: application/octet-stream``
  (labelled as a form, curl's default, TorchServe's HTTP layer parses the bytes as one
  and echoes them in its error) or as multipart when there is a ``prior``; options go as
  ``X-CXR-<option>`` headers over REST and as input fields over gRPC, since TorchServe
  never passes query strings to handlers.
"""
from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests

from cxrserve.tools.client.credentials import DEFAULT_MANAGEMENT, Credentials
from cxrserve.tools.client.errors import AuthenticationError, CXRServeError, InputRejected, ServerUnavailable

DEFAULT_REST = "http://127.0.0.1:8080"
DEFAULT_GRPC = "127.0.0.1:7070"
#: REST statuses and gRPC codes that mean "busy or restarting: try again".
RETRY_STATUSES = (503, 507)
RETRY_GRPC_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
#: rest: TorchServe's /predictions API; grpc: its gRPC API; kserve: the Open Inference
#: Protocol (v2) of a KServe InferenceService (deploy/kserve/).
PROTOCOLS = ("rest", "grpc", "kserve")


def _read(data: bytes | str | Path) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    return Path(data).read_bytes()


def _option_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _error_from_body(status: int, text: str) -> CXRServeError:
    try:
        body = json.loads(text) if text else {}
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    kind = body.get("type") or body.get("error") or ""
    message = str(body.get("message") or text[:300] or f"HTTP {status}")
    if kind == "InvalidKeyException" or status == 401:
        return AuthenticationError(message, status=401, code="unauthenticated", body=body)
    if 400 <= status < 500:
        return InputRejected(message, status=status, code=str(kind or "bad_request"), body=body)
    return CXRServeError(message, status=status, code=str(kind or "server_error"), body=body)


class CXRClient:
    """One client for REST and gRPC; thread-safe (one HTTP session / channel per thread)."""

    def __init__(self, url: str | None = None, *, protocol: str = "rest", token: str | None = None,
                 key_file: str | Path | None = None, management_url: str | None = None,
                 timeout: float = 120.0, retries: int = 4, backoff: float = 0.5, model_version: str | None = None):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        self.protocol = protocol
        self.url = (url or (DEFAULT_GRPC if protocol == "grpc" else DEFAULT_REST)).rstrip("/")
        if protocol == "grpc" and "://" in self.url:
            self.url = urlparse(self.url).netloc
        self.credentials = Credentials.resolve(token, key_file, management_url or DEFAULT_MANAGEMENT)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.model_version = model_version
        self._local = threading.local()
        self._channels: list = []
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- lifecycle
    def __enter__(self) -> "CXRClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            for channel in self._channels:
                channel.close()
            self._channels.clear()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def _grpc(self):
        stub = getattr(self._local, "stub", None)
        if stub is None:
            import grpc

            from cxrserve.tools.grpc_stubs import load_stubs

            stubs = load_stubs()
            # Up to the server's own max_request_size (DICOMs are large).
            opts = [("grpc.max_send_message_length", 64 * 2**20 + 4096),
                    ("grpc.max_receive_message_length", 64 * 2**20 + 4096)]
            channel = grpc.insecure_channel(self.url, options=opts)
            with self._lock:
                self._channels.append(channel)
            stub = self._local.stub = (stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel), stubs)
        return stub

    # ----------------------------------------------------------------- calls
    def predict(self, model: str, image: bytes | str | Path, *, prior: bytes | str | Path | None = None,
                version: str | None = None, options: dict | None = None,
                extra_images: dict[str, bytes | str | Path] | None = None, **kw_options) -> dict:
        """Score one study; returns the model's response dict.

        ``extra_images``: further images by request field (a model's ``extra_images``;
        ``prior`` is the common one and has its own argument).

        Raises:
            InputRejected: 4xx about the input (its ``status``: 400/413/415/422).
            AuthenticationError: wrong or expired token (after trying to refresh it).
            ServerUnavailable: no answer after ``retries`` attempts.
            CXRServeError: any other server error (5xx).
        """
        files = {"image": _read(image)}
        if prior is not None:
            files["prior"] = _read(prior)
        files.update({name: _read(data) for name, data in (extra_images or {}).items()})
        opts = {**(options or {}), **kw_options}
        version = version or self.model_version
        call = {"grpc": self._predict_grpc, "kserve": self._predict_kserve}.get(self.protocol, self._predict_rest)
        return self._with_retries(lambda: call(model, files, opts, version))

    def _with_retries(self, call):
        delay, attempt, refreshed = self.backoff, 0, False
        while True:
            seen = self.credentials.token
            try:
                return call()
            except AuthenticationError:
                if refreshed or not self.credentials.refresh(seen):
                    raise
                refreshed = True
            except ServerUnavailable:
                attempt += 1
                if attempt > self.retries:
                    raise
                time.sleep(delay * (1 + 0.25 * random.random()))  # jitter: clients don't retry in lockstep
                delay *= 2

    def _predict_rest(self, model: str, files: dict[str, bytes], options: dict, version: str | None) -> dict:
        url = f"{self.url}/predictions/{model}" + (f"/{version}" if version else "")
        headers = {**self.credentials.header(),
                   **{f"X-CXR-{k}": _option_text(v) for k, v in options.items() if v is not None}}
        try:
            if len(files) == 1:
                headers["Content-Type"] = "application/octet-stream"
                r = self._session().post(url, data=files["image"], headers=headers, timeout=self.timeout)
            else:
                multipart = {k: (k, v, "application/octet-stream") for k, v in files.items()}
                r = self._session().post(url, files=multipart, headers=headers, timeout=self.timeout)
        except (requests.ConnectionError, requests.Timeout) as err:
            raise ServerUnavailable(f"{url}: {type(err).__name__}", status=503, code="unavailable") from err
        if r.status_code == 200:
            return r.json()
        if r.status_code in RETRY_STATUSES:
            raise ServerUnavailable(f"{url}: HTTP {r.status_code}", status=r.status_code, code="unavailable")
        raise _error_from_body(r.status_code, r.text)

    def _predict_kserve(self, model: str, files: dict[str, bytes], options: dict, version: str | None) -> dict:
        from cxrserve.core.kserve import v2_request, v2_response

        url = f"{self.url}/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        body = v2_request(files["image"], model_inputs={k: v for k, v in files.items() if k != "image"},
                          options=options)
        try:
            r = self._session().post(url, json=body, headers=self.credentials.header(), timeout=self.timeout)
        except (requests.ConnectionError, requests.Timeout) as err:
            raise ServerUnavailable(f"{url}: {type(err).__name__}", status=503, code="unavailable") from err
        if r.status_code in RETRY_STATUSES:
            raise ServerUnavailable(f"{url}: HTTP {r.status_code}", status=r.status_code, code="unavailable")
        try:
            result = v2_response(r.json())
        except ValueError:
            raise _error_from_body(r.status_code if r.status_code != 200 else 502, r.text) from None
        if r.status_code == 200:
            return result
        if r.status_code == 401 or r.status_code == 403:
            raise AuthenticationError(str(result)[:300], status=401, code="unauthenticated")
        cls = InputRejected if 400 <= r.status_code < 500 else CXRServeError
        raise cls(str(result.get("message", "")), status=r.status_code, code=str(result.get("error", "error")),
                  body=result)

    def _predict_grpc(self, model: str, files: dict[str, bytes], options: dict, version: str | None) -> dict:
        import grpc

        stub, stubs = self._grpc()
        inputs = {("data" if k == "image" else k): v for k, v in files.items()}
        inputs.update({k: _option_text(v).encode() for k, v in options.items() if v is not None})
        request = stubs.inference_pb2.PredictionsRequest(model_name=model, model_version=version or "", input=inputs)
        metadata = [("authorization", f"Bearer {self.credentials.token}")] if self.credentials.token else None
        try:
            response = stub.Predictions(request, timeout=self.timeout, metadata=metadata)
        except grpc.RpcError as err:
            raise _grpc_error(err) from err
        result = json.loads(response.prediction)
        # TorchServe's gRPC layer answers OK even when the handler set a 4xx for this
        # request; the handler's error body (error, status, message) tells.
        if isinstance(result, dict) and "error" in result and int(result.get("status", 200) or 200) >= 400:
            status = int(result["status"])
            cls = InputRejected if status < 500 else CXRServeError
            raise cls(str(result.get("message", "")), status=status, code=str(result["error"]), body=result)
        return result

    def ping(self) -> bool:
        """True when the server reports Healthy (TorchServe requires the token here too)."""
        if self.protocol == "grpc":
            import grpc
            from google.protobuf import empty_pb2

            stub, _ = self._grpc()
            metadata = [("authorization", f"Bearer {self.credentials.token}")] if self.credentials.token else None
            try:
                health = stub.Ping(empty_pb2.Empty(), timeout=10, metadata=metadata).health
            except grpc.RpcError as err:
                raise _grpc_error(err) from err
            return json.loads(health).get("status") == "Healthy"
        if self.protocol == "kserve":
            # Open Inference Protocol readiness (KServe, the native predictor); TorchServe's own
            # kservev2 front end has no v2 health endpoints, so fall back to /ping there.
            r = self._session().get(f"{self.url}/v2/health/ready", headers=self.credentials.header(), timeout=10)
            if r.status_code == 200:
                return bool(r.json().get("ready"))
            if r.status_code != 404:
                raise _error_from_body(r.status_code, r.text)
        r = self._session().get(f"{self.url}/ping", headers=self.credentials.header(), timeout=10)
        if r.status_code != 200:
            raise _error_from_body(r.status_code, r.text)
        return r.json().get("status") == "Healthy"


def _grpc_error(err) -> CXRServeError:
    code = err.code().name if hasattr(err, "code") and err.code() else "UNKNOWN"
    details = (err.details() if hasattr(err, "details") else "") or ""
    if code in RETRY_GRPC_CODES:
        return ServerUnavailable(f"gRPC {code}: {details[:200]}", status=503, code="unavailable")
    if code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
        return AuthenticationError(details or code, status=401, code="unauthenticated")
    # TorchServe puts the handler's JSON error body in the details.
    try:
        body = json.loads(details)
    except ValueError:
        body = None
    if isinstance(body, dict) and "status" in body:
        status = int(body.get("status") or 500)
        message = str(body.get("message") or details)
        cls = InputRejected if 400 <= status < 500 else CXRServeError
        return cls(message, status=status, code=str(body.get("error") or code.lower()), body=body)
    status = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "INTERNAL": 500, "DEADLINE_EXCEEDED": 504}.get(code, 500)
    if code == "INTERNAL" and ("Model not found" in details or "does not exist" in details):
        status = 404  # TorchServe's gRPC layer reports an unknown model or version as INTERNAL
    cls = InputRejected if 400 <= status < 500 else CXRServeError
    return cls(f"gRPC {code}: {details[:300]}", status=status, code=code.lower())
