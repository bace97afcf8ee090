"""Python client for a cxrserve TorchServe: REST and gRPC behind one interface.

>>> from cxrserve.tools.client import CXRClient
>>> with CXRClient() as client:                      # REST on 127.0.0.1:8080, key file found
...     result = client.predict("cxr-triage", "study.dcm", heatmap=True)
>>> with CXRClient(protocol="grpc") as client:       # gRPC on 127.0.0.1:7070
...     result = client.predict("cxr-pxs", "follow_up.dcm", prior="baseline.dcm")
>>> with CXRClient() as client:                      # every model in one request
...     study = client.predict("cxr-study", "follow_up.dcm", prior="baseline.dcm", pictures=True)
...     study["results"]["triage"]["label"], study["results"]["pxs"]["change"]["direction"]

* **Token**: given explicitly, or read from TorchServe's ``key_file.json``
  (``$CXRSERVE_KEY_FILE``, else the current folder or its parents, else
  ``.torchserve/`` where ``make serve`` runs TorchServe). When the server says the
  token is wrong or expired the key file is read again (TorchServe rewrites it on
  restart) and, failing that, a fresh inference token is minted with the API key
  through TorchServe's token API; only then does the call fail with
  :class:`AuthenticationError`.
* **Retries** with exponential backoff on 503/507 (gRPC ``UNAVAILABLE`` /
  ``RESOURCE_EXHAUSTED``) and on connection errors only; a 4xx is an answer about the
  input and is never retried.
* **Requests**: files go as the raw body with ``Content-Type: application/octet-stream``
  (labelled as a form, curl's default, TorchServe's HTTP layer parses the bytes as one
  and echoes them in its error) or as multipart when there is a ``prior``; options go as
  ``X-CXR-<option>`` headers over REST and as input fields over gRPC, since TorchServe
  never passes query strings to handlers.

``cxrserve predict FILE...`` (see :func:`register_cli`) is the command-line face.
"""
from __future__ import annotations

import json
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests

from cxrserve.tools import server

DEFAULT_REST = "http://127.0.0.1:8080"
DEFAULT_GRPC = "127.0.0.1:7070"
DEFAULT_MANAGEMENT = "http://127.0.0.1:8081"
#: REST statuses and gRPC codes that mean "busy or restarting: try again".
RETRY_STATUSES = (503, 507)
RETRY_GRPC_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
#: rest: TorchServe's /predictions API; grpc: its gRPC API; kserve: the Open Inference
#: Protocol (v2) of a KServe InferenceService (deploy/kserve/).
PROTOCOLS = ("rest", "grpc", "kserve")


# --------------------------------------------------------------------------- errors
class CXRServeError(Exception):
    """A request the server answered with an error, or could not be sent."""

    def __init__(self, message: str, *, status: int = 0, code: str = "", body: dict | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code or "error"
        self.body = body or {}

    def to_dict(self) -> dict:
        return {"error": self.code, "status": self.status, "message": self.message}


class AuthenticationError(CXRServeError):
    """Missing, wrong or expired token. TorchServe 0.12 answers these with HTTP 400
    ``InvalidKeyException`` (gRPC ``PERMISSION_DENIED``); reported here as 401."""


class InputRejected(CXRServeError):
    """The model answered 4xx about this input (400 / 413 / 415 / 422)."""


class ServerUnavailable(CXRServeError):
    """Connection failed or the server stayed busy (503/507) through every retry."""


# --------------------------------------------------------------------------- tokens
def default_key_file() -> Path | None:
    """Where ``cxrserve predict`` looks for TorchServe's keys (see module docstring)."""
    found = server.find_key_file()
    if found is not None:
        return found
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        candidate = folder / ".torchserve" / "key_file.json"
        if candidate.exists():
            return candidate
    return None


@dataclass
class Credentials:
    """The inference token and where to get a new one."""

    token: str | None = None
    key_file: Path | None = None
    management: str = DEFAULT_MANAGEMENT
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def resolve(cls, token: str | None = None, key_file: str | Path | None = None,
                management: str = DEFAULT_MANAGEMENT) -> "Credentials":
        if token is None:
            token = os.environ.get("CXRSERVE_TOKEN") or None
        path = Path(key_file) if key_file else (None if token else default_key_file())
        creds = cls(token=token, key_file=path, management=management)
        if creds.token is None and path is not None:
            creds.reload()
        return creds

    def reload(self) -> bool:
        """Re-read the key file; True when it held a different inference token."""
        if self.key_file is None or not Path(self.key_file).exists():
            return False
        try:
            keys = server.read_keys(self.key_file)
        except (OSError, ValueError, KeyError):
            return False
        new = keys.get("inference")
        changed = bool(new) and new != self.token
        self.token = new or self.token
        return changed

    def refresh(self, seen: str | None) -> bool:
        """Get a token other than ``seen``: re-read the key file, then mint one with the API key."""
        with self._lock:
            if self.token != seen:  # another thread already refreshed
                return True
            if self.reload():
                return True
            if self.key_file is None:
                return False
            try:
                api = server.read_keys(self.key_file).get("api")
                if not api:
                    return False
                r = requests.get(f"{self.management}/token", params={"type": "inference"},
                                  headers={"Authorization": f"Bearer {api}"}, timeout=10)
            except (requests.RequestException, OSError, ValueError, KeyError):
                return False
            if r.status_code != 200:
                return False
            return self.reload()

    def header(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


# --------------------------------------------------------------------------- client
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


# --------------------------------------------------------------------------- CLI
PNG_SUFFIX = "_png"


def save_pngs(result: dict, out_dir: Path, stem: str) -> dict:
    """Write every ``*_png`` field of ``result`` as ``<stem>.<field>.png``; return the result
    with those fields replaced by the file names (the summary stays small and readable)."""
    import base64

    out = {}
    for key, value in result.items():
        if key.endswith(PNG_SUFFIX) and isinstance(value, str):
            path = out_dir / f"{stem}.{key[: -len(PNG_SUFFIX)]}.png"
            path.write_bytes(base64.b64decode(value))
            out[key[: -len(PNG_SUFFIX)] + "_file"] = path.name
        elif isinstance(value, dict):  # nested: a cxr-study section (results.triage.heatmap_png)
            out[key] = save_pngs(value, out_dir, f"{stem}.{key}") if _has_png(value) else value
        else:
            out[key] = value
    return out


def _has_png(value: dict) -> bool:
    return any((k.endswith(PNG_SUFFIX) and isinstance(v, str)) or (isinstance(v, dict) and _has_png(v))
               for k, v in value.items())


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: -kv[1] if isinstance(kv[1], (int, float)) else 0)
        return ", ".join(f"{k} {_fmt_value(v)}" for k, v in items)
    if isinstance(value, list):
        return "[" + ", ".join(_fmt_value(v) for v in value) + "]"
    return str(value)


def format_human(name: str, result: dict) -> str:
    """A few readable lines per study: main fields, gate, warnings, saved pictures."""
    lines = [f"{name}: {result.get('model', '')} {result.get('model_version', '')}".rstrip()]
    skip = {"model", "model_version", "warnings", "input", "input_gate", "results", "timings_ms"}
    for key, value in result.items():
        if key in skip or key.endswith("_file"):  # saved pictures are listed by the caller
            continue
        lines.append(f"  {key}: {_fmt_value(value)}")
    for family, section in (result.get("results") or {}).items():  # cxr-study: one block per family
        if "error" in section:
            lines.append(f"  {family}: error {section.get('status')} {section['error']}: {section.get('message', '')}")
            continue
        lines.append(f"  {family}:")
        for key, value in section.items():
            if key not in skip and not key.endswith("_file"):
                lines.append(f"    {key}: {_fmt_value(value)}")
        own = [w for w in section.get("warnings", []) if w not in result.get("warnings", [])]
        lines.extend(f"    warning: {w}" for w in own)
    gate = result.get("input_gate")
    if gate:
        lines.append(f"  input gate: {gate['verdict']} (score {gate['score']:.3f}, threshold {gate['threshold']:g})")
    info = result.get("input") or {}
    if info:
        lines.append(f"  input: {info.get('format')} {info.get('width')}x{info.get('height')} "
                     f"{info.get('photometric', '')} {info.get('view', '')}".rstrip())
    for warning in result.get("warnings", []):
        lines.append(f"  warning: {warning}")
    return "\n".join(lines)


def _parse_option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise SystemExit(f"--option expects NAME=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value


def cmd_predict(args) -> int:
    from cxrserve import families

    model = args.model or families.default_served()
    options = dict(_parse_option(o) for o in (args.option or []))
    for flag in families.flags():  # the pictures (and other flags) the families declare
        if getattr(args, flag, False):
            options[flag] = True
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    client = CXRClient(args.url, protocol=protocol_of(args), token=args.token, key_file=args.key_file,
                       management_url=args.management_url, timeout=args.timeout, model_version=args.version)
    if client.credentials.token is None:
        print("warning: no token given and no key_file.json found (set --key-file or CXRSERVE_KEY_FILE); "
              "TorchServe will refuse the request", flush=True)
    summary, failures = [], 0
    with client:
        for i, path in enumerate(args.files):
            name = Path(path).name
            stem = f"{i:03d}_{Path(path).stem}"
            try:
                result = client.predict(model, path, prior=args.prior, options=options)
                entry = {"file": str(path), "status": 200, "result": save_pngs(result, out_dir, stem)}
                if not args.json:
                    print(format_human(name, entry["result"]))
                    for key, value in _saved_files(entry["result"]):
                        print(f"  saved {key[:-5]}: {out_dir / value}")
            except AuthenticationError as err:
                print(f"error: {err.message} (HTTP 401 semantics; TorchServe itself answered 400)")
                return 2
            except ServerUnavailable as err:
                print(f"error: {err.message}")
                return 2
            except CXRServeError as err:
                failures += 1
                entry = {"file": str(path), "status": err.status, "error": err.code, "message": err.message}
                if not args.json:
                    print(f"{name}: rejected, {err.status} {err.code}: {err.message}")
            except OSError as err:
                failures += 1
                entry = {"file": str(path), "status": 0, "error": "unreadable", "message": str(err)}
                if not args.json:
                    print(f"{name}: cannot read: {err}")
            summary.append(entry)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"summary: {out_dir / 'summary.json'} ({len(summary) - failures} scored, {failures} rejected)")
    return 1 if failures else 0


def _saved_files(result: dict, prefix: str = ""):
    """``(field, file)`` of every picture :func:`save_pngs` wrote, sections included."""
    for key, value in result.items():
        if key.endswith("_file") and isinstance(value, str):
            yield prefix + key, value
        elif isinstance(value, dict):
            yield from _saved_files(value, "" if key == "results" else f"{prefix}{key}.")


def protocol_of(args) -> str:
    return "grpc" if getattr(args, "grpc", False) else "kserve" if getattr(args, "kserve", False) else "rest"


def add_connection_args(p) -> None:
    p.add_argument("--url", help=f"inference address (REST default {DEFAULT_REST}, gRPC default {DEFAULT_GRPC})")
    p.add_argument("--grpc", action="store_true", help="use gRPC (TorchServe's port 7070) instead of REST")
    p.add_argument("--kserve", action="store_true",
                   help="KServe v2 protocol (an InferenceService from deploy/kserve; --url is its address)")
    p.add_argument("--token", help="inference token (default: $CXRSERVE_TOKEN, else key_file.json)")
    p.add_argument("--key-file", help="TorchServe key_file.json (default: $CXRSERVE_KEY_FILE, ./, .torchserve/)")
    p.add_argument("--management-url", default=DEFAULT_MANAGEMENT, help="for minting a new token when it expired")
    p.add_argument("--timeout", type=float, default=120.0)


def register_cli(subparsers) -> None:
    from cxrserve import families

    p = subparsers.add_parser("predict", help="score files with a running cxrserve (REST or gRPC)")
    p.add_argument("files", nargs="+", help="DICOM, PNG or JPEG files")
    p.add_argument("--model", help="served model name (default: the registry's first; a composed model when the "
                                   "store has one: every model on one upload)")
    p.add_argument("--version", help="model version (default: the server's default)")
    p.add_argument("--prior", help="prior study, for models that compare two")
    for flag, help_text in families.flags().items():  # declared by each family (its pictures, its flags)
        p.add_argument(f"--{flag}", action="store_true", help=help_text)
    p.add_argument("--option", action="append", help="any model option, NAME=VALUE (repeatable)")
    p.add_argument("--json", action="store_true", help="print the responses as JSON (machines)")
    p.add_argument("--out", default="cxrserve-predictions", help="folder for summary.json and PNGs")
    add_connection_args(p)
    p.set_defaults(func=cmd_predict)

