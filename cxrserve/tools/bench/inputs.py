"""Benchmark inputs: the real files of ../shared/data and phantom DICOMs in every transfer syntax."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[3]
RESULTS_FORMAT = 1
#: Real files that are deliberately broken test cases, not studies a hospital would send.
REAL_SKIP = ("SIIM_Fake_MONOCHROME1.dcm",)
#: Transfer syntaxes of the phantom DICOMs (decode table; the model inputs without real data).
PHANTOM_SYNTAXES = ("explicit_le", "implicit_le", "deflated", "rle", "jpeg_baseline", "jpeg_lossless",
                    "jpegls_lossless", "j2k_lossless")
PHANTOM_MODEL_SYNTAXES = ("explicit_le", "rle", "jpeg_baseline", "jpeg_lossless", "j2k_lossless")
PHANTOM_VERSION = 1  # bump when the phantom inputs change (cache key)




# --------------------------------------------------------------------------- inputs
@dataclass
class BenchInput:
    """One study file. ``name`` never holds a file name (real ones carry SOP UIDs)."""

    name: str
    format: str  # dicom | png
    syntax: str  # short transfer-syntax name for DICOM, "" for PNG
    width: int
    height: int
    source: str  # real | phantom
    data: bytes = field(repr=False, default=b"")

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6

    def describe(self) -> dict:
        return {"name": self.name, "format": self.format, "syntax": self.syntax, "width": self.width,
                "height": self.height, "megapixels": round(self.megapixels, 2), "bytes": len(self.data),
                "source": self.source}


def _syntax_name(uid: str) -> str:
    from cxrserve.synthetic.dicomwrite import TRANSFER_SYNTAXES

    names = {v: k for k, v in TRANSFER_SYNTAXES.items()}
    return names.get(uid, uid)


def _describe_file(data: bytes, source: str, index: int) -> BenchInput:
    from cxrserve.core.imageio import decode, sniff_format

    kind = sniff_format(data)
    syntax = ""
    if kind == "dicom":
        import io

        import pydicom

        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        syntax = _syntax_name(str(ds.file_meta.get("TransferSyntaxUID", "")))
        width, height = int(ds.Columns), int(ds.Rows)
    else:
        xray = decode(data)
        width, height = xray.width, xray.height
    name = f"{source}-{index}-{kind}{'-' + syntax if syntax else ''}-{width}x{height}"
    return BenchInput(name, kind, syntax, width, height, source, data)


def real_inputs(root: Path, max_png: int = 3) -> list[BenchInput]:
    """Chest DICOMs (several transfer syntaxes, 1-3.6 Mpx) and full-resolution PNGs."""
    files = [p for p in sorted((root / "dicom_samples" / "chest").glob("*.dcm")) if p.name not in REAL_SKIP]
    files += sorted((root / "dicom_samples" / "derived").glob("*.dcm"))
    files += sorted((root / "fullres").glob("*.png"))[:max_png]
    return [_describe_file(p.read_bytes(), "real", i) for i, p in enumerate(files)]


def phantom_image(size: int, seed: int = 11) -> np.ndarray:
    """A frontal phantom (pneumonia, so every model has something to see) at ``size`` px."""
    from cxrserve.synthetic.phantoms import render, sample_spec

    return render(sample_spec(seed, label="pneumonia", height=size, width=size, min_extent=2)).image


def phantom_inputs(cache: Path, size: int, syntaxes: Sequence[str], png: bool = True) -> list[BenchInput]:
    """One phantom encoded as DICOM in ``syntaxes`` (12 bits stored where lossless) and PNG.

    Files are cached in ``cache`` (rendering a 2048 px phantom takes seconds).
    """
    from cxrserve.synthetic.dicomwrite import to_dicom

    folder = cache / f"phantoms-v{PHANTOM_VERSION}-{size}"
    folder.mkdir(parents=True, exist_ok=True)
    wanted = [(s, folder / f"{s}.dcm") for s in syntaxes] + ([("png", folder / "image.png")] if png else [])
    if not all(path.exists() for _, path in wanted):
        image = phantom_image(size)
        # 12-bit detector values (what DR systems store), spread over the full range.
        image12 = (image.astype(np.uint16) << 4) | (image.astype(np.uint16) >> 4)
        for syntax, path in wanted:
            if path.exists():
                continue
            if syntax == "png":
                import cv2

                ok, buf = cv2.imencode(".png", image)
                data = buf.tobytes()
            else:
                try:
                    data = (to_dicom(image, transfer_syntax=syntax) if syntax == "jpeg_baseline"
                            else to_dicom(image12, transfer_syntax=syntax, bits_stored=12))
                except NotImplementedError as err:  # an encoder this machine lacks
                    log.warning("phantom %s skipped: %s", syntax, err)
                    continue
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
    out = []
    for syntax, path in wanted:
        if path.exists():
            kind = "png" if syntax == "png" else "dicom"
            out.append(BenchInput(f"phantom-{kind}{'' if kind == 'png' else '-' + syntax}-{size}x{size}", kind,
                                  "" if kind == "png" else syntax, size, size, "phantom", path.read_bytes()))
    return out
