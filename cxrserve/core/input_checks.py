"""Input checks that need no learned model: rejections every store applies, demo included.

:meth:`cxrserve.core.pipeline.Pipeline.screen` calls :func:`check_input` on every decoded
image (the main one and extras such as a prior) before the learned input gate and
before any model. Each rule answers 422 with its own error code
(:mod:`cxrserve.core.errors`):

============================  ===========================================================
code                          rule
============================  ===========================================================
``not_projection_radiograph`` DICOM SOP class not a projection radiograph (CR, DX, or a
                              greyscale Secondary Capture), or Modality not a radiograph
                              (CT, MR, US, NM, MG, XA, ...)
``colour_image``              colour DICOM (PhotometricInterpretation RGB, YBR_*,
                              PALETTE COLOR), or a raster with more than
                              ``COLOUR_MAX_SHARE`` of its pixels strongly coloured
``image_too_small``           shortest side below ``MIN_SIDE`` pixels
``constant_image``            1st-99th percentile spread of the 8-bit image below
                              ``MIN_SPREAD`` grey levels
============================  ===========================================================

Thresholds and the evidence for them (``python -m cxrserve.core.input_checks DIR`` reprints
the survey for a data folder):

* **Colour.** A pixel is *strongly coloured* when its chroma, max(R,G,B) - min(R,G,B),
  is at least ``CHROMA_STRONG`` = 96 of 255 (saturated reds, yellows, greens, blues; the
  blue or sepia tint of a photographed film stays below it). An image is colour when more
  than ``COLOUR_MAX_SHARE`` = 5 % of its pixels are strongly coloured. Measured on every
  frontal film in ``../shared/data`` (1,683 images; 30 of them, ieee8023 and gb_covid
  screenshots and journal figures, have coloured pixels: arrows, captions, tinted
  photographs of films): the largest share is 0.97 % (a figure with coloured arrows);
  two tinted photographs have 52 % and 25 % of pixels at chroma >= 64 but 0 % at >= 96.
  pydicom's colour Secondary Capture test patterns have 30-92 % (their DICOM copies are
  refused by photometric already). The tests' 384 x 320 film with a red arrow and a
  yellow caption has 2.0 % and passes.
* **DICOM colour.** A radiograph is stored MONOCHROME1/MONOCHROME2 (PS3.3 C.8.11.7 requires
  it for DX; CR and Secondary Capture films are grey in practice), so an RGB, YBR or
  palette DICOM is refused whatever its content: the grey film inside a colour
  screenshot can be sent as a PNG/JPEG, where the pixel rule above judges it.
* **Size.** ``MIN_SIDE`` = 64 px: the smallest frontal film in ``../shared/data`` has a
  172 px shortest side (the collections were downsampled to <= 512 px), the models read
  224-512 px, and below 64 px a chest film holds no readable anatomy (pydicom's 16 x 16
  CR/CT/MR thumbnails, 10 x 45 JPEG-LS and 3 x 3 RGB tests are refused here).
* **Constant.** ``MIN_SPREAD`` = 8 grey levels between the 1st and 99th percentile of
  the 8-bit image: the smallest spread among the shared films is 62 (a low-contrast
  screenshot), typical films 120-255; blank images and pydicom's broken colour JPEG
  tests (spread 1-4) are refused.
* **SOP class / modality.** Accepted SOP classes: CR Image Storage, Digital X-Ray Image
  Storage (for presentation and for processing), Secondary Capture Image Storage and
  the single-frame use of Multi-frame Grayscale Byte/Word Secondary Capture. A file
  without SOPClassUID is judged by Modality alone. Accepted modalities: CR, DX, and
  the values films carry in the wild (DR, RG, OT, SC, empty). Mammography (MG, and its
  SOP classes) and intra-oral (IO) are projection radiographs but never chest films and
  are refused too. Body part and view are :func:`cxrserve.core.imageio.check_frontal_chest_header`'s.

Whatever passes here still goes to the learned gate when the archive has one.
"""
from __future__ import annotations

import numpy as np

from cxrserve.core.errors import ColourImage, ConstantImage, ImageTooSmall, NotProjectionRadiograph
from cxrserve.core.imageio import XRay

CHROMA_STRONG = 96
COLOUR_MAX_SHARE = 0.05
MIN_SIDE = 64
MIN_SPREAD = 8

#: SOP classes whose instances can be a chest projection radiograph.
RADIOGRAPH_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
}
#: Modality (0008,0060) values a chest film carries; "" when absent.
RADIOGRAPH_MODALITIES = {"CR", "DX", "DR", "RG", "OT", "SC", ""}
MONOCHROME = {"MONOCHROME1", "MONOCHROME2"}


def _sop_name(uid: str) -> str:
    try:
        from pydicom.uid import UID

        name = UID(uid).name
    except Exception:  # an invalid UID string: name it as sent
        name = uid
    return name if name and name != uid else f"SOP class {uid}"


def check_dicom_type(xray: XRay) -> None:
    """Refuse DICOM objects that are not a (greyscale) projection radiograph."""
    if xray.format != "dicom":
        return
    uid = xray.sop_class_uid
    if uid and uid not in RADIOGRAPH_SOP_CLASSES:
        name = _sop_name(uid)
        raise NotProjectionRadiograph(
            f"DICOM {name}{f' (Modality {xray.modality})' if xray.modality else ''} is not a "
            "projection radiograph: send a CR or DX chest radiograph (or a greyscale Secondary Capture of one)",
            detail={"field": "SOPClassUID", "value": uid, "name": name})
    if xray.modality not in RADIOGRAPH_MODALITIES:
        raise NotProjectionRadiograph(
            f"DICOM Modality {xray.modality} is not a chest radiograph: send a CR or DX chest radiograph",
            detail={"field": "Modality", "value": xray.modality})
    if xray.photometric not in MONOCHROME:
        raise ColourImage(
            f"DICOM PhotometricInterpretation {xray.photometric}: a radiograph is stored MONOCHROME1 or "
            "MONOCHROME2; colour DICOM objects (screenshots, photographs, ultrasound) are refused",
            detail={"field": "PhotometricInterpretation", "value": xray.photometric})


def strong_colour_share(rgb: np.ndarray) -> float:
    """Share of pixels whose chroma (max - min of R, G, B) is >= CHROMA_STRONG."""
    if rgb.size == 0:
        return 0.0
    chroma = rgb.max(axis=-1).astype(np.int16) - rgb.min(axis=-1).astype(np.int16)
    return float((chroma >= CHROMA_STRONG).mean())


def check_colour(xray: XRay) -> None:
    if xray.colour_sample is None:
        return
    share = strong_colour_share(xray.colour_sample)
    if share > COLOUR_MAX_SHARE:
        raise ColourImage(
            f"colour image: {100 * share:.0f}% of pixels are strongly coloured (more than "
            f"{100 * COLOUR_MAX_SHARE:.0f}%); a radiograph is grey (coloured arrows or captions are fine)",
            detail={"field": "pixels", "strong_colour_share": round(share, 4),
                    "max_share": COLOUR_MAX_SHARE})


def check_size(xray: XRay) -> None:
    side = min(xray.width, xray.height)
    if side < MIN_SIDE:
        raise ImageTooSmall(
            f"image is {xray.width} x {xray.height} px; a radiograph needs at least {MIN_SIDE} px a side",
            detail={"field": "pixels", "width": xray.width, "height": xray.height, "min_side": MIN_SIDE})


def grey_spread(image: np.ndarray) -> int:
    """1st-99th percentile spread of a uint8 image, from its histogram (O(n), ~1024 px a side)."""
    step = max(1, -(-max(image.shape) // 1024))
    counts = np.bincount(image[::step, ::step].ravel(), minlength=256)
    cdf = np.cumsum(counts)
    lo = int(np.searchsorted(cdf, 0.01 * cdf[-1], side="left"))
    hi = int(np.searchsorted(cdf, 0.99 * cdf[-1], side="left"))
    return hi - lo


def check_not_constant(xray: XRay) -> None:
    spread = grey_spread(xray.uint8)
    if spread < MIN_SPREAD:
        raise ConstantImage(
            f"image is blank or nearly constant (1st-99th percentile spread {spread} of 255 grey "
            f"levels, under {MIN_SPREAD})",
            detail={"field": "pixels", "spread": spread, "min_spread": MIN_SPREAD})


def check_input(xray: XRay) -> None:
    """All model-free rules, cheapest and most specific first; raises a 422 subclass."""
    check_dicom_type(xray)
    check_size(xray)
    check_not_constant(xray)
    check_colour(xray)


# --------------------------------------------------------------------------- survey
def survey(paths) -> dict:
    """Decode ``paths`` and tally which rule (if any) refuses each: ``{path: code|"ok"|"4xx ..."}``."""
    from cxrserve.core.errors import CXRInputError
    from cxrserve.core.imageio import read_file

    out = {}
    for path in paths:
        try:
            check_input(read_file(path))
            out[str(path)] = "ok"
        except CXRInputError as err:
            out[str(path)] = err.code if err.status == 422 else f"{err.status} {err.code}"
    return out


def main(argv=None) -> int:
    import argparse
    import collections
    from pathlib import Path

    ap = argparse.ArgumentParser(description="Run the model-free input checks over files or folders")
    ap.add_argument("paths", nargs="+")
    args = ap.parse_args(argv)
    files = []
    for p in map(Path, args.paths):
        files += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    results = survey(files)
    for path, verdict in results.items():
        print(f"{verdict:28s} {path}")
    print(dict(collections.Counter(results.values())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
