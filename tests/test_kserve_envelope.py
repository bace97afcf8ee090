"""TorchServe's ``kservev2`` envelope learns the v2 binary tensor extension in the handler's ``initialize``.

In process, the way TorchServe's worker does it (``ts/model_loader.py``): the envelope
wraps the handler's ``handle`` and parses each request before the handler sees it. Until
a cxrserve handler has initialized, a binary body fails inside the envelope (the worker
answers 503); after, it is answered like the same request in JSON, and a malformed one
gets a 400. Importing cxrserve's TorchServe adapter changes nothing in TorchServe.
"""
from __future__ import annotations

import base64
import importlib
import json
import struct
import subprocess
import sys

import pytest

from handlers_loader import initialized_handler
from tsutil import REPO, HandlerContext
from tsutil import png as _png

pytest.importorskip("ts")

#: Keys whose values differ between two runs of the same request.
VOLATILE = {"seconds", "timings_ms", "created", "request_id"}


def binary_body(png: bytes, request_id: str) -> tuple[bytes, int]:
    """A v2 request with the image as a binary BYTES tensor; (body, JSON header length)."""
    tensor = struct.pack("<I", len(png)) + png
    header = json.dumps({"id": request_id, "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                       "parameters": {"binary_data_size": len(tensor)}}]}).encode()
    return header + tensor, len(header)


def json_body(png: bytes, request_id: str) -> bytes:
    return json.dumps({"id": request_id, "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                     "data": [base64.b64encode(png).decode()]}]}).encode()


def stable(value):
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


@pytest.fixture()
def fresh_envelope_class():
    """The envelope class as a new worker has it: TorchServe's module, re-imported untaught."""
    return importlib.reload(importlib.import_module("ts.torch_handler.request_envelope.kservev2")).KServev2Envelope


def test_importing_the_adapter_leaves_torchserve_alone():
    code = ("import cxrserve.core.serving\n"
            "from ts.torch_handler.request_envelope.kservev2 import KServev2Envelope as E\n"
            "print(getattr(E, '_cxrserve_binary', False))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_initialize_teaches_the_envelope_binary_requests(unpacked, fresh_envelope_class):
    from ts.utils.util import PredictionException

    from cxrserve.core import kserve
    from cxrserve.tools.kserve.repository import model_config
    from cxrserve.synthetic.phantoms import render, sample_spec

    png = _png(render(sample_spec(3, kind="frontal", height=256, width=256)).image)
    body, length = binary_body(png, "bin-1")
    headers = [{"Inference-Header-Content-Length": str(length)}]

    untaught = fresh_envelope_class(lambda data, context: pytest.fail("the handler was reached"))
    with pytest.raises(UnicodeDecodeError):  # what TorchServe's worker answers with a 503
        untaught.handle([{"body": body}], HandlerContext("unused", headers=headers))

    folder = unpacked("cxr-lungseg")
    handler, _ = initialized_handler(folder, model_config(folder).get("handler"))  # as the worker reads it
    envelope = fresh_envelope_class(handler.handle)  # as model_loader wraps the handler
    context = HandlerContext("unused", headers=headers)
    (answer,) = envelope.handle([{"body": body}], context)
    assert answer["id"] == "bin-1" and context.status(0) == 200
    (as_json,) = envelope.handle([{"body": json_body(png, "json-1")}], HandlerContext("unused"))
    assert stable(kserve.v2_response(answer)) == stable(kserve.v2_response(as_json))

    # the handler's own status for a bad file, not the envelope's 503
    bad, bad_length = binary_body(b"not an image", "bin-2")
    context = HandlerContext("unused", headers=[{"Inference-Header-Content-Length": str(bad_length)}])
    (answer,) = envelope.handle([{"body": bad}], context)
    assert context.status(0) == 415 and kserve.v2_response(answer)["error"] == "unsupported_format"
    # a body that lies about its tensor's size: 400 with the reason
    with pytest.raises(PredictionException) as err:
        envelope.handle([{"body": body[:-10]}], HandlerContext("unused", headers=headers))
    assert err.value.error_code == 400 and "binary_data_size" in err.value.message
