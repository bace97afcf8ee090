"""Cheaper precisions for the ONNX components on CPU: int8 (ONNX Runtime static
quantization) and bf16 (PyTorch autocast), speed and agreement with fp32.

    PYTHONPATH=$PWD python benchmarks/precision.py [--store /work/main/model_store]
        [--checkpoints /work/main/build/checkpoints] [--data ../shared/data] [--out ...json]

Per component served through ONNX Runtime (lungseg, triage_classifier, pxs, mortality,
gate; from the store's archives):

* inputs: real images of the patient-level split (``patient_split(seed 0, 0.2)``, as
  ``cxrserve eval --split val``), decoded and preprocessed with the component's own
  transform; the triage classifier gets whole images (its crop needs lungseg first);
* fp32: the archive's ``model.onnx``; ms per image at batch 4 (median), one session,
  default options, all in this process;
* int8: ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel int8 weights,
  uint8 activations, MinMax calibration) calibrated on ``--calib`` TRAINING-split
  images; agreement = max/mean |difference| of the first output over the
  VALIDATION-split images (for lungseg: Dice of the > 0.5 masks);
* bf16: the component's checkpoint (``build/checkpoints/<name>/best.ckpt``, the weights
  the ONNX file was exported from) under ``torch.autocast("cpu", torch.bfloat16)`` when
  this CPU has AVX512-BF16 or AMX (``cxrserve.core.runtime.cpu_has_bf16``), else reported as
  fp32 fallback; ms per image at batch 4 and agreement with the fp32 ONNX outputs.

The demo store's weights are phantom-trained, so the agreement here is between
precisions of the same function, not a clinical metric.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cxrserve.tools.bench.archives import unpacked_archive  # noqa: E402


def ms_per_image(fn, batch: np.ndarray, seconds: float) -> float:
    fn(batch)
    times, start = [], time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < seconds and len(times) < 30):
        t = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000 / len(batch)


def components(store: Path, cache: Path) -> dict[str, Path]:
    out = {}
    for mar in sorted(store.glob("cxr-*.mar")):
        folder = unpacked_archive(mar, cache)
        for meta in folder.glob("*/metadata.json"):
            if (meta.parent / "model.onnx").exists():
                out.setdefault(meta.parent.name, meta.parent)
    return out


def images(data_root: Path, n: int, part: str) -> list[np.ndarray]:
    from cxrserve.training.datasets import patient_split
    from cxrserve.core.imageio import read_file
    from cxrserve.training.common import load_records

    records = load_records([data_root])
    chosen = patient_split(records, val_fraction=0.2, seed=0)[part]
    step = max(1, len(chosen) // n)
    return [read_file(r.path).uint8 for r in chosen[::step][:n]]


class Reader:
    def __init__(self, name: str, arrays: list[np.ndarray]):
        self.name, self.items = name, iter(arrays)

    def get_next(self):
        x = next(self.items, None)
        return None if x is None else {self.name: x[None]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default=os.environ.get("CXRSERVE_STORE", "model_store"))
    parser.add_argument("--checkpoints", default=str(ROOT / "build" / "checkpoints"))
    data = next((p for p in (ROOT.parent / "shared" / "data", ROOT.parents[1] / "shared" / "data") if p.exists()),
                ROOT.parent / "shared" / "data")
    parser.add_argument("--data", default=str(data))
    parser.add_argument("--cache", default=str(ROOT / "build" / "bench-cache"))
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--val", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--out")
    args = parser.parse_args()

    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from cxrserve.core.card import ModelCard
    from cxrserve.models.checkpoint import load_model
    from cxrserve.core.runtime import cpu_has_bf16
    from cxrserve.core.transforms import build_transform

    bf16 = cpu_has_bf16()
    print(f"CPU bf16 (AVX512-BF16/AMX): {'yes' if bf16 else 'no: bf16 rows fall back to fp32'}; "
          f"torch threads {torch.get_num_threads()}")
    calib_images = images(Path(args.data), args.calib, "train")
    val_images = images(Path(args.data), args.val, "val")
    work = Path(tempfile.mkdtemp(prefix="cxrserve-precision-"))
    rows = []
    for name, folder in components(Path(args.store), Path(args.cache)).items():
        if args.only and name not in args.only:
            continue
        card = ModelCard.load(folder / "metadata.json")
        transform = build_transform(card.preprocessing)
        calib = [transform(img).numpy() for img in calib_images]
        val = np.stack([transform(img).numpy() for img in val_images])
        fp32 = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        input_name = fp32.get_inputs()[0].name
        run32 = lambda x, s=fp32: s.run(None, {input_name: x})  # noqa: E731
        ref = np.concatenate([run32(val[i : i + 4])[0] for i in range(0, len(val), 4)])
        row = {"component": name, "preprocessing": card.preprocessing, "val_images": len(val),
               "fp32_ms": round(ms_per_image(run32, val[:4], args.seconds), 2)}
        # int8 static quantization, calibrated on training images
        q_path = work / f"{name}-int8.onnx"
        try:
            quantize_static(str(folder / "model.onnx"), str(q_path), Reader(input_name, calib),
                            quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                            activation_type=QuantType.QUInt8, calibrate_method=CalibrationMethod.MinMax)
            q = ort.InferenceSession(str(q_path), providers=["CPUExecutionProvider"])
            run8 = lambda x, s=q: s.run(None, {input_name: x})  # noqa: E731
            out8 = np.concatenate([run8(val[i : i + 4])[0] for i in range(0, len(val), 4)])
            row["int8_ms"] = round(ms_per_image(run8, val[:4], args.seconds), 2)
            row["int8_max_abs_diff"] = float(np.abs(out8 - ref).max())
            row["int8_mean_abs_diff"] = float(np.abs(out8 - ref).mean())
            if card.task == "segmentation":
                a, b = ref > 0.5, out8 > 0.5
                row["int8_dice"] = float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))
            if ref.ndim == 2 and ref.shape[1] > 1:
                row["int8_top1_agreement"] = float((ref.argmax(1) == out8.argmax(1)).mean())
            row["int8_model_mb"] = round(q_path.stat().st_size / 2**20, 1)
        except Exception as err:  # noqa: BLE001  a model the quantizer cannot handle: say so
            row["int8_error"] = f"{type(err).__name__}: {str(err)[:200]}"
        row["fp32_model_mb"] = round((folder / "model.onnx").stat().st_size / 2**20, 1)
        # bf16 autocast on the checkpoint the ONNX file came from
        ckpt = Path(args.checkpoints) / name / "best.ckpt"
        if ckpt.exists():
            model, _ = load_model(ckpt)

            def run_torch(x, autocast: bool):
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    out = model(torch.from_numpy(x))
                out = out[0] if isinstance(out, (tuple, list)) else out
                return out.float().numpy()

            eager = np.concatenate([run_torch(val[i : i + 4], False) for i in range(0, len(val), 4)])
            row["torch_fp32_vs_onnx_max_abs_diff"] = float(np.abs(eager - ref).max()) if eager.shape == ref.shape else None
            row["torch_fp32_ms"] = round(ms_per_image(lambda x: run_torch(x, False), val[:4], args.seconds), 2)
            if bf16:
                outb = np.concatenate([run_torch(val[i : i + 4], True) for i in range(0, len(val), 4)])
                row["bf16_ms"] = round(ms_per_image(lambda x: run_torch(x, True), val[:4], args.seconds), 2)
                if outb.shape == ref.shape:
                    row["bf16_max_abs_diff"] = float(np.abs(outb - ref).max())
                    row["bf16_mean_abs_diff"] = float(np.abs(outb - ref).mean())
                    if card.task == "segmentation":
                        a, b = ref > 0.5, outb > 0.5
                        row["bf16_dice"] = float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))
                    if ref.ndim == 2 and ref.shape[1] > 1:
                        row["bf16_top1_agreement"] = float((ref.argmax(1) == outb.argmax(1)).mean())
            else:
                row["bf16"] = "no AVX512-BF16/AMX: fp32"
        rows.append(row)
        print("  " + json.dumps(row), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"bf16_cpu": bf16, "rows": rows, "load_average": os.getloadavg()},
                                             indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
