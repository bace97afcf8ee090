"""The viewer's server (`cxrserve ui`): page, guards, and the proxy to TorchServe.

Guards are checked against a TorchServe address where nothing listens; the proxy
against the session's real TorchServe (``served``), including models it lacks. Every
client logs in as a browser does, through the printed secret URL (its own guards, the
lengths and the timeouts are in test_ui_security.py).
"""
from __future__ import annotations

import base64
import io
import threading

import numpy as np
import pytest
import requests
from PIL import Image

from cxrserve.synthetic.phantoms import render, sample_spec
from cxrserve.tools.ui.config import UIConfig
from cxrserve.tools.ui.server import make_server
from cxrserve.tools.ui.views import views
from schemas import validate
from tsutil import png

UI = {"X-CXR-UI": "1"}




def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def start(config: UIConfig):
    server = make_server(config)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


def login(server) -> requests.Session:
    """A client holding the viewer's cookie, got the browser's way (the printed URL)."""
    session = requests.Session()
    r = session.get(server.secret_url, timeout=10)
    assert r.status_code == 200 and r.url == server.url, r.text
    return session


@pytest.fixture
def offline_ui():
    """A viewer whose TorchServe address has nothing listening."""
    server = start(UIConfig(port=0, inference="http://127.0.0.1:9", management="http://127.0.0.1:9", token="t",
                            max_bytes=32 * 1024))
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def offline_api(offline_ui):
    with login(offline_ui) as session:
        yield session


@pytest.fixture(scope="module")
def frontal_png() -> bytes:
    return png(render(sample_spec(77, label="covid19", height=320, width=320, min_extent=2)).image)


# --------------------------------------------------------------------------- guards
def test_page_is_served_with_a_strict_policy(offline_ui, offline_api):
    r = offline_api.get(offline_ui.url, timeout=10)
    assert r.status_code == 200 and "<title>cxrserve viewer</title>" in r.text
    policy = r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy
    assert r.headers["X-Frame-Options"] == "DENY"
    for name in ("app.js", "style.css"):
        assert requests.get(f"{offline_ui.url}static/{name}", timeout=10).status_code == 200
    assert requests.get(f"{offline_ui.url}static/../app.py", timeout=10).status_code == 404


@pytest.mark.parametrize("headers,status", [
    ({"Host": "attacker.example:80"}, 403),  # DNS rebinding
    ({"Origin": "http://attacker.example"}, 403),  # another site's page
])
def test_foreign_host_or_origin_is_refused(offline_ui, offline_api, headers, status):
    r = offline_api.post(f"{offline_ui.url}api/predict/cxr-zeroshot", json={"image": b64(b"x")},
                      headers={**UI, **headers}, timeout=10)
    assert r.status_code == status


@pytest.mark.parametrize("case,status,error", [
    ("no_ui_header", 403, "forbidden"),
    ("form_post", 415, "unsupported_media_type"),
    ("bad_base64", 400, "malformed_request"),
    ("bad_labels", 400, "malformed_request"),
    ("bad_name", 400, "bad_model_name"),
    ("unknown_model", 404, "not_served"),
    ("too_large", 413, "payload_too_large"),
    ("server_down", 502, "unavailable"),
])
def test_api_guards_answer_clearly(offline_ui, offline_api, case, status, error):
    url = f"{offline_ui.url}api/predict/cxr-zeroshot"
    kwargs = {"json": {"image": b64(b"\x89PNG fake")}, "headers": UI}
    if case == "no_ui_header":
        kwargs["headers"] = {}
    elif case == "form_post":
        kwargs = {"files": {"image": ("a.png", b"x")}, "headers": UI}
    elif case == "bad_base64":
        kwargs["json"] = {"image": "not base64!"}
    elif case == "bad_labels":
        kwargs["json"] = {"image": b64(b"x"), "labels": "Pneumonia"}
    elif case == "bad_name":
        url = f"{offline_ui.url}api/predict/cxr%20zeroshot"
    elif case == "unknown_model":
        url = f"{offline_ui.url}api/predict/cxr-unknown"
    elif case == "too_large":
        kwargs["json"] = {"image": b64(bytes(200 * 1024))}  # the viewer's limit here: 32 KiB per image
    r = offline_api.post(url, timeout=30, **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"] == error and r.json()["message"]


def test_models_list_says_when_torchserve_cannot_be_asked(offline_ui, offline_api):
    info = offline_api.get(f"{offline_ui.url}api/models", timeout=10).json()
    assert info["management"] == "unavailable"
    assert [m["name"] for m in info["models"]] == [v.name for v in views()]
    assert all(m["served"] is None for m in info["models"])


# --------------------------------------------------------------------------- proxy
@pytest.fixture(scope="module")
def live_ui(served):
    server = start(UIConfig(port=0, inference=served.inference, management=served.management,
                            key_file=served.workdir / "key_file.json"))
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def live_api(live_ui):
    with login(live_ui) as session:
        yield session


@pytest.mark.serve
def test_models_list_matches_the_store(live_ui, live_api, served):
    info = live_api.get(f"{live_ui.url}api/models", timeout=10).json()
    assert info["management"] == "ok"
    by_name = {m["name"]: m["served"] for m in info["models"]}
    for view in views():
        assert by_name[view.name] == (view.name in served.models)
    assert all(by_name.get(name) for name in served.models)


@pytest.mark.serve
def test_proxy_returns_what_torchserve_returns(live_ui, live_api, served, frontal_png):
    assert "cxr-zeroshot" in served.models
    r = live_api.post(f"{live_ui.url}api/predict/cxr-zeroshot", headers=UI, timeout=180,
                      json={"image": b64(frontal_png), "labels": ["Pneumonia", "épanchement pleural"]})
    assert r.status_code == 200, r.text
    body = r.json()
    validate(body, "cxr-zeroshot")
    assert list(body["probabilities"]) == ["Pneumonia", "épanchement pleural"]
    direct = served.post("cxr-zeroshot", frontal_png, headers={"X-CXR-Labels": '["Pneumonia"]'}).json()
    assert body["probabilities"]["Pneumonia"] == pytest.approx(direct["probabilities"]["Pneumonia"], abs=1e-6)
    keys = served.keys
    for secret in keys.values():
        assert secret not in r.text
        assert secret not in live_api.get(f"{live_ui.url}api/models", timeout=10).text


@pytest.mark.serve
def test_every_served_model_answers_with_its_pictures(live_ui, live_api, served, frontal_png):
    pictures = {"cxr-triage": "heatmap_png", "cxr-lungseg": "overlay_png", "cxr-severity": "saliency_png",
                "cxr-mortality": "overlay_png"}
    for view in views():
        payload = {"image": b64(frontal_png)}
        if "prior" in view.inputs:
            payload["prior"] = b64(frontal_png)
        r = live_api.post(f"{live_ui.url}api/predict/{view.name}", headers=UI, json=payload, timeout=180)
        if view.name not in served.models:
            assert r.status_code == 404 and r.json()["error"] == "not_served"
            continue
        assert r.status_code == 200, (view.name, r.text)
        body = r.json()
        validate(body, view.name)
        if view.name in pictures:
            picture = Image.open(io.BytesIO(base64.b64decode(body[pictures[view.name]])))
            assert picture.size == (320, 320)
        if view.name == "cxr-study":  # one request, every family's section with its picture
            for name, field in pictures.items():
                assert field in body["results"][name.removeprefix("cxr-")], name
            body = body["results"]["pxs"]
        if "prior" in view.inputs:
            assert body["change"]["distance"] == pytest.approx(0.0, abs=1e-3)


@pytest.mark.serve
def test_rejected_input_keeps_the_model_status_and_message(live_ui, live_api, served):
    garbage = np.random.default_rng(0).bytes(4000)
    r = live_api.post(f"{live_ui.url}api/predict/cxr-zeroshot", headers=UI, json={"image": b64(garbage)}, timeout=60)
    assert r.status_code == 415
    assert r.json()["error"] == "unsupported_format" and "DICOM, PNG or JPEG" in r.json()["message"]
