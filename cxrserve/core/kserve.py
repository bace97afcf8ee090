"""KServe v2 (Open Inference Protocol) requests for every cxrserve handler.

With ``service_envelope=kservev2`` (how KServe's TorchServe runtime runs TorchServe,
see ``deploy/kserve/``) TorchServe's envelope turns one v2 request

.. code-block:: json

    {"id": "study-1",
     "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["<base64 DICOM/PNG/JPEG>"]},
                {"name": "prior", "datatype": "BYTES", "shape": [1], "data": ["<base64>"]},
                {"name": "heatmap", "datatype": "BOOL", "shape": [1], "data": [true]}]}

into a handler batch of one entry per named input (``{"name", "datatype", "shape",
"data"}``, BYTES reduced to their first element) and wraps what the handler returns
as ``{"id", "model_name", "model_version", "outputs": [{"name", "datatype": "BYTES",
"shape": [1], "data": [<response>]}]}``. :func:`is_v2_batch` recognises that shape and
:func:`merge_v2_inputs` folds the inputs back into one study (image, extra images,
options), so the handler answers with one response named after the first input.

TorchServe 0.12's envelope reads only the first request of a batch, so models served
through it must run with ``batchSize: 1`` (``deploy/kserve/config/config.properties``
sets it per model); the other requests of a larger batch would never be answered.
"""
from __future__ import annotations

import base64
import binascii
from typing import Any

from cxrserve.core.errors import MalformedInput

V2_KEYS = {"name", "datatype", "data"}
IMAGE_NAMES = ("image", "data", "body", "file", "input-0")


def is_v2_batch(requests: list) -> bool:
    """True when ``requests`` are the per-input dicts the kservev2 envelope produces."""
    return bool(requests) and all(isinstance(r, dict) and V2_KEYS <= set(r) and isinstance(r.get("name"), str)
                                  for r in requests)


def _unwrap(value: Any) -> Any:
    while isinstance(value, list) and len(value) == 1:
        value = value[0]
    return value


def _bytes(value: Any, name: str) -> bytes:
    value = _unwrap(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as err:
            raise MalformedInput(f"KServe v2 input {name!r}: BYTES data must be base64: {err}") from err
    raise MalformedInput(f"KServe v2 input {name!r}: expected BYTES data (base64 file)")


def merge_v2_inputs(inputs: list[dict], extra_images: tuple[str, ...] = ()) -> tuple[dict[str, bytes], dict]:
    """Per-input dicts -> ``({"image": bytes, "prior": bytes}, options)`` for one study."""
    images: dict[str, bytes] = {}
    options: dict = {}
    for entry in inputs:
        name = entry["name"]
        if name in IMAGE_NAMES:
            if "image" in images:
                raise MalformedInput("KServe v2 request has more than one image input: send one study per request")
            images["image"] = _bytes(entry.get("data"), name)
        elif name in extra_images:
            images[name] = _bytes(entry.get("data"), name)
        else:
            options[name] = _unwrap(entry.get("data"))
    return images, options


def v2_request(image: bytes, *, model_inputs: dict[str, bytes] | None = None, options: dict | None = None,
               request_id: str | None = None) -> dict:
    """Build a v2 request body for one study (clients, tests, the README)."""
    inputs = [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(image).decode()]}]
    for name, data in (model_inputs or {}).items():
        inputs.append({"name": name, "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(data).decode()]})
    for name, value in (options or {}).items():
        if isinstance(value, bool):
            inputs.append({"name": name, "datatype": "BOOL", "shape": [1], "data": [value]})
        elif isinstance(value, (int, float)):
            inputs.append({"name": name, "datatype": "FP64", "shape": [1], "data": [float(value)]})
        else:
            inputs.append({"name": name, "datatype": "BYTES", "shape": [1], "data": [str(value)]})
    body: dict = {"inputs": inputs}
    if request_id:
        body["id"] = request_id
    return body


def v2_response(body: dict) -> dict:
    """The cxrserve response inside a v2 answer (``outputs[0].data[0]``).

    TorchServe's envelope puts the JSON object itself there; the KServe-native predictor
    (:mod:`cxrserve.tools.kserve`) answers a BYTES tensor holding it as JSON text.
    """
    try:
        value = body["outputs"][0]["data"][0]
    except (KeyError, IndexError, TypeError) as err:
        raise ValueError(f"not a KServe v2 response: {str(body)[:200]}") from err
    if isinstance(value, (str, bytes)):
        import json

        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"v2 output is not a JSON response: {str(value)[:200]}") from err
    return value


# --------------------------------------------------------------------------- model repository
