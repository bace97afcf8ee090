"""Benchmark cases in process: batched pipelines, the naive loop, the forward-pass ceiling."""
from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from cxrserve.tools.bench.inputs import BenchInput
from cxrserve.tools.bench.measure import latency_summary, run_serial
from cxrserve.tools.bench.naive import NaiveBaseline
from cxrserve.tools.bench.scores import main_scores



log = logging.getLogger(__name__)


def _outputs_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


# --------------------------------------------------------------------------- in process
def load_served(model_dir: Path, backend: str, device: str, extra: dict | None = None):
    """The served pipeline in this process, configured as its archive's handler block says."""
    from cxrserve.core.loading import load_pipeline

    config = dict(json.loads((model_dir / "pipeline.json").read_text()).get("handler", {}))
    config.update({"backend": backend, **(extra or {})})
    return load_pipeline(model_dir, device=device, config=config)


def score_batches(pipeline, inputs: Sequence[BenchInput], options: dict, batch: int, *, n: int, seconds: float,
                  min_n: int) -> tuple[dict, dict[str, dict[str, float]], dict[str, float]]:
    """Decode and score ``inputs`` (cycled) ``batch`` studies at a time, as a handler does.

    Returns the latency summary (every study of a batch waits for the whole batch),
    the main scores per input, and the mean milliseconds per study of each stage.
    """
    from cxrserve.core.errors import CXRInputError

    scores: dict[str, dict[str, float]] = {}
    errors: list[int] = []

    def call(i: int) -> int:
        chunk = [inputs[(i * batch + k) % len(inputs)] for k in range(batch)]
        items = []
        for inp in chunk:
            try:
                items.append(pipeline.make_item({"image": inp.data}, options))
            except CXRInputError as err:
                items.append(err)
        for inp, result in zip(chunk, pipeline.predict(items)):
            if isinstance(result, dict):
                scores.setdefault(inp.name, main_scores(pipeline.name, result))
            else:
                errors.append(result.status)
        return len(chunk)

    call(0)  # warm-up: first-run allocations and lazy initialisation are not a study's cost
    scores.clear()
    pipeline.timer.reset()
    batches = max(1, -(-n // batch))
    latencies, wall, sizes = run_serial(call, n=batches, seconds=seconds, min_n=max(1, -(-len(inputs) // batch)))
    studies = sum(sizes)
    stages = {k: round(v * 1000 / studies, 2) for k, v in pipeline.timer.reset().items()}
    summary = latency_summary([t for t, s in zip(latencies, sizes) for _ in range(s)], wall, studies)
    if errors:
        summary["errors"] = len(errors)
    return summary, scores, stages


def naive_case(naive: NaiveBaseline, inputs: Sequence[BenchInput], options: dict, *, n: int, seconds: float
               ) -> tuple[dict, dict[str, dict[str, float]]]:
    from cxrserve.core.errors import CXRInputError

    scores: dict[str, dict[str, float]] = {}
    errors = 0

    def call(i: int) -> None:
        nonlocal errors
        inp = inputs[i % len(inputs)]
        try:
            scores.setdefault(inp.name, main_scores(naive.name, naive.predict(inp.data, options)))
        except CXRInputError:
            errors += 1

    call(0)
    scores.clear()
    errors = 0
    latencies, wall, _ = run_serial(call, n=max(n, len(inputs)), seconds=seconds, min_n=len(inputs))
    summary = latency_summary(latencies, wall)
    if errors:
        summary["errors"] = errors
    return summary, scores


# --------------------------------------------------------------------------- ceiling
def _components(pipeline) -> dict:
    parts = dict(pipeline.parts)
    if pipeline.gate is not None and pipeline.gate not in parts.values():
        parts["gate"] = pipeline.gate
    return parts


def forward_ceiling(pipeline, image: np.ndarray, batch_sizes: Sequence[int], seconds: float,
                    low_precision: bool = False) -> dict:
    """Forward passes alone, per component (gate included), at each batch size.

    Each component gets its own preprocessed tensor of ``image`` (forward cost does not
    depend on content); its best batch size gives its ms per image and the sum over
    components the ceiling in studies/s (every study passes every component once).
    With ``low_precision``, TorchScript components are also timed under bf16 autocast
    (fp16 on CUDA) with the largest difference from fp32 on their first output: the
    opt-in trade of accuracy for speed, never the default.
    """

    parts = _components(pipeline)
    per_part = max(0.2, seconds / max(1, len(parts) * len(batch_sizes)))
    report: dict = {"components": {}}
    total = 0.0
    for name, part in parts.items():
        x1 = part.transform()(image)
        by_batch = {}
        for b in batch_sizes:
            x = x1[None].repeat(b, *([1] * x1.dim()))
            part.runtime(x)  # warm-up
            times = []
            start = time.perf_counter()
            while len(times) < 2 or (time.perf_counter() - start < per_part and len(times) < 50):
                t = time.perf_counter()
                part.runtime(x)
                times.append(time.perf_counter() - t)
            by_batch[b] = round(statistics.median(times) * 1000 / b, 2)
        best = min(by_batch, key=by_batch.get)
        entry = {"backend": part.runtime.backend, "ms_per_image": by_batch[best], "best_batch": best,
                 "by_batch": by_batch}
        module = getattr(part.runtime, "module", None)
        if low_precision and module is not None:
            entry["low_precision"] = _low_precision(part.runtime, x1, best, per_part)
        report["components"][name] = entry
        total += by_batch[best]
    report["ms_per_study"] = round(total, 2)
    report["studies_per_s"] = round(1000.0 / total, 3) if total else None
    return report


def _low_precision(runtime, x1, batch: int, seconds: float) -> dict:
    """bf16 (CPU) / fp16 (CUDA) autocast timing and max |difference| from fp32."""
    import torch

    device = runtime.device
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    x = x1[None].repeat(batch, *([1] * x1.dim())).to(device)
    with torch.inference_mode():
        reference = _outputs_tuple(runtime.module(x))[0].float()
        with torch.autocast(device.type, dtype=dtype):
            _outputs_tuple(runtime.module(x))  # warm-up
            times = []
            start = time.perf_counter()
            while len(times) < 2 or (time.perf_counter() - start < seconds and len(times) < 50):
                t = time.perf_counter()
                out = _outputs_tuple(runtime.module(x))[0].float()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
    return {"dtype": str(dtype).replace("torch.", ""), "ms_per_image": round(statistics.median(times) * 1000 / batch, 2),
            "max_abs_diff_first_output": float((out - reference).abs().max())}
