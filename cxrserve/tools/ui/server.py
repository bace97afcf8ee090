"""The viewer's server: its secret, its address and how many connections it serves at once.

Access: the viewer holds TorchServe's token, so every other local user could use the models
(and see the patient data) through it if it answered anyone on 127.0.0.1. Each start makes
a secret (or reads ``--secret-file``); :attr:`UIServer.secret_url` logs a browser in.
At most ``max_connections`` connections are served at once (the rest get 503 at once, from
the accepting thread).
"""
from __future__ import annotations

import hmac
import json
import secrets
import socket
import threading
from http.server import ThreadingHTTPServer

from cxrserve.tools.ui.backend import Backend
from cxrserve.tools.ui.config import UIConfig
from cxrserve.tools.ui.handler import SECURITY_HEADERS, UIRequestHandler


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


def make_server(config: UIConfig, backend: Backend | None = None) -> UIServer:
    return UIServer(config, backend)
