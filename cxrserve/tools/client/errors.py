"""The errors of a :class:`~cxrserve.tools.client.client.CXRClient` request, one class per
thing a caller does about it: fix the input, fix the token, try later, or report it.

``status`` and ``code`` are the server's HTTP status and error code, or the client's stand-in
when no answer came.
"""
from __future__ import annotations


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
