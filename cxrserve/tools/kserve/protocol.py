"""The Open Inference Protocol (v2) as cxrserve speaks it: requests in, errors out.

A v2 request holds one study: ``image`` BYTES ``[1]`` (base64 in JSON, raw bytes with the
binary tensor extension or gRPC), extra images (``prior``) likewise, options as request
``parameters`` or as BOOL/BYTES/FP64 inputs (inputs win). :func:`request_to_study` turns
it into what ``Pipeline.make_item`` takes, through the same parser as TorchServe's
``kservev2`` envelope (:func:`cxrserve.core.kserve.merge_v2_inputs`). The answer is one
output, ``response``, BYTES ``[1]``: the model's JSON response as UTF-8 text.

A request's own input error is answered with the project's error body
(``{"error": code, "status", "message", "detail"}``) and

=====  ======================  ==========================================================
HTTP   gRPC code               when
=====  ======================  ==========================================================
400    ``INVALID_ARGUMENT``    malformed request, bad base64, bad option value
413    ``RESOURCE_EXHAUSTED``  too many bytes or pixels (gRPC's own code for an over-size
                               message; not worth retrying: the same input fails again)
415    ``INVALID_ARGUMENT``    not DICOM/PNG/JPEG (the trailing metadata tells 415)
422    ``FAILED_PRECONDITION`` a valid image that is not a frontal CXR: the request is well
                               formed, the input is not in the state the model requires
=====  ======================  ==========================================================

Over gRPC the status details are the JSON error body, and the trailing metadata carries
``cxr-http-status`` and ``cxr-error`` (the code), so 400 and 415 stay distinguishable.
"""
from __future__ import annotations

from typing import Any

from cxrserve.core.errors import CXRInputError, MalformedInput

#: Input errors -> gRPC status code names (see the table above).
GRPC_CODES = {400: "INVALID_ARGUMENT", 413: "RESOURCE_EXHAUSTED", 415: "INVALID_ARGUMENT",
              422: "FAILED_PRECONDITION"}
OUTPUT_NAME = "response"
#: v2 request parameters that belong to the protocol, never options.
PROTOCOL_PARAMETERS = {"binary_data_output", "binary_data", "binary_data_size", "content_type", "headers"}


def grpc_code_name(status: int) -> str:
    return GRPC_CODES.get(status, "INVALID_ARGUMENT" if 400 <= status < 500 else "INTERNAL")


# --------------------------------------------------------------------------- metadata
def option_datatype(default: Any) -> str:
    if isinstance(default, bool):
        return "BOOL"
    if isinstance(default, (int, float)):
        return "FP64"
    return "BYTES"


def model_inputs(pipeline) -> list[dict]:
    """A pipeline's v2 inputs: ``image``, its extra images, one per option (what it declares)."""
    from cxrserve.core.pipeline import FULL_RESOLUTION
    from cxrserve.core.sites import SITE_OPTION

    inputs = [{"name": "image", "datatype": "BYTES", "shape": [1]}]
    inputs += [{"name": name, "datatype": "BYTES", "shape": [1]} for name in pipeline.extra_images]
    inputs += [{"name": key, "datatype": option_datatype(opt.default), "shape": [1]}
               for key, opt in pipeline.OPTIONS.items()]
    inputs.append({"name": FULL_RESOLUTION, "datatype": "BOOL", "shape": [1]})  # every pipeline's
    inputs.append({"name": SITE_OPTION, "datatype": "BYTES", "shape": [1]})  # every pipeline's (a site name)
    return inputs


def model_outputs() -> list[dict]:
    return [{"name": OUTPUT_NAME, "datatype": "BYTES", "shape": [1]}]


# --------------------------------------------------------------------------- requests
def _values(inp) -> list:
    """Elements of a kserve ``InferInput``, BYTES kept as ``bytes`` (raw) or ``str`` (JSON)."""
    import numpy as np

    if getattr(inp, "_raw_data", None) is not None:
        return [v.item() if hasattr(v, "item") else v for v in np.asarray(inp.as_numpy()).reshape(-1)]
    data = inp.data
    if data is None:
        return []
    if hasattr(data, "tolist"):
        data = data.tolist()
    out: list = []

    def flat(value):
        if isinstance(value, (list, tuple)):
            for v in value:
                flat(v)
        else:
            out.append(value)

    flat(data)
    return out


def _parameters(params) -> dict:
    """v2 request parameters (REST: plain values; gRPC: ``InferParameter`` oneofs) as options."""
    out = {}
    for key, value in (params or {}).items():
        if hasattr(value, "WhichOneof"):  # gRPC: bool / int64 / string / double / uint64
            field = value.WhichOneof("parameter_choice")
            if field is None:
                continue
            value = getattr(value, field)
        if key not in PROTOCOL_PARAMETERS:
            out[key] = value
    return out


def request_to_study(request, extra_images: tuple[str, ...]) -> tuple[dict[str, bytes], dict]:
    """A v2 ``InferRequest`` -> ``({"image": bytes, ...}, raw options)`` for ``Pipeline.make_item``.

    Reuses :func:`cxrserve.core.kserve.merge_v2_inputs` (the TorchServe envelope's parser), so
    both engines read the same requests the same way.
    """
    from cxrserve.core.kserve import IMAGE_NAMES, merge_v2_inputs

    if not hasattr(request, "inputs"):
        raise MalformedInput("send an Open Inference Protocol (v2) request to /v2/models/<model>/infer")
    entries = []
    for inp in request.inputs:
        values = _values(inp)
        if inp.name in IMAGE_NAMES or inp.name in extra_images:
            if inp.datatype != "BYTES":
                raise MalformedInput(f"input {inp.name!r} must be BYTES (the file), got {inp.datatype}")
            if len(values) != 1:
                raise MalformedInput(f"input {inp.name!r} holds {len(values)} elements: send one study per "
                                     "request (shape [1]); concurrent requests are batched by the server")
        elif len(values) != 1:
            raise MalformedInput(f"option input {inp.name!r} must hold exactly one value, got {len(values)}")
        entries.append({"name": inp.name, "datatype": inp.datatype, "data": values})
    images, options = merge_v2_inputs(entries, extra_images)
    return images, {**_parameters(getattr(request, "parameters", None)), **options}


def parse_binary_request(body: bytes, json_length: int, model_name: str):
    """A v2 REST request with the binary tensor extension, BYTES elements kept as bytes."""
    import orjson
    from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput

    if json_length < 0 or json_length > len(body):
        raise MalformedInput(f"Inference-Header-Content-Length {json_length} does not fit the {len(body)}-byte body")
    try:
        header = orjson.loads(body[:json_length])
        offset, inputs = json_length, []
        for spec in header["inputs"]:
            params = dict(spec.get("parameters") or {})
            inp = InferInput(name=spec["name"], shape=list(spec["shape"]), datatype=spec["datatype"],
                             parameters=params)
            if spec.get("data") is not None:
                inp.data = spec["data"]
            elif "binary_data_size" in params:
                size = int(params["binary_data_size"])
                if size < 0 or offset + size > len(body):
                    raise MalformedInput(f"input {inp.name!r}: binary_data_size {size} runs past the body")
                inp._raw_data = body[offset:offset + size]
                offset += size
            else:
                raise MalformedInput(f"input {inp.name!r} has neither data nor binary_data_size")
            inputs.append(inp)
        outputs = [RequestedOutput(name=o["name"], parameters=o.get("parameters")) for o in header.get("outputs") or []]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        if isinstance(err, CXRInputError):
            raise
        raise MalformedInput(f"malformed v2 binary request: {type(err).__name__}: {str(err)[:200]}") from None
    if offset != len(body):
        raise MalformedInput(f"{len(body) - offset} bytes after the last binary input")
    return InferRequest(model_name=model_name, infer_inputs=inputs, request_id=header.get("id"),
                        parameters=header.get("parameters"), request_outputs=outputs or None)
