"""Typed input errors, each carrying the HTTP status a client should see.

Handlers catch these per request and answer that request alone with its status, so
one bad file never fails its batch neighbours. Anything else escaping a handler is a
bug and becomes TorchServe's generic 5xx.
"""
from __future__ import annotations


class CXRInputError(ValueError):
    """A request whose input cannot be scored. ``status`` is the HTTP code."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, detail: dict | None = None):
        super().__init__(message)
        self.message = message
        self.detail = detail or {}

    def to_dict(self) -> dict:
        body = {"error": self.code, "status": self.status, "message": self.message}
        if self.detail:
            body["detail"] = self.detail
        return body


class MalformedInput(CXRInputError):
    """400: bytes that claim a format but cannot be decoded, or a malformed request."""

    status = 400
    code = "malformed_input"


class PayloadTooLarge(CXRInputError):
    """413: too many bytes or too many pixels (decompression bombs)."""

    status = 413
    code = "payload_too_large"


class UnsupportedFormat(CXRInputError):
    """415: not DICOM, PNG or JPEG, or a DICOM object that holds no single 2-D image."""

    status = 415
    code = "unsupported_format"


class NotFrontalCXR(CXRInputError):
    """422: a valid image that is not a frontal chest radiograph."""

    status = 422
    code = "not_frontal_cxr"


# 422s from the input checks that need no learned model (cxrserve.core.input_checks).
class ColourImage(NotFrontalCXR):
    """422: a colour image (or colour DICOM); radiographs are grey."""

    code = "colour_image"


class ImageTooSmall(NotFrontalCXR):
    """422: too few pixels a side to be a radiograph the models can read."""

    code = "image_too_small"


class ConstantImage(NotFrontalCXR):
    """422: blank or nearly constant image."""

    code = "constant_image"


class NotProjectionRadiograph(NotFrontalCXR):
    """422: a DICOM object whose SOP class / modality is not a chest projection radiograph."""

    code = "not_projection_radiograph"


HTTP_PHRASES = {
    200: "OK",
    400: "Bad Request",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Entity",
    500: "Internal Server Error",
}
