"""What a study costs by stage: decode per transfer syntax, preprocessing steps, growth with size."""
from __future__ import annotations

import gc
import logging
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cxrserve.tools.bench.cases import score_batches
from cxrserve.tools.bench.inputs import BenchInput, phantom_inputs
from cxrserve.tools.bench.measure import Monitor

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- decode, preprocessing
def _median_ms(fn: Callable[[], Any], seconds: float, max_runs: int = 20) -> float:
    fn()  # warm-up
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 2 or (time.perf_counter() - start < seconds and len(times) < max_runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1000, 2)


def decode_costs(inputs: Sequence[BenchInput], seconds: float) -> list[dict]:
    """Decode time per file (header parse + pixel decoder + Modality/VOI LUT) and the uint8 step."""
    from cxrserve.core.imageio import decode

    per_input = max(0.1, seconds / max(1, len(inputs)))
    rows = []
    for inp in inputs:
        decode_ms = _median_ms(lambda: decode(inp.data), per_input * 0.8)
        xray = decode(inp.data)
        uint8_ms = _median_ms(lambda: np.clip(np.rint(xray.pixels * 255.0), 0, 255).astype(np.uint8), per_input * 0.2)
        rows.append({**inp.describe(), "decode_ms": decode_ms, "uint8_ms": uint8_ms,
                     "ms_per_megapixel": round((decode_ms + uint8_ms) / inp.megapixels, 2)})
    return rows


def preprocess_costs(image: np.ndarray, seconds: float) -> list[dict]:
    """Each named preprocessing pipeline, and its costly steps, on one full-size uint8 image."""
    import cv2

    from cxrserve import families
    from cxrserve.core import transforms as T

    limited = T.LimitLongSide(512)(image)
    three = T.SeedThreeChannel()
    short = min(limited.shape[:2])
    steps: list[tuple[str, str, Callable[[], Any]]] = [
        (name, "pipeline", (lambda tr: lambda: tr(image))(T.build_transform(name))) for name in families.preprocessings()
    ]
    steps += [
        ("squash to 224 (INTER_AREA)", "step", lambda: T.Resize(224)(image)),
        ("long side <= 512", "step", lambda: T.LimitLongSide(512)(image)),
        ("seed 3-channel on the <= 512 image", "step", lambda: three(limited)),
        ("  Otsu threshold", "step", lambda: cv2.threshold(limited, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)),
        ("  CLAHE 3.0, 8x8", "step", lambda: cv2.createCLAHE(3.0, (8, 8)).apply(limited)),
        ("  median blur + adaptive threshold", "step", lambda: cv2.adaptiveThreshold(
            cv2.medianBlur(limited, T._odd(0.005 * short, 7)), 255, cv2.ADAPTIVE_THRESH_GAUSSIAN_C,
            cv2.THRESH_BINARY_INV, T._odd(0.02 * short, 7), 2)),
        ("trim border", "step", lambda: T.TrimBorder(2)(image)),
        ("histogram equalisation (full image)", "step", lambda: T.EqualizeHist()(image)),
        ("short side 336 + centre crop 320", "step", lambda: T.CenterCrop(320)(T.ResizeShortSide(336)(image))),
        ("centre square + 224", "step", lambda: T.Resize(224)(T.CenterCropSquare()(image))),
    ]
    per_step = max(0.05, seconds / len(steps))
    return [{"name": name, "kind": kind, "ms": _median_ms(fn, per_step)} for name, kind, fn in steps]


def thread_pool_effect(inputs: Sequence[BenchInput], preprocessing: Sequence[str], seconds: float,
                       threads: int = 2, batch: int = 4) -> list[dict]:
    """Decode + preprocess a batch serially vs in a thread pool, per input format.

    OpenCV and numpy release the GIL; pydicom's parsing and pylibjpeg-openjpeg's JPEG
    2000 decoder do not, so the pool helps some formats and not others.
    """
    from cxrserve.core.imageio import decode
    from cxrserve.core.transforms import build_transform

    def work(data: bytes) -> None:
        xray = decode(data)
        for name in preprocessing:
            build_transform(name)(xray.uint8)  # a transform per call: CLAHE objects are not thread-safe

    kinds: dict[str, BenchInput] = {}
    for inp in inputs:
        kinds.setdefault(f"{inp.format}{'-' + inp.syntax if inp.syntax else ''}", inp)
    per_kind = max(0.1, seconds / max(1, 2 * len(kinds)))
    rows = []
    with ThreadPoolExecutor(threads) as pool:
        for kind, inp in kinds.items():
            payload = [inp.data] * batch
            serial = _median_ms(lambda: [work(d) for d in payload], per_kind, max_runs=5)
            pooled = _median_ms(lambda: list(pool.map(work, payload)), per_kind, max_runs=5)
            rows.append({"input": kind, "megapixels": round(inp.megapixels, 2), "batch": batch,
                         "serial_ms": serial, f"threads{threads}_ms": pooled, "speedup": round(serial / pooled, 2)})
    return rows


# --------------------------------------------------------------------------- growth
def growth_image_size(pipeline, cache: Path, sizes: Sequence[int], seconds: float) -> list[dict]:
    """One study at a time through ``pipeline``: latency, stages and memory vs image size."""
    rows = []
    for size in sizes:
        inp = phantom_inputs(cache, size, ("explicit_le",), png=False)[0]
        gc.collect()
        with Monitor() as mon:
            summary, _, stages = score_batches(pipeline, [inp], {}, 1, n=20, seconds=seconds, min_n=2)
        rows.append({"size": f"{size}x{size}", "megapixels": round(inp.megapixels, 2), "bytes": len(inp.data),
                     "p50_ms": summary.get("p50_ms"), "stages_ms": stages,
                     "rss_peak_mb": round(mon.peak_rss / 2**20), "rss_growth_mb": round((mon.peak_rss - mon.start_rss) / 2**20)})
    return rows


def growth_batch(pipeline, inputs: Sequence[BenchInput], batches: Sequence[int], seconds: float) -> list[dict]:
    rows = []
    for batch in batches:
        gc.collect()
        with Monitor() as mon:
            summary, _, _ = score_batches(pipeline, inputs, {}, batch, n=max(batch * 3, 8), seconds=seconds,
                                          min_n=1)
        rows.append({"batch": batch, "throughput": summary.get("throughput"), "p50_ms": summary.get("p50_ms"),
                     "rss_peak_mb": round(mon.peak_rss / 2**20), "rss_growth_mb": round((mon.peak_rss - mon.start_rss) / 2**20),
                     **mon.report()})
    return rows


