"""The KServe-native predictor's body limit is enforced while the body arrives.

The predictor's own ``/v2/models/{name}/infer`` route (``install_routes``) runs in a real
uvicorn on a loopback port, in front of a stand-in model server (no model store needed),
in a process of its own (``kserve_limits_server.py``: the kserve SDK and tritonclient's
gRPC stubs cannot share one process). A chunked upload has no Content-Length, so only counting the bytes as they are
read can stop it: the old route buffered the whole body first (a 300 MiB upload got its
413 after 67 s and +460 MB). The client below keeps sending until the answer comes and
reports how much it got to send.
"""
from __future__ import annotations

import importlib.util
import json
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tsutil import free_port

if importlib.util.find_spec("kserve") is None or importlib.util.find_spec("uvicorn") is None:
    pytest.skip("kserve / uvicorn not installed", allow_module_level=True)

LIMIT = 1 << 20  # the route's max_body in these tests
CHUNK = 64 << 10


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    here = Path(__file__).resolve().parent
    port = free_port()
    log = tmp_path_factory.mktemp("kserve-limits") / "server.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent), str(here)])}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(here / "kserve_limits_server.py"), str(port), str(LIMIT)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, log.read_text()[-2000:]
                assert time.time() < deadline, "the route's server did not start"
                time.sleep(0.2)
        yield ("127.0.0.1", port)
    finally:
        proc.terminate()
        proc.wait(10)


def read_response(sock: socket.socket, timeout: float = 10.0) -> tuple[int, dict]:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        if not part:
            break
        data += part
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    headers = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
    length = int(headers.get(b"content-length", b"0"))
    while len(rest) < length:
        part = sock.recv(65536)
        if not part:
            break
        rest += part
    return status, json.loads(rest[:length] or b"{}")


def upload(address, total: int, *, chunked: bool = True, send_body: bool = True) -> tuple[int, dict, int, float]:
    """POST ``total`` bytes to the infer route; (status, body, bytes sent, seconds to the answer).

    Sends until the server answers, closes, or the body is complete, checking for an answer
    between chunks like a client that reads early responses (curl does).
    """
    start = time.perf_counter()
    sent = 0
    with socket.create_connection(address, timeout=30) as sock:
        length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}"
        sock.sendall(f"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"{length}\r\n\r\n".encode())
        block = b"x" * CHUNK
        try:
            while send_body and sent < total:
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:
                    break  # the answer (or a close) came before the body was done
                piece = block[: min(CHUNK, total - sent)]
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                sent += len(piece)
            else:
                if chunked and send_body:
                    sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed after answering: read what it said
        status, body = read_response(sock)
    return status, body, sent, time.perf_counter() - start


def test_a_chunked_upload_over_the_limit_is_refused_at_the_limit(url):
    total = 64 << 20  # 64 x the limit; the old route read all of it before answering
    status, body, sent, seconds = upload(url, total)
    assert status == 413 and body["error"] == "payload_too_large", body
    # What the client got to send before the answer: the limit plus socket buffers, not the body.
    assert sent < total // 4, f"{sent} of {total} bytes were sent before the 413"
    assert seconds < 10, seconds


def test_a_declared_length_over_the_limit_is_refused_before_any_body(url):
    status, body, sent, _ = upload(url, 300 << 20, chunked=False, send_body=False)
    assert status == 413 and body["error"] == "payload_too_large" and sent == 0, body


def test_a_chunked_body_under_the_limit_is_read_whole(url):
    # Past the limit check: the route reads it all and finds it is not JSON (400, not 413).
    status, body, sent, _ = upload(url, LIMIT - CHUNK)
    assert status == 400 and body["error"] == "malformed_input", body
    assert sent == LIMIT - CHUNK


def test_the_server_still_answers_after_refusing(url):
    upload(url, 8 * LIMIT)
    status, _, _, _ = upload(url, 100)
    assert status == 400
