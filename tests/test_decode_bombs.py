"""Decompression bombs and lying headers (issue 25, finding 1): refused before they inflate.

Each attack is built small here (never the inflated size) and must be refused by
:mod:`cxrserve.core.bounded` with a typed 413/400 *before* a decoder runs: a spy on
``Dataset.pixel_array`` (and on simplejpeg for the reduced-resolution path) fails the
test if one does. Also: every syntax in ``DECODABLE_TRANSFER_SYNTAXES`` really decodes.
"""
from __future__ import annotations

import base64
import io
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest

from cxrserve.core import bounded
from cxrserve.core.bounded import DECODABLE_TRANSFER_SYNTAXES
from cxrserve.core.errors import CXRInputError, MalformedInput, PayloadTooLarge, UnsupportedFormat
from cxrserve.core.imageio import MAX_BYTES, decode
from cxrserve.synthetic.dicomwrite import TRANSFER_SYNTAXES, to_dicom

MiB = 1 << 20


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """64 x 80 uint8 with structure (lossy codecs stay close to it)."""
    y, x = np.mgrid[0:64, 0:80]
    return (40 + 3 * x + 2 * y + 20 * np.sin(x / 5.0)).clip(0, 255).astype(np.uint8)


@pytest.fixture()
def no_decoder(monkeypatch):
    """Fails the test if any pixel decoder runs (pydicom's, or simplejpeg's fast path)."""
    import pydicom
    import simplejpeg

    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a decoder ran on an input that must be refused from its headers")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(spy))
    monkeypatch.setattr(simplejpeg, "decode_jpeg", spy)
    yield calls
    assert not calls, "a decoder ran before the bound was checked"


# --------------------------------------------------------------------------- builders
def _encode(ds, implicit: bool = False) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, implicit
    write_dataset(buf, ds)
    return buf.getvalue()


def _file(meta_ts: str, body: bytes) -> bytes:
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    meta.TransferSyntaxUID = meta_ts
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + buf.getvalue() + body


def deflate_bomb(inflated: int = 300 * MiB) -> bytes:
    """A Deflated Explicit VR LE DICOM whose data set inflates to ``inflated`` bytes.

    A 64 x 64 radiograph with a private OB element of zeros in front of it; compressed
    a MiB at a time, so building it never holds the inflated size.
    """
    from pydicom.dataset import Dataset

    head, tail = Dataset(), Dataset()
    head.SOPClassUID, head.SOPInstanceUID, head.Modality = "1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.4.5", "DX"
    head.add_new(0x00091000, "LO", "CXRSERVE TEST")  # private creator of block 0x10
    tail.Rows = tail.Columns = 64
    tail.SamplesPerPixel, tail.PhotometricInterpretation = 1, "MONOCHROME2"
    tail.BitsAllocated, tail.BitsStored, tail.HighBit, tail.PixelRepresentation = 8, 8, 7, 0
    tail.PixelData = bytes(range(64)) * 64
    zeros = inflated - 4096
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [packer.compress(_encode(head)), packer.compress(struct.pack("<HH2sHI", 0x0009, 0x1010, b"OB", 0, zeros))]
    block = bytes(MiB)
    for start in range(0, zeros, MiB):
        parts.append(packer.compress(block[: min(MiB, zeros - start)]))
    parts += [packer.compress(_encode(tail)), packer.flush()]
    return _file("1.2.840.10008.1.2.1.99", b"".join(parts))


def _dataset(data: bytes):
    import pydicom

    return pydicom.dcmread(io.BytesIO(data), force=True)


def _save(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def with_frame(data: bytes, patch, *, rows: int | None = None, cols: int | None = None, ts: str | None = None) -> bytes:
    """``data`` (a one-frame encapsulated DICOM) with its frame replaced by ``patch(frame)``."""
    from pydicom.encaps import encapsulate, generate_frames

    ds = _dataset(data)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([patch(bytearray(frame))])
    if rows is not None:
        ds.Rows = rows
    if cols is not None:
        ds.Columns = cols
    if ts is not None:
        ds.file_meta.TransferSyntaxUID = ts
    return _save(ds)


def set_sof(width: int, height: int):
    """A patch that writes ``width`` x ``height`` into a JPEG's SOFn (without re-encoding)."""
    def patch(frame: bytearray) -> bytes:
        at = 2
        while frame[at + 1] not in bounded._FRAME_MARKERS:
            at += 2 + struct.unpack_from(">H", frame, at + 2)[0]
        struct.pack_into(">HH", frame, at + 5, height, width)
        return bytes(frame)
    return patch


def set_siz(width: int, height: int):
    """A patch that writes ``width`` x ``height`` into a J2K codestream's SIZ segment."""
    def patch(frame: bytearray) -> bytes:
        at = frame.find(b"\xff\x51")
        struct.pack_into(">II", frame, at + 6, width, height)  # Xsiz, Ysiz (offsets are 0)
        return bytes(frame)
    return patch


def display(image: np.ndarray) -> np.ndarray:
    """What the decoder shows for stored ``image`` with no window: min-max to 0..255."""
    x = image.astype(np.float64)
    return np.rint((x - x.min()) / (x.max() - x.min()) * 255).astype(np.uint8)


def jpeg_dicom(image: np.ndarray) -> bytes:
    return to_dicom(image, transfer_syntax="jpeg_baseline", bits_stored=8)


# --------------------------------------------------------------------------- deflate
def test_deflate_bomb_is_refused_fast_and_small(no_decoder):
    bomb = deflate_bomb(300 * MiB)
    assert len(bomb) < 2 * MiB  # ~300 KB on the wire
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(PayloadTooLarge, match="inflates to more than 64 MiB"):
            decode(bomb)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0, f"refusing the bomb took {elapsed:.2f} s"
    assert peak < 50 * MiB, f"refusing the bomb held {peak / MiB:.0f} MiB"


def test_deflate_bomb_is_refused_by_the_reduced_path_too(no_decoder):
    with pytest.raises(PayloadTooLarge):
        decode(deflate_bomb(80 * MiB), target=96)


def test_deflated_file_under_the_cap_still_decodes(image):
    data = to_dicom(image, transfer_syntax="deflated", bits_stored=8)
    xray = decode(data)
    assert xray.transfer_syntax == "Deflated Explicit VR Little Endian"
    assert np.array_equal(xray.uint8, display(image))
    # the cap is on the inflated data set: a little over its size refuses it
    inflated = len(bounded.inflate_dataset(data, MAX_BYTES))
    with pytest.raises(PayloadTooLarge):
        bounded.inflate_dataset(data, inflated // 2)


def test_inflate_dataset_rewrites_the_file_meta(image):
    import pydicom

    data = to_dicom(image, transfer_syntax="deflated", bits_stored=8)
    plain = bounded.inflate_dataset(data, MAX_BYTES)
    ds = pydicom.dcmread(io.BytesIO(plain))
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert ds.file_meta.FileMetaInformationGroupLength == len(_encode(ds.file_meta)) - 12
    assert np.array_equal(ds.pixel_array, image)
    other = to_dicom(image, transfer_syntax="explicit_le", bits_stored=8)
    assert bounded.inflate_dataset(other, MAX_BYTES) is other  # not deflated: untouched


def test_truncated_or_corrupt_deflate_is_400(image):
    data = to_dicom(image, transfer_syntax="deflated", bits_stored=8)
    with pytest.raises(MalformedInput):
        decode(data[: len(data) - 200])
    body = bytearray(data)
    body[bounded._file_meta(data)[3]] = 0xFF  # first deflate block of type 3: reserved, invalid
    with pytest.raises(MalformedInput, match="corrupt"):
        decode(bytes(body))


def test_header_readers_outside_imageio_are_bounded_too():
    """``bounded.dcmread`` (for the node and batch header reads): stop_before_pixels does
    not stop pydicom inflating, this does."""
    with pytest.raises(PayloadTooLarge):
        bounded.dcmread(deflate_bomb(80 * MiB), max_bytes=MAX_BYTES, stop_before_pixels=True)


# --------------------------------------------------------------------------- JPEG frames
def test_jpeg_frame_larger_than_the_limit_in_a_small_header_is_413(image, no_decoder):
    # the case: Rows x Columns 512 x 512, the frame's SOF 12000 x 12000 (144 Mpx)
    data = with_frame(jpeg_dicom(image), set_sof(12000, 12000), rows=512, cols=512)
    for target in (None, 96):
        with pytest.raises(PayloadTooLarge, match="12000 x 12000"):
            decode(data, target=target)


def test_jpeg_frame_that_disagrees_with_rows_and_columns_is_400(image, no_decoder):
    data = with_frame(jpeg_dicom(image), set_sof(1000, 1000))
    for target in (None, 96):
        with pytest.raises(MalformedInput, match="not the header's Columns x Rows"):
            decode(data, target=target)


def test_frame_over_a_lower_pixel_limit_is_413(image, no_decoder):
    # header 80 x 64 (5,120 px) passes a 6,000 px limit; the frame's 100 x 100 does not
    data = with_frame(jpeg_dicom(image), set_sof(100, 100))
    with pytest.raises(PayloadTooLarge):
        decode(data, max_pixels=6_000)


@pytest.mark.parametrize("syntax", ["jpeg_lossless", "jpegls_lossless"])
def test_lossless_jpeg_and_jpegls_frames_are_checked(image, syntax, no_decoder):
    data = to_dicom(image, transfer_syntax=syntax, bits_stored=8)
    assert bounded.frame_shape((next(_frames(data)),), TRANSFER_SYNTAXES[syntax]) == (80, 64, 1)
    with pytest.raises(PayloadTooLarge):
        decode(with_frame(data, set_sof(12000, 12000), rows=512, cols=512))
    with pytest.raises(MalformedInput):
        decode(with_frame(data, set_sof(81, 64)))


def test_jpeg_component_count_must_match_samples(image, no_decoder):
    def three_components(frame: bytearray) -> bytes:
        at = 2
        while frame[at + 1] not in bounded._FRAME_MARKERS:
            at += 2 + struct.unpack_from(">H", frame, at + 2)[0]
        frame[at + 9] = 3
        return bytes(frame)

    with pytest.raises(MalformedInput, match="component count"):
        decode(with_frame(jpeg_dicom(image), three_components))


def test_jpeg_header_walk_skips_what_libjpeg_skips(image):
    """Fill bytes and extraneous bytes before a marker (libjpeg tolerates both) do not hide
    the frame header from the check, nor reject a readable file."""
    frame = bytes(next(_frames(jpeg_dicom(image))))
    sloppy = frame[:2] + b"\x00\x00\xff\xff" + frame[2:]
    assert bounded.jpeg_dimensions(sloppy) == bounded.jpeg_dimensions(frame) == (80, 64, 1)
    assert bounded.jpeg_dimensions(frame[:2] + bytes(100_000) + frame[2:]) == (80, 64, 1)
    lying = set_sof(12000, 12000)(bytearray(frame))
    assert bounded.jpeg_dimensions(lying[:2] + b"\x00\x00\xff\xff" + lying[2:]) == (12000, 12000, 1)


def test_jpeg_without_a_frame_header_is_400(image, no_decoder):
    with pytest.raises(MalformedInput):
        decode(with_frame(jpeg_dicom(image), lambda f: b"\xff\xd8\xff\xda\x00\x08" + bytes(8) + b"\xff\xd9"))
    with pytest.raises(MalformedInput):
        decode(with_frame(jpeg_dicom(image), lambda f: b"GIF89a" + bytes(f[6:])))


def _frames(data: bytes):
    from pydicom.encaps import generate_frames

    return generate_frames(_dataset(data).PixelData, number_of_frames=1)


# --------------------------------------------------------------------------- JPEG 2000
@pytest.mark.parametrize("syntax", ["j2k_lossless", "j2k"])
def test_j2k_siz_that_lies_is_refused(image, syntax, no_decoder):
    data = to_dicom(image, transfer_syntax=syntax, bits_stored=8)
    with pytest.raises(PayloadTooLarge):
        decode(with_frame(data, set_siz(12000, 12000), rows=512, cols=512))
    for target in (None, 96):
        with pytest.raises(MalformedInput, match="not the header's Columns x Rows"):
            decode(with_frame(data, set_siz(1000, 1000)), target=target)


def test_j2k_inside_a_jp2_wrapper_is_read(image):
    codestream = next(_frames(to_dicom(image, transfer_syntax="j2k_lossless", bits_stored=8)))

    def box(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", 8 + len(body)) + kind + body

    ihdr = box(b"ihdr", struct.pack(">IIHBBBB", 64, 80, 1, 7, 7, 0, 0))
    jp2 = (box(b"jP  ", b"\r\n\x87\n") + box(b"ftyp", b"jp2 \0\0\0\0jp2 ") + box(b"jp2h", ihdr)
           + box(b"jp2c", codestream))
    assert bounded.j2k_dimensions(jp2) == (80, 64, 1)
    lying = jp2[: len(jp2) - len(codestream)] + set_siz(12000, 12000)(bytearray(codestream))
    assert bounded.j2k_dimensions(lying) == (12000, 12000, 1)
    with pytest.raises(MalformedInput):
        bounded.j2k_dimensions(b"\0\0\0\x0cjP  \r\n\x87\n" + b"\0\0\0\x04junk")


def test_j2k_component_count_must_match_samples(image, no_decoder):
    def components(frame: bytearray) -> bytes:
        at = frame.find(b"\xff\x51")
        struct.pack_into(">H", frame, at + 38, 16384)  # Csiz: OpenJPEG allocates every one
        return bytes(frame)

    with pytest.raises(MalformedInput, match="component count"):
        decode(with_frame(to_dicom(image, transfer_syntax="j2k_lossless", bits_stored=8), components))


# --------------------------------------------------------------------------- RLE
def _rle_table(count: int, offsets: list[int]):
    def patch(frame: bytearray) -> bytes:
        struct.pack_into("<16I", frame, 0, count, *(offsets + [0] * (15 - len(offsets))))
        return bytes(frame)
    return patch


@pytest.mark.parametrize("count, offsets, why", [
    (0, [], "number of segments"),
    (16, [64], "number of segments"),
    (1, [60], "segment table"),                  # first segment inside the header
    (2, [64, 64], "segment table"),              # not increasing
    (2, [64, 10**6], "segment table"),           # past the end of the frame
    (2, [64, 100], "segment count"),             # 2 segments for 8-bit grey (1 byte/pixel)
])
def test_rle_with_a_bogus_segment_table_is_400(image, count, offsets, why, no_decoder):
    data = to_dicom(image, transfer_syntax="rle", bits_stored=8)
    with pytest.raises(MalformedInput, match=why):
        decode(with_frame(data, _rle_table(count, offsets)))


def test_rle_never_falls_back_to_the_unbounded_decoder(image, monkeypatch):
    """pydicom's own RLE decoder grows a segment without a cap (64x); it must not run,
    even when pylibjpeg-rle (which fills a Rows x Columns buffer) fails."""
    import pydicom.pixels.decoders.rle as native
    from pydicom.pixels.decoders.base import RLELosslessDecoder

    ran = []
    monkeypatch.setattr(native, "_rle_decode_segment", lambda src: ran.append(1) or bytearray(10**8))

    def failing(src, runner):
        raise RuntimeError("pylibjpeg-rle failed")

    monkeypatch.setitem(RLELosslessDecoder._available, "pylibjpeg", failing)
    with pytest.raises((MalformedInput, UnsupportedFormat)):  # pydicom's "all plugins failed"
        decode(to_dicom(image, transfer_syntax="rle", bits_stored=8))
    assert not ran


# --------------------------------------------------------------------------- fragments, memory, syntax
def test_millions_of_fragments_are_refused(no_decoder, image):
    from pydicom.encaps import encapsulate

    ds = _dataset(jpeg_dicom(image))
    frame = b"\xff\xd8" + b"\0" * (2 * (bounded.MAX_FRAGMENTS + 10))
    ds.PixelData = encapsulate([frame], fragments_per_frame=bounded.MAX_FRAGMENTS + 1)
    start = time.perf_counter()
    with pytest.raises(PayloadTooLarge, match="fragments"):
        decode(_save(ds))
    assert time.perf_counter() - start < 1.0


def test_decode_memory_cap(image, no_decoder):
    # 5,120 px RGB 8-bit needs 5,120 x 3 x 9 bytes: over the 6,000 px limit's 60,000
    rgb = to_dicom(image, photometric_rgb=True, bits_stored=8)
    with pytest.raises(PayloadTooLarge, match="decoding this image needs"):
        decode(rgb, max_pixels=6_000)
    assert bounded.decode_bytes(64, 80, 3, 8) > bounded.decode_bytes(1, 6_000, 1, 16)
    assert bounded.decode_bytes(64, 80, 1, 16) <= bounded.decode_bytes(1, 6_000, 1, 16)


def test_transfer_syntax_outside_the_list_is_415(image, no_decoder):
    data = with_frame(jpeg_dicom(image), lambda f: bytes(f), ts="1.2.840.10008.1.2.4.100")  # MPEG2
    with pytest.raises(UnsupportedFormat, match="transfer syntax"):
        decode(data)


def test_error_messages_quote_no_header_text(image):
    """Messages carry sizes only: a patient name in the file never reaches a response."""
    import pydicom

    name = "DOE^JANE^SECRET"
    cases = [with_frame(jpeg_dicom(image), set_sof(1000, 1000)),
             with_frame(to_dicom(image, transfer_syntax="rle", bits_stored=8), _rle_table(2, [64, 64]))]
    for data in cases:
        ds = _dataset(data)
        ds.PatientName = ds.PatientID = name
        with pytest.raises(CXRInputError) as err:
            decode(_save(ds))
        assert name not in str(err.value) and "SECRET" not in str(err.value.to_dict())
    ds = pydicom.dcmread(io.BytesIO(deflate_bomb(80 * MiB)))  # pydicom inflates: fine at 80 MiB here
    ds.PatientName = name
    with pytest.raises(PayloadTooLarge) as err:
        bounded.inflate_dataset(_deflated(ds), MAX_BYTES)
    assert "SECRET" not in str(err.value)


def _deflated(ds) -> bytes:
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    return _save(ds)


# --------------------------------------------------------------------------- statuses
def test_bombs_map_to_413_and_400_statuses(image):
    """The status a client sees (handlers answer ``err.status`` with ``err.to_dict()``)."""
    cases = [(deflate_bomb(80 * MiB), 413),
             (with_frame(jpeg_dicom(image), set_sof(12000, 12000), rows=512, cols=512), 413),
             (with_frame(jpeg_dicom(image), set_sof(1000, 1000)), 400)]
    for data, status in cases:
        with pytest.raises(CXRInputError) as err:
            decode(data)
        body = err.value.to_dict()
        assert err.value.status == body["status"] == status
        assert body["error"] == {413: "payload_too_large", 400: "malformed_input"}[status]


def test_handler_answers_a_bomb_with_its_status(image):
    """TorchServe's handler (postprocess) sets the HTTP status of each request from the error."""
    from types import SimpleNamespace

    from cxrserve.core.serving import CXRHandler

    statuses = []
    handler = CXRHandler()
    handler.context = SimpleNamespace(metrics=None, set_response_status=lambda code, phrase, idx: statuses.append(
        (idx, code, phrase)))
    handler.pipeline = SimpleNamespace(timer=SimpleNamespace(reset=dict))
    results = []
    for data in (deflate_bomb(80 * MiB), with_frame(jpeg_dicom(image), set_sof(1000, 1000))):
        try:
            decode(data)
        except CXRInputError as err:
            results.append(err)
    bodies = handler.postprocess(results)
    assert statuses == [(0, 413, "Payload Too Large"), (1, 400, "Bad Request")]
    assert [b["status"] for b in bodies] == [413, 400]


# --------------------------------------------------------------------------- PNG
def _png_with_chunks(image: np.ndarray, chunks: list[tuple[bytes, bytes]]) -> bytes:
    import cv2

    png = cv2.imencode(".png", image)[1].tobytes()
    at = png.index(b"IDAT") - 4
    extra = b"".join(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
                     for kind, body in chunks)
    return png[:at] + extra + png[at:]


def _ztxt(keyword: bytes, inflated: int) -> tuple[bytes, bytes]:
    return b"zTXt", keyword + b"\0\0" + zlib.compress(b"A" * inflated, 9)


def test_pillow_settings_that_bound_png_chunks_are_in_force():
    from PIL import ImageFile, PngImagePlugin

    import cxrserve.core.imageio  # noqa: F401  nothing it imports may loosen them

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # True would let Pillow skip the checks silently
    assert PngImagePlugin.MAX_TEXT_CHUNK <= MiB


def test_png_single_text_or_icc_bomb_is_refused(image):
    # one zTXt and one iCCP each inflating to 100 MiB from ~100 KB: Pillow stops at 1 MiB
    bomb = zlib.compress(bytes(100 * MiB), 9)
    for chunk in (_ztxt(b"Comment", 100 * MiB), (b"iCCP", b"icc\0\0" + bomb)):
        tracemalloc.start()
        try:
            with pytest.raises(PayloadTooLarge):
                decode(_png_with_chunks(image, [chunk]))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 20 * MiB


def test_png_many_text_chunks_are_bounded_in_all(image):
    # 64 zTXt chunks of 1 MiB each (under Pillow's per-chunk cap): 64 MiB from ~70 KB
    data = _png_with_chunks(image, [_ztxt(b"k%d" % i, MiB - 1024) for i in range(64)])
    assert len(data) < 200_000
    with pytest.raises(PayloadTooLarge, match="PNG text"):
        decode(data)
    # a few small text chunks (what real PNGs carry) are fine
    ok = decode(_png_with_chunks(image, [_ztxt(b"Software", 2000), (b"tEXt", b"Title\0chest")]))
    assert ok.uint8.shape == image.shape


# --------------------------------------------------------------------------- every decodable syntax
# HTJ2K has no encoder here: three 32 x 24 codestreams of the gradient below, made with
# OpenJPH 0.9 (ojph_compress -num_decomps 2; -reversible true [-prog_order RPCL] / -qstep 0.01).
HTJ2K = {
    "1.2.840.10008.1.2.4.201": (
        "/0//UQApQAAAAAAgAAAAGAAAAAAAAAAAAAAAIAAAABgAAAAAAAAAAAABBwEB/1AACAACAAAAA/9SAAwAAgABAAIEBEAB/1wA"
        "CiBQWFhYUFBY/2QAFgABT3BlbkpQSCBWZXIgMC45LjAu/5AACgAAAAABEgAB/5PAF3L/a8efx/n6+sZ6p93Bex3uz9/l4HFZ"
        "zRBKAvejb+xEcHiD9mOl9eceybj0DCJ2qVKA4AiyAAABvgDAC1oAWzAC1l6ZIrE3CxAwoJXPQgPy5cFeXxQCWADmpVBUKBEB"
        "OKZPHjrK5QEAnuT2WAVxU9wAgcNe41E3Ag9k95knwecEb3k4PANZAMAXUwBdbAC3ACTD/IdffIyHx08fw3w8vq+HwfD6/OiB"
        "/Pnngpy98m5HZHDZLi5HQnEB/j9+z9fj8+t7/3v/PhEAAAAe8iMeIeD+q2E9iqE/ZJ79knssNR4MNkuKAFYB/v9Pv39+/n7/"
        "fz+/fv7+q8CPjBOjlsMKSiBeAP/Z"
    ),
    "1.2.840.10008.1.2.4.203": (
        "/0//UQApQAAAAAAgAAAAGAAAAAAAAAAAAAAAIAAAABgAAAAAAAAAAAABBwEB/1AACAACAAAAIP9SAAwAAgABAAIEBEAA/1wA"
        "ESJJ8EpCSkJKlkIgQiBB2P9kABYAAU9wZW5KUEggVmVyIDAuOS4wLv+QAAoAAAAAARgAAf+TwC7wd4de9q+jfnJkZFPRF52i"
        "oHh3r1xawJQKEzY+lU2NQrAnsGjhMmR/EBfplqV/AHCdyp4YYpDERABAVz8AwC2YBbUAtQAKR76iOS8YqCA8ew2V8VQK7+k5"
        "lv8Dy3sAgF6wIxwcRgeMuiNAYAECO8SU3QDcPrmM7gAUUA59dwc81BfdzfzmCB6JcXBYAMBdRAXVQF0QoEgA6RdpGHQrOCRe"
        "xgKfFIRYvD3FhPnng4nLvI8w1A8L3kujwfJyAUNAGb3ugyUgCAQQjhKcMgIAFeJrNAT8/qtAqzEbdddTmAD1QQJS73IzAQlE"
        "QGc2BgrQF4VBjPA/EWAwMJP+q8l0KODfobIEC/QiPwD/2Q=="
    ),
}
# The reversible codestream is already in RPCL order (its COD segment says so), which both
# HTJ2K Lossless and HTJ2K Lossless RPCL allow: one codestream serves both syntaxes.
HTJ2K["1.2.840.10008.1.2.4.202"] = HTJ2K["1.2.840.10008.1.2.4.201"]


def _gradient() -> np.ndarray:
    y, x = np.mgrid[0:24, 0:32]
    return ((x * 7 + y * 5) % 256).astype(np.uint8)


def _relabel(data: bytes, ts: str) -> bytes:
    ds = _dataset(data)
    ds.file_meta.TransferSyntaxUID = ts
    return _save(ds)


def _syntax_sample(uid: str, image: np.ndarray) -> tuple[bytes, np.ndarray, bool]:
    """(DICOM in ``uid``, the pixels it holds, lossless?)."""
    from pydicom.encaps import encapsulate

    by_uid = {v: k for k, v in TRANSFER_SYNTAXES.items()}
    if uid in by_uid:
        name = by_uid[uid]
        return to_dicom(image, transfer_syntax=name, bits_stored=8), image, name not in ("jpeg_baseline", "j2k")
    if uid == "1.2.840.10008.1.2.4.51":  # extended (process 2 & 4) includes baseline streams
        return _relabel(jpeg_dicom(image), uid), image, False
    if uid == "1.2.840.10008.1.2.4.57":  # process 14, any predictor: SV1 streams included
        return _relabel(to_dicom(image, transfer_syntax="jpeg_lossless", bits_stored=8), uid), image, True
    if uid == "1.2.840.10008.1.2.4.81":  # JPEG-LS near-lossless (NEAR=2) with pyjpegls
        ds = _dataset(to_dicom(image, transfer_syntax="explicit_le", bits_stored=8))
        ds.compress(uid, jls_error=2, encoding_plugin="pyjpegls")
        return _save(ds), image, False
    if uid in HTJ2K:
        ds = _dataset(to_dicom(_gradient(), transfer_syntax="explicit_le", bits_stored=8))
        ds.PixelData = encapsulate([base64.b64decode(HTJ2K[uid])])
        ds.file_meta.TransferSyntaxUID = uid
        return _save(ds), _gradient(), uid != "1.2.840.10008.1.2.4.203"
    raise AssertionError(f"no sample for {uid}: add one, or drop it from DECODABLE_TRANSFER_SYNTAXES")


@pytest.mark.parametrize("uid", DECODABLE_TRANSFER_SYNTAXES)
def test_every_decodable_syntax_decodes(image, uid):
    data, truth, lossless = _syntax_sample(uid, image)
    assert str(_dataset(data).file_meta.TransferSyntaxUID) == uid
    for target in (None, 16):
        xray = decode(data, target=target)
        assert xray.full_size == (truth.shape[1], truth.shape[0])
        if target is None:
            error = np.abs(xray.uint8.astype(int) - display(truth).astype(int))
            assert error.max() == 0 if lossless else error.mean() < 4, uid


def test_decodable_list_is_every_syntax_pydicom_can_decode_here():
    """Each listed syntax has a decoder available; none the decoders offer is missing
    except the retired/video ones this server does not take."""
    from pydicom.pixels.decoders.base import _PIXEL_DATA_DECODERS

    available = {str(uid) for uid, (dec, _) in _PIXEL_DATA_DECODERS.items() if dec.is_available}
    assert set(DECODABLE_TRANSFER_SYNTAXES) <= available
    assert available - set(DECODABLE_TRANSFER_SYNTAXES) == set()
    assert len(set(DECODABLE_TRANSFER_SYNTAXES)) == len(DECODABLE_TRANSFER_SYNTAXES)
