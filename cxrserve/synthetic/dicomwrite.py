"""Write images as DICOM bytes in many variants, for tests of the DICOM decoder.

:func:`to_dicom` turns a uint8/uint16 MONOCHROME2 image into a complete DICOM object in
a chosen transfer syntax, photometric interpretation, bit depth, pixel-value
transformation (rescale, modality LUT, window, VOI LUT) and file framing (with or
without File Meta Information / preamble, multi-frame). :func:`expected_output` returns
what a correct reader must get at each stage, so decoder tests can assert exactly.
:func:`non_image_dicom` gives a valid DICOM object with no pixel data (a Basic Text SR).

Transfer syntaxes (``transfer_syntax=``):

=================== ======================================= ===========================
name                UID                                     how it is produced
=================== ======================================= ===========================
``implicit_le``     1.2.840.10008.1.2                       pydicom
``explicit_le``     1.2.840.10008.1.2.1                     pydicom
``explicit_be``     1.2.840.10008.1.2.2 (retired)           pydicom, pixels byte-swapped here
``deflated``        1.2.840.10008.1.2.1.99                  pydicom (zlib)
``rle``             1.2.840.10008.1.2.5                     ``Dataset.compress`` (lossless)
``jpeg_baseline``   1.2.840.10008.1.2.4.50                  Pillow, 8-bit only (lossy)
``jpeg_lossless``   1.2.840.10008.1.2.4.70                  :func:`~cxrserve.synthetic.jpeg_lossless.encode_jpeg_lossless`
``jpegls_lossless`` 1.2.840.10008.1.2.4.80                  ``Dataset.compress`` + pyjpegls
``j2k_lossless``    1.2.840.10008.1.2.4.90                  ``Dataset.compress`` + pylibjpeg-openjpeg
``j2k``             1.2.840.10008.1.2.4.91                  same, lossy (about 45 dB PSNR)
=================== ======================================= ===========================

Everything except ``jpeg_baseline`` and ``j2k`` is lossless: a correct reader gets
``expected_output(...)["stored"]`` back bit-exactly. ``jpegls_lossless`` needs the
``pyjpegls`` package; without it :class:`NotImplementedError` is raised.

Output is deterministic: UIDs are derived from a hash of the pixels and the options.
"""
from __future__ import annotations

import hashlib
import io

import numpy as np

from cxrserve.synthetic.jpeg_lossless import encode_jpeg_lossless

__all__ = ["to_dicom", "expected_output", "non_image_dicom", "TRANSFER_SYNTAXES", "LOSSLESS_SYNTAXES", "SOP_CLASSES",
           "voi_lut_table"]

TRANSFER_SYNTAXES = {
    "implicit_le": "1.2.840.10008.1.2",
    "explicit_le": "1.2.840.10008.1.2.1",
    "explicit_be": "1.2.840.10008.1.2.2",
    "deflated": "1.2.840.10008.1.2.1.99",
    "rle": "1.2.840.10008.1.2.5",
    "jpeg_baseline": "1.2.840.10008.1.2.4.50",
    "jpeg_lossless": "1.2.840.10008.1.2.4.70",
    "jpegls_lossless": "1.2.840.10008.1.2.4.80",
    "j2k_lossless": "1.2.840.10008.1.2.4.90",
    "j2k": "1.2.840.10008.1.2.4.91",
}
LOSSLESS_SYNTAXES = tuple(k for k in TRANSFER_SYNTAXES if k not in ("jpeg_baseline", "j2k"))
_ENCAPSULATED = ("rle", "jpeg_baseline", "jpeg_lossless", "jpegls_lossless", "j2k_lossless", "j2k")

SOP_CLASSES = {
    "dx": "1.2.840.10008.5.1.4.1.1.1.1",   # Digital X-Ray Image Storage - For Presentation
    "cr": "1.2.840.10008.5.1.4.1.1.1",     # Computed Radiography Image Storage
    "sc": "1.2.840.10008.5.1.4.1.1.7",     # Secondary Capture Image Storage
}
_BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


# ---------------------------------------------------------------------------- pixel plan

def voi_lut_table(out_max: int) -> np.ndarray:
    """The VOI LUT written by ``voi_lut=True``: ``out_max + 1`` entries (first value
    mapped 0, 16 bits), ``lut[i] = round(65535 * sqrt(i / out_max))`` -- a square-root
    display curve, so a reader that ignores the VOI LUT gives visibly different output."""
    i = np.arange(out_max + 1, dtype=np.float64)
    return np.rint(65535.0 * np.sqrt(i / max(out_max, 1))).astype(np.uint16)


def _scale_int(img: np.ndarray, src_max: int, dst_max: int) -> np.ndarray:
    """round(img * dst_max / src_max) in exact integer arithmetic (half rounds up)."""
    if src_max == dst_max:
        return img.astype(np.int64)
    return (img.astype(np.int64) * (2 * dst_max) + src_max) // (2 * src_max)


def _plan(image, *, photometric, bits_stored, rescale, modality_lut, photometric_rgb):
    """Decide stored pixels and what a reader gets at each stage (see expected_output)."""
    img = np.asarray(image)
    if img.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"image must be uint8 or uint16, got {img.dtype}")
    if photometric_rgb:
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError("photometric_rgb needs an HxW or HxWx3 uint8 image")
        if bits_stored != 8 or rescale is not None or modality_lut:
            raise ValueError("photometric_rgb supports bits_stored=8 without rescale/modality LUT")
        st = img.astype(np.int64)
        return {"stored": st, "modality": st.astype(np.float64), "out_max": 255, "mono2": st.astype(np.float64)}
    if img.ndim != 2:
        raise ValueError(f"image must be 2-D (HxW), got shape {img.shape}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError("photometric must be MONOCHROME1 or MONOCHROME2")
    if not 2 <= int(bits_stored) <= 16:
        raise ValueError("bits_stored must be in 2..16")
    if rescale is not None and modality_lut:
        raise ValueError("use either rescale or modality_lut, not both")
    bs = int(bits_stored)
    maxv = (1 << bs) - 1
    dmax = 255 if img.dtype == np.uint8 else 65535
    mono1 = photometric == "MONOCHROME1"
    if rescale is None and not modality_lut:
        v = _scale_int(img, dmax, maxv)                  # image scaled to fill 0..2**bs-1
        st = maxv - v if mono1 else v
        return {"stored": st, "modality": st.astype(np.float64), "out_max": maxv,
                "mono2": v.astype(np.float64)}
    # with a modality transformation the *output* is the image in its own units
    o = (dmax - img.astype(np.int64)) if mono1 else img.astype(np.int64)
    if rescale is not None:
        m, b = float(rescale[0]), float(rescale[1])
        if m == 0:
            raise ValueError("rescale slope must be non-zero")
        stf = (o - b) / m
        st = np.rint(stf).astype(np.int64)
        if not np.allclose(st * m + b, o, rtol=0, atol=1e-6) or st.min() < 0 or st.max() > maxv:
            raise ValueError(f"rescale {rescale} cannot reproduce the image with stored values in "
                             f"0..{maxv}: need (value - intercept) / slope to be integers in range "
                             f"(e.g. uint8 image, bits_stored=12, rescale=(0.25, 0) or (1, -1000))")
        return {"stored": st, "modality": st * m + b, "out_max": dmax,
                "mono2": img.astype(np.float64), "rescale": (m, b)}
    # modality LUT: a non-linear (square-root) encoding when there is room for it,
    # otherwise an inverting one; either way the LUT maps stored -> o exactly
    dbits = 8 if dmax == 255 else 16
    if bs > dbits:
        levels = np.arange(dmax + 1, dtype=np.float64)
        enc = np.rint(maxv * np.sqrt(levels / dmax)).astype(np.int64)  # injective: slope >= 1
        lut = np.interp(np.arange(maxv + 1), enc, levels)
        lut = np.rint(lut).astype(np.int64)
        lut[enc] = np.arange(dmax + 1)
        st = enc[o]
        kind = "sqrt"
    else:
        lut = dmax - np.arange(maxv + 1, dtype=np.int64)
        lut = np.clip(lut, 0, dmax)
        st = dmax - o
        kind = "inverting"
    return {"stored": st, "modality": lut[st].astype(np.float64), "out_max": dmax,
            "mono2": img.astype(np.float64), "lut": lut, "lut_kind": kind}


def expected_output(image: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int = 8,
                    rescale=None, modality_lut: bool = False, window=None, voi_lut: bool = False,
                    photometric_rgb: bool = False, **_ignored) -> dict:
    """What a correct reader gets from ``to_dicom(image, **same options)``.

    Keys (arrays are per frame; every frame holds the same image):

    * ``stored``: the stored pixel values (``pixel_array`` for lossless syntaxes), int.
      Without rescale/modality LUT: ``round(image * (2**bits_stored - 1) / dtype_max)``
      (dtype_max 255 or 65535), inverted as ``2**bits_stored - 1 - that`` for MONOCHROME1.
    * ``modality``: after the modality transformation (rescale ``slope*stored+intercept``
      or the Modality LUT), float. With rescale/modality LUT this equals the image in its
      own units (MONOCHROME2), or ``dtype_max - image`` for MONOCHROME1.
    * ``out_max``: the top of the modality output range (``2**bits_stored - 1``, or
      dtype_max with a modality transformation). MONOCHROME1 is inverted about it.
    * ``mono2``: ``modality`` in MONOCHROME2 sense (``out_max - modality`` for
      MONOCHROME1), i.e. the input image (scaled to the stored range when no modality
      transformation is used).
    * ``voi``: with ``voi_lut=True``: ``voi_lut_table(out_max)[modality]`` (0..65535,
      applied to the MONOCHROME-as-stored modality values). With only ``window=(c, w)``:
      the DICOM linear window (PS3.3 C.11.2.1.2.1) of ``modality`` onto 0..``out_max``:
      ``x <= c-0.5-(w-1)/2 -> 0``, ``x > c-0.5+(w-1)/2 -> out_max``, else
      ``((x-(c-0.5))/(w-1)+0.5)*out_max``. ``None`` when neither is written. When both
      are written, readers that prefer the VOI LUT (pydicom's default) give the LUT.
    """
    pl = _plan(image, photometric=photometric, bits_stored=bits_stored, rescale=rescale,
               modality_lut=modality_lut, photometric_rgb=photometric_rgb)
    out = {"stored": pl["stored"], "modality": pl["modality"], "out_max": pl["out_max"],
           "mono2": pl["mono2"], "voi": None}
    if voi_lut:
        out["voi"] = voi_lut_table(pl["out_max"])[np.rint(pl["modality"]).astype(np.int64)].astype(np.float64)
    elif window is not None:
        c, w = float(window[0]), float(window[1])
        x = pl["modality"]
        lo, hi = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
        y = ((x - (c - 0.5)) / (w - 1) + 0.5) * pl["out_max"]
        out["voi"] = np.where(x <= lo, 0.0, np.where(x > hi, float(pl["out_max"]), y))
    return out


# ---------------------------------------------------------------------------- writer

def _uid(*parts) -> str:
    """A deterministic 2.25 (UUID-derived) UID from a hash of ``parts``."""
    hsh = hashlib.sha256(repr(parts).encode()).hexdigest()
    return "2.25." + str(int(hsh[:32], 16) >> 1)  # 127 bits: a positive, UUID-sized integer


def _lut_item(lut: np.ndarray, explanation: str, little_endian: bool):
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset
    item = Dataset()
    n = len(lut)
    item.add(DataElement(0x00283002, "US", [n if n < 65536 else 0, 0, 16]))  # LUTDescriptor
    item.LUTExplanation = explanation
    arr = np.asarray(lut, dtype=np.uint16)
    item.add(DataElement(0x00283006, "OW", arr.astype(">u2" if not little_endian else "<u2").tobytes()))
    return item


def _base_dataset(*, sop_class, modality, body_part, view_position, patient_name, patient_id,
                  birth_date, uid_seed):
    from pydicom.dataset import Dataset, FileMetaDataset
    if sop_class not in SOP_CLASSES:
        raise ValueError(f"sop_class must be one of {tuple(SOP_CLASSES)}")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_uid = _uid("sop", uid_seed)
    ds.file_meta.MediaStorageSOPClassUID = SOP_CLASSES[sop_class]
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    ds.file_meta.ImplementationVersionName = "CXRSERVE_PH"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "SECONDARY"] if sop_class == "sc" else ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = SOP_CLASSES[sop_class]
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20200401"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "ACC" + patient_id[-6:]
    ds.Modality = modality
    if sop_class == "sc":
        ds.ConversionType = "WSD"
    ds.InstitutionName = "PHANTOM GENERAL HOSPITAL"
    ds.ReferringPhysicianName = "REFERRER^PHANTOM"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth_date
    ds.PatientSex = "O"
    ds.StudyInstanceUID = _uid("study", uid_seed)
    ds.SeriesInstanceUID = _uid("series", uid_seed)
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    if body_part:
        ds.BodyPartExamined = body_part
    if view_position:
        ds.ViewPosition = view_position
    if sop_class == "dx":
        ds.PresentationIntentType = "FOR PRESENTATION"
    if sop_class in ("dx", "cr"):
        ds.ImagerPixelSpacing = [0.143, 0.143]
        ds.PatientOrientation = ["L", "F"] if view_position != "LATERAL" else ["P", "F"]
    return ds


def to_dicom(image: np.ndarray, *, transfer_syntax: str = "explicit_le", photometric: str = "MONOCHROME2",
             bits_stored: int = 8, modality: str = "DX", body_part: str = "CHEST", view_position: str = "PA",
             rescale: tuple[float, float] | None = None, window: tuple[float, float] | None = None,
             voi_lut: bool = False, modality_lut: bool = False, file_meta: bool = True, preamble: bool = True,
             frames: int = 1, sop_class: str = "dx", patient_name="PHANTOM^TEST", patient_id="PH0001",
             birth_date="19600101", photometric_rgb: bool = False, tags: dict | None = None) -> bytes:
    """Encode ``image`` (HxW uint8/uint16, MONOCHROME2 sense) as DICOM bytes.

    * ``tags``: further header elements by keyword, set last (e.g. ``SOPInstanceUID``,
      which also becomes the file meta's MediaStorageSOPInstanceUID, or
      ``StudyDescription``).

    * ``bits_stored``: 2..16; BitsAllocated is 8 up to 8 bits, else 16; HighBit =
      bits_stored - 1; PixelRepresentation 0. Without a modality transformation the
      image is scaled to fill 0..2**bits_stored-1 (see :func:`expected_output`).
    * ``photometric="MONOCHROME1"`` stores inverted pixels (``max - value``), so a
      reader that inverts MONOCHROME1 recovers the MONOCHROME2 image.
    * ``rescale=(slope, intercept)``: RescaleSlope/Intercept written and stored values
      chosen so that ``slope * stored + intercept`` is the image in its own units
      (``dtype_max - image`` for MONOCHROME1). ValueError if that is not possible with
      integers in 0..2**bits_stored-1 (e.g. uint8 image, bits_stored 12,
      rescale (0.25, 0) or (1, -1000) work).
    * ``modality_lut=True``: a ModalityLUTSequence (LUTDescriptor [n, 0, 16], OW
      LUTData) maps stored -> the image in its own units. The stored values are a
      square-root encoding when ``bits_stored`` exceeds the image's bit depth, otherwise
      an inverted copy, so a reader that ignores the LUT gets a wrong image.
    * ``window=(center, width)``: WindowCenter/WindowWidth (linear VOI, in modality
      output units). ``voi_lut=True``: a VOILUTSequence (:func:`voi_lut_table`).
    * ``file_meta=False``: no File Meta Information and no preamble; the dataset is
      written raw in implicit VR little endian (``implicit_le``) or explicit VR little
      endian (``explicit_le``); other syntaxes raise ValueError. Read with
      ``pydicom.dcmread(..., force=True)``; the reader must then supply the transfer
      syntax itself (pydicom's ``pixel_array`` needs ``ds.file_meta.TransferSyntaxUID``
      set, e.g. from ``ds.is_implicit_VR``).
    * ``preamble=False``: the 128-byte preamble and ``DICM`` are left out (the File Meta
      group still starts the stream).
    * ``frames > 1``: NumberOfFrames = frames, every frame the same image.
    * ``sop_class``: "dx" (DX For Presentation), "cr" or "sc" (Secondary Capture).
    * ``photometric_rgb=True``: SamplesPerPixel 3, RGB, PlanarConfiguration 0 (an HxW
      image is replicated into R, G and B; an HxWx3 uint8 image is used as is). JPEG
      baseline writes YBR_FULL_422 (Pillow's 4:2:2 YCbCr); the other syntaxes keep RGB
      as pydicom's encoders leave it.

    Lossy syntaxes set LossyImageCompression "01". Raises NotImplementedError for a
    syntax whose encoder is missing here (``jpegls_lossless`` without pyjpegls).
    """
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID

    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"transfer_syntax must be one of {tuple(TRANSFER_SYNTAXES)}")
    if frames < 1:
        raise ValueError("frames must be >= 1")
    if not file_meta and transfer_syntax not in ("implicit_le", "explicit_le"):
        raise ValueError("file_meta=False needs transfer_syntax implicit_le or explicit_le")
    if photometric_rgb:
        bits_stored = 8
    if transfer_syntax == "jpeg_baseline" and int(bits_stored) > 8:
        raise ValueError("jpeg_baseline holds 8-bit samples only")
    pl = _plan(image, photometric=photometric, bits_stored=bits_stored, rescale=rescale,
               modality_lut=modality_lut, photometric_rgb=photometric_rgb)
    bs = int(bits_stored)
    ba = 8 if bs <= 8 else 16
    stored = pl["stored"].astype(np.uint8 if ba == 8 else np.uint16)
    opts = (transfer_syntax, photometric, bs, modality, body_part, view_position, rescale, window,
            voi_lut, modality_lut, file_meta, preamble, frames, sop_class, patient_id, photometric_rgb)
    uid_seed = (hashlib.sha256(np.ascontiguousarray(stored).tobytes()).hexdigest(), repr(opts))
    ds = _base_dataset(sop_class=sop_class, modality=modality, body_part=body_part,
                       view_position=view_position, patient_name=patient_name, patient_id=patient_id,
                       birth_date=birth_date, uid_seed=uid_seed)
    for keyword, value in (tags or {}).items():
        setattr(ds, keyword, value)
        if keyword == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = value
    rows, cols = stored.shape[:2]
    ds.Rows, ds.Columns = rows, cols
    if photometric_rgb:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
    else:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ba
    ds.BitsStored = bs
    ds.HighBit = bs - 1
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    little = transfer_syntax != "explicit_be"
    if "rescale" in pl:
        ds.RescaleSlope = f"{pl['rescale'][0]:.10g}"
        ds.RescaleIntercept = f"{pl['rescale'][1]:.10g}"
        ds.RescaleType = "US"
    if "lut" in pl:
        from pydicom.sequence import Sequence
        item = _lut_item(pl["lut"], f"PHANTOM {pl['lut_kind'].upper()} MODALITY LUT", little)
        item.ModalityLUTType = "US"
        ds.ModalityLUTSequence = Sequence([item])
    if window is not None:
        ds.WindowCenter = f"{float(window[0]):.10g}"
        ds.WindowWidth = f"{float(window[1]):.10g}"
        ds.VOILUTFunction = "LINEAR"
    if voi_lut:
        from pydicom.sequence import Sequence
        ds.VOILUTSequence = Sequence([_lut_item(voi_lut_table(pl["out_max"]), "PHANTOM SQRT VOI LUT", little)])

    frame_arr = np.ascontiguousarray(stored)
    all_frames = np.ascontiguousarray(np.stack([frame_arr] * frames)) if frames > 1 else frame_arr
    ts_uid = UID(TRANSFER_SYNTAXES[transfer_syntax])
    native = all_frames.astype(("<" if little else ">") + ("u1" if ba == 8 else "u2"))
    ds.PixelData = native.tobytes()
    ds["PixelData"].VR = "OB" if ba == 8 else "OW"
    ds.file_meta.TransferSyntaxUID = ts_uid

    if transfer_syntax in ("rle", "jpegls_lossless", "j2k_lossless", "j2k"):
        ds.file_meta.TransferSyntaxUID = UID(TRANSFER_SYNTAXES["explicit_le"])
        kwargs = {}
        if transfer_syntax == "jpegls_lossless":
            try:
                import jpeg_ls  # noqa: F401  (pyjpegls)
            except ImportError as exc:
                raise NotImplementedError("jpegls_lossless needs the pyjpegls package "
                                          "(pip install pyjpegls)") from exc
        if transfer_syntax == "j2k":
            kwargs["j2k_psnr"] = [45.0]
        try:
            ds.compress(ts_uid, arr=all_frames, **kwargs)
        except (RuntimeError, ImportError) as exc:
            raise NotImplementedError(f"cannot encode {transfer_syntax} here: {exc}") from exc
    elif transfer_syntax == "jpeg_baseline":
        from PIL import Image
        encoded = []
        for f in (all_frames if frames > 1 else [frame_arr]):
            buf = io.BytesIO()
            if photometric_rgb:
                Image.fromarray(f, mode="RGB").save(buf, format="JPEG", quality=95, subsampling=1)
            else:
                Image.fromarray(f, mode="L").save(buf, format="JPEG", quality=95)
            encoded.append(buf.getvalue())
        if photometric_rgb:
            ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.PixelData = encapsulate(encoded, has_bot=True)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    elif transfer_syntax == "jpeg_lossless":
        encoded = [encode_jpeg_lossless(f, bs) for f in (all_frames if frames > 1 else [frame_arr])]
        ds.PixelData = encapsulate(encoded, has_bot=True)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    if transfer_syntax in ("jpeg_baseline", "j2k"):
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1" if transfer_syntax == "jpeg_baseline" else "ISO_15444_1"

    buf = io.BytesIO()
    if not file_meta:
        del ds.file_meta
        pydicom.dcmwrite(buf, ds, implicit_vr=transfer_syntax == "implicit_le", little_endian=True,
                         enforce_file_format=False)
        return buf.getvalue()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    data = buf.getvalue()
    if not preamble:
        if data[128:132] != b"DICM":
            raise AssertionError("unexpected file layout")
        data = data[132:]
    return data


def non_image_dicom(*, patient_name="PHANTOM^TEST", patient_id="PH0001", birth_date="19600101") -> bytes:
    """A valid Basic Text SR object (no PixelData): a DICOM file that is not an image."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_uid = _uid("sr", patient_id)
    ds.file_meta.MediaStorageSOPClassUID = _BASIC_TEXT_SR
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SOPClassUID = _BASIC_TEXT_SR
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "SR"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth_date
    ds.PatientSex = "O"
    ds.StudyInstanceUID = _uid("sr-study", patient_id)
    ds.SeriesInstanceUID = _uid("sr-series", patient_id)
    ds.StudyDate = "20200401"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "SR0001"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    concept = Dataset()
    concept.CodeValue = "18748-4"
    concept.CodingSchemeDesignator = "LN"
    concept.CodeMeaning = "Diagnostic imaging report"
    ds.ConceptNameCodeSequence = Sequence([concept])
    text = Dataset()
    text.RelationshipType = "CONTAINS"
    text.ValueType = "TEXT"
    finding = Dataset()
    finding.CodeValue = "121071"
    finding.CodingSchemeDesignator = "DCM"
    finding.CodeMeaning = "Finding"
    text.ConceptNameCodeSequence = Sequence([finding])
    text.TextValue = "No acute cardiopulmonary abnormality."
    ds.ContentSequence = Sequence([text])
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()
