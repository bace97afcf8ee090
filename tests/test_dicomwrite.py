"""DICOM writer: every variant must round-trip through pydicom as documented."""
from __future__ import annotations

import io
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from cxrserve.synthetic.dicomwrite import (LOSSLESS_SYNTAXES, SOP_CLASSES, TRANSFER_SYNTAXES, expected_output,
                                           non_image_dicom, to_dicom, voi_lut_table)
from cxrserve.synthetic.jpeg_lossless import encode_jpeg_lossless
from cxrserve.synthetic.phantoms import PhantomSpec, render

IMG = render(PhantomSpec(3, height=72, width=60, label="covid19", extent=(2, 2), opacity=(1, 1))).image
IMG16 = (IMG.astype(np.uint16) * 257 + np.arange(60, dtype=np.uint16)[None, :]).astype(np.uint16)

try:
    import jpeg_ls  # noqa: F401
    HAVE_JPEGLS = True
except ImportError:
    HAVE_JPEGLS = False


def read(b: bytes) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(b), force=True)


def pixels(ds) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ds.pixel_array


def mono2(ds, arr):
    """What a reader shows: MONOCHROME1 inverted about the stored range."""
    if ds.PhotometricInterpretation == "MONOCHROME1":
        return (1 << ds.BitsStored) - 1 - arr.astype(np.int64)
    return arr.astype(np.int64)


def _skip_missing(ts):
    if ts == "jpegls_lossless" and not HAVE_JPEGLS:
        pytest.skip("pyjpegls not installed")


@pytest.mark.parametrize("ts", LOSSLESS_SYNTAXES)
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_lossless_round_trip_8bit(ts, photometric):
    _skip_missing(ts)
    b = to_dicom(IMG, transfer_syntax=ts, photometric=photometric)
    ds = read(b)
    assert ds.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[ts]
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (8, 8, 7, 0)
    assert ds.PhotometricInterpretation == photometric
    arr = pixels(ds)
    assert np.array_equal(mono2(ds, arr), IMG)  # exact after the reader's MONOCHROME1 inversion
    if photometric == "MONOCHROME1":
        assert np.array_equal(arr, 255 - IMG)


@pytest.mark.parametrize("ts", LOSSLESS_SYNTAXES)
@pytest.mark.parametrize("bits", [10, 12, 16])
def test_lossless_round_trip_high_bit_depths(ts, bits):
    _skip_missing(ts)
    for src in (IMG, IMG16):
        ds = read(to_dicom(src, transfer_syntax=ts, bits_stored=bits))
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, bits, bits - 1)
        arr = pixels(ds)
        exp = expected_output(src, bits_stored=bits)["stored"]
        assert np.array_equal(arr, exp)
        assert arr.max() <= (1 << bits) - 1 and arr.max() > (1 << (bits - 1))  # fills the range
        if src is IMG:  # the 8-bit image is recoverable exactly from any deeper encoding
            back = (arr.astype(np.int64) * 255 * 2 + (1 << bits) - 1) // (2 * ((1 << bits) - 1))
            assert np.array_equal(back, IMG)


@pytest.mark.parametrize("ts,tol", [("jpeg_baseline", 4.0), ("j2k", 4.0)])
def test_lossy_round_trip_within_tolerance(ts, tol):
    for photometric in ("MONOCHROME2", "MONOCHROME1"):
        ds = read(to_dicom(IMG, transfer_syntax=ts, photometric=photometric))
        err = np.abs(mono2(ds, pixels(ds)) - IMG.astype(np.int64))
        assert err.mean() < tol and err.max() < 40
        assert ds.LossyImageCompression == "01"
    with pytest.raises(ValueError):
        to_dicom(IMG, transfer_syntax="jpeg_baseline", bits_stored=12)


@pytest.mark.parametrize("ts", [t for t in TRANSFER_SYNTAXES if t != "explicit_be"] + ["explicit_be"])
def test_multiframe(ts):
    _skip_missing(ts)
    ds = read(to_dicom(IMG, transfer_syntax=ts, frames=3))
    assert int(ds.NumberOfFrames) == 3
    arr = pixels(ds)
    assert arr.shape == (3,) + IMG.shape
    if ts in LOSSLESS_SYNTAXES:
        assert all(np.array_equal(f, IMG) for f in arr)


@pytest.mark.parametrize("ts", LOSSLESS_SYNTAXES + ("jpeg_baseline",))
def test_rgb(ts):
    _skip_missing(ts)
    rgb = np.stack([IMG, IMG[::-1], 255 - IMG], axis=2)
    ds = read(to_dicom(rgb, transfer_syntax=ts, photometric_rgb=True))
    assert ds.SamplesPerPixel == 3
    arr = pixels(ds)
    assert arr.shape == IMG.shape + (3,)
    if ts == "jpeg_baseline":
        assert ds.PhotometricInterpretation == "YBR_FULL_422"
        assert np.abs(arr.astype(int) - rgb).mean() < 6
    else:
        assert ds.PhotometricInterpretation == "RGB"
        assert np.array_equal(arr, rgb)
    grey = pixels(read(to_dicom(IMG, transfer_syntax=ts, photometric_rgb=True)))
    if ts != "jpeg_baseline":
        assert all(np.array_equal(grey[..., c], IMG) for c in range(3))


def test_no_file_meta_and_no_preamble():
    for ts, uid in (("implicit_le", ImplicitVRLittleEndian), ("explicit_le", ExplicitVRLittleEndian)):
        b = to_dicom(IMG, transfer_syntax=ts, file_meta=False)
        assert b[128:132] != b"DICM" and b[:4] == b"\x08\x00\x05\x00"  # starts with (0008,0005)
        ds = read(b)
        assert "TransferSyntaxUID" not in ds.file_meta
        assert ds.PatientID == "PH0001"
        ds.file_meta.TransferSyntaxUID = uid  # a reader supplies the syntax itself
        assert np.array_equal(pixels(ds), IMG)
    b = to_dicom(IMG, preamble=False)
    assert b[:2] == b"\x02\x00" and b"DICM" not in b[:140]
    ds = read(b)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(pixels(ds), IMG)
    with pytest.raises(ValueError):
        to_dicom(IMG, transfer_syntax="rle", file_meta=False)


@pytest.mark.parametrize("kw", [
    dict(rescale=(0.25, 0.0), bits_stored=12),
    dict(rescale=(1.0, -1000.0), bits_stored=12),
    dict(rescale=(1.0, -1000.0), bits_stored=12, photometric="MONOCHROME1", transfer_syntax="explicit_be"),
    dict(modality_lut=True),
    dict(modality_lut=True, bits_stored=12),
    dict(modality_lut=True, bits_stored=12, photometric="MONOCHROME1", transfer_syntax="explicit_be"),
    dict(modality_lut=True, bits_stored=14, transfer_syntax="jpeg_lossless"),
])
def test_modality_transformations(kw):
    ds = read(to_dicom(IMG, **kw))
    exp = expected_output(IMG, **kw)
    arr = pixels(ds)
    assert np.array_equal(arr, exp["stored"])
    out = apply_modality_lut(arr, ds)
    assert np.allclose(out, exp["modality"])
    shown = exp["out_max"] - out if ds.PhotometricInterpretation == "MONOCHROME1" else out
    assert np.allclose(shown, IMG)  # the image in its own units, exactly
    if kw.get("modality_lut") and kw.get("bits_stored", 8) > 8:
        assert not np.allclose(arr * 255.0 / arr.max(), IMG, atol=2)  # ignoring the LUT is wrong
    with pytest.raises(ValueError):
        to_dicom(IMG, rescale=(3.0, 0.0))  # 255/3 is not an integer


@pytest.mark.parametrize("kw", [
    dict(window=(100, 80)),
    dict(window=(2000, 3000), bits_stored=12),
    dict(voi_lut=True),
    dict(voi_lut=True, bits_stored=12, transfer_syntax="explicit_be"),
    dict(voi_lut=True, window=(100, 80)),
])
def test_voi_transformations(kw):
    ds = read(to_dicom(IMG, **kw))
    exp = expected_output(IMG, **kw)
    out = apply_voi_lut(apply_modality_lut(pixels(ds), ds), ds)
    assert np.allclose(out, exp["voi"])
    if kw.get("voi_lut"):
        assert "VOILUTSequence" in ds
        assert np.array_equal(voi_lut_table(255)[[0, 255]], [0, 65535])
    if "window" in kw:
        assert float(ds.WindowCenter) == kw["window"][0] and float(ds.WindowWidth) == kw["window"][1]


def test_sop_classes_identifiers_and_determinism():
    for name, uid in SOP_CLASSES.items():
        ds = read(to_dicom(IMG, sop_class=name, modality="CR" if name == "cr" else "DX"))
        assert ds.SOPClassUID == uid == ds.file_meta.MediaStorageSOPClassUID
    b = to_dicom(IMG, patient_name="DOE^JANE", patient_id="MRN123456", birth_date="19451231",
                 view_position="AP", body_part="CHEST")
    ds = read(b)
    assert (str(ds.PatientName), ds.PatientID, ds.PatientBirthDate) == ("DOE^JANE", "MRN123456", "19451231")
    assert ds.ViewPosition == "AP" and ds.BodyPartExamined == "CHEST" and ds.Modality == "DX"
    assert b"DOE^JANE" in b and b"MRN123456" in b
    assert to_dicom(IMG) == to_dicom(IMG)  # deterministic bytes (UIDs from a hash)
    assert read(to_dicom(IMG)).SOPInstanceUID != read(to_dicom(IMG[::-1])).SOPInstanceUID


def test_non_image_dicom():
    ds = read(non_image_dicom())
    assert "PixelData" not in ds and ds.Modality == "SR"
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.11"


def test_jpeg_lossless_encoder_is_bit_exact():
    libjpeg = pytest.importorskip("libjpeg")
    rng = np.random.default_rng(0)
    cases = [
        (rng.integers(0, 65536, (37, 23), dtype=np.uint16), 16),   # full range: +-32768 differences
        (np.tile(np.array([0, 32768, 65535, 0], np.uint16), (5, 4)), 16),
        (np.full((16, 16), 7, np.uint8), 8),                       # one Huffman symbol only
        (rng.integers(0, 4, (9, 31), dtype=np.uint8), 2),
        (rng.integers(0, 4096, (40, 40), dtype=np.uint16), 12),
        (IMG, 8),
        (rng.integers(0, 256, (11, 13, 3), dtype=np.uint8), 8),   # three interleaved components
    ]
    for arr, p in cases:
        data = encode_jpeg_lossless(arr, p)
        assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9" and b"\xff\xc3" in data
        out = libjpeg.decode(data)
        assert np.array_equal(out.reshape(arr.shape), arr), (arr.shape, p)
    with pytest.raises(ValueError):
        encode_jpeg_lossless(np.full((4, 4), 300, np.uint16), 8)


def test_bad_arguments():
    with pytest.raises(ValueError):
        to_dicom(IMG, transfer_syntax="jpeg_xl")
    with pytest.raises(TypeError):
        to_dicom(IMG.astype(np.float32))
    with pytest.raises(ValueError):
        to_dicom(np.zeros((2, 3, 4), np.uint8))
    with pytest.raises(ValueError):
        to_dicom(IMG, sop_class="ct")
