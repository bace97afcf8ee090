"""MLLP (HL7 v2 Minimal Lower Layer Protocol) client: one message, one ACK, on one connection.

Framing: ``<VT> message <FS><CR>`` both ways. :func:`send` connects, sends, reads one framed
answer within ``timeout_s`` and raises :class:`Nak` for a negative acknowledgement (AE, AR,
CE, CR: the code, the ERR-3 error code and the receiver's text) and :class:`MLLPError` for
everything else that is not an AA/CA to this very message (no answer, a broken frame, an
ACK to another control ID). Both are :class:`ConnectionError`: the node retries them with
back-off. Texts the receiver wrote are scrubbed of the message's identifiers before they
can reach a state file or a log (a receiver may quote the PID it refused).
"""
from __future__ import annotations

import socket
import time

from cxrserve.tools.hl7fhir.hl7 import HL7Error, read_ack

START, END = b"\x0b", b"\x1c\x0d"
MAX_ACK_BYTES = 1 << 20


class MLLPError(ConnectionError):
    """No usable acknowledgement (retried)."""


class Nak(MLLPError):
    """The receiver answered with a negative acknowledgement; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(f"NAK {reason}")
        self.reason = reason


def scrub(text: str, identifiers: list[str]) -> str:
    """``text`` without any of ``identifiers`` (longest first), and at most 200 characters."""
    for value in sorted(identifiers, key=len, reverse=True):
        if value:
            text = text.replace(value, "<withheld>")
    return text[:200]


def frame(message: str) -> bytes:
    return START + message.encode("utf-8") + END


def read_frame(sock: socket.socket, deadline: float) -> str:
    data = b""
    while not data.endswith(END):
        left = deadline - time.monotonic()
        if left <= 0:
            raise MLLPError("no acknowledgement within the timeout")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout as err:
            raise MLLPError("no acknowledgement within the timeout") from err
        if not chunk:
            raise MLLPError("the receiver closed the connection without an acknowledgement")
        data += chunk
        if len(data) > MAX_ACK_BYTES:
            raise MLLPError("the acknowledgement is larger than 1 MiB")
    start = data.find(START)
    if start < 0:
        raise MLLPError("the answer is not an MLLP frame")
    return data[start + 1:-len(END)].decode("utf-8", errors="replace")


def send(message: str, host: str, port: int, control_id: str, *, timeout_s: float = 30.0,
         identifiers: list[str] | None = None) -> str:
    """Send one message; return the ACK code (AA or CA), else raise :class:`Nak` / :class:`MLLPError`."""
    deadline = time.monotonic() + timeout_s
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
            sock.sendall(frame(message))
            ack = read_frame(sock, deadline)
    except MLLPError:
        raise
    except OSError as err:
        raise MLLPError(f"MLLP {host}:{port}: {type(err).__name__}") from err
    try:
        accepted, reason = read_ack(ack, control_id)
    except HL7Error as err:
        raise MLLPError(str(err)) from err
    if not accepted:
        raise Nak(scrub(reason, identifiers or []))
    return reason
