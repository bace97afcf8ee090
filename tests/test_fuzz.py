"""Property-based fuzzing (hypothesis) of the decoders, the handler and the served model.

Inputs are valid DICOM / PNG / JPEG files with bytes flipped, cut, inserted or spliced,
and random request shapes (raw body, form fields, JSON with base64, headers). Every
case must end as a 200 or a typed 4xx: never another exception, a 5xx, or a dead worker.
Bounded: a fixed number of examples per property, no shrinking time limit surprises.
"""
from __future__ import annotations

import base64
import io
import json

import cv2
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cxrserve.core.errors import CXRInputError
from cxrserve.core.imageio import decode
from cxrserve.synthetic.phantoms import render, sample_spec

STATUSES = {200, 400, 413, 415, 422}


def _seeds() -> dict[str, bytes]:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    img = render(sample_spec(77, kind="frontal", height=96, width=96)).image
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "1.2.3.4"
    ds.Modality, ds.Rows, ds.Columns = "CR", 96, 96
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.WindowCenter, ds.WindowWidth, ds.RescaleSlope, ds.RescaleIntercept = 2048, 4096, 1, 0
    ds.PixelData = (img.astype("uint16") * 16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return {"dicom": buf.getvalue(), "png": cv2.imencode(".png", img)[1].tobytes(),
            "jpeg": cv2.imencode(".jpg", img)[1].tobytes()}


SEEDS = _seeds()


@st.composite
def mutated(draw) -> bytes:
    """A seed file with 1-4 mutations: flips, truncation, insertion, splice, header clobber."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "splice", "header"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            data = data[:pos]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "splice":
            other = SEEDS[draw(st.sampled_from(sorted(SEEDS)))]
            data = data[:pos] + other[draw(st.integers(0, len(other) - 1)):]
        else:  # overwrite bytes where the format's header / DICOM tags live
            start = draw(st.integers(0, min(400, max(0, len(data) - 1))))
            blob = draw(st.binary(min_size=1, max_size=16))
            data[start:start + len(blob)] = blob
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated())
def test_decoder_only_raises_typed_errors(data):
    try:
        xray = decode(data)
    except CXRInputError as err:
        assert err.status in STATUSES - {200, 422}
        return
    assert xray.pixels.ndim == 2 and 0.0 <= float(xray.pixels.min()) <= float(xray.pixels.max()) <= 1.0


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=2048))
def test_decoder_on_random_bytes(data):
    with pytest.raises(CXRInputError):
        decode(data)


# --------------------------------------------------------------------------- handler in process
@pytest.fixture(scope="module")
def handler(unpacked):
    from cxrserve.core.serving import CXRHandler
    from cxrserve.families.triage.pipeline import LungSegPipeline
    from tsutil import HandlerContext

    folder = unpacked("cxr-lungseg")
    config = json.loads((folder / "pipeline.json").read_text()).get("handler", {})

    class Handler(CXRHandler):
        pipeline_class = LungSegPipeline

    h = Handler()
    h.initialize(HandlerContext(model_dir=str(folder), model_yaml_config={"handler": config}))
    return h


@st.composite
def request_shapes(draw) -> tuple[dict, dict]:
    body = draw(mutated())
    shape = draw(st.sampled_from(["raw", "form", "json", "json_bad_b64", "options"]))
    headers = {}
    if shape == "raw":
        req = {"body": body}
    elif shape == "form":
        req = {"image": body, "mask": draw(st.sampled_from([b"true", b"false", b"perhaps", b""]))}
    elif shape == "json":
        req = {"body": json.dumps({"image": base64.b64encode(body).decode(),
                                   "overlay": draw(st.sampled_from([True, False, "x", 3, None]))}).encode()}
    elif shape == "json_bad_b64":
        req = {"body": json.dumps({"image": draw(st.text(max_size=40))}).encode()}
    else:
        req = {"data": body}
        headers = {"X-CXR-Mask": draw(st.sampled_from(["true", "no", "%%%", ""]))}
    return req, headers


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(batch=st.lists(request_shapes(), min_size=1, max_size=3))
def test_handler_answers_every_request_with_its_own_status(handler, batch):
    ctx = handler.context
    ctx.statuses.clear()
    ctx.headers = [h for _, h in batch]
    out = handler.handle([r for r, _ in batch], ctx)
    assert len(out) == len(batch)
    for i, response in enumerate(out):
        status = ctx.status(i)
        assert status in STATUSES, (status, response)
        if status == 200:
            assert response["model"] == "cxr-lungseg"
        else:
            assert response["status"] == status and response["message"]


# --------------------------------------------------------------------------- the running server
@pytest.mark.serve
@pytest.mark.slow
def test_served_model_survives_malformed_uploads(served, capsys):
    """A bounded stream of fuzzed uploads: every answer 200/4xx, and the same worker lives on."""
    def worker_pid() -> int:
        r = requests.get(f"{served.management}/models/cxr-lungseg", headers=served.headers("management"), timeout=10)
        return int(r.json()[0]["workers"][0]["pid"])

    pid = worker_pid()
    seen = []

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.function_scoped_fixture])
    @given(data=mutated())
    def post(data):
        r = served.post("cxr-lungseg", data, headers={"X-CXR-Mask": "false"})
        seen.append(r.status_code)
        assert r.status_code in STATUSES, (r.status_code, r.text[:300])

    post()
    with capsys.disabled():
        print(f"\nserver fuzz: {len(seen)} uploads, statuses {sorted(set(seen))}")
    assert worker_pid() == pid, "a malformed upload killed the worker"
    ok = served.post("cxr-lungseg", SEEDS["png"], headers={"X-CXR-Mask": "false"})
    assert ok.status_code == 200
