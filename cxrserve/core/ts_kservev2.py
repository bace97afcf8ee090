"""The KServe v2 binary tensor extension under TorchServe's ``kservev2`` envelope.

Why a v2 binary request used to get **503 "Prediction failed"** from TorchServe: the
Java front end passes the body through untouched, and TorchServe's Python envelope
(``ts/torch_handler/request_envelope/kservev2.py``, ``KServev2Envelope._from_json``)
runs ``json.loads(body.decode("utf8"))`` on the whole body. With the binary extension
(tritonclient's default for BYTES) the body is a JSON header of
``Inference-Header-Content-Length`` bytes followed by the raw tensors, so the decode
raises ``UnicodeDecodeError`` before our handler runs, and ``ts/service.py`` turns any
exception there into a 503 for the whole batch.

:func:`teach_envelope`, called by :meth:`cxrserve.core.serving.CXRHandler.initialize` (so
only inside a TorchServe worker that serves a cxrserve model, never on import), wraps
the envelope's ``_from_json`` so that it first splits such a body: the JSON header is
parsed, each input with ``parameters.binary_data_size`` gets its ``data`` from the bytes
that follow (BYTES elements as raw ``bytes``, numbers through numpy), and the envelope
then proceeds as for a JSON request. A body that is neither v2 JSON nor a well-formed
binary request is answered **400** with a message (TorchServe's ``PredictionException``),
never a 503. Responses stay JSON (TorchServe's envelope
writes only JSON; tritonclient reads a JSON answer to a binary request).

Why the class's method and not a subclass: TorchServe picks the envelope class from its
own module (``service_envelope=kservev2`` names a module), wraps the handler in it before
calling ``initialize``, and hands ``initialize`` nothing that reaches the envelope. A
worker process serves one model, so the class this worker teaches wraps only our handler.
"""
from __future__ import annotations

import json
import struct

HEADER = "inference-header-content-length"

_DTYPES = {"BOOL": "bool", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "<i1",
           "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}


class BinaryRequestError(ValueError):
    """A v2 body that cannot be split into its JSON header and binary tensors (400)."""


def split_bytes_tensor(raw: bytes) -> list[bytes]:
    """A serialized v2 BYTES tensor (each element: 4-byte little-endian length, then bytes)."""
    out, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise BinaryRequestError("BYTES tensor ends inside an element length")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise BinaryRequestError("BYTES tensor element runs past its binary_data_size")
        out.append(raw[offset:offset + size])
        offset += size
    return out


def _header_end(body: bytes) -> int:
    """Where the JSON header ends when the client sent no Inference-Header-Content-Length."""
    try:
        _, end = json.JSONDecoder().raw_decode(body.decode("latin-1"))  # 1 char per byte
    except json.JSONDecodeError as err:
        raise BinaryRequestError(f"request body is not a KServe v2 request: {err.msg} at byte {err.pos}") from None
    return end


def decode_v2_body(body: bytes, json_length: int | None = None) -> dict:
    """A v2 request body (JSON, or JSON header + binary tensors) -> the JSON form with ``data`` filled."""
    import numpy as np

    if json_length is None:
        try:
            return json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            json_length = _header_end(body)
    if not 0 < json_length <= len(body):
        raise BinaryRequestError(f"Inference-Header-Content-Length {json_length} does not fit the "
                                 f"{len(body)}-byte body")
    try:
        header = json.loads(body[:json_length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BinaryRequestError(f"the v2 JSON header is not valid JSON: {err}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise BinaryRequestError("the v2 JSON header has no 'inputs' list")
    offset = json_length
    for inp in header["inputs"]:
        if not isinstance(inp, dict):
            raise BinaryRequestError("every v2 input must be an object")
        size = (inp.get("parameters") or {}).get("binary_data_size")
        if inp.get("data") is not None or size is None:
            continue
        if not isinstance(size, int) or size < 0 or offset + size > len(body):
            raise BinaryRequestError(f"input {inp.get('name')!r}: binary_data_size {size!r} runs past the body")
        raw = body[offset:offset + size]
        offset += size
        datatype = str(inp.get("datatype", "")).upper()
        if datatype == "BYTES":
            inp["data"] = split_bytes_tensor(raw)
        elif datatype in _DTYPES:
            inp["data"] = np.frombuffer(raw, dtype=_DTYPES[datatype]).tolist()
        else:
            raise BinaryRequestError(f"input {inp.get('name')!r}: unsupported datatype {datatype!r}")
        inp["parameters"] = {k: v for k, v in inp["parameters"].items() if k != "binary_data_size"}
    if offset != len(body):
        raise BinaryRequestError(f"{len(body) - offset} bytes after the last binary input")
    return header


def _json_length(context, idx: int) -> int | None:
    try:
        headers = context.get_all_request_header(idx) or {}
    except (AttributeError, IndexError, KeyError, TypeError):
        return None
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == HEADER:
            if isinstance(value, (bytes, bytearray)):
                value = value.decode("ascii", "replace")
            try:
                return int(str(value).strip())
            except ValueError:
                raise BinaryRequestError("Inference-Header-Content-Length must be a byte count") from None
    return None


def teach_envelope() -> bool:
    """Teach this worker's kservev2 envelope the binary extension (idempotent); False without TorchServe."""
    try:
        from ts.torch_handler.request_envelope import kservev2
        from ts.utils.util import PredictionException
    except ImportError:
        return False
    envelope = kservev2.KServev2Envelope
    if getattr(envelope, "_cxrserve_binary", False):
        return True
    original = envelope._from_json

    def _from_json(self, body_list):
        if body_list and isinstance(body_list[0], (bytes, bytearray)):
            try:
                body_list = [decode_v2_body(bytes(body), _json_length(self.context, idx))
                             if isinstance(body, (bytes, bytearray)) else body
                             for idx, body in enumerate(body_list)]
            except BinaryRequestError as err:
                raise PredictionException(str(err), 400) from None
        try:
            return original(self, body_list)
        except (KeyError, IndexError, TypeError, ValueError) as err:
            # A JSON body that is not a v2 request (no "inputs", shape mismatch, ...).
            raise PredictionException(f"not a KServe v2 request: {type(err).__name__}: {str(err)[:200]}",
                                      400) from None

    envelope._from_json = _from_json
    envelope._cxrserve_binary = True
    return True
