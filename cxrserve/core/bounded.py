"""Bounded decoding of untrusted bytes: refuse a decompression bomb before it inflates.

A request is at most ``max_bytes`` long and its image at most ``max_pixels`` pixels
(:mod:`cxrserve.core.imageio`), but several layers of a DICOM or PNG file expand
without looking at either limit. Every one of them is bounded here by the same rule:
**read the size a layer will expand to from that layer's own header, or by a streamed
count that stops at the cap, and refuse (413) before any buffer of that size exists**.

==========================  ===============================================================
layer                       bound
==========================  ===============================================================
Deflated Explicit VR LE     :func:`inflate_dataset`: the data set is inflated here in 1 MiB
(1.2.840.10008.1.2.1.99)    steps, first only counted (nothing kept) and refused as soon as
                            it passes ``max_bytes``; a file under the cap is inflated again
                            and handed to pydicom as Explicit VR LE, so pydicom's own
                            unbounded ``zlib.decompress`` never runs. A bomb costs ~1 MiB.
Encapsulated frames         :func:`check_encapsulated_frames`: each frame's codestream says
(JPEG, JPEG-LS, J2K,        what the codec will allocate (JPEG SOFn / JPEG-LS SOF55 / J2K
HTJ2K, RLE)                 and HTJ2K SIZ, inside a JP2 wrapper too / RLE segment table);
                            it is read without decoding and must be Rows x Columns with
                            SamplesPerPixel components (400 otherwise: the header and the
                            frame disagree) and within ``max_pixels`` (413). Fragments are
                            counted before pydicom collects them (a frame of millions of
                            8-byte fragments is itself a bomb).
Decoded array and its       :func:`check_decode_memory`: ``rows * cols * samples *
float copies                (bytes per sample + 8)``, the stored array plus the float64
                            working copy of the display pipeline, must not exceed what a
                            16-bit grey image of ``max_pixels`` takes (``max_pixels * 10``
                            bytes, 600 MB at 60 Mpx). With the frame checks above this holds
                            for the codec's allocation too: a codec can no longer be told
                            to decode more samples than the header's Rows x Columns x
                            SamplesPerPixel.
Transfer syntaxes           :data:`DECODABLE_TRANSFER_SYNTAXES`: the only ones handed to a
                            decoder (each one round-trips in ``tests/test_decode_bombs.py``);
                            anything else is a 415 before decoding.
RLE                         pydicom's own RLE decoder grows its output with no cap (64x per
                            segment); :func:`check_dataset` pins RLE to pylibjpeg-rle, which
                            decodes into a Rows x Columns buffer.
PNG text / ICC chunks       Pillow caps each zTXt/iTXt/iCCP chunk at ``MAX_TEXT_CHUNK``
                            (1 MiB) inflated but allows 64 of them (64 MiB from a few KB);
                            :func:`check_png_chunks` bounds their sum from the chunk sizes.
==========================  ===============================================================

Error messages quote sizes this module computed, never a header's text values.
"""
from __future__ import annotations

import io
import struct
import zlib

from cxrserve.core.errors import MalformedInput, PayloadTooLarge, UnsupportedFormat

#: Defaults for input limits (every decoder is held to them); handlers read overrides
#: from model-config.yaml.
MAX_BYTES = 64 * 1024 * 1024
MAX_PIXELS = 60_000_000  # a 7,700 x 7,700 detector; real CXRs are 4-10 Mpx

DEFLATED = "1.2.840.10008.1.2.1.99"
EXPLICIT_LE = "1.2.840.10008.1.2.1"

JPEG_SYNTAXES = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",  # baseline, extended
                 "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70")  # lossless, lossless SV1
JPEGLS_SYNTAXES = ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81")
J2K_SYNTAXES = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
                "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203")  # HTJ2K
RLE_SYNTAXES = ("1.2.840.10008.1.2.5",)
NATIVE_SYNTAXES = ("1.2.840.10008.1.2", EXPLICIT_LE, "1.2.840.10008.1.2.2", DEFLATED)
ENCAPSULATED_SYNTAXES = JPEG_SYNTAXES + JPEGLS_SYNTAXES + J2K_SYNTAXES + RLE_SYNTAXES

#: Every transfer syntax the decoder reads (pydicom 3 + pylibjpeg-libjpeg/openjpeg/rle):
#: the DICOM node proposes exactly these, and anything else is refused (415) before decoding.
DECODABLE_TRANSFER_SYNTAXES: tuple[str, ...] = NATIVE_SYNTAXES + ENCAPSULATED_SYNTAXES

CHUNK = 1 << 20  # inflate step: the most a refused deflate bomb ever holds
#: Fragments a single-image DICOM may have (64 MiB in 4 KiB fragments); each costs a
#: Python bytes object when pydicom collects a frame.
MAX_FRAGMENTS = 16_384
WORK_BYTES_PER_SAMPLE = 8  # the float64 copy the display pipeline makes of each sample
#: zTXt/iTXt/iCCP inflated bytes a PNG may carry in all (a radiograph needs none).
MAX_PNG_TEXT = 8 * 1024 * 1024
_DEFLATE_RATIO = 1032  # deflate's largest expansion (258-byte matches in ~2 bits)


# --------------------------------------------------------------------------- deflate
def _file_meta(data: bytes):
    """(file meta, its start, its end, data set start) as pydicom's reader finds them.

    pydicom's own functions, in ``dcmread``'s order, so the syntax judged here is the one
    pydicom would act on; None where they fail (pydicom then fails the same way, first).
    """
    from pydicom.filereader import _read_command_set_elements, _read_file_meta_info, read_preamble

    try:
        fp = io.BytesIO(data)
        read_preamble(fp, True)
        meta_start = fp.tell()
        meta = _read_file_meta_info(fp)
        meta_end = fp.tell()
        _read_command_set_elements(fp)
        return meta, meta_start, meta_end, fp.tell()
    except Exception:  # noqa: BLE001 - pydicom's dcmread reports the same file as corrupt
        return None


def _inflate(body: memoryview, max_bytes: int, keep: bool) -> tuple[int, list[bytes]]:
    """Raw-deflate ``body`` in CHUNK steps: (inflated size, chunks if ``keep``); 413 past ``max_bytes``."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total, chunks, pending = 0, [], body
    try:
        while not inflater.eof:
            chunk = inflater.decompress(pending, CHUNK)
            pending = inflater.unconsumed_tail
            total += len(chunk)
            if total > max_bytes:
                raise PayloadTooLarge(f"deflated DICOM data set inflates to more than "
                                      f"{max_bytes / 2**20:.0f} MiB, the limit")
            if keep:
                chunks.append(chunk)
            if not chunk and not pending:
                break  # input used up and nothing more comes out: a truncated stream
    except zlib.error as err:
        raise MalformedInput("deflated DICOM data set is corrupt (zlib error)") from err
    if not inflater.eof:
        raise MalformedInput("deflated DICOM data set is truncated")
    return total, chunks


def inflate_dataset(data: bytes, max_bytes: int) -> bytes:
    """``data`` as Explicit VR Little Endian if its file meta says Deflated; else ``data`` itself.

    The inflated data set is counted in a stream and refused (:class:`PayloadTooLarge`)
    as soon as it passes ``max_bytes``, holding nothing but one CHUNK; only a data set
    under the cap is inflated again and kept. pydicom then reads an Explicit VR LE file
    and never inflates anything itself.
    """
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    found = _file_meta(data)
    if found is None:
        return data
    meta, meta_start, meta_end, body_start = found
    try:
        deflated = meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
    except Exception:  # noqa: BLE001 - an unreadable syntax is pydicom's error to report
        return data
    if not deflated:
        return data
    body = memoryview(data)[body_start:]
    _inflate(body, max_bytes, keep=False)  # refuse a bomb before keeping any of it
    _, chunks = _inflate(body, max_bytes, keep=True)
    try:
        new_meta = pydicom.dataset.FileMetaDataset(meta)
        new_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        buf = pydicom.filebase.DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, False
        pydicom.filewriter.write_dataset(buf, new_meta)
        if "FileMetaInformationGroupLength" in new_meta:  # first element: its value counts the rest
            new_meta.FileMetaInformationGroupLength = buf.tell() - 12
            buf.seek(0)
            pydicom.filewriter.write_data_element(buf, new_meta[0x00020000])
        encoded_meta = buf.getvalue()
    except Exception as err:  # noqa: BLE001 - garbage meta values cannot be re-encoded
        raise MalformedInput(f"DICOM file meta information cannot be read ({type(err).__name__})") from err
    return b"".join([data[:meta_start], encoded_meta, data[meta_end:body_start], *chunks])


def dcmread(data: bytes, *, max_bytes: int, **kwargs):
    """``pydicom.dcmread`` of untrusted bytes with any deflated data set inflated under ``max_bytes``.

    For code outside :mod:`cxrserve.core.imageio` that reads DICOM bytes (headers included:
    ``stop_before_pixels`` does not stop pydicom inflating the whole data set first).
    The returned data set's TransferSyntaxUID stays Deflated where the file was (it is
    already inflated; pydicom decodes its pixels as native ones).
    """
    import pydicom

    kwargs.setdefault("force", True)
    plain = inflate_dataset(data, max_bytes)
    ds = pydicom.dcmread(io.BytesIO(plain), **kwargs)
    if plain is not data:
        ds.file_meta.TransferSyntaxUID = DEFLATED
    return ds


# --------------------------------------------------------------------------- memory
def decode_bytes(rows: int, cols: int, samples: int, bits_allocated: int) -> int:
    """Bytes one decode of this image takes: the stored array plus its float64 working copy."""
    per_sample = max(1, -(-int(bits_allocated) // 8)) + WORK_BYTES_PER_SAMPLE
    return int(rows) * int(cols) * max(1, int(samples)) * per_sample


def check_decode_memory(rows: int, cols: int, samples: int, bits_allocated: int, max_pixels: int) -> None:
    """413 if decoding this image would take more than a 16-bit grey image of ``max_pixels``."""
    need = decode_bytes(rows, cols, samples, bits_allocated)
    limit = decode_bytes(1, max_pixels, 1, 16)
    if need > limit:
        raise PayloadTooLarge(f"decoding this image needs {need / 2**20:.0f} MiB; the limit is "
                              f"{limit / 2**20:.0f} MiB ({max_pixels / 1e6:.0f} Mpx of 16-bit grey)")


# --------------------------------------------------------------------------- codestream headers
class _Short(Exception):
    """The header runs past the bytes at hand (a frame split over fragments)."""


def _u16(buf: bytes, at: int) -> int:
    if at + 2 > len(buf):
        raise _Short
    return (buf[at] << 8) | buf[at + 1]


def _u32(buf: bytes, at: int) -> int:
    if at + 4 > len(buf):
        raise _Short
    return struct.unpack_from(">I", buf, at)[0]


#: SOFn (C0-CF less DHT C4, JPG C8, DAC CC), DHP (DE, hierarchical) and JPEG-LS SOF55 (F7):
#: all start P(1) Y(2) X(2) Nf(1).
_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xDE, 0xF7}
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}  # RSTn, TEM: no length field


def _next_ff(frame, at: int) -> int:
    """Offset of the next 0xFF byte from ``at`` (4 KiB steps: a frame may be a view)."""
    while at < len(frame):
        found = bytes(frame[at:at + 4096]).find(b"\xff")
        if found >= 0:
            return at + found
        at += 4096
    raise _Short


def jpeg_dimensions(frame: bytes) -> tuple[int, int, int]:
    """(width, height, components) from a JPEG / JPEG-LS frame header, without decoding."""
    if frame[:2] != b"\xff\xd8":
        raise MalformedInput("JPEG frame does not start with an SOI marker")
    at = 2
    while True:
        if at >= len(frame):
            raise _Short
        if frame[at] != 0xFF:  # extraneous bytes: libjpeg skips to the next 0xFF, so do we
            at = _next_ff(frame, at)
            continue
        marker = frame[at + 1] if at + 1 < len(frame) else None
        if marker is None:
            raise _Short
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _STANDALONE:
            at += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI / SOS before any frame header
            raise MalformedInput("JPEG frame has no frame header (SOF) before its scan")
        length = _u16(frame, at + 2)
        if length < 2:
            raise MalformedInput("JPEG frame header is corrupt (segment length)")
        if marker in _FRAME_MARKERS:
            height, width = _u16(frame, at + 5), _u16(frame, at + 7)
            if at + 9 >= len(frame):
                raise _Short
            return width, height, frame[at + 9]
        at += 2 + length


def _j2k_codestream_at(frame: bytes) -> int:
    """Offset of the J2K codestream: 0 for a bare one, the ``jp2c`` box's contents in a JP2 file."""
    if frame[:2] == b"\xff\x4f":
        return 0
    if frame[4:8] != b"jP  ":
        raise MalformedInput("JPEG 2000 frame is neither a codestream (SOC) nor a JP2 file")
    at = 0
    while at + 8 <= len(frame):
        size, kind = _u32(frame, at), frame[at + 4:at + 8]
        header = 8
        if size == 1:  # 64-bit XLBox
            if at + 16 > len(frame):
                raise _Short
            size, header = struct.unpack_from(">Q", frame, at + 8)[0], 16
        elif size == 0:  # box runs to the end
            size = len(frame) - at
        if kind == b"jp2c":
            return at + header
        if size < header:
            raise MalformedInput("JP2 box structure is corrupt")
        at += size
    raise _Short


def j2k_dimensions(frame: bytes) -> tuple[int, int, int]:
    """(width, height, components) from a JPEG 2000 / HTJ2K SIZ segment, without decoding."""
    at = _j2k_codestream_at(frame)
    if frame[at:at + 4] != b"\xff\x4f\xff\x51":  # SIZ must follow SOC (15444-1 A.5.1)
        if len(frame) < at + 4:
            raise _Short
        raise MalformedInput("JPEG 2000 codestream does not start SOC, SIZ")
    siz = at + 4  # Lsiz(2) Rsiz(2) Xsiz Ysiz XOsiz YOsiz (4 each) tiles (4 x 4) Csiz(2)
    xsiz, ysiz, xo, yo = (_u32(frame, siz + 4 + 4 * i) for i in range(4))
    components = _u16(frame, siz + 36)
    if xo >= xsiz or yo >= ysiz:
        raise MalformedInput("JPEG 2000 image area is empty")
    return xsiz - xo, ysiz - yo, components


def rle_segments(frame: bytes, total: int) -> int:
    """Number of segments in an RLE frame's header (PS3.5 G.5), offsets checked against ``total`` bytes."""
    if len(frame) < 64:
        raise _Short
    count, *offsets = struct.unpack_from("<16I", frame, 0)
    if not 1 <= count <= 15:
        raise MalformedInput("RLE frame header has an invalid number of segments")
    used = offsets[:count]
    if used[0] != 64 or any(b <= a for a, b in zip(used, used[1:])) or used[-1] >= total:
        raise MalformedInput("RLE frame header has an invalid segment table")
    if any(offsets[count:]):
        raise MalformedInput("RLE frame header has offsets after its last segment")
    return count


def _fragments(pixel_data: bytes, limit: int) -> list[memoryview]:
    """The fragments after the Basic Offset Table, as views (no copies); at most ``limit``."""
    view = memoryview(pixel_data)
    if len(view) < 8 or view[:4] != b"\xfe\xff\x00\xe0":
        raise MalformedInput("encapsulated pixel data does not start with a Basic Offset Table item")
    at = 8 + struct.unpack_from("<I", view, 4)[0]
    fragments = []
    while at + 8 <= len(view):
        tag, length = struct.unpack_from("<II", view, at)
        if tag == 0xE0DDFFFE:  # sequence delimitation item
            break
        if tag != 0xE000FFFE or length == 0xFFFFFFFF or at + 8 + length > len(view):
            raise MalformedInput("encapsulated pixel data holds a corrupt item")
        fragments.append(view[at + 8:at + 8 + length])
        if len(fragments) > limit:
            raise PayloadTooLarge(f"encapsulated pixel data has more than {limit} fragments")
        at += 8 + length
    return fragments


def _frames(pixel_data: bytes, number_of_frames: int) -> list[tuple]:
    """Each frame's fragments, counted against MAX_FRAGMENTS before anything is collected."""
    fragments = _fragments(pixel_data, MAX_FRAGMENTS * number_of_frames)
    if number_of_frames == 1:
        frames = [tuple(fragments)]
    else:  # which fragments make which frame (offset tables): pydicom's rules
        from pydicom.encaps import generate_fragmented_frames

        try:
            frames = list(generate_fragmented_frames(pixel_data, number_of_frames=number_of_frames))
        except Exception as err:  # noqa: BLE001 - ValueError/struct.error/... on bad offset tables
            raise MalformedInput(f"encapsulated pixel data is corrupt ({type(err).__name__})") from err
    if len(frames) != number_of_frames or not all(frames):
        raise MalformedInput("encapsulated pixel data does not hold NumberOfFrames frames")
    return frames


def frame_shape(fragments: tuple[bytes, ...], transfer_syntax: str) -> tuple[int, int, int]:
    """(width, height, components or RLE segments) of one encapsulated frame, from its header."""
    if transfer_syntax in RLE_SYNTAXES:
        parse = lambda buf: (0, 0, rle_segments(buf, sum(len(f) for f in fragments)))  # noqa: E731
    elif transfer_syntax in J2K_SYNTAXES:
        parse = j2k_dimensions
    else:
        parse = jpeg_dimensions
    try:
        return parse(fragments[0])
    except _Short:
        pass
    try:  # a header split over fragments: parse the whole frame
        return parse(b"".join(fragments))
    except _Short:
        raise MalformedInput("encapsulated frame ends inside its codestream header") from None


def check_encapsulated_frames(ds, max_pixels: int) -> None:
    """Each encapsulated frame's own size, read from its codestream header, before any decode.

    Raises:
        PayloadTooLarge: a frame of more than ``max_pixels`` pixels, or too many fragments.
        MalformedInput: a frame whose size or component count is not the header's Rows x
            Columns x SamplesPerPixel, or whose header cannot be parsed.
        UnsupportedFormat: a transfer syntax outside :data:`DECODABLE_TRANSFER_SYNTAXES`.
    """
    ts = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
    if ts not in DECODABLE_TRANSFER_SYNTAXES:
        raise UnsupportedFormat("the DICOM transfer syntax is not one this server decodes")
    if ts not in ENCAPSULATED_SYNTAXES:
        return
    rows, cols = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits_allocated = int(ds.BitsAllocated)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    for fragments in _frames(ds.PixelData, frames):
        width, height, components = frame_shape(fragments, ts)
        if ts in RLE_SYNTAXES:
            # One segment per byte of each sample (PS3.5 G.2); a segment the decoder fills
            # is Rows x Columns bytes, so the frame decodes to exactly the header's size.
            if components != samples * max(1, -(-bits_allocated // 8)):
                raise MalformedInput("RLE frame's segment count does not match SamplesPerPixel "
                                     "and BitsAllocated")
            continue
        if width * height > max_pixels:
            raise PayloadTooLarge(f"an encapsulated frame is {width} x {height} = "
                                  f"{width * height / 1e6:.1f} Mpx; the limit is {max_pixels / 1e6:.0f} Mpx")
        if (width, height) != (cols, rows):
            raise MalformedInput(f"an encapsulated frame is {width} x {height} pixels, not the "
                                 f"header's Columns x Rows ({cols} x {rows})")
        if components != samples:
            raise MalformedInput("an encapsulated frame's component count does not match SamplesPerPixel")


def check_dataset(ds, max_pixels: int) -> None:
    """Everything above for a parsed image data set, before ``ds.pixel_array``.

    Pixel count (413), decode memory (413), the transfer syntax (415) and each
    encapsulated frame's own header (413/400). Also pins RLE to the pylibjpeg-rle
    plugin: pydicom's fallback RLE decoder grows its output without a cap.
    """
    rows, cols = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits_allocated = int(ds.BitsAllocated)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows <= 0 or cols <= 0 or frames <= 0:
        raise MalformedInput("image has no pixels")
    if rows * cols * frames > max_pixels:
        raise PayloadTooLarge(f"image is {cols} x {rows} x {frames} frames = {rows * cols * frames / 1e6:.1f} "
                              f"Mpx; the limit is {max_pixels / 1e6:.0f} Mpx")
    check_decode_memory(rows * frames, cols, samples, bits_allocated, max_pixels)
    check_encapsulated_frames(ds, max_pixels)
    if str(ds.file_meta.get("TransferSyntaxUID", "")) in RLE_SYNTAXES:
        ds.pixel_array_options(decoding_plugin="pylibjpeg")


# --------------------------------------------------------------------------- PNG
def check_png_chunks(data: bytes, max_text: int = MAX_PNG_TEXT, max_chunks: int = 1 << 17) -> None:
    """413 if a PNG's compressed text/ICC chunks could inflate past ``max_text`` bytes in all.

    Each zTXt/iTXt/iCCP chunk is bounded by ``min(PngImagePlugin.MAX_TEXT_CHUNK, 1032 x
    its compressed size)`` (deflate cannot expand more); Pillow enforces the per-chunk
    cap itself. Only chunk lengths are read; the walk stops after ``max_chunks``.
    """
    from PIL import PngImagePlugin

    at, total, count = 8, 0, 0
    while at + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, at)
        if kind in (b"zTXt", b"iTXt", b"iCCP"):
            total += min(PngImagePlugin.MAX_TEXT_CHUNK, _DEFLATE_RATIO * length)
            if total > max_text:
                raise PayloadTooLarge(f"PNG text/ICC chunks may inflate to more than "
                                      f"{max_text / 2**20:.0f} MiB, the limit")
        if kind == b"IEND":
            return
        count += 1
        if count > max_chunks:
            raise PayloadTooLarge(f"PNG has more than {max_chunks} chunks")
        at += 12 + length
