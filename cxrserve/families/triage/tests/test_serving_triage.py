"""End to end through TorchServe started from config.properties with the built archives."""
from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from cxrserve.synthetic.dicomwrite import to_dicom
from cxrserve.synthetic.phantoms import render, sample_spec
from schemas import validate
from tsutil import png

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def frontal() -> np.ndarray:
    return render(sample_spec(21, label="pneumonia", height=512, width=448)).image


@pytest.fixture(scope="module")
def chest_dicom(frontal, shared_data_or_none) -> bytes:
    if shared_data_or_none is not None:
        return (shared_data_or_none / "dicom_samples" / "chest" / "WG04_RG1_J2KI.dcm").read_bytes()
    return to_dicom(frontal, transfer_syntax="j2k_lossless", bits_stored=12)


@pytest.fixture(scope="module")
def shared_data_or_none():
    from conftest import shared_data_root

    root = shared_data_root()
    return root if root.is_dir() else None




def test_dicom_returns_the_contract(served, chest_dicom):
    r = served.post("cxr-triage", chest_dicom, headers={"Content-Type": "application/dicom"})
    assert r.status_code == 200, r.text
    body = r.json()
    validate(body, "cxr-triage")
    assert body["input"]["format"] == "dicom"
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


def test_png_with_heatmap_as_form_field(served, frontal):
    r = requests.post(f"{served.inference}/predictions/cxr-triage", headers=served.headers(),
                      files={"image": ("study.png", png(frontal), "image/png")}, data={"heatmap": "true"}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    validate(body, "cxr-triage")
    heat = Image.open(io.BytesIO(base64.b64decode(body["heatmap_png"])))
    assert heat.size == (448, 512)


@pytest.mark.parametrize("case,status,words", [
    ("lateral", 422, "lateral"),
    ("garbage", 415, "unrecognised"),
    ("bomb", 413, "Mpx"),
    ("empty", 400, "empty"),
])
def test_bad_inputs_get_clear_4xx(served, frontal, case, status, words):
    data = {
        "lateral": lambda: to_dicom(frontal, view_position="LL"),
        "garbage": lambda: np.random.default_rng(0).bytes(5000),
        "bomb": lambda: bomb_png(),
        "empty": lambda: b"",
    }[case]()
    r = served.post("cxr-triage", data)
    assert r.status_code == status, r.text
    validate(r.json(), "error")
    assert words in r.json()["message"]


def bomb_png() -> bytes:
    import zlib

    data = bytearray(png(np.zeros((1, 1), np.uint8)))
    data[16:24] = (40000).to_bytes(4, "big") * 2
    data[29:33] = (zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF).to_bytes(4, "big")
    return bytes(data)


def test_oversized_request_is_413_and_server_stays_healthy(served):
    huge = b"\0" * (64 * 1024 * 1024 + 1024)  # over max_request_size
    r = served.post("cxr-triage", huge)
    assert r.status_code == 413
    assert requests.get(f"{served.inference}/ping", headers=served.headers(), timeout=10).status_code == 200


def test_good_requests_batched_with_bad_ones_still_succeed(served, frontal, chest_dicom):
    good = [png(frontal), chest_dicom] * 3
    bad = [b"not an image", to_dicom(frontal, view_position="RL"), bomb_png()] * 2
    payloads = [p for pair in zip(good, bad) for p in pair]
    with ThreadPoolExecutor(max_workers=len(payloads)) as pool:
        responses = list(pool.map(lambda d: served.post("cxr-triage", d), payloads))
    for data, r in zip(payloads, responses):
        if data in good:
            assert r.status_code == 200, r.text
            validate(r.json(), "cxr-triage")
        else:
            assert 400 <= r.status_code < 500, r.text
    after = served.post("cxr-triage", png(frontal))
    assert after.status_code == 200


def test_lungseg_served(served, frontal):
    r = served.post("cxr-lungseg", png(frontal))
    assert r.status_code == 200, r.text
    body = r.json()
    validate(body, "cxr-lungseg")
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png"]))))
    assert mask.shape == frontal.shape


def test_inference_needs_the_token(served, frontal):
    r = requests.post(f"{served.inference}/predictions/cxr-triage", data=png(frontal),
                      headers={"Content-Type": "application/octet-stream"}, timeout=30)
    assert r.status_code in (400, 401) and "label" not in r.text
