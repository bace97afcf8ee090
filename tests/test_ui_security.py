"""The viewer's guards against other local users and against clients that hold it up.

Every attack here worked on the viewer before it had a secret, strict lengths and timeouts:
any local user used TorchServe through it, ``Content-Length: -1`` read the stream to its
end, and slow senders held a thread each for as long as they liked. The TorchServe
address has nothing listening: none of this needs a model.
"""
from __future__ import annotations

import base64
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest import mock

import pytest
import requests

from cxrserve.tools.ui import cli as ui_cli
from cxrserve.tools.ui.config import UIConfig, read_secret_file
from cxrserve.tools.ui.server import make_server

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")

UI = {"X-CXR-UI": "1"}
MAX_BYTES = 32 * 1024
CONN_TIMEOUT = 1.5
#: Answers that need no body and no TorchServe come back well within this.
FAST_S = 3.0


@pytest.fixture
def ui():
    server = make_server(UIConfig(port=0, inference="http://127.0.0.1:9", management="http://127.0.0.1:9",
                                  token="t", max_bytes=MAX_BYTES, conn_timeout=CONN_TIMEOUT, max_connections=3))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def login(server) -> requests.Session:
    session = requests.Session()
    r = session.get(server.secret_url, timeout=10)
    assert r.status_code == 200 and r.url == server.url
    return session


def raw(server, request: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.config.port), timeout=FAST_S)
    if request:
        sock.sendall(request)
    return sock


def post_head(server, length_headers: str, extra: str = "") -> bytes:
    """A predict request's head, authenticated, with the given length header lines."""
    return (f"POST /api/predict/cxr-zeroshot HTTP/1.1\r\nHost: 127.0.0.1:{server.config.port}\r\n"
            f"Authorization: Bearer {server.secret}\r\nX-CXR-UI: 1\r\nContent-Type: application/json\r\n"
            f"{length_headers}{extra}\r\n").encode()


def read_response(sock: socket.socket) -> bytes:
    """Everything until the server closes (or the socket times out: pytest then fails)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> float | None:
    """Seconds until the server drops ``sock`` (sending ``trickle`` every 0.2 s meanwhile), or None."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        try:
            if trickle:
                sock.send(trickle)
            if select.select([sock], [], [], 0.2)[0] and sock.recv(65536) == b"":
                return time.monotonic() - start
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - start
    return None


# --------------------------------------------------------------------------- the secret
@pytest.mark.parametrize("method,path", [("GET", "api/models"), ("POST", "api/predict/cxr-zeroshot")])
@pytest.mark.parametrize("credentials", ["none", "wrong_cookie", "wrong_bearer", "other_port_cookie"])
def test_api_needs_the_secret(ui, method, path, credentials):
    headers, cookies = dict(UI), {}
    if credentials == "wrong_cookie":
        cookies[ui.cookie_name] = ui.secret[:-1] + ("A" if ui.secret[-1] != "A" else "B")
    elif credentials == "wrong_bearer":
        headers["Authorization"] = "Bearer not-the-secret"
    elif credentials == "other_port_cookie":  # another viewer's cookie (cookies ignore ports)
        cookies["cxrserve-ui-1"] = ui.secret
    r = requests.request(method, f"{ui.url}{path}", headers=headers, cookies=cookies,
                         json={"image": base64.b64encode(b"x").decode()}, timeout=10)
    assert r.status_code == 401, r.text
    assert r.json()["error"] == "unauthorized" and "secret" in r.json()["message"]
    assert r.headers["WWW-Authenticate"].startswith("Bearer")


def test_the_printed_url_logs_the_browser_in_and_leaves_the_address_bar(ui):
    assert ui.secret_url == f"{ui.url}?secret={ui.secret}" and len(ui.secret) >= 40
    r = requests.get(ui.secret_url, allow_redirects=False, timeout=10)
    assert r.status_code == 303 and r.headers["Location"] == "/"
    cookie = r.headers["Set-Cookie"]
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}
    assert cookie.startswith(f"{ui.cookie_name}={ui.secret};")
    assert attributes == {"httponly", "samesite", "path"} and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert r.headers["X-Frame-Options"] == "DENY" and "default-src 'none'" in r.headers["Content-Security-Policy"]

    session = login(ui)
    assert "<title>cxrserve viewer</title>" in session.get(ui.url, timeout=10).text
    info = session.get(f"{ui.url}api/models", timeout=10)
    assert info.status_code == 200 and info.json()["max_bytes"] == MAX_BYTES
    r = session.post(f"{ui.url}api/predict/cxr-zeroshot", headers=UI, timeout=30,
                     json={"image": base64.b64encode(b"\x89PNG fake").decode()})
    assert r.status_code == 502 and r.json()["error"] == "unavailable"  # past every guard, to TorchServe
    session.close()


def test_a_login_from_another_site_lands_through_the_viewers_own_page(ui):
    # A redirect would keep the cross-site chain, where a browser withholds the Strict cookie.
    r = requests.get(ui.secret_url, headers={"Sec-Fetch-Site": "cross-site"}, allow_redirects=False, timeout=10)
    assert r.status_code == 200 and r.headers["Set-Cookie"].startswith(f"{ui.cookie_name}={ui.secret};")
    assert 'http-equiv="refresh" content="0; url=/"' in r.text and ui.secret not in r.text


@pytest.mark.slow
def test_chromium_logs_in_from_the_launcher_file_and_from_a_link(ui):
    if not CHROMIUM.exists():
        pytest.skip("Chromium from the OS packages is not installed: run `make browser`")
    sync_api = pytest.importorskip("playwright.sync_api")
    with mock.patch.object(ui_cli.webbrowser, "open") as opened:
        folder = ui_cli.open_in_browser(ui.secret_url)  # what `cxrserve ui --open` hands the browser
    launcher = Path(opened.call_args.args[0].removeprefix("file://"))
    assert ui.secret not in opened.call_args.args[0]  # the browser's command line shows no secret
    assert launcher.parent == folder and (folder.stat().st_mode & 0o777, launcher.stat().st_mode & 0o777) == (
        0o700, 0o600)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                             args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"])
        try:
            for how in ("launcher", "link"):
                page = browser.new_page()
                if how == "launcher":
                    page.goto(launcher.as_uri())
                else:
                    page.set_content(f'<a id="go" href="{ui.secret_url}">viewer</a>')
                    page.click("#go")
                page.wait_for_selector("#analyse", timeout=15_000)
                assert page.url == ui.url, how
                page.close()
        finally:
            browser.close()
    launcher.unlink()
    folder.rmdir()


def test_scripts_use_the_bearer_header(ui):
    r = requests.get(f"{ui.url}api/models", headers={"Authorization": f"Bearer {ui.secret}"}, timeout=10)
    assert r.status_code == 200


@pytest.mark.parametrize("query", ["", "?secret=wrong", "?secret=", "?secret={s}&secret={s}"])
def test_page_without_the_secret_says_where_to_get_it(ui, query):
    r = requests.get(ui.url + query.format(s=ui.secret), allow_redirects=False, timeout=10)
    assert r.status_code == 401 and r.headers["Content-Type"].startswith("text/html")
    assert "printed" in r.text and "Set-Cookie" not in r.headers
    assert ui.secret not in r.text


def test_static_files_stay_open(ui):
    # The package's own files, no data: the 401 page and the login need nothing else.
    for name in ("app.js", "style.css"):
        assert requests.get(f"{ui.url}static/{name}", timeout=10).status_code == 200


def test_secrets_differ_per_start_and_stay_out_of_the_log(ui, caplog):
    other = make_server(UIConfig(port=0, token="t"))
    assert other.secret != ui.secret
    other.server_close()
    with caplog.at_level(logging.INFO, logger="cxrserve.tools.ui.handler"):
        login(ui).close()
    assert "secret=<redacted>" in caplog.text and ui.secret not in caplog.text


def test_secret_file_must_be_private(tmp_path):
    path = tmp_path / "ui-secret"
    path.write_text("a-fixed-secret-for-tests-0123456789\n")
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        read_secret_file(path)
    os.chmod(path, 0o600)
    assert read_secret_file(path) == "a-fixed-secret-for-tests-0123456789"
    path.write_text("short")
    with pytest.raises(ValueError, match="at least 16"):
        read_secret_file(path)


# --------------------------------------------------------------------------- lengths
@pytest.mark.parametrize("lengths,status,error", [
    ("Content-Length: -1\r\n", 400, "bad_content_length"),
    ("Content-Length: abc\r\n", 400, "bad_content_length"),
    ("Content-Length: +5\r\n", 400, "bad_content_length"),
    ("Content-Length: 5\r\nContent-Length: 5\r\n", 400, "bad_content_length"),
    ("Content-Length: 5, 5\r\n", 400, "bad_content_length"),
    ("", 411, "length_required"),
    ("Transfer-Encoding: chunked\r\n", 411, "length_required"),
    ("Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", 411, "length_required"),
    (f"Content-Length: {10 * MAX_BYTES}\r\n", 413, "payload_too_large"),
])
def test_bad_lengths_are_answered_at_once_without_reading_the_body(ui, lengths, status, error):
    # Only the head is sent and the socket stays open: a server that waits for a body
    # (or for the end of the stream, as -1 did) never answers within FAST_S.
    sock = raw(ui, post_head(ui, lengths))
    start = time.monotonic()
    response = read_response(sock)  # also shows the server closed the connection
    sock.close()
    assert time.monotonic() - start < FAST_S
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), response[:200]
    assert b"Connection: close" in head and f'"error": "{error}"'.encode() in body


def test_over_the_limit_with_expect_100_is_refused_before_continue(ui):
    sock = raw(ui, post_head(ui, f"Content-Length: {10 * MAX_BYTES}\r\n", "Expect: 100-continue\r\n"))
    response = read_response(sock)
    sock.close()
    assert response.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in response


def test_refused_body_is_never_taken_for_a_second_request(ui):
    # The body of a refused POST holds a request; were it read as the next one, it would be answered too.
    smuggled = f"GET /api/models HTTP/1.1\r\nHost: 127.0.0.1:{ui.config.port}\r\n\r\n".encode()
    head = (f"POST /api/predict/cxr-zeroshot HTTP/1.1\r\nHost: 127.0.0.1:{ui.config.port}\r\n"
            f"Content-Length: {len(smuggled)}\r\n\r\n").encode()
    sock = raw(ui, head + smuggled)
    response = read_response(sock)
    sock.close()
    assert response.count(b"HTTP/1.1 ") == 1 and response.startswith(b"HTTP/1.1 401 ")


def test_a_good_length_is_read_exactly_and_the_connection_kept(ui):
    body = b'{"image": "not base64!"}'
    request = post_head(ui, f"Content-Length: {len(body)}\r\n") + body
    sock = raw(ui, request + request)  # two requests on one connection: the first consumed exactly its bytes
    data = b""
    while data.count(b'"error": "malformed_request"') < 2:
        chunk = sock.recv(65536)
        assert chunk, data  # closed after the first answer: the body's bytes were not all consumed
        data += chunk
    sock.close()
    assert data.count(b"HTTP/1.1 400 ") == 2 and b"Connection: close" not in data


def test_a_short_body_times_out(ui):
    sock = raw(ui, post_head(ui, "Content-Length: 100\r\n") + b'{"image": ')
    assert closed_within(sock, CONN_TIMEOUT + FAST_S) is not None
    sock.close()


# --------------------------------------------------------------------------- slow clients
@pytest.mark.parametrize("trickle", [b"", b"X"], ids=["idle", "one_byte_every_0.2s"])
def test_slow_sender_is_dropped_after_the_timeout(ui, trickle):
    sock = raw(ui, f"GET /api/models HTTP/1.1\r\nHost: 127.0.0.1:{ui.config.port}\r\nX-Slow: ".encode())
    dropped = closed_within(sock, CONN_TIMEOUT + FAST_S, trickle)
    sock.close()
    assert dropped is not None, "the server still holds a connection that never finishes its request"
    assert dropped >= CONN_TIMEOUT - 0.5


def test_connections_beyond_the_cap_get_503_at_once_and_slots_come_back(ui):
    holders = [raw(ui, b"GET /api/models HTTP/1.1\r\n") for _ in range(ui.config.max_connections)]
    time.sleep(0.3)  # let the server accept them
    extra = raw(ui)  # sends nothing: a server without a cap would wait for its request
    start = time.monotonic()
    response = read_response(extra)
    extra.close()
    assert time.monotonic() - start < FAST_S
    assert response.startswith(b"HTTP/1.1 503 ") and b'"error": "busy"' in response
    for sock in holders:
        sock.close()
    deadline = time.monotonic() + FAST_S  # the handlers notice the closed sockets and free their slots
    while True:
        r = requests.get(f"{ui.url}api/models", headers={"Authorization": f"Bearer {ui.secret}"}, timeout=10)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert r.status_code == 200


# --------------------------------------------------------------------------- the command
@pytest.mark.slow
def test_cxrserve_ui_prints_the_secret_url_and_refuses_a_shared_secret_file(tmp_path):
    secret_file = tmp_path / "ui-secret"
    secret_file.write_text("fixed-secret-for-this-test-0123456789\n")
    command = [sys.executable, "-m", "cxrserve", "ui", "--port", "0", "--inference", "http://127.0.0.1:9",
               "--management", "http://127.0.0.1:9", "--secret-file", str(secret_file)]
    os.chmod(secret_file, 0o640)
    refused = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "chmod 600" in refused.stderr
    os.chmod(secret_file, 0o600)
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        url = line.split()[3]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/?secret=fixed-secret-for-this-test-0123456789")
        with requests.Session() as session:
            assert session.get(url, timeout=10).status_code == 200
            assert session.get(url.split("?")[0] + "api/models", timeout=10).status_code == 200
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
        process.stdout.close()
        process.stderr.close()
