"""cxrserve.tools.client: REST and gRPC against the running TorchServe, tokens, retries, ``cxrserve predict``.

Retry behaviour is checked against a tiny local HTTP server that answers 503/507 or
4xx on demand, so the tests count exactly how many attempts the client made.
"""
from __future__ import annotations

import argparse
import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import pytest
import requests

from cxrserve.tools import server
from cxrserve.tools.client import cli as predict_cli
from cxrserve.tools.client import AuthenticationError, CXRClient, InputRejected, ServerUnavailable
from cxrserve.synthetic.phantoms import render, sample_spec
from tsutil import free_port


def phantom_png(seed: int) -> bytes:
    return cv2.imencode(".png", render(sample_spec(seed, kind="frontal", height=256, width=256)).image)[1].tobytes()


@pytest.fixture(scope="module")
def rest(served):
    with CXRClient(served.inference, key_file=served.workdir / "key_file.json") as c:
        yield c


@pytest.fixture(scope="module")
def grpc_client(served):
    with CXRClient(f"127.0.0.1:{served.grpc_inference_port}", protocol="grpc",
                   key_file=served.workdir / "key_file.json") as c:
        yield c


# --------------------------------------------------------------------------- against TorchServe
@pytest.mark.serve
def test_rest_and_grpc_agree_on_every_model(served, rest, grpc_client):
    image = phantom_png(31)
    for model in served.models:
        a = rest.predict(model, image)
        b = grpc_client.predict(model, image)
        a.pop("timings_ms", None), b.pop("timings_ms", None)  # cxr-study's wall times differ per call
        assert a == b, model
        assert a["model"] == model and a["input"]["width"] == 256


@pytest.mark.serve
def test_options_reach_the_handler_both_ways(rest, grpc_client):
    image = phantom_png(32)
    for c in (rest, grpc_client):
        out = c.predict("cxr-triage", image, heatmap=True)
        assert base64.b64decode(out["heatmap_png"])[:4] == b"\x89PNG"
        assert "heatmap_png" not in c.predict("cxr-triage", image, heatmap=False)


@pytest.mark.serve
@pytest.mark.parametrize("payload,status,code", [
    (b"definitely not an image", 415, "unsupported_format"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 400, "malformed_input"),
])
def test_bad_input_is_the_same_4xx_over_rest_and_grpc(rest, grpc_client, payload, status, code):
    for c in (rest, grpc_client):
        with pytest.raises(InputRejected) as info:
            c.predict("cxr-triage", payload)
        assert (info.value.status, info.value.code) == (status, code), c.protocol


@pytest.mark.serve
def test_bad_option_and_unknown_model(rest, grpc_client):
    with pytest.raises(InputRejected) as info:
        rest.predict("cxr-triage", phantom_png(33), heatmap="maybe")
    assert info.value.status == 400 and "heatmap" in info.value.message
    for c in (rest, grpc_client):
        with pytest.raises(InputRejected) as info:
            c.predict("cxr-no-such-model", phantom_png(33))
        assert info.value.status == 404, c.protocol


@pytest.mark.serve
def test_wrong_token_is_an_authentication_error(served):
    for protocol, url in (("rest", served.inference), ("grpc", f"127.0.0.1:{served.grpc_inference_port}")):
        with CXRClient(url, protocol=protocol, token="not-the-token") as c:
            with pytest.raises(AuthenticationError) as info:
                c.predict("cxr-triage", phantom_png(34))
            assert info.value.status == 401


@pytest.mark.serve
def test_client_follows_a_rotated_token(served, tmp_path):
    """A token minted anew (expiry, restart) is picked up from the key file without user action."""
    key_file = served.workdir / "key_file.json"
    c = CXRClient(served.inference, key_file=key_file, management_url=served.management)
    old = c.credentials.token
    api = json.loads(key_file.read_text())["API"]["key"]
    r = requests.get(f"{served.management}/token", params={"type": "inference"},
                     headers={"Authorization": f"Bearer {api}"}, timeout=10)
    assert r.status_code == 200
    try:
        assert c.predict("cxr-lungseg", phantom_png(35))["model"] == "cxr-lungseg"
        assert c.credentials.token != old
    finally:
        # The session's other tests read keys once at start: give them a valid token again.
        served.keys.update(server.read_keys(key_file))
        c.close()


@pytest.mark.serve
def test_predict_command_saves_pngs_next_to_summary(served, tmp_path, capsys):
    files = []
    for i in range(2):
        f = tmp_path / f"study{i}.png"
        f.write_bytes(phantom_png(40 + i))
        files.append(str(f))
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    parser = argparse.ArgumentParser()
    predict_cli.register_cli(parser.add_subparsers())
    out = tmp_path / "out"
    args = parser.parse_args(["predict", *files, str(bad), "--model", "cxr-triage", "--heatmap", "--url",
                              served.inference, "--key-file", str(served.workdir / "key_file.json"), "--out", str(out)])
    assert args.func(args) == 1  # one input rejected
    text = capsys.readouterr().out
    assert "study0.png: cxr-triage" in text and "input gate:" in text
    assert "notes.txt: rejected, 415 unsupported_format" in text
    summary = json.loads((out / "summary.json").read_text())
    assert [e["status"] for e in summary] == [200, 200, 415]
    heatmap = out / summary[0]["result"]["heatmap_file"]
    assert heatmap.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cv2.imread(str(heatmap)).shape[:2] == (256, 256)

    args = parser.parse_args(["predict", files[0], "--model", "cxr-lungseg", "--json", "--url", served.inference,
                              "--key-file", str(served.workdir / "key_file.json"), "--out", str(out)])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed[0]["result"]["model"] == "cxr-lungseg" and "mask_file" in printed[0]["result"]


# --------------------------------------------------------------------------- retries (fake server)
class FakeServer:
    """Answers POST /predictions/* with a scripted list of statuses, counting calls."""

    def __init__(self, statuses: list[int]):
        self.statuses, self.calls = list(statuses), 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                owner.calls += 1
                status = owner.statuses.pop(0) if owner.statuses else 200
                body = {"model": "fake", "ok": True} if status == 200 else {
                    "code": status, "type": "ServiceUnavailableException" if status >= 500 else "",
                    "error": "unsupported_format", "status": status, "message": "scripted"}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.mark.parametrize("statuses,calls", [([503, 507, 503], 4), ([], 1)])
def test_retries_busy_answers_then_succeeds(statuses, calls):
    fake = FakeServer(statuses)
    try:
        c = CXRClient(fake.url, token="t", retries=4, backoff=0.01)
        assert c.predict("m", b"x") == {"model": "fake", "ok": True}
        assert fake.calls == calls
    finally:
        fake.close()


def test_gives_up_after_retries_and_never_retries_4xx():
    fake = FakeServer([503] * 10)
    try:
        with pytest.raises(ServerUnavailable):
            CXRClient(fake.url, token="t", retries=2, backoff=0.01).predict("m", b"x")
        assert fake.calls == 3
    finally:
        fake.close()
    fake = FakeServer([415, 200])
    try:
        with pytest.raises(InputRejected):
            CXRClient(fake.url, token="t", retries=4, backoff=0.01).predict("m", b"x")
        assert fake.calls == 1
    finally:
        fake.close()


def test_connection_refused_is_retried_then_unavailable():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerUnavailable):
        CXRClient(url, token="t", retries=2, backoff=0.01, timeout=2).predict("m", b"x")


def test_token_from_key_file(tmp_path, monkeypatch):
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"inference": {"key": "abc"}, "management": {"key": "m"}, "API": {"key": "k"}}))
    monkeypatch.setenv("CXRSERVE_KEY_FILE", str(key_file))
    monkeypatch.delenv("CXRSERVE_TOKEN", raising=False)
    assert CXRClient().credentials.token == "abc"
    assert CXRClient(token="explicit").credentials.token == "explicit"


def test_grpc_stubs_come_from_the_installed_torchserve(tmp_path):
    from cxrserve.tools import grpc_stubs

    protos = grpc_stubs.read_protos()
    assert b"service InferenceAPIsService" in protos["inference.proto"]
    folder = grpc_stubs.ensure_stubs(tmp_path)
    assert (folder / "inference_pb2_grpc.py").exists() and (folder / "management_pb2_grpc.py").exists()
    assert grpc_stubs.ensure_stubs(tmp_path) == folder  # cached: generated once per protocol version


@pytest.mark.serve
def test_model_version_selection(rest, grpc_client):
    image = phantom_png(36)
    for c in (rest, grpc_client):
        assert c.predict("cxr-lungseg", image, version="0.1.0", mask=False)["model"] == "cxr-lungseg"
        with pytest.raises(InputRejected) as info:
            c.predict("cxr-lungseg", image, version="9.9.9", mask=False)
        assert isinstance(info.value, InputRejected) and info.value.status == 404, (c.protocol, info.value)
