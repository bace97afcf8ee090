"""The viewer's HTTP server: one static page plus a JSON proxy to TorchServe.

Routes:

* ``GET /`` and ``GET /static/{app.js,style.css}``: the page;
* ``GET /api/models``: the models the page knows how to show, each marked ``served``
  (``true``/``false`` from TorchServe's management API, ``null`` when that API cannot
  be asked), plus the upload limit;
* ``POST /api/predict/<model>``: JSON ``{"image": base64, "prior": base64?,
  "labels": [...]?}`` -> that model's response, with TorchServe's status (4xx bodies are
  the model's own error JSON; 404 ``not_served``; 502 when TorchServe is unreachable).

Requests for pictures (heatmap, overlay, saliency) are the server's choice per model
(:func:`views`, from the family registry), so the browser can ask for nothing but a known model with an image.
When a composed model (``cxr-study``) is served the page sends that one request and shows each
family's section in that family's card; otherwise it asks each model.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import threading
import webbrowser
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests

from cxrserve.tools.client import (DEFAULT_MANAGEMENT, DEFAULT_REST, AuthenticationError, CXRClient, CXRServeError,
                      InputRejected, ServerUnavailable)
from cxrserve.core.imageio import MAX_BYTES

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}
UI_HEADER = "X-CXR-UI"
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                                "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class ModelView:
    """How the page asks one model: the options that turn its pictures on, prior/labels."""

    name: str
    title: str
    seed: str
    options: dict = field(default_factory=dict)
    takes_prior: bool = False
    takes_labels: bool = False
    composes: bool = False  # answers every family in one request (its sections fill their cards)


def views() -> tuple[ModelView, ...]:
    """Every served model of the family registry, as the page asks for it."""
    from cxrserve import families

    return tuple(ModelView(s.name, s.title or s.name, s.seed, dict(s.viewer_options),
                           takes_prior="prior" in s.viewer_inputs, takes_labels="labels" in s.viewer_inputs,
                           composes=s.compose)
                 for _, s in families.served().values())


@dataclass
class UIConfig:
    inference: str = DEFAULT_REST
    management: str = DEFAULT_MANAGEMENT
    key_file: Path | None = None
    token: str | None = None
    host: str = "127.0.0.1"
    port: int = 8765
    max_bytes: int = MAX_BYTES
    timeout: float = 180.0


class Backend:
    """What the page needs from TorchServe, through the project's REST client."""

    def __init__(self, config: UIConfig):
        self.config = config
        self.client = CXRClient(config.inference, token=config.token, key_file=config.key_file,
                                management_url=config.management, timeout=config.timeout, retries=2)
        self.views = {v.name: v for v in views()}

    def _management_token(self) -> str | None:
        from cxrserve.tools.server import read_keys

        key_file = self.client.credentials.key_file
        if key_file is None or not Path(key_file).exists():
            return None
        try:
            return read_keys(key_file).get("management")
        except (OSError, ValueError, KeyError):
            return None

    def served_models(self) -> list[str] | None:
        """Registered model names from the management API, or None when it cannot be asked."""
        token = self._management_token()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            r = requests.get(f"{self.config.management.rstrip('/')}/models", params={"limit": 1000},
                             headers=headers, timeout=5)
            if r.status_code != 200:
                return None
            return sorted(m["modelName"] for m in r.json().get("models", []))
        except (requests.RequestException, ValueError, KeyError, TypeError):
            return None

    def models(self) -> dict:
        served = self.served_models()
        listed = [{**asdict(v), "served": None if served is None else v.name in served} for v in self.views.values()]
        extra = [{"name": name, "title": name, "seed": "", "options": {}, "takes_prior": False,
                  "takes_labels": False, "composes": False, "served": True}
                 for name in (served or []) if name not in self.views]
        return {"models": listed + extra, "max_bytes": self.config.max_bytes,
                "management": "ok" if served is not None else "unavailable"}

    def predict(self, model: str, image: bytes, prior: bytes | None = None,
                labels: list[str] | None = None) -> tuple[int, dict]:
        """``(HTTP status, body)`` for one model; never raises for the server's answers."""
        view = self.views.get(model)
        options = dict(view.options) if view else {}
        if labels and (view is None or view.takes_labels):
            options["labels"] = list(labels)  # sent as JSON: any Unicode survives the header
        if prior is not None and view is not None and not view.takes_prior:
            prior = None
        try:
            return 200, self.client.predict(model, image, prior=prior, options=options)
        except InputRejected as err:
            if err.status == 404:
                return 404, {"error": "not_served", "status": 404,
                             "message": f"{model} is not served by this TorchServe"}
            body = err.body if isinstance(err.body, dict) and err.body.get("message") else err.to_dict()
            return err.status, {**body, "status": err.status}
        except AuthenticationError:
            return 502, {"error": "unauthenticated", "status": 502,
                         "message": "TorchServe refused the viewer's token: start `cxrserve ui` with --key-file "
                                    "pointing at TorchServe's key_file.json"}
        except ServerUnavailable as err:
            return 502, {"error": "unavailable", "status": 502,
                         "message": f"TorchServe is not answering at {self.config.inference} ({err.message})"}
        except CXRServeError as err:
            return 502, {"error": "server_error", "status": err.status or 502, "message": err.message}


def _b64(value: Any, name: str) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"'{name}' must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"'{name}' is not valid base64") from None


class UIServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, config: UIConfig, backend: Backend | None = None):
        self.config = config
        self.backend = backend or Backend(config)
        super().__init__((config.host, config.port), UIRequestHandler)
        self.config.port = self.server_address[1]

    @property
    def url(self) -> str:
        host = self.config.host if self.config.host not in ("0.0.0.0", "::") else "127.0.0.1"
        return f"http://{host}:{self.config.port}/"

    def allowed_hosts(self) -> set[str] | None:
        """``Host`` values accepted (DNS-rebinding guard); None when bound to every interface."""
        if self.config.host in ("0.0.0.0", "::", ""):
            return None
        port = self.config.port
        return {f"{name}:{port}" for name in (self.config.host, "127.0.0.1", "localhost", "[::1]")}


class UIRequestHandler(BaseHTTPRequestHandler):
    server: UIServer
    server_version = "cxrserve-ui"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    # ----------------------------------------------------------------- plumbing
    def log_message(self, format: str, *args) -> None:  # noqa: A002 (stdlib signature)
        log.info("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in SECURITY_HEADERS.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: dict) -> None:
        self._send(status, json.dumps(payload).encode("utf-8"), "application/json")

    def _error(self, status: int, code: str, message: str) -> None:
        self._json(status, {"error": code, "status": status, "message": message})

    def _host_ok(self) -> bool:
        allowed = self.server.allowed_hosts()
        if allowed is None:
            return True
        if self.headers.get("Host", "") not in allowed:
            return False
        origin = self.headers.get("Origin")
        return origin is None or urlparse(origin).netloc in allowed

    # ----------------------------------------------------------------- routes
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        if not self._host_ok():
            return self._error(403, "forbidden_host", "unexpected Host or Origin header")
        path = urlparse(self.path).path
        if path in ("/", "/index.html"):
            return self._static("index.html")
        if path.startswith("/static/"):
            return self._static(path[len("/static/"):])
        if path == "/api/models":
            return self._json(200, self.server.backend.models())
        return self._error(404, "not_found", "no such page")

    def _static(self, name: str) -> None:
        if name not in STATIC_FILES:
            return self._error(404, "not_found", "no such file")
        self._send(200, (STATIC / name).read_bytes(), STATIC_FILES[name])

    def do_POST(self) -> None:
        if not self._host_ok():
            return self._error(403, "forbidden_host", "unexpected Host or Origin header")
        path = urlparse(self.path).path
        if not path.startswith("/api/predict/"):
            return self._error(404, "not_found", "no such endpoint")
        if self.headers.get(UI_HEADER) != "1":
            return self._error(403, "forbidden", f"API calls need the {UI_HEADER} header (sent by the viewer page)")
        model = path[len("/api/predict/"):]
        if not MODEL_NAME.match(model):
            return self._error(400, "bad_model_name", "model names are letters, digits, '-', '_' and '.'")
        known = set(self.server.backend.views)
        if model not in known and model not in (self.server.backend.served_models() or []):
            return self._error(404, "not_served", f"{model} is not served by this TorchServe")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._error(411, "length_required", "send a Content-Length")
        # base64 inflates by 4/3; two images (study and prior) plus a little JSON.
        limit = 2 * (self.server.config.max_bytes * 4 // 3 + 4) + 65536
        if length > limit:
            self.close_connection = True
            return self._error(413, "payload_too_large",
                               f"upload larger than {self.server.config.max_bytes // 2**20} MiB per image")
        if not (self.headers.get("Content-Type", "").split(";")[0].strip() == "application/json"):
            return self._error(415, "unsupported_media_type", "send JSON (application/json)")
        try:
            body = json.loads(self.rfile.read(length))
            if not isinstance(body, dict):
                raise ValueError("expected a JSON object")
            image = _b64(body.get("image"), "image")
            prior = _b64(body["prior"], "prior") if body.get("prior") else None
            labels = body.get("labels")
            if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
                raise ValueError("'labels' must be a list of strings")
        except (ValueError, UnicodeDecodeError) as err:
            return self._error(400, "malformed_request", str(err))
        if not image:
            return self._error(400, "malformed_request", "no image in the request")
        status, payload = self.server.backend.predict(model, image, prior, labels or None)
        self._json(status, payload)


# --------------------------------------------------------------------------- CLI
def add_arguments(p) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default loopback; 0.0.0.0 exposes the token-holding proxy)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--inference", default=DEFAULT_REST, help="TorchServe inference address")
    p.add_argument("--management", default=DEFAULT_MANAGEMENT, help="TorchServe management address (model list)")
    p.add_argument("--key-file", help="TorchServe's key_file.json (default: $CXRSERVE_KEY_FILE, ./, .torchserve/)")
    p.add_argument("--max-mb", type=float, default=MAX_BYTES / 2**20, help="largest upload per image, MiB")
    p.add_argument("--open", action="store_true", help="open the page in the default browser")


def make_server(config: UIConfig, backend: Backend | None = None) -> UIServer:
    return UIServer(config, backend)


def cmd_ui(args) -> int:
    config = UIConfig(inference=args.inference, management=args.management,
                      key_file=Path(args.key_file) if args.key_file else None, host=args.host, port=args.port,
                      max_bytes=int(args.max_mb * 2**20))
    server = make_server(config)
    if server.allowed_hosts() is None:
        log.warning("listening on every interface: anyone who can reach port %d can use TorchServe through "
                    "this viewer's token", config.port)
    if server.backend.client.credentials.token is None:
        log.warning("no TorchServe key file found: pass --key-file .torchserve/key_file.json")
    print(f"cxrserve viewer at {server.url}  (Ctrl+C stops it)", flush=True)
    if args.open:
        threading.Timer(0.5, webbrowser.open, args=(server.url,)).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
