"""JPEG lossless (ITU T.81 Process 14, SOF3) encoder, for DICOM transfer syntax 1.2.840.10008.1.2.4.70.

pydicom's ``Dataset.compress`` does not write this syntax, so the DICOM writer's
(:mod:`cxrserve.synthetic.dicomwrite`) ``jpeg_lossless`` variant is encoded here: an optimal
Huffman table per image (Annex K.2), its canonical codes (Annex C) and the SOF3 bitstream.
"""
from __future__ import annotations

import struct

import numpy as np

__all__ = ["encode_jpeg_lossless"]


def _huffman_lengths(freq: np.ndarray) -> tuple[list[int], list[int]]:
    """JPEG Annex K.2: code lengths (max 16, no all-ones code) -> (BITS[1..16], HUFFVAL)."""
    nsym = len(freq)
    f = [int(v) for v in freq] + [1]  # reserved symbol so that no code is all ones
    codesize = [0] * (nsym + 1)
    others = [-1] * (nsym + 1)
    while True:
        cand = [(f[i], -i) for i in range(nsym + 1) if f[i] > 0]
        if len(cand) < 2:
            break
        cand.sort()
        v1 = -cand[0][1]
        v2 = -cand[1][1]
        # K.2 picks the least frequency, ties broken towards the larger symbol
        f[v1] += f[v2]
        f[v2] = 0
        codesize[v1] += 1
        while others[v1] != -1:
            v1 = others[v1]
            codesize[v1] += 1
        others[v1] = v2
        codesize[v2] += 1
        while others[v2] != -1:
            v2 = others[v2]
            codesize[v2] += 1
    bits = [0] * 33
    for i in range(nsym + 1):
        if codesize[i]:
            bits[codesize[i]] += 1
    for i in range(32, 16, -1):  # K.3 adjust_bits: limit lengths to 16
        while bits[i] > 0:
            j = i - 2
            while bits[j] == 0:
                j -= 1
            bits[i] -= 2
            bits[i - 1] += 1
            bits[j + 1] += 2
            bits[j] -= 1
    i = 16
    while bits[i] == 0:
        i -= 1
    bits[i] -= 1  # drop the reserved symbol (it has the longest code)
    order = sorted((codesize[s], s) for s in range(nsym) if codesize[s] > 0)
    huffval = [s for _, s in order]
    return bits[1:17], huffval


def _canonical_codes(bits, huffval):
    """Annex C: code and length for each symbol in HUFFVAL order."""
    code, k = 0, 0
    codes, lens = {}, {}
    for length in range(1, 17):
        for _ in range(bits[length - 1]):
            codes[huffval[k]] = code
            lens[huffval[k]] = length
            code += 1
            k += 1
        code <<= 1
    return codes, lens


def encode_jpeg_lossless(arr: np.ndarray, precision: int) -> bytes:
    """Encode an image as a JPEG lossless (ITU T.81 Process 14, SOF3) bitstream.

    First-order prediction (selection value 1: the left neighbour; the first row uses
    the left neighbour, the first column the pixel above, the first pixel
    ``2**(precision-1)``), point transform 0, one Huffman table (optimal for this image,
    built per Annex K.2) for difference categories 0..16, no restart markers, 0xFF bytes
    stuffed. ``arr``: HxW (one component) or HxWxC (C <= 4, interleaved scan), unsigned
    values < 2**precision, precision 2..16. This is what DICOM transfer syntax
    1.2.840.10008.1.2.4.70 expects in each frame.
    """
    a = np.asarray(arr)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or not 1 <= a.shape[2] <= 4:
        raise ValueError("arr must be HxW or HxWxC with C <= 4")
    if not 2 <= precision <= 16:
        raise ValueError("precision must be 2..16")
    x = a.astype(np.int64)
    if x.min() < 0 or x.max() >= (1 << precision):
        raise ValueError(f"values must be in 0..{(1 << precision) - 1}")
    h, w, nc = x.shape
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:] = x[0, :-1]
    pred[1:, 0] = x[:-1, 0]
    pred[1:, 1:] = x[1:, :-1]
    d = (x - pred) % 65536                      # differences are taken modulo 2**16
    d = np.where(d > 32768, d - 65536, d).reshape(-1)  # -> -32767..32768, interleaved order
    absd = np.abs(d)
    ssss = np.frexp(absd.astype(np.float64))[1].astype(np.int64)  # bit length, 0 for 0
    freq = np.bincount(ssss, minlength=17)[:17]
    bits, huffval = _huffman_lengths(freq)
    codes, lens = _canonical_codes(bits, huffval)
    code_tab = np.zeros(17, np.int64)
    len_tab = np.zeros(17, np.int64)
    for s_, c_ in codes.items():
        code_tab[s_] = c_
        len_tab[s_] = lens[s_]
    extra_len = np.where(ssss == 16, 0, ssss)
    extra = np.where(d < 0, d + (np.int64(1) << extra_len) - 1, d) & ((np.int64(1) << extra_len) - 1)
    val = (code_tab[ssss] << extra_len) | extra
    nbits = len_tab[ssss] + extra_len
    # pack variable-length codes MSB first
    total = int(nbits.sum())
    idx = np.repeat(np.arange(nbits.size), nbits)
    starts = np.cumsum(nbits) - nbits
    pos = np.arange(total, dtype=np.int64) - starts[idx]
    bitstream = ((val[idx] >> (nbits[idx] - 1 - pos)) & 1).astype(np.uint8)
    pad = (-total) % 8
    if pad:
        bitstream = np.concatenate([bitstream, np.ones(pad, np.uint8)])  # pad with 1-bits
    data = np.packbits(bitstream)
    ff = np.flatnonzero(data == 0xFF)
    if ff.size:
        data = np.insert(data, ff + 1, 0)  # byte stuffing
    out = bytearray(b"\xff\xd8")
    out += b"\xff\xc3" + struct.pack(">HBHHB", 8 + 3 * nc, precision, h, w, nc)
    for c in range(nc):
        out += bytes([c + 1, 0x11, 0])
    out += b"\xff\xc4" + struct.pack(">HB", 2 + 17 + len(huffval), 0x00) + bytes(bits) + bytes(huffval)
    out += b"\xff\xda" + struct.pack(">HB", 6 + 2 * nc, nc)
    for c in range(nc):
        out += bytes([c + 1, 0x00])
    out += bytes([1, 0, 0])  # Ss = predictor 1, Se = 0, Ah/Al = 0 (no point transform)
    out += data.tobytes()
    out += b"\xff\xd9"
    return bytes(out)
