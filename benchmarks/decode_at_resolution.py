"""Decode at model resolution: cost per transfer syntax before/after, and result agreement.

    PYTHONPATH=$PWD python benchmarks/decode_at_resolution.py [--store /work/main/model_store]
        [--data ../shared/data] [--seconds 0.6] [--val 40] [--out benchmarks/results/decode-....json]

1. Decode table: every phantom transfer syntax (2048 x 2048, 12 bits stored where
   lossless, as ``cxrserve bench``) and every real DICOM of ``dicom_samples``, decoded
   on ONE core (affinity pinned, OpenCV single-threaded): the full-resolution path
   (``decode(data)`` + the uint8 step the pipelines take) against ``decode(data,
   target=512)`` (a 512-px model) and ``target=1024`` (what cxr-triage asks for).
   Medians of repeated calls, all in this process.
2. Agreement table: every served family in the store scores the same real files with
   ``handler: decode_size`` = ``full`` and = ``auto`` (what the archive serves by
   default); per family, the max and mean |difference| of its main scores
   (``cxrserve.tools.bench.main_scores``), and for cxr-lungseg the Dice of the returned
   full-size masks. Files: the real DICOMs (chest and derived), the six full-resolution
   NIH PNGs, the same six re-encoded as JPEG baseline / JPEG 2000 / RLE DICOMs (real
   pixels, container by ``cxrserve.synthetic.dicomwrite``), and ``--val`` images of the
   patient-level validation split (``cxrserve eval --split val``'s; these are stored at
   <= 512 px, so most are decoded at full size by both paths).

The demo store is phantom-trained: its scores on real films mean nothing clinically;
only the agreement between the two decode paths is measured here.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cxrserve.tools.bench.archives import unpacked_archive  # noqa: E402
from cxrserve.tools.bench.inputs import PHANTOM_SYNTAXES, phantom_inputs  # noqa: E402
from cxrserve.tools.bench.scores import main_scores  # noqa: E402
from cxrserve.core.imageio import decode  # noqa: E402


def median_ms(fn, seconds: float, min_runs: int = 3) -> float:
    fn()
    times, start = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if len(times) >= 200:
            break
    return statistics.median(times) * 1000


def full_path(data: bytes):
    return decode(data).uint8  # what every pipeline did: float decode, then the uint8 image


def decode_table(inputs, seconds: float) -> list[dict]:
    rows = []
    for name, data in inputs:
        full = median_ms(lambda: full_path(data), seconds)
        r512 = median_ms(lambda: decode(data, target=512).uint8, seconds)
        r1024 = median_ms(lambda: decode(data, target=1024).uint8, seconds)
        small = decode(data, target=512)
        rows.append({"input": name, "stored": "x".join(map(str, small.full_size)),
                     "decoded_512": f"{small.width}x{small.height}", "full_ms": round(full, 1),
                     "target512_ms": round(r512, 1), "target1024_ms": round(r1024, 1),
                     "speedup_512": round(full / r512, 1)})
        print(f"  {name:48s} {rows[-1]['stored']:>10s} -> {rows[-1]['decoded_512']:>9s}  "
              f"full {full:7.1f} ms   target 512 {r512:6.1f} ms ({full / r512:4.1f}x)   target 1024 {r1024:6.1f} ms",
              flush=True)
    return rows


def windowed_phantoms(cache: Path, size: int) -> list[tuple[str, bytes]]:
    """The bench phantom as JPEG / JPEG 2000 DICOMs WITH a VOI window (the codec-reduced path;
    the bench's own phantoms have none, so they are min-max images, decoded in full)."""
    from cxrserve.tools.bench.inputs import phantom_image
    from cxrserve.synthetic.dicomwrite import to_dicom

    folder = cache / f"windowed-{size}"
    folder.mkdir(parents=True, exist_ok=True)
    specs = {"jpeg_baseline": (8, (127.5, 256.0)), "j2k_lossless": (12, (2048.0, 4096.0)), "j2k": (12, (2048.0, 4096.0))}
    out, image = [], None
    for syntax, (bits, window) in specs.items():
        path = folder / f"{syntax}.dcm"
        if not path.exists():
            if image is None:
                image = phantom_image(size)
            pixels = image if bits == 8 else (image.astype(np.uint16) << 4) | (image.astype(np.uint16) >> 4)
            path.write_bytes(to_dicom(pixels, transfer_syntax=syntax, bits_stored=bits, window=window))
        out.append((f"phantom-dicom-{syntax}+window-{size}x{size}", path.read_bytes()))
    return out


def real_files(data_root: Path, n_val: int) -> list[tuple[str, str, bytes]]:
    """(group, name, bytes); names never hold file names (real DICOM names carry UIDs)."""
    from cxrserve.synthetic.dicomwrite import to_dicom

    out = []
    dicoms = sorted((data_root / "dicom_samples" / "chest").glob("*.dcm"))
    dicoms += sorted((data_root / "dicom_samples" / "derived").glob("*.dcm"))
    for i, p in enumerate(dicoms):
        out.append(("real DICOM", f"dicom-{i}", p.read_bytes()))
    pngs = sorted((data_root / "fullres").glob("*.png"))
    for i, p in enumerate(pngs):
        out.append(("full-res NIH PNG", f"png-{i}", p.read_bytes()))
        grey = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
        for syntax in ("jpeg_baseline", "j2k_lossless", "rle"):
            out.append((f"NIH PNG as {syntax} DICOM", f"png-{i}-{syntax}",
                        to_dicom(grey, transfer_syntax=syntax, bits_stored=8)))
        # with a (near-identity) window: JPEG is then DCT-scaled (min-max ones decode in full)
        for syntax in ("jpeg_baseline", "j2k"):
            out.append((f"NIH PNG as {syntax} DICOM + window", f"png-{i}-{syntax}-w",
                        to_dicom(grey, transfer_syntax=syntax, bits_stored=8, window=(127.5, 256.0))))
    if n_val:
        from cxrserve.training.datasets import patient_split
        from cxrserve.training.common import load_records

        records = load_records([data_root])
        val = patient_split(records, val_fraction=0.2, seed=0)["val"]
        step = max(1, len(val) // n_val)
        for i, r in enumerate(val[::step][:n_val]):
            out.append(("val split (<= 512 px)", f"val-{i}", Path(r.path).read_bytes()))
    return out


def mask_from(response: dict) -> np.ndarray | None:
    value = response.get("mask_png")
    if not value:
        return None
    return cv2.imdecode(np.frombuffer(base64.b64decode(value), np.uint8), cv2.IMREAD_GRAYSCALE) > 127


def agreement(store: Path, files, cache: Path) -> list[dict]:
    from cxrserve.core.errors import CXRInputError
    from cxrserve.core.loading import load_pipeline

    rows = []
    for mar in sorted(store.glob("cxr-*.mar")):
        folder = unpacked_archive(mar, cache)
        pipeline = load_pipeline(folder, device="cpu")
        target = pipeline.decode_target
        per_group: dict[str, list[float]] = {}
        dice: list[float] = []
        sizes_ok = True
        t = {"full": 0.0, "auto": 0.0}
        for group, name, data in files:
            answers = {}
            for mode in ("full", "auto"):
                pipeline.config["decode_size"] = mode
                start = time.perf_counter()
                try:
                    answers[mode] = pipeline.predict_bytes(data)
                except CXRInputError as err:
                    answers[mode] = err
                t[mode] += time.perf_counter() - start
            a, b = answers["full"], answers["auto"]
            if isinstance(a, CXRInputError) or isinstance(b, CXRInputError):
                if type(a) is not type(b):
                    per_group.setdefault(group, []).append(float("inf"))  # one path refused, the other not
                continue
            sizes_ok &= a["input"] == b["input"]
            sa, sb = main_scores(pipeline.name, a), main_scores(pipeline.name, b)
            per_group.setdefault(group, []).extend(abs(sa[k] - sb[k]) for k in sa if k in sb)
            ma, mb = mask_from(a), mask_from(b)
            if ma is not None and mb is not None:
                sizes_ok &= ma.shape == mb.shape
                if ma.shape == mb.shape:
                    inter = np.logical_and(ma, mb).sum()
                    dice.append(float(2 * inter / max(1, ma.sum() + mb.sum())))
        pipeline.config["decode_size"] = "auto"
        for group, diffs in per_group.items():
            rows.append({"model": pipeline.name, "decode_target": target, "group": group, "scores": len(diffs),
                         "max_abs_diff": max(diffs), "mean_abs_diff": float(np.mean(diffs))})
        everything = [d for diffs in per_group.values() for d in diffs]
        rows.append({"model": pipeline.name, "decode_target": target, "group": "ALL", "scores": len(everything),
                     "max_abs_diff": max(everything) if everything else None,
                     "mean_abs_diff": float(np.mean(everything)) if everything else None,
                     "lung_dice_min": min(dice) if dice else None, "lung_dice_mean": float(np.mean(dice)) if dice else None,
                     "input_block_and_mask_sizes_equal": bool(sizes_ok),
                     "seconds_full": round(t["full"], 2), "seconds_auto": round(t["auto"], 2)})
        r = rows[-1]
        print(f"  {pipeline.name:14s} target {target:5d}  scores {r['scores']:4d}  max |d| {r['max_abs_diff']:.2e}  "
              f"mean |d| {r['mean_abs_diff']:.2e}" + (f"  lung Dice min {r['lung_dice_min']:.4f} mean {r['lung_dice_mean']:.4f}"
                                                      if dice else "")
              + f"  sizes equal {sizes_ok}  time full {t['full']:.1f} s / reduced {t['auto']:.1f} s", flush=True)
        for row in rows:
            if row["model"] == pipeline.name and row["group"] != "ALL":
                print(f"      {row['group']:36s} n {row['scores']:4d}  max {row['max_abs_diff']:.2e}  mean {row['mean_abs_diff']:.2e}")
        del pipeline
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default=os.environ.get("CXRSERVE_STORE", "model_store"))
    data = next((p for p in (ROOT.parent / "shared" / "data", ROOT.parents[1] / "shared" / "data") if p.exists()),
                ROOT.parent / "shared" / "data")
    parser.add_argument("--data", default=str(data))
    parser.add_argument("--cache", default=str(ROOT / "build" / "bench-cache"))
    parser.add_argument("--seconds", type=float, default=0.6, help="timing per input and path")
    parser.add_argument("--val", type=int, default=40, help="validation-split images in the agreement set")
    parser.add_argument("--skip", nargs="*", default=[], choices=["decode", "agreement"])
    parser.add_argument("--out")
    args = parser.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    data_root = Path(args.data)
    result: dict = {"load_average": os.getloadavg()}
    if "decode" not in args.skip:
        inputs = [(i.name, i.data) for i in phantom_inputs(cache, 2048, tuple(PHANTOM_SYNTAXES) + ("j2k",))]
        inputs += windowed_phantoms(cache, 2048)
        if (data_root / "dicom_samples").exists():
            for i, p in enumerate(sorted((data_root / "dicom_samples").glob("*/*.dcm"))):
                inputs.append((f"real-{i}-{p.parent.name}", p.read_bytes()))
        affinity = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(affinity)})
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        print("decode on one core (median ms; full = decode + uint8 image, as the pipelines did)")
        try:
            result["decode"] = decode_table(inputs, args.seconds)
        finally:
            os.sched_setaffinity(0, affinity)
            cv2.setNumThreads(threads)
    if "agreement" not in args.skip:
        if not data_root.exists():
            print(f"no {data_root}: agreement table skipped")
        else:
            files = real_files(data_root, args.val)
            print(f"agreement, full vs reduced decode, {len(files)} real files, store {args.store}")
            result["agreement"] = agreement(Path(args.store), files, cache)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
