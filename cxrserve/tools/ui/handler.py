"""The viewer's HTTP requests: one static page plus a JSON proxy to TorchServe.

Routes:

* ``GET /`` and ``GET /static/{app.js,style.css}``: the page;
* ``GET /api/models``: the models the page knows how to show, each marked ``served``
  (``true``/``false`` from TorchServe's management API, ``null`` when that API cannot
  be asked), plus the upload limit;
* ``POST /api/predict/<model>``: JSON ``{"image": base64, <extra input>: base64 or [...]}``
  (the extra inputs the families declare, ``ViewerInput``: a second image, a list option)
  -> that model's response, with TorchServe's status (4xx bodies are the model's own error
  JSON; 404 ``not_served``; 502 when TorchServe is unreachable), from
  :class:`~cxrserve.tools.ui.backend.Backend`.

Every request is checked before it is answered: its ``Host`` (and ``Origin``) must be the
address the viewer serves (DNS rebinding), ``/api/*`` needs the viewer's secret (the
HttpOnly cookie the ``/?secret=`` login sets, or ``Authorization: Bearer <secret>``; ``/``
without it is a 401 page, the static files stay open: they hold no data), a POST needs the
``X-CXR-UI`` header (a cross-site form cannot set it), one exact ``Content-Length`` within
the limit (checked before any byte of the body is read; chunked bodies are refused with
411), and the whole request must arrive within ``conn_timeout`` seconds (a slow sender is
dropped).
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import re
import socket
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}
UI_HEADER = "X-CXR-UI"
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
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


class UIRequestHandler(BaseHTTPRequestHandler):
    # self.server is the tools.ui.server.UIServer that made it (not imported: that module imports this one)
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
            site = body.get("site") or None
            if site is not None and not (isinstance(site, str) and SITE_NAME.match(site)):
                raise ValueError("'site' must be a site name: lower-case letters, digits, '-' or '_'")
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
        status, payload = self.server.backend.predict(model, image, extra, site=site)
        self._json(status, payload)
