"""The decoder: every transfer syntax, photometric and LUT path, and every rejection."""
from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from PIL import Image

from cxrserve.synthetic.dicomwrite import (LOSSLESS_SYNTAXES, TRANSFER_SYNTAXES, expected_output,
                                 non_image_dicom, to_dicom)
from cxrserve.core.errors import MalformedInput, NotFrontalCXR, PayloadTooLarge, UnsupportedFormat
from cxrserve.core.imageio import check_frontal_chest_header, decode


@pytest.fixture(scope="module")
def radiograph() -> np.ndarray:
    """A frontal phantom, uint8 MONOCHROME2, smallish for speed."""
    from cxrserve.synthetic.phantoms import render, sample_spec

    return render(sample_spec(7, label="covid19", height=160, width=128)).image


def minmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return (x - x.min()) / (x.max() - x.min())


# --------------------------------------------------------------------------- DICOM
@pytest.mark.parametrize("syntax", sorted(TRANSFER_SYNTAXES))
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_every_transfer_syntax_and_photometric(radiograph, syntax, photometric):
    bits = 8 if syntax == "jpeg_baseline" else 12
    data = to_dicom(radiograph, transfer_syntax=syntax, photometric=photometric, bits_stored=bits)
    xray = decode(data)
    assert xray.format == "dicom" and xray.photometric == photometric
    assert (xray.height, xray.width) == radiograph.shape
    truth = minmax(expected_output(radiograph, photometric=photometric, bits_stored=bits)["mono2"])
    error = np.abs(xray.pixels - truth)
    if syntax in LOSSLESS_SYNTAXES:
        assert error.max() < 1e-6, f"{syntax} {photometric}: lossless decode differs"
    else:  # lossy: close on average, MONOCHROME1 inverted correctly
        assert error.mean() < 0.02 and np.corrcoef(xray.pixels.ravel(), truth.ravel())[0, 1] > 0.99


@pytest.mark.parametrize("bits", [8, 10, 12, 14, 16])
def test_bits_stored_and_unused_high_bits(radiograph, bits):
    data = to_dicom(radiograph, bits_stored=bits)
    xray = decode(data)
    assert xray.bits_stored == bits
    assert np.abs(xray.pixels - minmax(radiograph)).max() < 1e-2


def test_garbage_in_unused_high_bits_is_masked(radiograph):
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(to_dicom(radiograph, bits_stored=12)))
    clean = ds.pixel_array.copy()
    dirty = clean | 0xF000  # overlay bits above BitsStored
    ds.PixelData = dirty.astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf)
    assert np.array_equal(decode(buf.getvalue()).pixels, decode(to_dicom(radiograph, bits_stored=12)).pixels)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_rescale_slope_intercept(radiograph, photometric):
    data = to_dicom(radiograph, bits_stored=12, rescale=(1.0, -1000.0), photometric=photometric)
    assert np.abs(decode(data).pixels - minmax(radiograph)).max() < 1e-6


def test_modality_lut_sequence(radiograph):
    data = to_dicom(radiograph, bits_stored=12, modality_lut=True)
    assert np.abs(decode(data).pixels - minmax(radiograph)).max() < 1e-6


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_window_center_width(radiograph, photometric):
    window = (2000.0, 2500.0)
    data = to_dicom(radiograph, bits_stored=12, window=window, photometric=photometric)
    expected = expected_output(radiograph, bits_stored=12, window=window, photometric=photometric)
    voi = expected["voi"] / expected["out_max"]
    truth = 1.0 - voi if photometric == "MONOCHROME1" else voi
    assert np.abs(decode(data).pixels - truth).max() < 1e-6


def test_voi_lut_sequence_preferred_over_window(radiograph):
    data = to_dicom(radiograph, bits_stored=12, voi_lut=True, window=(100.0, 50.0))
    expected = expected_output(radiograph, bits_stored=12, voi_lut=True, window=(100.0, 50.0))
    assert np.abs(decode(data).pixels - expected["voi"] / 65535.0).max() < 1e-6


@pytest.mark.parametrize("syntax", ["implicit_le", "explicit_le"])
def test_no_file_meta_and_no_preamble(radiograph, syntax):
    raw = to_dicom(radiograph, transfer_syntax=syntax, file_meta=False)
    assert raw[128:132] != b"DICM"
    assert np.abs(decode(raw).pixels - minmax(radiograph)).max() < 1e-6
    no_preamble = to_dicom(radiograph, preamble=False)
    assert no_preamble.startswith(b"\x02\x00") and decode(no_preamble).format == "dicom"


def test_rgb_dicom_becomes_grey(radiograph):
    xray = decode(to_dicom(radiograph, photometric_rgb=True))
    assert xray.pixels.ndim == 2 and any("grey" in w for w in xray.warnings)
    assert np.abs(xray.pixels - radiograph / 255.0).max() < 1e-2


def test_multiframe_and_non_image_are_415(radiograph):
    with pytest.raises(UnsupportedFormat, match="multi-frame"):
        decode(to_dicom(radiograph, frames=3))
    with pytest.raises(UnsupportedFormat, match="no image"):
        decode(non_image_dicom())


def test_truncated_dicom_is_400(radiograph):
    data = to_dicom(radiograph, bits_stored=12)
    with pytest.raises(MalformedInput):
        decode(data[: len(data) // 2])


def test_decompression_bomb_dicom_is_413_before_decoding(radiograph):
    data = to_dicom(radiograph)
    with pytest.raises(PayloadTooLarge, match="Mpx"):
        decode(data, max_pixels=100)


def test_no_identifiers_leave_the_decoder(radiograph):
    xray = decode(to_dicom(radiograph, patient_name="DOE^JANE", patient_id="MRN123456", birth_date="19450101"))
    text = repr(xray.info()) + repr(xray.warnings) + xray.instance_hash
    for secret in ("DOE", "JANE", "MRN123456", "19450101"):
        assert secret not in text
    assert len(xray.instance_hash) == 16


@pytest.mark.parametrize("view,body,modality,message", [
    ("LL", "CHEST", "DX", "lateral"),
    ("RL", "CHEST", "CR", "lateral"),
    ("PA", "HIP", "CR", "HIP"),
    ("PA", "CHEST", "CT", "Modality CT"),
    ("RLO", "CHEST", "DX", "RLO"),
])
def test_header_checks_reject_non_frontal_chest(radiograph, view, body, modality, message):
    xray = decode(to_dicom(radiograph, view_position=view, body_part=body, modality=modality))
    with pytest.raises(NotFrontalCXR, match=message) as err:
        check_frontal_chest_header(xray)
    assert err.value.status == 422


@pytest.mark.parametrize("view,body", [("PA", "CHEST"), ("AP", "THORAX"), ("", ""), ("AP", "PORT CHEST")])
def test_header_checks_accept_frontal_chest(radiograph, view, body):
    check_frontal_chest_header(decode(to_dicom(radiograph, view_position=view, body_part=body)))


# --------------------------------------------------------------------------- rasters
def _png(arr, mode=None, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG", **save)
    return buf.getvalue()


def test_png_8_and_16_bit(radiograph):
    assert np.abs(decode(_png(radiograph)).pixels - radiograph / 255.0).max() < 1e-6
    twelve_bit = (radiograph.astype(np.uint16) * 16)  # 12-bit data in a 16-bit PNG
    xray = decode(_png(twelve_bit))
    assert xray.bits_stored == 12
    assert np.abs(xray.pixels - twelve_bit / 4095.0).max() < 1e-6


def test_colour_rasters_become_grey(radiograph):
    rgb = np.dstack([radiograph] * 3)
    rgba = np.dstack([radiograph] * 3 + [np.full_like(radiograph, 255)])
    for data in (_png(rgb), _png(rgba)):
        assert np.abs(decode(data).pixels - radiograph / 255.0).max() < 2 / 255
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    buf = io.BytesIO()
    palette.save(buf, format="PNG")
    xray = decode(buf.getvalue())
    assert xray.photometric == "P" and np.abs(xray.pixels - radiograph / 255.0).mean() < 0.03


def test_jpeg_and_exif_orientation(radiograph):
    buf = io.BytesIO()
    Image.fromarray(radiograph).save(buf, format="JPEG", quality=95)
    assert np.abs(decode(buf.getvalue()).pixels - radiograph / 255.0).mean() < 0.02
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(radiograph).save(rotated, format="JPEG", quality=95, exif=exif)
    xray = decode(rotated.getvalue())
    assert (xray.height, xray.width) == (radiograph.shape[1], radiograph.shape[0])


def test_png_bomb_is_413_before_decoding():
    # A valid PNG header announcing 30000 x 30000 pixels; the data is never inflated.
    big = Image.new("L", (1, 1))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = (30000).to_bytes(4, "big") * 2  # IHDR width, height
    import zlib

    crc = zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF
    data[29:33] = crc.to_bytes(4, "big")
    with pytest.raises(PayloadTooLarge, match="900"):
        decode(bytes(data))


@pytest.mark.parametrize("data,error", [
    (b"", MalformedInput),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, MalformedInput),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 40, MalformedInput),
    (b"GIF89a" + b"\x00" * 40, UnsupportedFormat),
    (b"%PDF-1.4 ...", UnsupportedFormat),
    (bytes(range(256)) * 8, UnsupportedFormat),
    (b"hello, world", UnsupportedFormat),
])
def test_malformed_and_unsupported(data, error):
    with pytest.raises(error) as err:
        decode(data)
    assert err.value.status == error.status and err.value.message


def test_byte_limit_is_413(radiograph):
    with pytest.raises(PayloadTooLarge, match="MiB"):
        decode(_png(radiograph), max_bytes=1000)


# --------------------------------------------------------------------------- real files
def test_real_dicom_samples(shared_data):
    root = shared_data / "dicom_samples"
    rows = list(csv.DictReader(open(root / "labels.csv")))
    assert rows
    for row in rows:
        xray = decode((root / row["filename"]).read_bytes())
        assert (xray.height, xray.width) == (int(row["rows"]), int(row["columns"])), row["filename"]
        assert xray.photometric == row["photometric"]
        assert 0.05 < xray.pixels.mean() < 0.95, f"{row['filename']} decoded to a blank image"
        if row["label"] == "non_chest" and row["body_part"]:
            with pytest.raises(NotFrontalCXR):
                check_frontal_chest_header(xray)
        elif row["label"] == "chest":
            check_frontal_chest_header(xray)


def test_real_lossy_j2k_matches_its_lossless_twin(shared_data):
    root = shared_data / "dicom_samples"
    lossy = decode((root / "chest" / "WG04_RG1_J2KI.dcm").read_bytes()).pixels
    twin = decode((root / "derived" / "WG04_RG1_uncompressed_from_JLSN_DERIVED.dcm").read_bytes()).pixels
    assert np.corrcoef(lossy.ravel(), twin.ravel())[0, 1] > 0.99
    # MONOCHROME1 inverted: the lungs (upper-lateral fields) are darker than the spine.
    h, w = lossy.shape
    assert lossy[h // 3, w // 4] < lossy[h // 3, w // 2]


def test_header_values_never_come_back_in_error_messages():
    """Malformed image-module values are named, never quoted: the message goes back in the
    response and a crafted value could carry the patient's name."""
    base = to_dicom(np.full((32, 32), 100, np.uint8))  # explicit VR little endian
    for tag in (b"\x28\x00\x08\x00", b"\x28\x00\x10\x00"):  # NumberOfFrames, Rows: raw IS "DOE^JOHN"
        element = tag + b"IS" + (8).to_bytes(2, "little") + b"DOE^JOHN"
        data = _insert_element(base, tag, element)
        with pytest.raises(MalformedInput) as err:
            decode(data)
        assert "DOE" not in str(err.value), str(err.value)


def _insert_element(data: bytes, tag: bytes, element: bytes) -> bytes:
    """``data`` with ``element`` in place of the element ``tag`` (or before the next higher one):
    written by hand, since pydicom will not write a value its VR cannot hold."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    group, elem = int.from_bytes(tag[:2], "little"), int.from_bytes(tag[2:], "little")
    target = (group << 16) | elem
    if target in ds:
        del ds[target]
    buf = io.BytesIO()
    ds.save_as(buf)
    out = buf.getvalue()
    # the first element of group 0x0028 at or after the target (elements are in tag order)
    at = None
    i = out.find(b"\x28\x00")
    while i != -1:
        e = int.from_bytes(out[i + 2:i + 4], "little")
        if out[i + 4:i + 6].isalpha() and e >= elem:
            at = i
            break
        i = out.find(b"\x28\x00", i + 1)
    assert at is not None
    return out[:at] + element + out[at:]
