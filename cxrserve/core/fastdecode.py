"""Decode at model resolution: only the pixels the requested models read.

Every served model reads at most 512 px of a radiograph that is stored at 1-10 Mpx, so
``decode(data, target=N)`` (:func:`cxrserve.core.imageio.decode`) returns an
:class:`~cxrserve.core.imageio.XRay` whose shorter side is at least ``N`` pixels (never
enlarged), and whose ``original_size`` keeps the stored size for the ``input`` block,
boxes and pictures. Per source:

================================  =========================================================
JPEG baseline DICOM (8 bit)       libjpeg-turbo DCT-domain scaling (``simplejpeg``,
                                  ``min_height``/``min_width``: scales 1/8 .. 7/8)
JPEG files                        the same scaling through Pillow's ``draft`` (same
                                  libjpeg-turbo; keeps the EXIF orientation path)
JPEG 2000 DICOM (unsigned, VOI)   OpenJPEG's resolution reduction (Pillow's ``reduce``):
                                  only the wavelet levels needed are decoded
everything else (raw, RLE,        full decode by pydicom/pylibjpeg, then stored values ->
deflate, JPEG lossless, JPEG-LS,  display uint8 through one integer lookup table (no
12-bit JPEG, signed J2K)          full-size float copies), then an area downscale in uint8
PNG                               Pillow decode; 8-bit grey goes straight to the uint8 area
                                  downscale, other modes through the full raster path
================================  =========================================================

Images without a VOI (window or VOI LUT) are min-max normalised, and their extremes are
the stored pixels' (often a small burned-in marker): a codec-reduced image's smoothed
extremes would change the contrast of the whole film, so those JPEGs are decoded at full
size by libjpeg-turbo (still ~6 ms for 4 Mpx) and those JPEG 2000 files at full size.

The lookup table is the full-resolution pipeline itself (BitsStored mask, Modality
LUT, VOI LUT/window or min-max, MONOCHROME1 inversion, rounding) evaluated once per
stored value that can occur, so a LUT-then-downscale image equals the full path's uint8
image downscaled. DCT scaling and wavelet reduction average in stored values before
the LUT (the codec offers no other order); the effect on every family's scores is
measured by ``benchmarks/decode_at_resolution.py``.
"""
from __future__ import annotations

import io
import math

import cv2
import numpy as np

JPEG_SYNTAXES = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51")  # baseline, extended
J2K_SYNTAXES = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")


def reduced_size(width: int, height: int, target: int | None) -> tuple[int, int]:
    """``(w, h)`` whose shorter side is ``target`` (aspect kept); the input size if not larger."""
    if not target or min(width, height) <= target:
        return width, height
    scale = target / min(width, height)
    return max(target, round(width * scale)), max(target, round(height * scale))


def power_of_two_levels(width: int, height: int, target: int | None, most: int = 5) -> int:
    """How many halvings keep the shorter side at least ``target`` (0 when none)."""
    if not target:
        return 0
    short, levels = min(width, height), 0
    while levels < most and math.ceil(short / 2 ** (levels + 1)) >= target:
        levels += 1
    return levels


def area_downscale(image: np.ndarray, target: int | None) -> np.ndarray:
    """Area average (``cv2.INTER_AREA``) by the largest whole factor keeping the shorter side >= ``target``.

    Whole factors only (2 x 2, 3 x 3, ... blocks): the models' own resize then starts
    from block means of the stored pixels, and an image less than twice the target is
    left as it is (never enlarged).
    """
    h, w = image.shape[:2]
    factor = min(h, w) // target if target else 1
    if factor <= 1:
        return image
    new_w, new_h = max(1, round(w / factor)), max(1, round(h / factor))
    return cv2.resize(np.ascontiguousarray(image), (new_w, new_h), interpolation=cv2.INTER_AREA)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """0..1 float display values -> uint8, exactly as :attr:`XRay.uint8` rounds them."""
    return np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- DICOM
def _frame(ds) -> bytes:
    from pydicom.encaps import generate_frames

    return next(generate_frames(ds.PixelData, number_of_frames=1))


def _jpeg_reduced(ds, rows: int, cols: int, target: int) -> np.ndarray | None:
    """8-bit grey JPEG frame decoded at the smallest libjpeg-turbo scale >= target.

    Without a VOI (min-max normalisation) the frame is decoded at full size (still
    libjpeg-turbo, ~6 ms for 4 Mpx): a scaled decode's extremes are a smoothed image's,
    and min-max would change the whole image's contrast by them.
    """
    import simplejpeg

    frame = _frame(ds)
    height, width, colorspace, _ = simplejpeg.decode_jpeg_header(frame)
    if (height, width) != (rows, cols) or colorspace != "Gray":
        return None  # colour or mismatched frames: the full path handles (and reports) them
    want_w, want_h = reduced_size(width, height, target) if _has_voi(ds) else (width, height)
    out = simplejpeg.decode_jpeg(frame, colorspace="GRAY", min_height=want_h, min_width=want_w)
    return out[..., 0]


def _j2k_precision(frame: bytes) -> tuple[int, bool] | None:
    """(precision, signed) of the first component from the codestream's SIZ segment."""
    at = frame.find(b"\xff\x51")
    if at < 0 or len(frame) < at + 41:
        return None
    ssiz = frame[at + 40]  # marker 2 + Lsiz 2 + Rsiz 2 + 8 x 4 bytes + Csiz 2
    return (ssiz & 0x7F) + 1, bool(ssiz & 0x80)


def _j2k_reduced(ds, rows: int, cols: int, bits_stored: int, signed: bool, target: int) -> np.ndarray | None:
    """Unsigned grey JPEG 2000 frame decoded at a reduced resolution level (OpenJPEG)."""
    from PIL import Image

    levels = power_of_two_levels(cols, rows, target)
    if levels == 0 or signed or not _has_voi(ds):
        # Min-max images (no VOI) need the stored extremes, which a low band has smoothed
        # away (a 255 text marker becomes 246, and the whole film brightens): full decode.
        return None
    frame = _frame(ds)
    prec = _j2k_precision(frame)
    if prec is None or prec[1] or prec[0] > 16:
        return None
    img = Image.open(io.BytesIO(frame))
    if img.size != (cols, rows) or img.mode not in ("L", "I;16"):
        return None
    img.reduce = levels
    img.load()
    arr = np.asarray(img)
    if img.mode == "I;16" and prec[0] < 16:
        # Pillow scales samples of P < 16 bits up to 16 bits (x << (16 - P)): undo it.
        arr = arr >> (16 - prec[0])
    # The low band's sample k sits on stored pixel 2^L k, an area average's on the centre
    # of its 2^L block: shift by the difference, (2^L - 1) / 2 stored pixels.
    shift = -(2 ** levels - 1) / 2 ** (levels + 1)
    moved = cv2.warpAffine(arr.astype(np.float32), np.float32([[1, 0, shift], [0, 1, shift]]),
                           (arr.shape[1], arr.shape[0]), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return np.clip(np.rint(moved), 0, 2 ** prec[0] - 1).astype(arr.dtype)


def _lut_input(arr: np.ndarray, bits_stored: int, signed: bool) -> tuple[np.ndarray, int]:
    """Stored values with unused high bits cleared (sign-extended), as LUT indices and offset."""
    width = arr.dtype.itemsize * 8
    if not signed and arr.dtype.kind == "u":
        if 0 < bits_stored < width:
            arr = arr & arr.dtype.type((1 << bits_stored) - 1)
        return arr, 0
    values = arr.astype(np.int32)
    if 0 < bits_stored < width:
        values &= (1 << bits_stored) - 1
        if signed:
            sign = 1 << (bits_stored - 1)
            values = (values ^ sign) - sign
    lo = int(values.min())
    return (values - lo).astype(np.uint16), lo


def display_uint8(ds, arr: np.ndarray, bits_stored: int, signed: bool, photometric: str,
                  warn: list[str]) -> np.ndarray:
    """Stored grey values -> display uint8 through one LUT built by the full pipeline.

    Equal, pixel for pixel, to rounding :func:`cxrserve.core.imageio._mono_pipeline`'s output
    (with MONOCHROME1 inverted) of the same array.
    """
    from cxrserve.core.dicom_display import _mono_pipeline

    if arr.dtype.itemsize > 2:
        raise ValueError("more than 16 bits allocated")
    index, offset = _lut_input(arr, bits_stored, signed)
    if index.ndim != 2:
        raise ValueError("not a 2-D grey frame")
    lo, hi = (int(v) for v in cv2.minMaxLoc(index)[:2])
    domain = np.arange(0, hi + 1, dtype=np.int64) + offset
    if "ModalityLUTSequence" in ds and not _has_voi(ds):
        # A LUT's extremes need not be the stored extremes: min-max over the values present.
        present = np.bincount(index.ravel(), minlength=hi + 1) > 0
        mapped = np.zeros(hi + 1, np.float64)
        mapped[present] = _mono_pipeline(ds, domain[present][None, :], bits_stored, signed, warn)[0]
    else:
        mapped = np.zeros(hi + 1, np.float64)
        # min-max normalisation must see the image's own extremes: evaluate from its minimum.
        mapped[lo:] = _mono_pipeline(ds, domain[lo:][None, :], bits_stored, signed, warn)[0]
    if photometric == "MONOCHROME1":
        mapped = 1.0 - mapped
    lut = to_uint8(mapped.astype(np.float32))
    if index.dtype == np.uint8 or hi < 256:
        table = np.zeros(256, np.uint8)
        table[: hi + 1] = lut
        return cv2.LUT(index.astype(np.uint8, copy=False), table)
    return np.take(lut, index)


def _has_voi(ds) -> bool:
    from cxrserve.core.dicom_display import _first_window

    return ("VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0) or _first_window(ds) is not None


def mono_reduced(ds, rows: int, cols: int, bits_stored: int, signed: bool, photometric: str,
                 target: int, warn: list[str], *, max_pixels: int | None = None) -> np.ndarray:
    """A grey DICOM's display uint8 image with shorter side >= ``target`` (see module doc).

    ``max_pixels`` (default :data:`cxrserve.core.bounded.MAX_PIXELS`): no codec runs before
    :func:`cxrserve.core.bounded.check_dataset` has checked the frame's own header and
    the decode's memory against it.
    """
    from cxrserve.core import bounded

    bounded.check_dataset(ds, bounded.MAX_PIXELS if max_pixels is None else max_pixels)
    ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    small = None
    try:
        if ts in JPEG_SYNTAXES and int(ds.BitsAllocated) == 8:
            small = _jpeg_reduced(ds, rows, cols, target)
        elif ts in J2K_SYNTAXES:
            small = _j2k_reduced(ds, rows, cols, bits_stored, signed, target)
    except Exception:  # noqa: BLE001  the full decoder reports what is wrong with the file
        small = None
    if small is not None:
        return area_downscale(display_uint8(ds, small, bits_stored, signed, photometric, warn), target)
    arr = ds.pixel_array
    if arr.ndim != 2 or arr.shape != (rows, cols):
        from cxrserve.core.errors import MalformedInput

        raise MalformedInput(f"pixel data shape {arr.shape} does not match Rows x Columns {rows} x {cols}")
    return area_downscale(display_uint8(ds, arr, bits_stored, signed, photometric, warn), target)


# --------------------------------------------------------------------------- what to decode
def decode_need(cards) -> int:
    """Shorter side to decode for these components (cards): the largest need of any."""
    from cxrserve.core.preprocessing import PREPROCESSING

    # a pipeline declares what it needs beyond the default of twice its input size
    needs = [getattr(PREPROCESSING.get(c.preprocessing), "source_need", 0) or 2 * int(c.input_size) for c in cards]
    return max(needs) if needs else 1024
