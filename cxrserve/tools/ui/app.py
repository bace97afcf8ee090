"""The viewer's HTTP server: one static page plus a JSON proxy to TorchServe.

Routes:

* ``GET /`` and ``GET /static/{app.js,style.css}``: the page;
* ``GET /api/models``: the models the page knows how to show, each marked ``served``
  (``true``/``false`` from TorchServe's management API, ``null`` when that API cannot
  be asked), plus the upload limit;
* ``POST /api/predict/<model>``: JSON ``{"image": base64, <extra input>: base64 or [...]}``
  (the extra inputs the families declare, ``ViewerInput``: a second image, a list option)
  -> that model's response, with TorchServe's status (4xx bodies are the model's own error
  JSON; 404 ``not_served``; 502 when TorchServe is unreachable).

What the page sends and shows comes from the family registry (:func:`views`): the options
that turn a model's pictures on are the server's choice per model, so the browser can ask
for nothing but a known model with an image; each model's card is its family's declared
``CardLine``s and pictures, rendered by the page's generic code.
When a composed model (``cxr-study``) is served the page sends that one request and shows each
family's section in that family's card; otherwise it asks each model.

Access: the viewer holds TorchServe's token, so every other local user could use the models
(and see the patient data) through it if it answered anyone on 127.0.0.1. Each start makes
a secret (or reads ``--secret-file``); the printed ``/?secret=...`` URL sets an HttpOnly,
SameSite=Strict cookie and redirects to ``/``; ``/api/*`` needs that cookie or
``Authorization: Bearer <secret>``. ``/`` without it is a 401 page; the static files stay
open (they are the package's own files and hold no data).

Resources: a POST needs one exact ``Content-Length`` within the limit (checked before any
byte of the body is read; chunked bodies are refused with 411), each request must arrive
within ``conn_timeout`` seconds in all (a slow sender is dropped), and at most
``max_connections`` connections are served at once (the rest get 503 at once).
"""
from __future__ import annotations

import base64
import binascii
import hmac
import html
import io
import json
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import tempfile
import threading
import time
import webbrowser
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import requests

from cxrserve.tools.client import AuthenticationError, CXRClient, CXRServeError, InputRejected, ServerUnavailable
from cxrserve.tools.client.client import DEFAULT_REST
from cxrserve.tools.client.credentials import DEFAULT_MANAGEMENT
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
DIGITS = re.compile(r"[0-9]{1,18}")  # int() would also take "+5", " 5", "5_0" and non-ASCII digits
SECRET_QUERY = re.compile(r"(secret=)[^&\s]*")
UNAUTHORIZED_PAGE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cxrserve viewer: secret needed</title></head>
<body><h1>401: this viewer needs its secret</h1>
<p>Open the address that <code>cxrserve ui</code> printed when it started
(<code>http://127.0.0.1:PORT/?secret=...</code>). The secret keeps other users of this machine
from using TorchServe through the viewer; it changes at every start.</p></body></html>
"""
LOGIN_PAGE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="0; url=/">
<title>cxrserve viewer</title></head><body><p><a href="/">Open the viewer</a></p></body></html>
"""


@dataclass(frozen=True)
class ModelView:
    """How the page asks one model and shows its answer, from its family's declarations."""

    name: str
    title: str
    seed: str
    options: dict = field(default_factory=dict)  # request options the page sends (its pictures, on by default)
    inputs: tuple[str, ...] = ()  # the extra inputs it takes (``ViewerInput`` names)
    composes: bool = False  # answers every family in one request (its sections fill their cards)
    section: str = ""  # its section's key in a composed answer
    card: tuple[dict, ...] = ()  # ``CardLine``s, rendered by the page's generic code
    pictures: tuple[dict, ...] = ()  # ``{"option", "field", "caption"}`` of each picture it can show


def views() -> tuple[ModelView, ...]:
    """Every served model of the family registry, as the page asks for it and shows it."""
    from cxrserve import families

    # every declared picture is asked for unless the model's viewer_options say otherwise
    return tuple(ModelView(s.name, s.title or s.name, s.seed,
                           {**{p.option: True for p in families.pictures(s.name)}, **s.viewer_options},
                           tuple(s.viewer_inputs),
                           composes=s.compose, section=s.key, card=tuple(asdict(c) for c in families.card(s.name)),
                           pictures=tuple({"option": p.option, "field": p.field, "caption": p.caption or p.label}
                                          for p in families.pictures(s.name)))
                 for _, s in families.served().values())


def viewer_inputs(views_: tuple[ModelView, ...]) -> dict:
    """The extra inputs some model takes, by name (``ViewerInput`` as a dict), for the page's form."""
    from cxrserve import families

    declared = families.viewer_inputs()
    wanted = {name for v in views_ for name in v.inputs}
    return {name: asdict(spec) for name, spec in declared.items() if name in wanted}


@dataclass
class UIConfig:
    inference: str = DEFAULT_REST
    management: str = DEFAULT_MANAGEMENT
    key_file: Path | None = None
    token: str | None = None
    host: str = "127.0.0.1"
    port: int = 8765
    max_bytes: int = MAX_BYTES
    timeout: float = 180.0  # for TorchServe's answer
    secret: str | None = None  # None: a new random one at each start
    conn_timeout: float = 30.0  # a request (line, headers, body) must arrive within this
    max_connections: int = 32  # a browser opens ~6; beyond this, 503


def read_secret_file(path: Path) -> str:
    """A fixed secret for tests and automation, from a file only its owner can read."""
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"{path} is readable or writable by group/others (mode {stat.S_IMODE(mode):o}): "
                         f"chmod 600 it")
    value = Path(path).read_text(encoding="utf-8").strip()
    if len(value) < 16 or not value.isascii() or any(c.isspace() or c in ";,&=" for c in value):
        raise ValueError(f"{path}: the secret must be at least 16 printable ASCII characters "
                         f"without spaces, ';', ',', '&' or '='")
    return value


class Backend:
    """What the page needs from TorchServe, through the project's REST client."""

    def __init__(self, config: UIConfig):
        self.config = config
        self.client = CXRClient(config.inference, token=config.token, key_file=config.key_file,
                                management_url=config.management, timeout=config.timeout, retries=2)
        self.views = {v.name: v for v in views()}
        self.inputs = viewer_inputs(tuple(self.views.values()))

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
        extra = [{**asdict(ModelView(name, name, "")), "served": True} for name in (served or []) if name not in self.views]
        return {"models": listed + extra, "inputs": list(self.inputs.values()), "max_bytes": self.config.max_bytes,
                "management": "ok" if served is not None else "unavailable"}

    def predict(self, model: str, image: bytes, extra: dict | None = None) -> tuple[int, dict]:
        """``(HTTP status, body)`` for one model; never raises for the server's answers.

        ``extra``: the form's extra inputs by name (bytes of a second image, or a list of
        strings for a list option); a model gets those it takes (a model the registry does
        not know gets them all)."""
        view = self.views.get(model)
        options = dict(view.options) if view else {}
        images = {}
        for name, value in (extra or {}).items():
            if view is not None and name not in view.inputs:
                continue
            if isinstance(value, bytes):
                images[name] = value
            else:
                options[name] = list(value)  # sent as JSON: any Unicode survives the header
        try:
            return 200, self.client.predict(model, image, extra_images=images, options=options)
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


class _DeadlineReader(io.RawIOBase):
    """The connection's reads, each bounded by what is left of the request's deadline.

    A socket timeout alone bounds one read, so a sender trickling a byte every few
    seconds would hold its thread for ever; this bounds the whole request.
    """

    def __init__(self, sock: socket.socket, idle: float):
        self.sock = sock
        self.idle = idle
        self.deadline = time.monotonic() + idle

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request not received in time")
        self.sock.settimeout(remaining)
        try:
            return self.sock.recv_into(buffer)
        finally:
            self.sock.settimeout(self.idle)  # writes keep the plain per-call timeout


class UIServer(ThreadingHTTPServer):
    daemon_threads = True
    # Handler threads are daemons; waiting for them on close would wait on idle keep-alive browsers.
    block_on_close = False

    def __init__(self, config: UIConfig, backend: Backend | None = None):
        self.config = config
        self.secret = config.secret or secrets.token_urlsafe(32)
        self.backend = backend or Backend(config)
        self._slots = threading.BoundedSemaphore(max(1, config.max_connections))
        super().__init__((config.host, config.port), UIRequestHandler)
        self.config.port = self.server_address[1]

    @property
    def url(self) -> str:
        host = self.config.host if self.config.host not in ("0.0.0.0", "::") else "127.0.0.1"
        return f"http://{host}:{self.config.port}/"

    @property
    def secret_url(self) -> str:
        """The address to open: it logs the browser in (cookie) and redirects to :attr:`url`."""
        return f"{self.url}?secret={self.secret}"

    @property
    def cookie_name(self) -> str:
        # Cookies ignore ports: one name per port keeps two viewers from overwriting each other's.
        return f"cxrserve-ui-{self.config.port}"

    def secret_ok(self, candidate: str | None) -> bool:
        return candidate is not None and hmac.compare_digest(candidate.encode("utf-8", "replace"),
                                                             self.secret.encode("utf-8"))

    # ------------------------------------------------------------ connection cap
    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            return self._refuse(request)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request: socket.socket) -> None:
        """503 at once, from the accepting thread (no handler thread for it), then close."""
        body = json.dumps({"error": "busy", "status": 503,
                           "message": f"the viewer already serves {self.config.max_connections} connections"})
        head = ["HTTP/1.1 503 Service Unavailable", "Content-Type: application/json",
                f"Content-Length: {len(body)}", "Connection: close", "Retry-After: 1",
                *(f"{k}: {v}" for k, v in SECURITY_HEADERS.items())]
        try:
            request.settimeout(1.0)  # never let one refused client stall the accept loop
            request.sendall(("\r\n".join(head) + "\r\n\r\n" + body).encode("utf-8"))
            # What the client already sent: unread bytes at close would turn the FIN into an RST
            # (and the client could lose the 503).
            request.recv(65536, socket.MSG_DONTWAIT)
        except OSError:
            pass
        finally:
            self.shutdown_request(request)

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
    def setup(self) -> None:
        self.timeout = self.server.config.conn_timeout
        super().setup()
        self.rfile.close()  # the stdlib's reader: replaced by one with a per-request deadline
        self._reader = _DeadlineReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        # The deadline covers waiting for the request and reading it, not the answer to it.
        self._reader.deadline = time.monotonic() + self.server.config.conn_timeout
        self._expect_100 = False
        self._unread_body = False
        super().handle_one_request()

    def handle_expect_100(self) -> bool:
        # "100 Continue" only once the request passed its checks (do_POST), so a refused
        # client never sends its body.
        self._expect_100 = True
        return True

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (stdlib signature)
        # The request line of the login URL holds the secret.
        log.info("%s %s", self.address_string(), SECRET_QUERY.sub(r"\1<redacted>", format % args))

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in {**SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(key, value)
        if self._unread_body:
            # The body left unread would be taken for the next request on this connection.
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: dict, headers: dict | None = None) -> None:
        self._send(status, json.dumps(payload).encode("utf-8"), "application/json", headers)

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

    def _cookie_secrets(self) -> list[str]:
        # Split by hand: 127.0.0.1's cookies from other local apps (any port) come along, and
        # http.cookies stops at the first value it dislikes.
        name = self.server.cookie_name
        pairs = (item.strip().partition("=") for header in self.headers.get_all("Cookie") or []
                 for item in header.split(";"))
        return [value.strip() for key, _, value in pairs if key.strip() == name]

    def _authorized(self) -> bool:
        """The viewer's cookie (the page) or ``Authorization: Bearer <secret>`` (scripts)."""
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self.server.secret_ok(token.strip()):
            return True
        return any(self.server.secret_ok(value) for value in self._cookie_secrets())

    def _unauthorized(self) -> None:
        self._json(401, {"error": "unauthorized", "status": 401,
                         "message": "open the URL `cxrserve ui` printed (it carries the viewer's secret), "
                                    "or send Authorization: Bearer <secret>"},
                   {"WWW-Authenticate": 'Bearer realm="cxrserve-ui"'})

    def _login_or_page(self, query: str) -> None:
        """``/``: the page for a logged-in browser; ``/?secret=`` logs in; else a 401 page."""
        given = parse_qs(query).get("secret")
        if given is not None:
            if len(given) == 1 and self.server.secret_ok(given[0]):
                # No Secure: the viewer is plain http on loopback, where a Secure cookie is never sent back.
                cookie = {"Set-Cookie": f"{self.server.cookie_name}={self.server.secret}; HttpOnly; "
                                        "SameSite=Strict; Path=/"}
                if self.headers.get("Sec-Fetch-Site") == "cross-site":
                    # Opened from another site or a file (the --open launcher): a redirect would stay
                    # in that cross-site chain, where the Strict cookie is not sent; a navigation
                    # started by this page is same-site.
                    return self._send(200, LOGIN_PAGE, "text/html; charset=utf-8", cookie)
                return self._send(303, b"", "text/plain; charset=utf-8", {"Location": "/", **cookie})
        elif self._authorized():
            return self._static("index.html")
        self._send(401, UNAUTHORIZED_PAGE, "text/html; charset=utf-8")

    def _body_pending(self) -> bool:
        if "Transfer-Encoding" in self.headers:
            return True
        length = self.headers.get("Content-Length")
        # A POST without a length may still be sending something (HTTP/1.0 style, until close).
        return self.command == "POST" if length is None else length.strip() != "0"

    def _content_length(self) -> int | None:
        """The body's length, or None once a 400/411/413 was answered (before reading any of it)."""
        values = self.headers.get_all("Content-Length") or []
        if "Transfer-Encoding" in self.headers:
            self._error(411, "length_required", "chunked uploads are not accepted: send a Content-Length")
        elif not values:
            self._error(411, "length_required", "send a Content-Length")
        elif len(values) > 1 or not DIGITS.fullmatch(values[0].strip()):
            self._error(400, "bad_content_length", "send one Content-Length, a non-negative decimal number")
        elif int(values[0]) > self._upload_limit():
            self._error(413, "payload_too_large",
                        f"upload larger than {self.server.config.max_bytes // 2**20} MiB per image")
        else:
            return int(values[0])
        return None

    def _upload_limit(self) -> int:
        # base64 inflates by 4/3; two images (study and prior) plus a little JSON.
        return 2 * (self.server.config.max_bytes * 4 // 3 + 4) + 65536

    def _read_body(self, length: int) -> bytes:
        if self._expect_100:
            self.send_response_only(100)
            self.end_headers()
        body = self.rfile.read(length)
        if len(body) != length:
            raise ValueError(f"the body ended after {len(body)} of {length} bytes")
        self._unread_body = False
        return body

    # ----------------------------------------------------------------- routes
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self._unread_body = self._body_pending()
        if not self._host_ok():
            return self._error(403, "forbidden_host", "unexpected Host or Origin header")
        url = urlparse(self.path)
        path = url.path
        if path in ("/", "/index.html"):
            return self._login_or_page(url.query)
        if path.startswith("/static/"):
            return self._static(path[len("/static/"):])
        if path.startswith("/api/") and not self._authorized():
            return self._unauthorized()
        if path == "/api/models":
            return self._json(200, self.server.backend.models())
        return self._error(404, "not_found", "no such page")

    def _static(self, name: str) -> None:
        if name not in STATIC_FILES:
            return self._error(404, "not_found", "no such file")
        self._send(200, (STATIC / name).read_bytes(), STATIC_FILES[name])

    def do_POST(self) -> None:
        self._unread_body = self._body_pending()
        if not self._host_ok():
            return self._error(403, "forbidden_host", "unexpected Host or Origin header")
        path = urlparse(self.path).path
        if path.startswith("/api/") and not self._authorized():
            return self._unauthorized()
        if not path.startswith("/api/predict/"):
            return self._error(404, "not_found", "no such endpoint")
        length = self._content_length()
        if length is None:
            return
        if self.headers.get(UI_HEADER) != "1":
            return self._error(403, "forbidden", f"API calls need the {UI_HEADER} header (sent by the viewer page)")
        model = path[len("/api/predict/"):]
        if not MODEL_NAME.match(model):
            return self._error(400, "bad_model_name", "model names are letters, digits, '-', '_' and '.'")
        known = set(self.server.backend.views)
        if model not in known and model not in (self.server.backend.served_models() or []):
            return self._error(404, "not_served", f"{model} is not served by this TorchServe")
        if not (self.headers.get("Content-Type", "").split(";")[0].strip() == "application/json"):
            return self._error(415, "unsupported_media_type", "send JSON (application/json)")
        try:
            body = json.loads(self._read_body(length))
            if not isinstance(body, dict):
                raise ValueError("expected a JSON object")
            image = _b64(body.get("image"), "image")
            extra = {}
            for name, spec in self.server.backend.inputs.items():  # the declared extra inputs
                value = body.get(name)
                if value is None or value == [] or value == "":
                    continue
                if spec["kind"] == "file":
                    extra[name] = _b64(value, name)
                elif isinstance(value, list) and all(isinstance(x, str) for x in value):
                    extra[name] = value
                else:
                    raise ValueError(f"'{name}' must be a list of strings")
        except (ValueError, UnicodeDecodeError) as err:
            return self._error(400, "malformed_request", str(err))
        if not image:
            return self._error(400, "malformed_request", "no image in the request")
        status, payload = self.server.backend.predict(model, image, extra)
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
    p.add_argument("--secret-file",
                   help="fixed secret for tests/automation, from a file only you can read (chmod 600); "
                        "default: a new random secret at each start")
    p.add_argument("--conn-timeout", type=float, default=30.0,
                   help="seconds a client has to send a whole request (slow senders are dropped; "
                        "raise it for large uploads over a slow network)")
    p.add_argument("--max-connections", type=int, default=32,
                   help="connections served at once; more get 503")


def open_in_browser(url: str) -> Path:
    """Opens ``url`` through a launcher file only this user can read, in a new private folder
    (returned, for removal): a URL on a browser's command line is visible to every local user (ps)."""
    folder = Path(tempfile.mkdtemp(prefix="cxrserve-ui-"))
    launcher = folder / "open.html"
    fd = os.open(launcher, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(f'<!doctype html><meta charset="utf-8"><meta http-equiv="refresh" content="0; url={html.escape(url)}">'
                f'<title>cxrserve viewer</title><a href="{html.escape(url)}">open the viewer</a>\n')
    webbrowser.open(launcher.as_uri())
    return folder


def make_server(config: UIConfig, backend: Backend | None = None) -> UIServer:
    return UIServer(config, backend)


def cmd_ui(args) -> int:
    try:
        secret = read_secret_file(Path(args.secret_file)) if args.secret_file else None
    except (OSError, ValueError) as err:
        log.error("--secret-file: %s", err)
        return 2
    config = UIConfig(inference=args.inference, management=args.management,
                      key_file=Path(args.key_file) if args.key_file else None, host=args.host, port=args.port,
                      max_bytes=int(args.max_mb * 2**20), secret=secret, conn_timeout=args.conn_timeout,
                      max_connections=args.max_connections)
    server = make_server(config)
    if server.allowed_hosts() is None:
        log.warning("listening on every interface: the viewer's secret and the studies cross the network "
                    "unencrypted (plain http on port %d)", config.port)
    if server.backend.client.credentials.token is None:
        log.warning("no TorchServe key file found: pass --key-file .torchserve/key_file.json")
    # The secret is the viewer's login: only whoever started it (and reads this terminal) gets it.
    print(f"cxrserve viewer at {server.secret_url}  (open this address; Ctrl+C stops it)", flush=True)
    launchers: list[Path] = []
    if args.open:
        opener = threading.Timer(0.5, lambda: launchers.append(open_in_browser(server.secret_url)))
        opener.daemon = True
        opener.start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        for folder in launchers:
            shutil.rmtree(folder, ignore_errors=True)
    return 0
