"""Image input: DICOM, PNG and JPEG bytes -> one grey radiograph in display values.

Every model in cxrserve starts from :class:`XRay`, whatever the file was:

* ``pixels``: float32, H x W, 0..1, "MONOCHROME2" sense (air dark, bone bright), after
  the DICOM Modality LUT, VOI LUT/window and MONOCHROME1 inversion;
* ``uint8``: the same rounded to 0..255, the 8-bit grey image all the seed systems
  were trained on.

DICOM pipeline (PS3.3 C.11 / C.7.6.3): parse (with or without preamble and file meta)
-> reject non-image and multi-frame objects -> check pixel count, decode memory and each
encapsulated frame's own header before decoding (:mod:`cxrserve.core.bounded`; a deflated
data set is inflated there, under ``max_bytes``) -> decode any of
:data:`~cxrserve.core.bounded.DECODABLE_TRANSFER_SYNTAXES` -> mask unused high bits
(BitsStored) -> Modality LUT (rescale slope/intercept or LUT sequence) -> VOI (first
window, or VOI LUT sequence; min-max when neither) -> invert MONOCHROME1.
Raster pipeline: Pillow, header-first pixel-count check (decompression bombs; PNG
text/ICC chunks bounded too), EXIF
orientation, 8/16-bit grey, RGB/RGBA/palette/CMYK -> grey.

Nothing here keeps patient identifiers: the only DICOM fields copied out are technical
ones and a one-way hash of the SOP Instance UID for de-duplication in batch jobs.
"""
from __future__ import annotations

import hashlib
import io
import math
import struct
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from cxrserve.core import bounded
from cxrserve.core.bounded import MAX_BYTES, MAX_PIXELS  # noqa: F401  (the input limits, re-exported here)
from cxrserve.core.errors import MalformedInput, NotFrontalCXR, PayloadTooLarge, UnsupportedFormat
from cxrserve.core.dicom_display import _mono_pipeline, _text

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
# Formats we recognise only to name them in the 415 message.
OTHER_MAGIC = {
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"%PDF": "PDF",
    b"RIFF": "RIFF/WebP",
    b"PK\x03\x04": "ZIP",
    b"\x1f\x8b": "gzip",
}

FRONTAL_VIEWS = {"PA", "AP", "AP SUPINE", "AP ERECT", "PA ERECT", ""}
LATERAL_VIEWS = {"LL", "RL", "LATERAL", "LAT", "L", "LLD", "RLD"}
RADIOGRAPH_MODALITIES = {"CR", "DX", "DR", "RG", "OT", ""}  # OT/""/SC: secondary captures of films
CHEST_BODY_PARTS = ("CHEST", "THORAX", "LUNG", "TORSO", "PORT CHEST", "THORACIC")
COLOUR_SAMPLE_SIDE = 512


def _colour_sample(rgb: np.ndarray) -> np.ndarray:
    """Strided uint8 RGB copy of at most COLOUR_SAMPLE_SIDE px a side (for input checks)."""
    step = max(1, -(-max(rgb.shape[:2]) // COLOUR_SAMPLE_SIDE))
    return np.ascontiguousarray(rgb[::step, ::step, :3], dtype=np.uint8)


@dataclass
class XRay:
    """A decoded radiograph and the technical facts a response reports."""

    pixels: np.ndarray  # float32 HxW in [0, 1], MONOCHROME2 sense
    format: str  # "dicom" | "png" | "jpeg"
    photometric: str = "MONOCHROME2"  # as stored in the file (PIL mode for rasters)
    view: str = ""  # "PA" | "AP" | "LATERAL" | other DICOM ViewPosition | "" unknown
    modality: str = ""
    body_part: str = ""
    bits_stored: int = 8
    transfer_syntax: str = ""
    instance_hash: str = ""  # sha256 of SOPInstanceUID, first 16 hex; "" for rasters
    warnings: list[str] = field(default_factory=list)
    sop_class_uid: str = ""  # DICOM SOPClassUID; "" for rasters or when absent
    #: uint8 H' x W' x 3 RGB copy of a colour source taken before grey conversion,
    #: subsampled to <= COLOUR_SAMPLE_SIDE px (None: the source was grey). Read by
    #: :mod:`cxrserve.core.input_checks`; never part of a response.
    colour_sample: np.ndarray | None = field(default=None, repr=False)
    #: (width, height) as stored when ``pixels`` was decoded at reduced resolution
    #: (``decode(..., target=N)``, :mod:`cxrserve.core.fastdecode`); None: ``pixels`` is full size
    original_size: tuple[int, int] | None = None
    #: acquisition facts the drift monitor watches (a new detector, a software update at the
    #: modality); never part of a response. "" / 0.0: unknown or a raster
    manufacturer: str = ""
    device_model: str = ""
    pixel_spacing_mm: float = 0.0

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def full_size(self) -> tuple[int, int]:
        """(width, height) of the image as stored, whatever resolution ``pixels`` has."""
        return self.original_size or (self.width, self.height)

    @property
    def reduced(self) -> bool:
        return self.original_size is not None and self.original_size != (self.width, self.height)

    @cached_property
    def uint8(self) -> np.ndarray:
        return np.clip(np.rint(self.pixels * 255.0), 0, 255).astype(np.uint8)

    def info(self) -> dict:
        """The ``input`` block of every response."""
        width, height = self.full_size
        return {
            "format": self.format,
            "width": width,
            "height": height,
            "photometric": self.photometric,
            "view": self.view,
            "modality": self.modality,
            "bits_stored": self.bits_stored,
        }


# --------------------------------------------------------------------------- sniffing
def sniff_format(data: bytes) -> str:
    """Return "dicom", "png" or "jpeg" from the leading bytes, or raise 400/415."""
    if not data:
        raise MalformedInput("empty request body: send a DICOM, PNG or JPEG file")
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if data[128:132] == b"DICM" or data.startswith(b"DICM"):
        return "dicom"
    # A raw dataset with no preamble or file meta starts with a group 0x0008 (or
    # 0x0002) little-endian tag; tag 0008,0005 / 0008,0008 / 0008,0016 are typical.
    if len(data) > 8 and data[:2] in (b"\x08\x00", b"\x02\x00") and data[3:4] == b"\x00":
        return "dicom"
    for magic, name in OTHER_MAGIC.items():
        if data.startswith(magic):
            raise UnsupportedFormat(f"{name} files are not supported: send DICOM, PNG or JPEG")
    raise UnsupportedFormat("unrecognised file format: send DICOM, PNG or JPEG")


def decode(data: bytes, *, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS,
           target: int | None = None) -> XRay:
    """Decode one file's bytes into an :class:`XRay`.

    ``target``: decode only as many pixels as a model reading ``target`` px needs: the
    result's shorter side is at least ``target`` (never enlarged; see
    :mod:`cxrserve.core.fastdecode`), ``original_size`` keeps the stored size. None: full size.

    Raises:
        MalformedInput: empty or corrupt file of a recognised format (400).
        PayloadTooLarge: more than ``max_bytes`` bytes or ``max_pixels`` pixels (413).
        UnsupportedFormat: not DICOM/PNG/JPEG, or a DICOM without one 2-D image (415).
    """
    if len(data) > max_bytes:
        raise PayloadTooLarge(
            f"file is {len(data) / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.0f} MiB"
        )
    kind = sniff_format(data)
    if kind == "dicom":
        try:
            return _decode_dicom(data, max_pixels, target, max_bytes)
        except (MalformedInput, PayloadTooLarge, UnsupportedFormat):
            raise
        except Exception as err:  # pydicom reads values lazily: corrupt ones raise many types, late
            # Only the exception's type: pydicom's messages quote raw header bytes, which
            # can hold the patient's name, and this message goes back in the response.
            raise MalformedInput(f"corrupt DICOM file ({type(err).__name__}): a header element "
                                 "cannot be read") from err
    return _decode_raster(data, kind, max_pixels, target)


def _reduced(xray: XRay, image: np.ndarray | None, target: int | None,
             full: tuple[int, int] | None = None) -> XRay:
    """``xray`` at shorter side >= ``target`` from its display uint8 ``image`` (or its pixels).

    ``full``: the stored (width, height) when ``image`` is already reduced.
    """
    if not target:
        return xray
    from cxrserve.core.fastdecode import area_downscale

    full = full or (xray.width, xray.height)
    small = area_downscale(xray.uint8 if image is None else image, target)
    xray.pixels = small.astype(np.float32) * np.float32(1 / 255)
    xray.__dict__["uint8"] = small  # the cached_property, exact (not re-rounded from pixels)
    xray.original_size = full
    return xray


def read_file(path: str | Path, **limits) -> XRay:
    return decode(Path(path).read_bytes(), **limits)


def _check_pixel_count(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise MalformedInput(f"image has no pixels ({width} x {height})")
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"image is {width} x {height} = {width * height / 1e6:.1f} Mpx; "
            f"the limit is {max_pixels / 1e6:.0f} Mpx"
        )


# --------------------------------------------------------------------------- rasters
def _decode_raster(data: bytes, kind: str, max_pixels: int, target: int | None = None) -> XRay:
    from PIL import Image, ImageOps, UnidentifiedImageError

    if kind == "png":
        bounded.check_png_chunks(data)
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below is stricter than Pillow's warning threshold.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            _check_pixel_count(img.width, img.height, max_pixels)
            stored_mode, full = img.mode, img.size
            if target and kind == "jpeg" and img.mode in ("L", "RGB") and min(img.size) >= 2 * target:
                from cxrserve.core.fastdecode import reduced_size

                # libjpeg-turbo DCT-domain scaling (1/2, 1/4, 1/8); colour JPEGs stay colour
                # (the input checks judge them), grey ones come straight from Y.
                img.draft(img.mode, reduced_size(img.width, img.height, target))
            img.load()
    except (PayloadTooLarge, MalformedInput):
        raise
    except Image.DecompressionBombError as err:
        raise PayloadTooLarge(f"image exceeds the {max_pixels / 1e6:.0f} Mpx limit: {err}") from err
    except ValueError as err:
        if "MAX_TEXT" in str(err):  # Pillow's caps on inflated zTXt/iTXt/iCCP chunks: a bomb
            raise PayloadTooLarge(f"PNG text/ICC chunk inflates past Pillow's cap: {err}") from err
        raise MalformedInput(f"corrupt or truncated {kind.upper()} file: {err}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise MalformedInput(f"corrupt or truncated {kind.upper()} file: {err}") from err

    warn: list[str] = []
    loaded = img.size
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not reject a readable image
        warn.append("EXIF orientation could not be read; image used as stored")
    mode = stored_mode
    bits = 8
    colour = None
    if target and mode in ("L", "RGB") and img.mode in ("L", "RGB"):
        from cxrserve.core.fastdecode import area_downscale

        if img.mode == "RGB":  # the input checks need the colour before it is lost to grey
            colour = _colour_sample(np.asarray(img))
            img = img.convert("L")
        if mode != "L":
            warn.append(f"{mode} image converted to grey")
        small = area_downscale(np.asarray(img), target)
        xray = XRay(pixels=small.astype(np.float32) * np.float32(1 / 255), format=kind, photometric=mode,
                    bits_stored=8, warnings=warn, colour_sample=colour,
                    original_size=full if img.size == loaded else (full[1], full[0]))  # EXIF 5-8 swap axes
        xray.__dict__["uint8"] = small
        return xray
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = float(arr.max()) if arr.size else 0.0
        # 16-bit PNGs often hold 10/12/14-bit data: scale by the bit depth in use.
        bits = max(8, min(16, int(math.ceil(math.log2(peak + 1))))) if peak > 0 else 16
        pixels = np.clip(arr / (2**bits - 1), 0.0, 1.0).astype(np.float32)
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        pixels = ((arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)).astype(np.float32)
        bits = 32
    else:
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
            # Flatten transparency onto black (air), the radiographic background.
            rgba = img.convert("RGBA")
            base = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            img = Image.alpha_composite(base, rgba)
            warn.append("alpha channel flattened onto black")
        if img.mode not in ("L", "1"):
            colour = _colour_sample(np.asarray(img.convert("RGB")))
        if img.mode not in ("L",):
            if img.mode not in ("1",):
                warn.append(f"{mode} image converted to grey")
            img = img.convert("L")
        pixels = np.asarray(img, dtype=np.float32) / 255.0
    return _reduced(XRay(
        pixels=np.ascontiguousarray(pixels, dtype=np.float32),
        format=kind,
        photometric=mode,
        bits_stored=bits,
        warnings=warn,
        colour_sample=colour,
    ), None, target)


# --------------------------------------------------------------------------- DICOM
def _read_dataset(data: bytes, max_bytes: int = MAX_BYTES):
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        # bounded.dcmread: a deflated data set is inflated under max_bytes, never by pydicom
        ds = bounded.dcmread(data, max_bytes=max_bytes)
    except (MalformedInput, PayloadTooLarge):
        raise
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError, struct.error) as err:
        # The type only: pydicom's messages may quote header values (patient identifiers).
        raise MalformedInput(f"corrupt DICOM file ({type(err).__name__})") from err
    if not hasattr(ds, "file_meta") or "TransferSyntaxUID" not in ds.file_meta:
        # No file meta: the transfer syntax is whatever encoding the parser detected;
        # PS3.5 says such a stream is implicit VR little endian.
        from pydicom.dataset import FileMetaDataset

        implicit, little = getattr(ds, "original_encoding", (True, True))
        meta = getattr(ds, "file_meta", None) or FileMetaDataset()
        if implicit in (None, True):
            meta.TransferSyntaxUID = ImplicitVRLittleEndian
        else:
            meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        ds.file_meta = meta
    return ds


def _decode_dicom(data: bytes, max_pixels: int, target: int | None = None,
                  max_bytes: int = MAX_BYTES) -> XRay:
    ds = _read_dataset(data, max_bytes)
    sop_class = ds.get("SOPClassUID")
    sop_name = getattr(sop_class, "name", str(sop_class or "unknown SOP class"))
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise UnsupportedFormat(
            f"DICOM object holds no image (SOP class: {sop_name}); send a radiograph"
        )
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise UnsupportedFormat("DICOM float pixel data is not a radiograph format")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as err:
        raise MalformedInput("invalid NumberOfFrames: not an integer") from err  # never echo header bytes
    if frames > 1:
        raise UnsupportedFormat(
            f"multi-frame DICOM ({frames} frames) is not supported: send one frontal image"
        )
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits_allocated = int(ds.BitsAllocated)
        bits_stored = int(ds.get("BitsStored", bits_allocated) or bits_allocated)
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError) as err:
        # the type only: the message can quote a header value, and it goes back in the response
        raise MalformedInput(f"DICOM image module incomplete or invalid ({type(err).__name__}): Rows, Columns "
                             "and BitsAllocated must be present and numeric") from err
    _check_pixel_count(cols, rows, max_pixels)
    # Before any decoder runs, fast path included: decode memory, transfer syntax, and
    # each encapsulated frame's own size (a 512 x 512 header over a 12000 x 12000 JPEG).
    bounded.check_dataset(ds, max_pixels)
    photometric = _text(ds, "PhotometricInterpretation") or "MONOCHROME2"

    if target and samples == 1 and photometric in ("MONOCHROME1", "MONOCHROME2") and bits_allocated <= 16:
        try:
            from cxrserve.core.fastdecode import mono_reduced

            warn: list[str] = []
            small = mono_reduced(ds, rows, cols, bits_stored, signed, photometric, target, warn,
                                 max_pixels=max_pixels)
        except (MalformedInput, PayloadTooLarge, UnsupportedFormat):
            raise
        except Exception:  # noqa: BLE001  the full path below reports what the file's problem is
            small = None
        if small is not None:
            return _reduced(_dicom_xray(ds, small.astype(np.float32) * np.float32(1 / 255), photometric,
                                        bits_stored, warn), small, target, (cols, rows))

    try:
        arr = ds.pixel_array
    except Exception as err:  # decoder plugins raise many types; all mean "can't decode"
        ts = ds.file_meta.get("TransferSyntaxUID")
        ts_name = getattr(ts, "name", str(ts))
        message = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        if "No pixel data decoders" in message or "plugin" in message.lower():
            raise UnsupportedFormat(f"no decoder for transfer syntax {ts_name}: {message}") from err
        raise MalformedInput(f"DICOM pixel data could not be decoded ({ts_name}): {message}") from err
    if arr.ndim != 2 + (samples > 1) or arr.shape[:2] != (rows, cols):
        raise MalformedInput(f"pixel data shape {arr.shape} does not match Rows x Columns {rows} x {cols}")

    warn: list[str] = []
    colour = None
    if samples > 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        pixels, colour = _colour_dicom_to_grey(ds, arr, photometric)
        warn.append(f"{photometric} DICOM converted to grey")
    else:
        pixels = _mono_pipeline(ds, arr, bits_stored, signed, warn)
        if photometric == "MONOCHROME1":
            pixels = 1.0 - pixels
    return _reduced(_dicom_xray(ds, pixels, photometric, bits_stored, warn, colour), None, target)


def _dicom_xray(ds, pixels: np.ndarray, photometric: str, bits_stored: int, warn: list[str],
                colour: np.ndarray | None = None) -> XRay:
    ts = ds.file_meta.get("TransferSyntaxUID")
    uid = str(ds.get("SOPInstanceUID", "") or "")
    view = _text(ds, "ViewPosition")
    return XRay(
        pixels=np.ascontiguousarray(pixels, dtype=np.float32),
        format="dicom",
        photometric=photometric,
        view="LATERAL" if view in LATERAL_VIEWS else view,
        modality=_text(ds, "Modality"),
        body_part=_text(ds, "BodyPartExamined"),
        bits_stored=bits_stored,
        transfer_syntax=getattr(ts, "name", str(ts or "")),
        instance_hash=hashlib.sha256(uid.encode()).hexdigest()[:16] if uid else "",
        warnings=warn,
        sop_class_uid=str(ds.get("SOPClassUID", "") or "").strip(),
        colour_sample=colour,
        manufacturer=_text(ds, "Manufacturer")[:64],
        device_model=_text(ds, "ManufacturerModelName")[:64],
        pixel_spacing_mm=_spacing(ds),
    )


def _spacing(ds) -> float:
    """Row spacing in mm at the detector (ImagerPixelSpacing, else PixelSpacing); 0.0 if absent or odd."""
    for keyword in ("ImagerPixelSpacing", "PixelSpacing"):
        try:
            value = float(ds.get(keyword)[0])
        except (TypeError, ValueError, IndexError, KeyError):
            continue
        if 0 < value < 10:
            return value
    return 0.0


def _colour_dicom_to_grey(ds, arr: np.ndarray, photometric: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Grey 0..1 pixels and, for a 3-sample image, its RGB colour sample (see XRay)."""
    from pydicom.pixels import apply_color_lut, convert_color_space

    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        photometric = "RGB"
    elif photometric.startswith("YBR") and photometric != "YBR_FULL_422" and arr.ndim == 3:
        arr = convert_color_space(arr, photometric, "RGB")
    elif photometric == "YBR_FULL_422" and arr.ndim == 3:
        arr = convert_color_space(arr, "YBR_FULL", "RGB")
    arr = arr.astype(np.float64)
    peak = float(2 ** int(ds.get("BitsStored", 8) or 8) - 1)
    colour = None
    if arr.ndim == 3:
        scale = 255.0 / max(peak, float(arr.max()), 1.0)
        colour = _colour_sample(np.clip(np.rint(arr * scale), 0, 255))
        arr = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
    return np.clip(arr / peak, 0.0, 1.0), colour


# --------------------------------------------------------------------------- checks
def check_frontal_chest_header(xray: XRay) -> None:
    """Reject, from header facts alone, images that are certainly not frontal CXRs.

    Only DICOM carries these facts; PNG/JPEG pass and are left to the learned input
    gate. Raises :class:`NotFrontalCXR` (422) naming the offending field.
    """
    if xray.format != "dicom":
        return
    if xray.modality and xray.modality not in RADIOGRAPH_MODALITIES and xray.modality != "SC":
        raise NotFrontalCXR(
            f"Modality {xray.modality} is not a radiograph: send a CR/DX chest radiograph",
            detail={"field": "Modality", "value": xray.modality},
        )
    if xray.body_part and not any(part in xray.body_part for part in CHEST_BODY_PARTS):
        raise NotFrontalCXR(
            f"BodyPartExamined {xray.body_part} is not the chest",
            detail={"field": "BodyPartExamined", "value": xray.body_part},
        )
    if xray.view == "LATERAL":
        raise NotFrontalCXR(
            "lateral view: the models need a frontal (PA/AP) chest radiograph",
            detail={"field": "ViewPosition", "value": "LATERAL"},
        )
    if xray.view and xray.view not in FRONTAL_VIEWS:
        raise NotFrontalCXR(
            f"ViewPosition {xray.view} is not a frontal view (PA/AP)",
            detail={"field": "ViewPosition", "value": xray.view},
        )
