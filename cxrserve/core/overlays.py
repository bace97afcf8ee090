"""Pictures people look at: heatmaps, saliency and masks over the radiograph, as PNG.

A map computed at model resolution (or inside a crop box) is resized onto the
original image, normalised to 0..1, coloured with the JET map and blended at half
opacity (Cohen et al. overlay saliency at half opacity), then PNG-encoded. Responses
carry PNGs as base64 strings; the CLI writes them to files.
"""
from __future__ import annotations

import base64

import cv2
import numpy as np

#: Largest side of returned overlays; huge DICOMs would make multi-MB responses.
MAX_OVERLAY_SIDE = 1024


def normalise_map(heat: np.ndarray) -> np.ndarray:
    heat = np.maximum(np.asarray(heat, dtype=np.float32), 0.0)
    peak = float(heat.max())
    return heat / peak if peak > 0 else heat


def place_map(heat: np.ndarray, image_size: tuple[int, int], box: list[int] | None = None) -> np.ndarray:
    """Resize ``heat`` onto a zero canvas of ``image_size`` (w, h), inside ``box`` if given."""
    width, height = image_size
    canvas = np.zeros((height, width), dtype=np.float32)
    x0, y0, x1, y1 = box if box is not None else (0, 0, width, height)
    canvas[y0:y1, x0:x1] = cv2.resize(heat.astype(np.float32), (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    return canvas


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5, box: list[int] | None = None) -> np.ndarray:
    """Blend a 0..1 ``heat`` map (same size as ``image``) over a grey uint8 image -> RGB uint8."""
    grey = np.repeat(image[..., None], 3, axis=2)
    colour = cv2.applyColorMap(np.uint8(np.clip(heat, 0, 1) * 255), cv2.COLORMAP_JET)[..., ::-1]
    weight = (alpha * np.clip(heat, 0, 1))[..., None]
    out = (grey * (1 - weight) + colour * weight).astype(np.uint8)
    if box is not None:
        x0, y0, x1, y1 = box
        thickness = max(1, round(max(image.shape) / 300))
        cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), (0, 255, 0), thickness)
    return out


def limit_size(img: np.ndarray, max_side: int = MAX_OVERLAY_SIDE) -> np.ndarray:
    h, w = img.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return img
    return cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def picture_size(full_size: tuple[int, int], max_side: int = MAX_OVERLAY_SIDE) -> tuple[int, int]:
    """(w, h) of a picture of an image stored at ``full_size``: the image's size, long side <= ``max_side``."""
    w, h = full_size
    scale = max_side / max(w, h)
    return (w, h) if scale >= 1 else (max(1, round(w * scale)), max(1, round(h * scale)))


def fit_picture(img: np.ndarray, full_size: tuple[int, int] | None = None) -> np.ndarray:
    """:func:`limit_size` for an image of ``full_size`` drawn on a reduced-resolution copy.

    Pictures keep the size the full-resolution path gives them (the stored size, long
    side at most :data:`MAX_OVERLAY_SIDE`) whatever resolution they were drawn at.
    """
    if full_size is None:
        return limit_size(img)
    w, h = picture_size(full_size)
    if (img.shape[1], img.shape[0]) == (w, h):
        return img
    interp = cv2.INTER_AREA if w < img.shape[1] else cv2.INTER_LINEAR
    return cv2.resize(img, (w, h), interpolation=interp)


def png_bytes(img: np.ndarray) -> bytes:
    """Encode a grey, bool or RGB array as PNG."""
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 3:
        img = img[..., ::-1]  # OpenCV writes BGR
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def png_base64(img: np.ndarray) -> str:
    return base64.b64encode(png_bytes(img)).decode("ascii")


def heatmap_png(image: np.ndarray, heat: np.ndarray, box: list[int] | None = None, alpha: float = 0.5,
                full_size: tuple[int, int] | None = None) -> str:
    """Base64 PNG of ``heat`` (any resolution, covering ``box`` or the whole image) over ``image``.

    ``full_size``: the stored (w, h) when ``image`` is a reduced-resolution copy.
    """
    h, w = image.shape[:2]
    placed = place_map(normalise_map(heat), (w, h), box)
    return png_base64(fit_picture(overlay(image, placed, alpha=alpha, box=box), full_size))
