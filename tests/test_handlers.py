"""Handlers in process (TorchServe's calling convention, no server): batches, options, errors."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from cxrserve.synthetic.dicomwrite import to_dicom
from cxrserve.synthetic.phantoms import render, sample_spec
from handlers_loader import handler_for, initialized_handler
from schemas import validate
from tsutil import png as _png




@pytest.fixture(scope="module")
def films():
    frontal = render(sample_spec(11, label="covid19", height=320, width=300)).image
    return {
        "png": _png(frontal),
        "dicom": to_dicom(frontal, transfer_syntax="jpeg_lossless", bits_stored=12, photometric="MONOCHROME1"),
        "lateral": to_dicom(frontal, view_position="LL"),
        "garbage": bytes(range(256)) * 4,
    }


def _bomb_png() -> bytes:
    import zlib

    data = bytearray(_png(np.zeros((1, 1), np.uint8)))
    data[16:24] = (40000).to_bytes(4, "big") * 2
    data[29:33] = (zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF).to_bytes(4, "big")
    return bytes(data)


def test_mixed_batch_answers_each_request_alone(pipeline, films):
    handler, context = handler_for(pipeline("cxr-triage"))
    requests = [
        {"body": films["png"]},
        {"body": films["garbage"]},
        {"image": films["lateral"]},
        {"data": films["dicom"], "heatmap": b"true"},
        {"body": _bomb_png()},
        {"body": b""},
        {"body": {"image": base64.b64encode(films["png"]).decode(), "heatmap": True}},
    ]
    out = handler.handle(requests, context)
    assert len(out) == len(requests)
    assert [context.status(i) for i in range(len(requests))] == [200, 415, 422, 200, 413, 400, 200]
    for i in (0, 3, 6):
        validate(out[i], "cxr-triage")
    for i in (1, 2, 4, 5):
        validate(out[i], "error")
    assert "lateral" in out[2]["message"]
    assert "heatmap_png" in out[3] and "heatmap_png" in out[6] and "heatmap_png" not in out[0]
    assert out[3]["input"]["format"] == "dicom" and out[3]["input"]["photometric"] == "MONOCHROME1"
    assert any("DEMO MODEL" in w for w in out[0]["warnings"])


def test_heatmap_png_covers_the_original_image(pipeline, films):
    handler, context = handler_for(pipeline("cxr-triage"), headers=[{"X-CXR-Heatmap": "true"}])
    out = handler.handle([{"body": films["png"]}], context)[0]
    heat = Image.open(io.BytesIO(base64.b64decode(out["heatmap_png"])))
    assert heat.size == (300, 320) and heat.mode == "RGB"


def test_bad_option_value_is_400_naming_the_option(pipeline, films):
    handler, context = handler_for(pipeline("cxr-triage"))
    out = handler.handle([{"image": films["png"], "heatmap": b"perhaps"}], context)[0]
    assert context.status(0) == 400 and "heatmap" in out["message"]


def test_lungseg_mask_at_original_size(pipeline, films):
    handler, context = handler_for(pipeline("cxr-lungseg"))
    out = handler.handle([{"body": films["png"], "overlay": b"1"}], context)[0]
    validate(out, "cxr-lungseg")
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(out["mask_png"]))))
    assert mask.shape == (320, 300) and set(np.unique(mask)) <= {0, 255}
    assert 0.1 < out["lung_area_fraction"] < 0.5
    x0, y0, x1, y1 = out["lung_bbox"]
    assert 0 <= x0 < x1 <= 300 and 0 <= y0 < y1 <= 320


def test_initialize_reads_model_config_limits(unpacked, films):
    handler, context = initialized_handler(unpacked("cxr-triage"), {"max_pixels": 50_000, "backend": "onnx"})
    out = handler.handle([{"body": films["png"]}], context)[0]
    assert context.status(0) == 413 and "Mpx" in out["message"]
    description = handler.describe_handle()
    assert set(description["components"]) == {"lungseg", "triage_classifier"}
    assert description["components"]["triage_classifier"]["labels"] == ["covid19", "normal", "pneumonia"]
