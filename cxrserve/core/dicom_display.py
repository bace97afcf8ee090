"""DICOM stored values -> display values: BitsStored, Modality LUT, VOI LUT / window, text tags.

One copy of the display pipeline, read by the full decoder (:mod:`cxrserve.core.imageio`) and
the reduced one (:mod:`cxrserve.core.fastdecode`, whose lookup tables are computed by it).
"""
from __future__ import annotations

import numpy as np


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else ""
    return str(value).strip().upper()



def _mono_pipeline(ds, arr: np.ndarray, bits_stored: int, signed: bool, warn: list[str]) -> np.ndarray:
    """Stored values -> display values in 0..1 (before MONOCHROME1 inversion)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    stored = arr.astype(np.int64)
    # Unused high bits may hold overlays or garbage (PS3.5 8.1.1): keep BitsStored bits.
    if 0 < bits_stored < arr.dtype.itemsize * 8:
        stored &= (1 << bits_stored) - 1
        if signed:  # sign-extend from BitsStored
            sign_bit = 1 << (bits_stored - 1)
            stored = (stored ^ sign_bit) - sign_bit
    values = apply_modality_lut(stored, ds).astype(np.float64)

    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        item = ds.VOILUTSequence[0]
        try:
            out_bits = int(item.LUTDescriptor[2])
            lut_input = values.astype(np.int64) if values.dtype.kind == "f" else values
            mapped = apply_voi_lut(lut_input, ds, index=0, prefer_lut=True).astype(np.float64)
            return np.clip(mapped / float(2**out_bits - 1), 0.0, 1.0)
        except Exception as err:  # a broken LUT should not lose the image: fall back
            warn.append(f"VOI LUT sequence unusable ({type(err).__name__}); window or min-max used")
    window = _first_window(ds)
    if window is not None:
        center, width = window
        function = _text(ds, "VOILUTFunction") or "LINEAR"
        return _apply_window(values, center, width, function)
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        warn.append("image is blank (all pixels equal)")
        return np.zeros_like(values)
    return (values - lo) / (hi - lo)


def _first_window(ds) -> tuple[float, float] | None:
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None

    def first(v):
        if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
            return float(v[0]) if len(v) else None
        return float(v) if v not in (None, "") else None

    try:
        center, width = first(ds.WindowCenter), first(ds.WindowWidth)
    except (TypeError, ValueError):
        return None
    if center is None or width is None or width < 1:
        return None
    return center, width


def _apply_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2 window functions, mapped to 0..1."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width <= 1:
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


