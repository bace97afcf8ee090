"""``cxrserve bench``: how fast cxrserve scores studies, against the seeds' way and the hardware.

One command (``make bench``) prints a markdown table and writes JSON + markdown to
``benchmarks/results/``. For every served model in the store it measures, on the same
inputs and in the same run:

* **naive**: the seed's way -- eager PyTorch modules rebuilt from the store's own
  checkpoints (``<work>/checkpoints/<component>/best.ckpt``), one image at a time in a
  Python loop, Grad-CAM by an autograd backward pass (as the seeds compute heatmaps),
  the same decoder and the same named preprocessing. Every ratio is against this row.
* **in-process**: :func:`cxrserve.pipeline.load_pipeline` with batching, on ONNX Runtime
  and TorchScript (the backend a store does not ship is exported from the checkpoint
  into a cache beside it, once);
* **TorchServe**: the store served end to end over REST and gRPC, at several numbers
  of concurrent clients, and for ``cxr-triage`` at several batch sizes;
* **ceiling**: the forward passes alone (input gate and every component) at their
  best batch size, on preprocessed tensors.

Each row has throughput (studies/s), latency p50/p99, CPU use (CPU seconds per wall
second of the processes doing the work: 2.0 = both cores of a 2-core machine busy),
peak RSS, the ratio to the naive baseline, the share of the ceiling and the largest
difference of the model's main scores from the naive outputs (the "same outputs"
check). Further sections: decode time per DICOM transfer syntax, preprocessing step
costs, per-stage timings of each pipeline, and how latency and memory grow with image
size, batch size, PXS pool size and concurrent clients.

Measurements are only as good as the machine is quiet: the load average is recorded
before and after, with the CPU model, core count and library versions. Without a GPU
the suite says so and measures the CPU; with ``--device cuda`` the pipelines, the naive
baseline and TorchServe's workers (``number_of_gpu``) run on the GPU and ONNX Runtime
asks for its CUDA provider.

Every case stops after ``--requests`` studies or ``--seconds`` seconds, whichever comes
first, and the case length shrinks when the whole run would exceed ``--budget``, so
the default configuration finishes in under 10 minutes on a 2-core CPU machine.
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
RESULTS_FORMAT = 1
#: Served models the suite knows how to compare (main scores) and run the naive way.
MODELS = ("cxr-triage", "cxr-lungseg", "cxr-pxs", "cxr-severity", "cxr-mortality", "cxr-zeroshot")
#: The request option that asks a model for its picture (lungseg returns its mask by default).
PICTURE_OPTIONS = {"cxr-triage": "heatmap", "cxr-severity": "saliency", "cxr-mortality": "overlay"}
#: Real files that are deliberately broken test cases, not studies a hospital would send.
REAL_SKIP = ("SIIM_Fake_MONOCHROME1.dcm",)
#: Transfer syntaxes of the phantom DICOMs (decode table; the model inputs without real data).
PHANTOM_SYNTAXES = ("explicit_le", "implicit_le", "deflated", "rle", "jpeg_baseline", "jpeg_lossless",
                    "jpegls_lossless", "j2k_lossless")
PHANTOM_MODEL_SYNTAXES = ("explicit_le", "rle", "jpeg_baseline", "jpeg_lossless", "j2k_lossless")
PHANTOM_VERSION = 1  # bump when the phantom inputs change (cache key)


# --------------------------------------------------------------------------- scores
def main_scores(model: str, response: dict) -> dict[str, float]:
    """The numbers "same outputs" is judged on: each model's headline scores and the gate's."""
    keys = {
        "cxr-triage": ("probabilities",),
        "cxr-lungseg": ("segmentation_confidence", "lung_area_fraction"),
        "cxr-pxs": ("pxs",),
        "cxr-severity": ("geographic_extent", "opacity"),
        "cxr-mortality": ("risk",),
        "cxr-zeroshot": ("probabilities",),
    }.get(model, ())
    out: dict[str, float] = {}
    for key in keys:
        value = response.get(key)
        if isinstance(value, dict):
            out.update({f"{key}.{k}": float(v) for k, v in value.items()})
        elif isinstance(value, (int, float)):
            out[key] = float(value)
    gate = response.get("input_gate")
    if isinstance(gate, dict) and "score" in gate:
        out["input_gate.score"] = float(gate["score"])
    return out


def max_abs_diff(reference: dict[str, dict[str, float]], other: dict[str, dict[str, float]]) -> float | None:
    """Largest |difference| of any main score over the inputs both runs answered."""
    worst = None
    for name, scores in other.items():
        ref = reference.get(name)
        if not ref:
            continue
        for key, value in scores.items():
            if key in ref:
                diff = abs(value - ref[key])
                worst = diff if worst is None else max(worst, diff)
    return worst


# --------------------------------------------------------------------------- environment
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    for name in (module, module.replace("_", "-")):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "absent"


def environment(device: str) -> dict:
    """Hardware, library versions and load: recorded with every result."""
    import torch

    from .runtime import cpu_has_bf16

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    import psutil

    env = {
        "cpu": _cpu_model(),
        "cores": cores,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu_bf16": cpu_has_bf16(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": _version("onnxruntime-gpu") if _version("onnxruntime-gpu") != "absent" else _version("onnxruntime"),
        "torchserve": _version("torchserve"),
        "numpy": np.__version__,
        "opencv": _version("opencv-python-headless"),
        "pydicom": _version("pydicom"),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "git_commit": commit,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if device == "cuda" and torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
    return env


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
    from .dicomwrite import TRANSFER_SYNTAXES

    names = {v: k for k, v in TRANSFER_SYNTAXES.items()}
    return names.get(uid, uid)


def _describe_file(data: bytes, source: str, index: int) -> BenchInput:
    from .imageio import decode, sniff_format

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
    from .phantoms import render, sample_spec

    return render(sample_spec(seed, label="pneumonia", height=size, width=size, min_extent=2)).image


def phantom_inputs(cache: Path, size: int, syntaxes: Sequence[str], png: bool = True) -> list[BenchInput]:
    """One phantom encoded as DICOM in ``syntaxes`` (12 bits stored where lossless) and PNG.

    Files are cached in ``cache`` (rendering a 2048 px phantom takes seconds).
    """
    from .dicomwrite import to_dicom

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


# --------------------------------------------------------------------------- measuring
class Monitor:
    """CPU seconds and peak RSS of some processes while a case runs.

    RSS is sampled every ``interval`` seconds in a thread (sum over the processes);
    CPU time is the difference of their ``cpu_times`` (user + system, children
    included for this process) between entry and exit.
    """

    def __init__(self, pids: Callable[[], Iterable[int]] | None = None, interval: float = 0.05):
        self.pids = pids or (lambda: [os.getpid()])
        self.interval = interval
        self.peak_rss = 0
        self.start_rss = 0
        self.cpu_seconds = 0.0
        self.wall = 0.0
        self._stop = threading.Event()

    def _procs(self):
        import psutil

        procs = []
        for pid in self.pids():
            try:
                procs.append(psutil.Process(pid))
            except psutil.Error:
                continue
        return procs

    @staticmethod
    def _cpu(procs) -> float:
        import psutil

        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                continue
        return total

    def _rss(self) -> int:
        import psutil

        total = 0
        for p in self._sampled:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
        return total

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, self._rss())

    def __enter__(self) -> "Monitor":
        self._sampled = self._procs()
        self.start_rss = self.peak_rss = self._rss()
        self._cpu0 = self._cpu(self._sampled)
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self._rss())
        self.cpu_seconds = self._cpu(self._sampled) - self._cpu0

    def report(self, prefix: str = "") -> dict:
        return {f"{prefix}cpu_util": round(self.cpu_seconds / self.wall, 2) if self.wall else None,
                f"{prefix}rss_peak_mb": round(self.peak_rss / 2**20)}


def latency_summary(latencies: Sequence[float], wall: float, studies: int | None = None) -> dict:
    """Throughput (studies per wall second) and latency percentiles in ms."""
    lat = sorted(latencies)
    n = studies if studies is not None else len(lat)
    if not lat:
        return {"n": 0}
    p = lambda q: lat[min(len(lat) - 1, int(round(q * (len(lat) - 1))))] * 1000  # noqa: E731
    return {"n": n, "wall_s": round(wall, 3), "throughput": round(n / wall, 3) if wall else None,
            "p50_ms": round(statistics.median(lat) * 1000, 1), "p99_ms": round(p(0.99), 1),
            "mean_ms": round(statistics.fmean(lat) * 1000, 1)}


class Clock:
    """Shares the run's time budget among the cases still to run.

    A case gets ``case_seconds`` unless the remaining budget divided by the cases left
    is smaller; never less than ``floor`` seconds (a case also stops after its request
    count, and always runs its minimum number of requests).
    """

    def __init__(self, budget: float, case_seconds: float, cases: int, floor: float = 1.0):
        self.start = time.perf_counter()
        self.budget = budget
        self.case_seconds = case_seconds
        self.cases_left = max(1, cases)
        self.floor = floor

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def take(self, weight: float = 1.0) -> float:
        remaining = self.budget - self.elapsed
        share = remaining / max(1, self.cases_left)
        self.cases_left = max(1, self.cases_left - 1)
        return max(self.floor, min(self.case_seconds, share) * weight)


def run_serial(call: Callable[[int], Any], *, n: int, seconds: float, min_n: int = 1) -> tuple[list[float], float, list]:
    """``call(i)`` for i = 0, 1, ... until ``n`` calls or ``seconds`` (at least ``min_n``)."""
    latencies, results = [], []
    start = time.perf_counter()
    i = 0
    while i < n and (i < min_n or time.perf_counter() - start < seconds):
        t = time.perf_counter()
        results.append(call(i))
        latencies.append(time.perf_counter() - t)
        i += 1
    return latencies, time.perf_counter() - start, results


def run_concurrent(call: Callable[[int], Any], *, n: int, seconds: float, concurrency: int,
                   min_n: int = 1) -> tuple[list[float], float, list, int]:
    """``concurrency`` clients calling ``call(i)`` until ``n`` calls or ``seconds`` pass.

    Returns per-request latencies, wall time, results (None for failures), failures.
    """
    lock = threading.Lock()
    counter = iter(range(n))
    latencies: list[float] = []
    results: list = [None] * n
    failures = 0
    start = time.perf_counter()

    def client() -> None:
        nonlocal failures
        while True:
            with lock:
                if time.perf_counter() - start > seconds and len(latencies) >= min_n:
                    return
                i = next(counter, None)
            if i is None:
                return
            t = time.perf_counter()
            try:
                out = call(i)
            except Exception as err:  # a failed request is counted, never fatal to the run
                log.warning("request %d failed: %s", i, err)
                with lock:
                    failures += 1
                continue
            with lock:
                latencies.append(time.perf_counter() - t)
                results[i] = out

    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client) for _ in range(concurrency)]:
            f.result()
    return latencies, time.perf_counter() - start, results, failures


# --------------------------------------------------------------------------- naive
def _outputs_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


class NaiveBaseline:
    """The seed's way for one served model: eager modules, one image at a time.

    Same weights (the store's checkpoints), decoder, header screen, input gate and named
    preprocessing as the served pipeline, and the same response numbers; no batching,
    no exported graph, and pictures drawn by autograd as the seeds draw them: Grad-CAM
    runs the classifier with gradients on and back-propagates the chosen class's logit
    through every layer (the parameters require gradients, as in the seeds' scripts),
    reading the last conv block's activations and gradients through hooks; severity's
    saliency is the input gradient (Cohen et al.'s code). What the seeds also do only
    once is done once here: loading weights, the PXS pool's embeddings (read from the
    archive, so the pools are identical) and CheXzero's label text embeddings.
    """

    def __init__(self, name: str, model_dir: Path, checkpoints: dict[str, Path], device: str = "cpu"):
        import torch

        from . import pipelines  # noqa: F401  (registers the pipeline classes)
        from .card import ModelCard
        from .checkpoint import load_model
        from .pipeline import GATE_COMPONENT, PIPELINES
        from .transforms import build_transform

        self.name = name
        self.device = torch.device(device)
        self.model_dir = Path(model_dir)
        self.config = json.loads((self.model_dir / "pipeline.json").read_text()).get("handler", {})
        parts = list(PIPELINES[name].components)
        if GATE_COMPONENT not in parts and (self.model_dir / GATE_COMPONENT / "metadata.json").exists():
            parts.append(GATE_COMPONENT)
        self.modules, self.cards, self.transforms, self.same_weights = {}, {}, {}, {}
        for part in parts:
            path = checkpoints.get(part)
            if path is None or not Path(path).exists():
                raise FileNotFoundError(f"no checkpoint for component {part!r} ({path}): give --work or "
                                        f"--checkpoint {part}=PATH")
            module, card = load_model(path, self.device)
            served = ModelCard.load(self.model_dir / part / "metadata.json")
            # The card's creation time is stamped at training: equal cards, equal weights.
            self.same_weights[part] = (card.created, card.version) == (served.created, served.version)
            self.modules[part], self.cards[part] = module.eval(), card
            self.transforms[part] = build_transform(card.preprocessing)
        self.gate = GATE_COMPONENT if GATE_COMPONENT in self.modules else None
        if self.gate:
            gate_card = self.cards[self.gate]
            self.gate_threshold = float(self.config.get("gate_threshold", gate_card.thresholds.get("accept", 0.5)))
            enforce = str(self.config.get("gate_enforce", "auto")).strip().lower()
            self.gate_enforced = (not gate_card.demo) if enforce == "auto" else enforce in ("1", "true", "yes", "on")
        setup = getattr(self, f"_setup_{name.removeprefix('cxr-')}", None)
        if setup is not None:
            setup()

    # ----------------------------------------------------------------- helpers
    def _tensor(self, part: str, image: np.ndarray):
        return self.transforms[part](image)[None].to(self.device)

    def _forward(self, part: str, image: np.ndarray) -> tuple[np.ndarray, ...]:
        """One image through one eager module; per-output arrays of that image."""
        import torch

        with torch.inference_mode():
            outs = _outputs_tuple(self.modules[part](self._tensor(part, image)))
        return tuple(o[0].float().cpu().numpy() for o in outs)

    def _grad_cam(self, part: str, x, choose: Callable[[np.ndarray], int] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
        """Seed-style Grad-CAM: ``(probabilities, CAM of the chosen class)``.

        ``choose(probabilities) -> class index`` (default: the top class) picks the class
        whose logit is back-propagated.
        """
        import torch

        model = self.modules[part]
        seen: dict = {}

        def keep(_module, _inputs, output):
            seen["activations"] = output
            output.register_hook(lambda grad: seen.__setitem__("gradients", grad))

        handle = model.features.register_forward_hook(keep)
        try:
            with torch.enable_grad():
                model.zero_grad(set_to_none=True)
                logits = model.logits(x)
                probs = torch.softmax(logits, dim=1)[0].detach().float().cpu().numpy()
                target = choose(probs) if choose is not None else int(np.argmax(probs))
                logits[0, target].backward()
        finally:
            handle.remove()
        weights = seen["gradients"].mean(dim=(2, 3), keepdim=True)
        cam = torch.relu((weights * seen["activations"]).sum(dim=1))[0]
        return probs, cam.detach().float().cpu().numpy()

    # ----------------------------------------------------------------- one study
    def predict(self, data: bytes, options: dict | None = None) -> dict:
        from .errors import NotFrontalCXR
        from .imageio import check_frontal_chest_header, decode

        options = options or {}
        xray = decode(data)
        check_frontal_chest_header(xray)
        out: dict = {}
        if self.gate:
            probs = self._forward(self.gate, xray.uint8)[0]
            score = float(probs[list(self.cards[self.gate].labels).index("frontal_cxr")])
            if self.gate_enforced and score < self.gate_threshold:
                raise NotFrontalCXR(f"input gate: score {score:.3f} < {self.gate_threshold:g}")
            out["input_gate"] = {"score": round(score, 4)}
        out.update(getattr(self, f"_predict_{self.name.removeprefix('cxr-')}")(xray, options))
        return out

    def _predict_lungseg(self, xray, options) -> dict:
        from .lungs import analyse_lungs, mask_to_image_size
        from .overlays import png_base64

        card = self.cards["lungseg"]
        finding = analyse_lungs(self._forward("lungseg", xray.uint8)[0][0], (xray.width, xray.height),
                                card.thresholds)
        out = {"segmentation_confidence": round(finding.segmentation_confidence, 4),
               "lung_area_fraction": round(finding.lung_area_fraction, 4)}
        if options.get("mask", True):
            out["mask_png"] = png_base64(mask_to_image_size(finding.probability, (xray.width, xray.height),
                                                            card.thresholds.get("mask", 0.5)))
        return out

    def _predict_triage(self, xray, options) -> dict:
        from .lungs import analyse_lungs
        from .overlays import heatmap_png

        image = xray.uint8
        finding = analyse_lungs(self._forward("lungseg", image)[0][0], (xray.width, xray.height),
                                self.cards["lungseg"].thresholds)
        labels = list(self.cards["triage_classifier"].labels)
        crop = finding.crop(image)
        out: dict = {}
        if options.get("heatmap"):
            probs, cam = self._grad_cam("triage_classifier", self._tensor("triage_classifier", crop))
            out["heatmap_png"] = heatmap_png(image, cam, box=finding.lung_bbox if finding.crop_used else None)
        else:
            probs = self._forward("triage_classifier", crop)[0]
        out["probabilities"] = {label: round(float(p), 6) for label, p in zip(labels, probs)}
        return out

    def _setup_pxs(self) -> None:
        from .pxs import ReferencePool

        self.pool = ReferencePool.load(self.model_dir / "pxs")

    def _predict_pxs(self, xray, options) -> dict:
        embedding = self._forward("pxs", xray.uint8)[0]
        pxs = float(np.median(np.linalg.norm(self.pool.embeddings - embedding[None], axis=1)))
        percentile = 100.0 * float(np.mean(self.pool.loo_scores <= pxs))
        return {"pxs": round(pxs, 4), "pxs_percentile": round(percentile, 2)}

    def _setup_severity(self) -> None:
        from .severity import score_maps

        self.maps = score_maps(self.cards["severity"])
        card = self.cards["severity"]
        from .xrv_import import load_template

        self.saliency_cfg = dict(card.extra.get("saliency") or load_template()["extra"]["saliency"])

    def _predict_severity(self, xray, options) -> dict:
        from .overlays import limit_size, overlay, png_base64
        from .severity import blur_saliency, input_gradients, saliency_on_image

        logits = self._forward("severity", xray.uint8)[0]
        out = {name: round(float(m(logits)), 6) for name, m in self.maps.items()}
        if options.get("saliency"):
            cfg = self.saliency_cfg
            grad = input_gradients(self.modules["severity"], self._tensor("severity", xray.uint8),
                                   self.maps[cfg["target"]])[0]
            heat = saliency_on_image((xray.width, xray.height), blur_saliency(grad, cfg["sigma"], cfg["truncate"]))
            out["saliency_png"] = png_base64(limit_size(overlay(xray.uint8, heat, alpha=cfg["alpha"])))
        return out

    def _setup_mortality(self) -> None:
        card = self.cards["mortality"]
        self.calibration = card.extra["calibration"]
        self.risk_threshold = float(card.thresholds["high_risk"])

    def _risk(self, probs: np.ndarray) -> float:
        from .mortality import calibrate, log_odds

        return float(calibrate(log_odds(probs), self.calibration))

    def _predict_mortality(self, xray, options) -> dict:
        from .mortality import RISK_LABELS
        from .overlays import heatmap_png

        if options.get("overlay"):
            # The seed's interface draws what drove the prediction: Grad-CAM of the predicted class.
            probs, cam = self._grad_cam(
                "mortality", self._tensor("mortality", xray.uint8),
                choose=lambda p: int(self._risk(p) >= self.risk_threshold))
        else:
            probs = self._forward("mortality", xray.uint8)[0]
        risk = self._risk(probs)
        out = {"risk": round(risk, 6), "risk_label": RISK_LABELS[int(risk >= self.risk_threshold)]}
        if options.get("overlay"):
            out["overlay_png"] = heatmap_png(xray.uint8, cam)
        return out

    def _setup_zeroshot(self) -> None:
        from .zeroshot import BPE_FILE, CHEXPERT_LABELS, Tokenizer, embed_labels

        card = self.cards["zeroshot"]
        model = self.modules["zeroshot"]
        bpe = self.model_dir / "zeroshot" / BPE_FILE
        tokenizer = Tokenizer(bpe if bpe.exists() else None, int(card.arch_kwargs.get("context_length", 77)))
        self.labels = tuple(card.labels) or CHEXPERT_LABELS
        self.text_embeddings = embed_labels(model.encode_text, tokenizer, self.labels, self.device)

    def _predict_zeroshot(self, xray, options) -> dict:
        import torch

        from .zeroshot import pair_probabilities

        image = torch.from_numpy(self._forward("zeroshot", xray.uint8)[0][None]).to(self.device)
        probs = pair_probabilities(image, self.text_embeddings)[0]
        return {"probabilities": {label: round(float(p), 6) for label, p in zip(self.labels, probs.tolist())}}


# --------------------------------------------------------------------------- archives
def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


def unpacked_archive(mar: Path, cache: Path) -> Path:
    """``mar`` extracted once into ``cache`` (reused while the archive is unchanged)."""
    from .export import unpack_archive

    target = cache / "unpacked" / f"{mar.stem}-{_stamp(mar)}"
    if not (target / ".complete").exists():
        shutil.rmtree(target, ignore_errors=True)
        unpack_archive(mar, target)
        (target / ".complete").write_text("")
    return target


def pipeline_parts(model_dir: Path) -> tuple[str, list[str]]:
    """``(pipeline name, component folders incl. the gate)`` of an unpacked archive."""
    from . import pipelines  # noqa: F401
    from .pipeline import GATE_COMPONENT, PIPELINES

    name = json.loads((model_dir / "pipeline.json").read_text())["pipeline"]
    parts = list(PIPELINES[name].components)
    if GATE_COMPONENT not in parts and (model_dir / GATE_COMPONENT / "metadata.json").exists():
        parts.append(GATE_COMPONENT)
    return name, parts


def with_backend(model_dir: Path, backend: str, checkpoints: dict[str, Path], cache: Path) -> Path:
    """An unpacked archive in which every component has ``backend``'s file.

    The default store ships only the format its model-config names; the other one is
    exported from the component's checkpoint (with the usual parity check) into a
    cached copy of the archive folder.
    """
    from . import pipelines  # noqa: F401
    from .export import export_component
    from .pipeline import PIPELINES
    from .runtime import BACKEND_FILES

    name, parts = pipeline_parts(model_dir)
    autograd = set(PIPELINES[name].autograd_components)
    missing = [p for p in parts if p not in autograd and not (model_dir / p / BACKEND_FILES[backend]).exists()]
    if not missing:
        return model_dir
    target = cache / "backends" / f"{model_dir.name}-{backend}"
    if (target / ".complete").exists():
        return target
    for part in missing:
        if part not in checkpoints or not Path(checkpoints[part]).exists():
            raise FileNotFoundError(f"{name}: component {part} has no {BACKEND_FILES[backend]} and no checkpoint "
                                    f"to export it from ({checkpoints.get(part)})")
    shutil.rmtree(target, ignore_errors=True)
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp)
    for part in missing:
        log.info("exporting %s/%s to %s for the benchmark", name, part, backend)
        keep = {f: (tmp / part / f).read_bytes() for f in ("metadata.json", "parity.json") if (tmp / part / f).exists()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notices
            export_component(checkpoints[part], tmp / part, formats=(backend,))
        for f, data in keep.items():  # the archive's own card and parity report stay
            (tmp / part / f).write_bytes(data)
    tmp.replace(target)
    (target / ".complete").write_text("")
    return target


def variant_archive(mar: Path, cache: Path, name: str, changes: dict, handler_changes: dict | None = None) -> Path:
    """A copy of ``mar`` whose ``model-config.yaml`` has ``changes`` (batchSize, workers, ...).

    TorchServe takes batch size and workers from the archive's own model-config (a
    ``models=`` entry in config.properties does not override it), so a served variant
    needs its own archive. Entries are copied uncompressed, as the store writes them.
    """
    import zipfile

    import yaml

    import hashlib

    key = hashlib.sha256(json.dumps([changes, handler_changes], sort_keys=True).encode()).hexdigest()[:8]
    target = cache / "variants" / f"{name}-{_stamp(mar)}-{key}.mar"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    with zipfile.ZipFile(mar) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as dst:
        manifest = json.loads(src.read("MAR-INF/MANIFEST.json"))
        config_name = manifest["model"].get("configFile", "model-config.yaml")
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == config_name:
                config = yaml.safe_load(data) or {}
                config.update(changes)
                config["handler"] = {**config.get("handler", {}), **(handler_changes or {})}
                data = yaml.safe_dump(config, sort_keys=False).encode()
            elif info.filename == "MAR-INF/MANIFEST.json":
                manifest["model"]["modelName"] = name
                data = json.dumps(manifest, indent=2).encode()
            dst.writestr(info.filename, data)
    tmp.replace(target)
    return target


def model_config(model_dir: Path) -> dict:
    """The model-config.yaml an unpacked archive was built with."""
    import yaml

    path = model_dir / "model-config.yaml"
    return yaml.safe_load(path.read_text()) if path.exists() else {}


# --------------------------------------------------------------------------- in process
def load_served(model_dir: Path, backend: str, device: str, extra: dict | None = None):
    """The served pipeline in this process, configured as its archive's handler block says."""
    from .pipeline import load_pipeline

    config = dict(json.loads((model_dir / "pipeline.json").read_text()).get("handler", {}))
    config.update({"backend": backend, **(extra or {})})
    return load_pipeline(model_dir, device=device, config=config)


def score_batches(pipeline, inputs: Sequence[BenchInput], options: dict, batch: int, *, n: int, seconds: float,
                  min_n: int) -> tuple[dict, dict[str, dict[str, float]], dict[str, float]]:
    """Decode and score ``inputs`` (cycled) ``batch`` studies at a time, as a handler does.

    Returns the latency summary (every study of a batch waits for the whole batch),
    the main scores per input, and the mean milliseconds per study of each stage.
    """
    from .errors import CXRInputError

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
    from .errors import CXRInputError

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
    import torch

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


# --------------------------------------------------------------------------- TorchServe
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TorchServeRun:
    """A private TorchServe (free loopback ports, own run folder) over chosen archives.

    ``archives`` maps served name -> ``.mar`` path; they are linked into a private
    store so the server loads exactly these (variants of one archive included).
    """

    def __init__(self, archives: dict[str, Path], workdir: Path, *, gpus: int = 0, timeout: float = 600):
        self.archives = archives
        self.workdir = Path(workdir)
        self.gpus = gpus
        self.timeout = timeout
        self.ports: dict[str, int] = {}
        self.keys: dict = {}

    def _config(self, store: Path) -> Path:
        import re

        self.ports = {k: _free_port() for k in ("inference", "management", "metrics", "grpc", "grpc_management")}
        source = REPO / "config.properties"
        text = source.read_text() if source.exists() else "disable_token_authorization=false\nenable_model_api=false\n"
        settings = {
            "inference_address": f"http://127.0.0.1:{self.ports['inference']}",
            "management_address": f"http://127.0.0.1:{self.ports['management']}",
            "metrics_address": f"http://127.0.0.1:{self.ports['metrics']}",
            "grpc_inference_address": "127.0.0.1",
            "grpc_management_address": "127.0.0.1",
            "grpc_inference_port": str(self.ports["grpc"]),
            "grpc_management_port": str(self.ports["grpc_management"]),
            "model_store": str(store),
            "load_models": ",".join(f"{name}={name}.mar" for name in self.archives),
            "max_request_size": "67108864",
            "max_response_size": "67108864",
            "number_of_gpu": str(self.gpus),
        }
        for key, value in settings.items():
            if re.search(rf"^{re.escape(key)}=", text, flags=re.M):
                text = re.sub(rf"^{re.escape(key)}=.*$", lambda m: f"{key}={value}", text, flags=re.M)
            else:
                text += f"\n{key}={value}\n"
        path = self.workdir / "config.properties"
        path.write_text(text)
        return path

    def start(self) -> None:
        import requests

        from . import server

        store = self.workdir / "store"
        shutil.rmtree(store, ignore_errors=True)
        store.mkdir(parents=True)
        for name, path in self.archives.items():
            # Linked under the served name: server.start waits for every <name>.mar in the store.
            (store / f"{name}.mar").symlink_to(Path(path).resolve())
        config = self._config(store)
        info = server.start(config, store, self.workdir, timeout=self.timeout)
        self.keys = server.read_keys(info["key_file"])
        deadline = time.time() + self.timeout
        pending = set(self.archives)  # names registered from variant archives are not in info["models"]
        while pending and time.time() < deadline:
            for name in list(pending):
                try:
                    r = requests.get(f"{self.management}/models/{name}", headers=self.auth("management"), timeout=5)
                    if r.status_code == 200 and any(w.get("status") == "READY" for w in r.json()[0]["workers"]):
                        pending.discard(name)
                except (requests.RequestException, ValueError, KeyError, IndexError):
                    pass
            if pending:
                time.sleep(1)
        if pending:
            raise TimeoutError(f"TorchServe workers for {sorted(pending)} not ready in {self.timeout:.0f} s")

    def stop(self) -> None:
        from . import server

        server.stop(self.workdir)

    @property
    def inference(self) -> str:
        return f"http://127.0.0.1:{self.ports['inference']}"

    @property
    def management(self) -> str:
        return f"http://127.0.0.1:{self.ports['management']}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    def auth(self, kind: str = "inference") -> dict:
        return {"Authorization": f"Bearer {self.keys[kind]}"}

    def client(self, protocol: str):
        from .client import CXRClient

        url = self.grpc if protocol == "grpc" else self.inference
        return CXRClient(url, protocol=protocol, token=self.keys["inference"], timeout=300, retries=2)

    def server_pid(self) -> int | None:
        pidfile = self.workdir / "tmp" / ".model_server.pid"
        try:
            return int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def all_pids(self) -> list[int]:
        """The Java frontend and every Python worker."""
        import psutil

        pid = self.server_pid()
        if pid is None:
            return []
        try:
            return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return [pid]

    def worker_pids(self, name: str) -> list[int]:
        import requests

        try:
            r = requests.get(f"{self.management}/models/{name}", headers=self.auth("management"), timeout=5)
            return [int(w["pid"]) for w in r.json()[0]["workers"] if w.get("pid")]
        except (requests.RequestException, ValueError, KeyError, IndexError):
            return []

    def served_config(self, name: str) -> dict:
        import requests

        r = requests.get(f"{self.management}/models/{name}", headers=self.auth("management"), timeout=5)
        d = r.json()[0]
        return {k: d.get(k) for k in ("batchSize", "maxBatchDelay", "minWorkers", "maxWorkers")}


def served_case(run: TorchServeRun, name: str, inputs: Sequence[BenchInput], options: dict, *, protocol: str,
                concurrency: int, n: int, seconds: float, model: str | None = None) -> tuple[dict, dict]:
    """``concurrency`` clients sending ``inputs`` (cycled) to served model ``name``.

    Returns the row (latency summary, CPU use and peak RSS of TorchServe, of the model's
    worker, and of the client process) and the main scores per input.
    """
    client = run.client(protocol)
    scores: dict[str, dict[str, float]] = {}
    model = model or name

    def call(i: int) -> dict:
        inp = inputs[i % len(inputs)]
        result = client.predict(name, inp.data, options=options)
        scores.setdefault(inp.name, main_scores(model, result))
        return result

    from .client import InputRejected

    try:
        for i in range(min(concurrency, 2)):  # warm-up: connections, first-run allocations
            try:
                call(i)
            except InputRejected:  # an answer (e.g. an enforced gate's 422): counted in the case itself
                pass
        scores.clear()
        with (Monitor(run.all_pids) as server_mon, Monitor() as client_mon,
              Monitor(lambda: run.worker_pids(name)) as worker_mon):
            latencies, wall, _, failures = run_concurrent(call, n=n, seconds=seconds, concurrency=concurrency,
                                                          min_n=min(n, len(inputs), 2 * concurrency))
    finally:
        client.close()
    row = latency_summary(latencies, wall)
    row.update(server_mon.report("server_"))
    row.update({"worker_rss_peak_mb": worker_mon.report()["rss_peak_mb"]})
    row.update(client_mon.report("client_"))
    if failures:
        row["errors"] = failures
    return row, scores


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
    from .imageio import decode

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

    from . import transforms as T

    limited = T.LimitLongSide(512)(image)
    three = T.SeedThreeChannel()
    short = min(limited.shape[:2])
    steps: list[tuple[str, str, Callable[[], Any]]] = [
        (name, "pipeline", (lambda tr: lambda: tr(image))(T.build_transform(name))) for name in T.PREPROCESSING
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
    from .imageio import decode
    from .transforms import build_transform

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


def growth_pool(sizes: Sequence[int], dim: int, seconds: float, batch: int = 8, device: str = "cpu") -> list[dict]:
    """PXS scoring cost (distances to every pool embedding, median, percentile) vs pool size."""
    import torch

    from .pxs import leave_one_out_scores, percentiles, pxs_scores

    rng = np.random.default_rng(0)
    rows = []
    for size in sizes:
        pool = torch.from_numpy(rng.normal(size=(size, dim)).astype(np.float32)).to(device)
        loo = leave_one_out_scores(pool) if size <= 4096 else pxs_scores(pool[:64], pool)
        emb = torch.from_numpy(rng.normal(size=(batch, dim)).astype(np.float32)).to(device)
        ms = _median_ms(lambda: percentiles(pxs_scores(emb, pool), loo).cpu(), seconds / max(1, len(sizes)))
        rows.append({"pool_size": size, "embedding_dim": dim, "batch": batch, "ms_per_batch": ms,
                     "ms_per_study": round(ms / batch, 3),
                     "pool_mb": round(pool.numel() * 4 / 2**20, 2),
                     "distance_matrix_mb": round(batch * size * 4 / 2**20, 3)})
    return rows


# --------------------------------------------------------------------------- the suite
@dataclass
class BenchOptions:
    store: Path = Path("model_store")
    work: Path = Path("build")
    out: Path = Path("benchmarks/results")
    models: tuple[str, ...] = ()  # empty: every known model in the store
    device: str = "auto"
    data: Path | None = None  # real data root; None: phantoms
    requests: int = 24
    seconds: float = 6.0
    budget: float = 540.0
    backends: tuple[str, ...] = ("onnx", "torchscript")  # empty: each model's served backend
    clients: tuple[int, ...] = (1, 4)
    triage_clients: tuple[int, ...] = (1, 2, 4, 8, 16)
    grpc_clients: tuple[int, ...] = (4,)
    ceiling_batches: tuple[int, ...] = (1, 4, 8)
    served_batches: tuple[int, ...] = (1, 8)  # cxr-triage variants besides the store's own
    pictures: bool = True
    skip: tuple[str, ...] = ()
    checkpoints: dict = field(default_factory=dict)
    phantom_size: int = 2048
    growth_sizes: tuple[int, ...] = (512, 1024, 2048, 3072)
    growth_batches: tuple[int, ...] = (1, 2, 4, 8)
    pool_sizes: tuple[int, ...] = (32, 256, 1024, 4096)
    max_inputs: int = 0  # 0: every input
    cache: Path | None = None  # default <work>/bench-cache
    tag: str = ""
    progress: bool = True

    def wants(self, section: str) -> bool:
        return section not in self.skip


SECTIONS = ("decode", "naive", "inprocess", "ceiling", "torchserve", "growth")


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device on this machine")
    return device


def find_checkpoints(work: Path, given: dict) -> dict[str, Path]:
    """``<work>/checkpoints/<component>/best.ckpt`` for every component, overridden by ``given``."""
    found = {p.parent.name: p for p in sorted(Path(work).glob("checkpoints/*/best.ckpt"))}
    found.update({k: Path(v) for k, v in given.items()})
    return found


class _Progress:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[{time.perf_counter() - self.start:6.1f} s] {message}", file=sys.stderr, flush=True)


def _count_cases(opts: BenchOptions, models: Sequence[str]) -> int:
    pics = sum(1 for m in models if m in PICTURE_OPTIONS and opts.pictures)
    n = 0
    if opts.wants("naive"):
        n += len(models) + pics
    if opts.wants("inprocess"):
        n += max(1, len(opts.backends)) * (len(models) + pics)
    if opts.wants("ceiling"):
        n += max(1, len(opts.backends)) * len(models)
    if opts.wants("torchserve"):
        for m in models:
            n += len(opts.triage_clients if m == "cxr-triage" else opts.clients) + len(opts.grpc_clients)
            n += (m in PICTURE_OPTIONS and opts.pictures) + (len(opts.served_batches) if m == "cxr-triage" else 0)
    if opts.wants("decode"):
        n += 3
    if opts.wants("growth"):
        n += len(opts.growth_sizes) + len(opts.growth_batches) + 1
    return n


def run_suite(opts: BenchOptions) -> dict:
    """Run every section; returns the results dict (also what the JSON holds)."""
    import torch

    progress = _Progress(opts.progress)
    device = _resolve_device(opts.device)
    env = environment(device)
    store, work = Path(opts.store), Path(opts.work)
    cache = Path(opts.cache or work / "bench-cache")
    cache.mkdir(parents=True, exist_ok=True)
    available = {p.stem: p for p in sorted(store.glob("*.mar"))}
    models = [m for m in (opts.models or MODELS) if m in available]
    missing = [m for m in (opts.models or ()) if m not in available]
    if not models:
        raise SystemExit(f"no served model to benchmark in {store} (found {sorted(available)}): run `make store`")
    checkpoints = find_checkpoints(work, opts.checkpoints)
    clock = Clock(opts.budget, opts.seconds, _count_cases(opts, models))

    progress(f"inputs ({'real data at ' + str(opts.data) if opts.data else 'phantoms'})")
    if opts.data is not None:
        inputs = real_inputs(Path(opts.data))
    else:
        inputs = phantom_inputs(cache, opts.phantom_size, PHANTOM_MODEL_SYNTAXES)
    if opts.max_inputs:
        inputs = inputs[: opts.max_inputs]
    results: dict = {
        "format": RESULTS_FORMAT, "suite": "cxrserve bench", "tag": opts.tag, "environment": env,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items() if k != "progress"},
        "gpu_measured": device == "cuda",
        "inputs": [i.describe() for i in inputs], "models": {}, "skipped_models": missing,
    }
    if device != "cuda":
        results["gpu_note"] = ("No GPU measured: " + ("this machine has none" if not torch.cuda.is_available()
                                                    else "run with --device cuda"))

    if opts.wants("decode"):
        progress("decode and preprocessing costs")
        syntax_inputs = phantom_inputs(cache, opts.phantom_size, PHANTOM_SYNTAXES)
        if opts.max_inputs:
            syntax_inputs = syntax_inputs[: opts.max_inputs]
        results["decode"] = decode_costs(
            [i for i in inputs if i.source == "real"] + syntax_inputs, clock.take())
        big = max(syntax_inputs, key=lambda i: i.megapixels)
        from .imageio import decode

        image = decode(big.data).uint8
        results["preprocess"] = {"image": f"{image.shape[1]}x{image.shape[0]}",
                                 "rows": preprocess_costs(image, clock.take())}
        results["threads"] = thread_pool_effect(inputs + syntax_inputs[:1], ("gate", "lungseg", "triage_crop"),
                                                clock.take())

    for name in models:
        model_dir = unpacked_archive(available[name], cache)
        config = model_config(model_dir)
        entry: dict = {"rows": [], "model_config": {k: config.get(k) for k in
                                                     ("batchSize", "maxBatchDelay", "minWorkers", "maxWorkers")},
                       "handler": config.get("handler", {}), "stages_ms": {}, "ceiling": {}, "notes": []}
        results["models"][name] = entry
        modes = [("scores", {})]
        if opts.pictures and name in PICTURE_OPTIONS:
            modes.append(("pictures", {PICTURE_OPTIONS[name]: True}))
        naive_scores: dict[str, dict] = {}
        if opts.wants("naive"):
            try:
                progress(f"{name}: naive baseline (eager, one image at a time)")
                naive = NaiveBaseline(name, model_dir, checkpoints, device)
                entry["naive_same_weights"] = naive.same_weights
                if not all(naive.same_weights.values()):
                    entry["notes"].append("checkpoint cards differ from the archive's: outputs may differ")
                for mode, options in modes:
                    gc.collect()
                    with Monitor() as mon:
                        summary, scores = naive_case(naive, inputs, options, n=opts.requests, seconds=clock.take())
                    naive_scores[mode] = scores
                    entry["rows"].append({"path": "naive", "mode": mode, "backend": "eager", "batch": 1,
                                          "clients": 1, **summary, **mon.report()})
                del naive
            except FileNotFoundError as err:
                entry["notes"].append(f"naive baseline skipped: {err}")
                progress(f"{name}: naive baseline skipped ({err})")
        served_backend = config.get("handler", {}).get("backend", "torchscript")
        batch = int(config.get("batchSize", 1) or 1)
        backends = opts.backends or (served_backend,)
        for backend in backends if (opts.wants("inprocess") or opts.wants("ceiling")) else ():
            try:
                folder = with_backend(model_dir, backend, checkpoints, cache)
            except FileNotFoundError as err:
                entry["notes"].append(f"{backend} skipped: {err}")
                continue
            progress(f"{name}: in-process, {backend}")
            gc.collect()
            pipeline = load_served(folder, backend, device)
            if opts.wants("inprocess"):
                for mode, options in modes:
                    gc.collect()
                    with Monitor() as mon:
                        summary, scores, stages = score_batches(pipeline, inputs, options, batch, n=opts.requests,
                                                                seconds=clock.take(), min_n=1)
                    row = {"path": "in-process", "mode": mode, "backend": backend, "batch": batch, "clients": 1,
                           **summary, **mon.report(), "max_abs_diff": max_abs_diff(naive_scores.get(mode, {}), scores)}
                    entry["rows"].append(row)
                    if mode == "scores":
                        entry["stages_ms"][backend] = stages
            if opts.wants("ceiling"):
                from .imageio import decode

                image = decode(max(inputs, key=lambda i: i.megapixels).data).uint8
                entry["ceiling"][backend] = forward_ceiling(pipeline, image, opts.ceiling_batches, clock.take(),
                                                            low_precision=(backend == "torchscript"))
            del pipeline
            gc.collect()
        entry["served_backend"] = served_backend
        entry["naive_scores"] = naive_scores

    if opts.wants("torchserve"):
        _torchserve_section(opts, results, models, available, inputs, cache, device, clock, progress)

    if opts.wants("growth"):
        _growth_section(opts, results, models, available, inputs, cache, checkpoints, device, clock, progress)

    _finish(results, opts)
    for entry in results["models"].values():
        entry.pop("naive_scores", None)
    results["environment"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    results["elapsed_s"] = round(clock.elapsed, 1)
    return results


def _torchserve_section(opts, results, models, available, inputs, cache, device, clock, progress) -> None:
    import torch

    archives: dict[str, Path] = {}
    for name in models:
        mar = available[name]
        if device == "cuda" and model_config(unpacked_archive(mar, cache)).get("deviceType") != "gpu":
            mar = variant_archive(mar, cache, name, {"deviceType": "gpu"})
        archives[name] = mar
    variants = {}
    if "cxr-triage" in models:
        base = model_config(unpacked_archive(available["cxr-triage"], cache))
        for b in opts.served_batches:
            if b != base.get("batchSize"):
                changes = {"batchSize": b, **({"deviceType": "gpu"} if device == "cuda" else {})}
                vname = f"cxr-triage-b{b}"
                archives[vname] = variant_archive(available["cxr-triage"], cache, vname, changes)
                variants[vname] = b
    workdir = Path(tempfile.mkdtemp(prefix="cxrserve-bench-ts-"))
    run = TorchServeRun(archives, workdir, gpus=torch.cuda.device_count() if device == "cuda" else 0)
    progress(f"TorchServe: starting {len(archives)} models")
    t = time.perf_counter()
    try:
        run.start()
        results["torchserve"] = {"start_s": round(time.perf_counter() - t, 1), "models": len(archives),
                                 "processes": len(run.all_pids()),
                                 "idle_rss_mb": round(sum(_rss(p) for p in run.all_pids()) / 2**20),
                                 "idle_pss_mb": round(sum(_pss(p) for p in run.all_pids()) / 2**20)}
        for name in models:
            entry = results["models"][name]
            entry["served_config"] = run.served_config(name)
            # PSS shares library pages between processes: what one more worker really costs.
            entry["worker_pss_mb"] = round(sum(_pss(p) for p in run.worker_pids(name)) / 2**20)
            naive = entry.get("naive_scores", {})
            cases = [("rest", c, "scores") for c in (opts.triage_clients if name == "cxr-triage" else opts.clients)]
            cases += [("grpc", c, "scores") for c in opts.grpc_clients]
            if opts.pictures and name in PICTURE_OPTIONS:
                cases.append(("rest", max(opts.clients), "pictures"))
            for protocol, clients, mode in cases:
                options = {PICTURE_OPTIONS[name]: True} if mode == "pictures" else {}
                progress(f"{name}: TorchServe {protocol}, {clients} client(s), {mode}")
                row, scores = served_case(run, name, inputs, options, protocol=protocol, concurrency=clients,
                                          n=max(opts.requests, 2 * clients), seconds=clock.take())
                entry["rows"].append({"path": f"torchserve-{protocol}", "mode": mode, "backend": entry["served_backend"],
                                      "batch": entry["served_config"]["batchSize"], "clients": clients, **row,
                                      "max_abs_diff": max_abs_diff(naive.get(mode, {}), scores)})
        for vname, b in variants.items():
            entry = results["models"]["cxr-triage"]
            clients = max(opts.triage_clients)
            progress(f"cxr-triage: TorchServe rest, batch size {b}, {clients} clients")
            row, scores = served_case(run, vname, inputs, {}, protocol="rest", concurrency=clients,
                                      n=max(opts.requests, 2 * clients), seconds=clock.take(), model="cxr-triage")
            entry["rows"].append({"path": "torchserve-rest", "mode": "scores", "backend": entry["served_backend"],
                                  "batch": b, "clients": clients, "variant": vname, **row,
                                  "max_abs_diff": max_abs_diff(entry.get("naive_scores", {}).get("scores", {}), scores)})
    except Exception as err:  # a server that will not start is a result to report, not a crash
        log.exception("TorchServe section failed")
        results["torchserve"] = {"error": f"{type(err).__name__}: {err}"}
    finally:
        run.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _rss(pid: int) -> int:
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


def _pss(pid: int) -> int:
    """Proportional set size (shared pages divided among the processes sharing them)."""
    import psutil

    try:
        return psutil.Process(pid).memory_full_info().pss
    except (psutil.Error, AttributeError):
        return 0


def _growth_section(opts, results, models, available, inputs, cache, checkpoints, device, clock, progress) -> None:
    growth: dict = {}
    name = "cxr-triage" if "cxr-triage" in models else models[0]
    model_dir = unpacked_archive(available[name], cache)
    backend = model_config(model_dir).get("handler", {}).get("backend", "torchscript")
    pipeline = load_served(model_dir, backend, device)
    progress(f"growth: image size and batch size ({name}, {backend})")
    growth["model"] = name
    growth["image_size"] = [growth_image_size(pipeline, cache, [s], clock.take())[0] for s in opts.growth_sizes]
    growth["batch"] = [growth_batch(pipeline, inputs, [b], clock.take())[0] for b in opts.growth_batches]
    del pipeline
    gc.collect()
    progress("growth: PXS pool size")
    dim = 1000
    if "cxr-pxs" in available:
        from .pxs import ReferencePool

        pool = ReferencePool.load(unpacked_archive(available["cxr-pxs"], cache) / "pxs")
        dim = int(pool.embeddings.shape[1])
        growth["served_pool_size"] = pool.size
    growth["pool"] = growth_pool(opts.pool_sizes, dim, clock.take(), device=device)
    clients = [r for r in results["models"].get("cxr-triage", {}).get("rows", [])
               if r["path"] == "torchserve-rest" and r["mode"] == "scores" and "variant" not in r]
    growth["clients"] = [{k: r.get(k) for k in ("clients", "throughput", "p50_ms", "p99_ms", "server_rss_peak_mb",
                                                "worker_rss_peak_mb", "server_cpu_util")} for r in clients]
    results["growth"] = growth


def _finish(results: dict, opts: BenchOptions) -> None:
    """Ratios to the naive baseline and shares of the ceiling, computed within this run."""
    for name, entry in results["models"].items():
        naive = {r["mode"]: r.get("throughput") for r in entry["rows"] if r["path"] == "naive"}
        ceilings = [c["studies_per_s"] for c in entry.get("ceiling", {}).values() if c.get("studies_per_s")]
        entry["ceiling_studies_per_s"] = max(ceilings) if ceilings else None
        for row in entry["rows"]:
            base = naive.get(row["mode"])
            row["vs_naive"] = round(row["throughput"] / base, 2) if base and row.get("throughput") else None
            ceiling = entry["ceiling_studies_per_s"]
            row["of_ceiling"] = (round(row["throughput"] / ceiling, 3)
                                 if ceiling and row.get("throughput") and row["mode"] == "scores" else None)
        stages = entry.get("stages_ms", {}).get(entry.get("served_backend")) or next(iter(entry.get("stages_ms", {}).values()), {})
        if stages:
            entry["slowest_stage"] = max(stages, key=stages.get)
        served = [r for r in entry["rows"] if r["path"].startswith("torchserve") and r["mode"] == "scores"
                  and r.get("throughput") and "variant" not in r]
        inproc = [r for r in entry["rows"] if r["path"] == "in-process" and r["mode"] == "scores" and r.get("throughput")]
        entry["best"] = {
            "torchserve": max(served, key=lambda r: r["throughput"], default=None),
            "in-process": max(inproc, key=lambda r: r["throughput"], default=None),
        }


# --------------------------------------------------------------------------- report
def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and abs(value) < 10 ** -digits:
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def markdown(results: dict) -> str:
    """The human-readable report: the main table first, then the sections behind it."""
    env = results["environment"]
    lines = [f"# cxrserve benchmark{' (' + results['tag'] + ')' if results.get('tag') else ''}", ""]
    lines.append(f"{env['created']} | {env['cpu']}, {env['cores']} cores, {env['memory_gb']} GB | "
                 f"torch {env['torch']}, onnxruntime {env['onnxruntime']}, torchserve {env['torchserve']} | "
                 f"load average {env['load_average_start'][0]} at start, "
                 f"{env.get('load_average_end', ['?'])[0]} at end | device {env['device']}"
                 + (f" ({env['gpu']})" if env.get("gpu") and env["device"] == "cuda" else "")
                 + f" | {results.get('elapsed_s', '?')} s")
    lines.append("")
    if results.get("gpu_note"):
        lines += [f"**{results['gpu_note']}.**", ""]
    kinds: dict[str, int] = {}
    for i in results["inputs"]:
        key = f"{i['format']}{' ' + i['syntax'] if i['syntax'] else ''}"
        kinds[key] = kinds.get(key, 0) + 1
    mpx = [i["megapixels"] for i in results["inputs"]]
    lines += [f"Inputs: {len(results['inputs'])} {results['inputs'][0]['source'] if results['inputs'] else ''} files "
              f"({', '.join(f'{n} {k}' for k, n in kinds.items())}), {min(mpx):.1f}-{max(mpx):.1f} Mpx, cycled. "
              "Modes: *scores* = default request; *pictures* = with the model's heatmap/saliency/overlay.", ""]
    lines += ["## Throughput and latency", "",
              "x naive: throughput / naive baseline (same mode, same run). ceiling: share of the forward passes "
              "alone at their best batch size. max diff: largest |difference| of the main scores from the naive "
              "outputs. CPU: CPU seconds per wall second (server processes for TorchServe rows). RSS: peak, MB "
              "(whole bench process in process; TorchServe frontend + all workers for TorchServe rows).", ""]
    rows = []
    for name, entry in results["models"].items():
        for r in entry["rows"]:
            cpu = r.get("server_cpu_util", r.get("cpu_util"))
            rss = r.get("server_rss_peak_mb", r.get("rss_peak_mb"))
            rows.append([name, r["path"] + (f" ({r['variant']})" if r.get("variant") else ""), r["mode"], r["backend"],
                         r["batch"], r["clients"], _fmt(r.get("throughput"), 2), _fmt(r.get("p50_ms"), 0),
                         _fmt(r.get("p99_ms"), 0), _fmt(r.get("vs_naive"), 2),
                         f"{r['of_ceiling'] * 100:.0f}%" if r.get("of_ceiling") else "-",
                         _fmt(r.get("max_abs_diff"), 6) if r["path"] != "naive" else "(ref)",
                         _fmt(cpu, 2), _fmt(rss, 0) + (f" ({r['errors']} errors)" if r.get("errors") else "")])
    lines += _table(["model", "path", "mode", "backend", "batch", "clients", "studies/s", "p50 ms", "p99 ms",
                     "x naive", "ceiling", "max diff", "CPU", "RSS MB"], rows)
    lines.append("")
    for name, entry in results["models"].items():
        for note in entry.get("notes", []):
            lines.append(f"* {name}: {note}")
    ts = results.get("torchserve", {})
    if ts.get("error"):
        lines.append(f"* TorchServe section failed: {ts['error']}")
    elif ts:
        pss = ", ".join(f"{n} {e['worker_pss_mb']}" for n, e in results["models"].items() if "worker_pss_mb" in e)
        lines.append(f"* TorchServe: {ts['models']} models in {ts['processes']} processes, ready in {ts['start_s']} s; "
                     f"idle RSS {ts['idle_rss_mb']} MB, PSS {ts['idle_pss_mb']} MB (shared library pages counted "
                     f"once); worker PSS after the run, MB: {pss}")
    lines.append("")

    ceiling_rows = []
    for name, entry in results["models"].items():
        for backend, c in entry.get("ceiling", {}).items():
            for part, p in c["components"].items():
                lp = p.get("low_precision")
                ceiling_rows.append([name, part, p["backend"], p["best_batch"], _fmt(p["ms_per_image"], 1),
                                     ", ".join(f"{b}: {v:.1f}" for b, v in p["by_batch"].items()),
                                     f"{lp['dtype']} {lp['ms_per_image']:.1f} ms (max diff {lp['max_abs_diff_first_output']:.1e})"
                                     if lp else "-"])
            ceiling_rows.append([name, "**all (per study)**", backend, "", _fmt(c["ms_per_study"], 1),
                                 f"**{_fmt(c['studies_per_s'], 2)} studies/s**", ""])
    if ceiling_rows:
        lines += ["## Ceiling: forward passes alone", "",
                  "ms per image at each batch size; the best batch size counts. Low precision is an opt-in "
                  "measurement (autocast), not what is served: it breaks the 1e-4 parity of the exported models.", ""]
        lines += _table(["model", "component", "backend", "best batch", "ms/image", "ms/image by batch",
                         "low precision"], ceiling_rows)
        lines.append("")

    stage_rows = []
    for name, entry in results["models"].items():
        for backend, stages in entry.get("stages_ms", {}).items():
            total = sum(stages.values()) or 1
            slowest = max(stages, key=stages.get) if stages else "-"
            stage_rows.append([name, backend, ", ".join(f"{k} {v:.1f}" for k, v in sorted(stages.items(), key=lambda kv: -kv[1])),
                               f"{slowest} ({stages.get(slowest, 0) / total * 100:.0f}%)"])
    if stage_rows:
        lines += ["## Stages (in process, ms per study)", ""]
        lines += _table(["model", "backend", "stages, slowest first", "slowest"], stage_rows)
        lines.append("")

    if results.get("decode"):
        lines += ["## Decode", ""]
        lines += _table(["input", "Mpx", "MB", "decode ms", "to uint8 ms", "ms/Mpx"],
                        [[d["name"], d["megapixels"], f"{d['bytes'] / 2**20:.2f}", _fmt(d["decode_ms"]),
                          _fmt(d["uint8_ms"]), _fmt(d["ms_per_megapixel"])] for d in results["decode"]])
        lines.append("")
    if results.get("preprocess"):
        lines += [f"## Preprocessing (one {results['preprocess']['image']} image)", ""]
        lines += _table(["pipeline or step", "ms"],
                        [[("`" + r["name"] + "`") if r["kind"] == "pipeline" else r["name"], _fmt(r["ms"])]
                         for r in results["preprocess"]["rows"]])
        lines.append("")
    if results.get("threads"):
        key = next(k for k in results["threads"][0] if k.startswith("threads"))
        lines += [f"## Decode + preprocess (gate, lungseg, triage_crop) of a batch of 4: serial vs {key[:-3]}", ""]
        lines += _table(["input", "Mpx", "serial ms", f"{key[:-3]} ms", "speed-up"],
                        [[t["input"], t["megapixels"], _fmt(t["serial_ms"], 0), _fmt(t[key], 0), _fmt(t["speedup"], 2)]
                         for t in results["threads"]])
        lines.append("")
    growth = results.get("growth")
    if growth:
        lines += ["## How cost grows", "", f"### Image size ({growth['model']}, in process, one study at a time)", ""]
        lines += _table(["image", "Mpx", "p50 ms", "decode ms", "RSS growth MB"],
                        [[g["size"], g["megapixels"], _fmt(g["p50_ms"], 0), _fmt(g["stages_ms"].get("decode"), 0),
                          g["rss_growth_mb"]] for g in growth["image_size"]])
        lines += ["", f"### Batch size ({growth['model']}, in process)", ""]
        lines += _table(["batch", "studies/s", "p50 ms", "RSS growth MB"],
                        [[g["batch"], _fmt(g["throughput"], 2), _fmt(g["p50_ms"], 0), g["rss_growth_mb"]]
                         for g in growth["batch"]])
        lines += ["", f"### PXS pool size (scoring {growth['pool'][0]['batch']} embeddings; "
                      f"served pool: {growth.get('served_pool_size', '-')} images)", ""]
        lines += _table(["pool size", "ms per study", "pool MB"],
                        [[g["pool_size"], _fmt(g["ms_per_study"], 3), g["pool_mb"]] for g in growth["pool"]])
        if growth.get("clients"):
            lines += ["", "### Concurrent clients (TorchServe REST, cxr-triage)", ""]
            lines += _table(["clients", "studies/s", "p50 ms", "p99 ms", "TorchServe RSS MB", "worker RSS MB", "CPU"],
                            [[g["clients"], _fmt(g["throughput"], 2), _fmt(g["p50_ms"], 0), _fmt(g["p99_ms"], 0),
                              g["server_rss_peak_mb"], g["worker_rss_peak_mb"], _fmt(g["server_cpu_util"], 2)]
                             for g in growth["clients"]])
        lines.append("")
    return "\n".join(lines)


def headline(results: dict) -> list[str]:
    """One line per model: best served throughput vs naive, and vs the ceiling."""
    out = []
    for name, entry in results["models"].items():
        naive = next((r for r in entry["rows"] if r["path"] == "naive" and r["mode"] == "scores"), None)
        for path in ("torchserve", "in-process"):
            best = entry.get("best", {}).get(path)
            if best:
                out.append(f"{name}: best {path} {best['throughput']:.2f} studies/s ({best['path']}, "
                           f"{best['backend']}, {best['clients']} client(s)) = {_fmt(best.get('vs_naive'), 2)}x naive"
                           + (f" ({naive['throughput']:.2f}/s)" if naive else "")
                           + (f", {best['of_ceiling'] * 100:.0f}% of the ceiling" if best.get("of_ceiling") else ""))
    return out


def write_results(results: dict, out: Path) -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = results["environment"]["created"].replace(":", "").replace("-", "").replace("+0000", "Z")
    stem = f"bench-{stamp}-{results['environment']['device']}" + (f"-{results['tag']}" if results.get("tag") else "")
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    md_path.write_text(markdown(results) + "\n")
    return json_path, md_path


# --------------------------------------------------------------------------- CLI
def quick(opts: BenchOptions) -> BenchOptions:
    """The smoke-test configuration: every section, a few studies each, small phantoms."""
    opts.requests, opts.seconds, opts.budget, opts.max_inputs = 2, 0.3, 90, 2
    opts.backends = ()  # each model's served backend only
    opts.clients, opts.triage_clients, opts.grpc_clients = (1,), (1,), (1,)
    opts.ceiling_batches, opts.served_batches = (1, 2), ()
    opts.growth_sizes, opts.growth_batches, opts.pool_sizes = (256,), (1, 2), (8, 32)
    opts.phantom_size = 256
    return opts


def _default_data() -> Path | None:
    env = os.environ.get("CXRSERVE_SHARED_DATA")
    root = Path(env) if env else REPO.parent / "shared" / "data"
    return root if (root / "dicom_samples").is_dir() else None


def options_from_args(args) -> BenchOptions:
    opts = BenchOptions(store=Path(args.store), work=Path(args.work), out=Path(args.out), device=args.device,
                        models=tuple(args.models or ()), tag=args.tag or "",
                        cache=Path(args.cache) if args.cache else None)
    if args.data == "none":
        opts.data = None
    elif args.data:
        opts.data = Path(args.data)
    else:
        opts.data = _default_data()
    if args.quick:
        quick(opts)
    for key in ("requests", "seconds", "budget", "phantom_size"):
        if getattr(args, key) is not None:
            setattr(opts, key, getattr(args, key))
    for key in ("backends", "clients", "triage_clients", "grpc_clients", "ceiling_batches", "served_batches",
                "growth_sizes", "growth_batches", "pool_sizes"):
        if getattr(args, key) is not None:
            setattr(opts, key, tuple(getattr(args, key)))
    opts.skip = tuple(args.skip or ())
    opts.pictures = not args.no_pictures
    from .cli import _kv

    opts.checkpoints = _kv(args.checkpoint)
    return opts


def cmd_bench(args) -> int:
    opts = options_from_args(args)
    if args.sweep:
        results = run_sweep(opts, batches=tuple(args.sweep_batches), clients=tuple(args.sweep_clients))
        out = Path(opts.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"sweep-{results['environment']['created'].replace(':', '').replace('-', '').replace('+0000', 'Z')}"
        (out / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
        text = sweep_markdown(results)
        (out / f"{stem}.md").write_text(text + "\n")
        print(text)
        print(f"\nwrote {out / stem}.json and .md")
        return 0
    results = run_suite(opts)
    json_path, md_path = write_results(results, opts.out)
    print(markdown(results))
    for line in headline(results):
        print(line)
    print(f"\nwrote {json_path} and {md_path}")
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark the served models against the naive baseline and the ceiling",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default="model_store", help="model store (.mar archives)")
    p.add_argument("--work", default="build", help="build folder beside the store (checkpoints; bench cache)")
    p.add_argument("--models", nargs="+", help=f"served models (default: those of {', '.join(MODELS)} in the store)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--data", help="real data root (default ../shared/data when present; 'none': phantoms)")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON and markdown results")
    p.add_argument("--cache", help="where exported backends, variant archives and phantom inputs are kept "
                                   "(default WORK/bench-cache)")
    p.add_argument("--quick", action="store_true", help="tiny configuration (smoke test): every section, seconds")
    p.add_argument("--requests", type=int, help="studies per case at most (default 24)")
    p.add_argument("--seconds", type=float, help="seconds per case at most (default 6)")
    p.add_argument("--budget", type=float, help="whole-run budget in seconds; cases shrink to fit (default 540)")
    p.add_argument("--backends", nargs="+", choices=["onnx", "torchscript"])
    p.add_argument("--clients", nargs="+", type=int, help="concurrent REST clients per model (default 1 4)")
    p.add_argument("--triage-clients", nargs="+", type=int, help="concurrent REST clients for cxr-triage")
    p.add_argument("--grpc-clients", nargs="+", type=int)
    p.add_argument("--ceiling-batches", nargs="+", type=int, help="batch sizes of the forward-only ceiling")
    p.add_argument("--served-batches", nargs="+", type=int, help="TorchServe batch sizes tried for cxr-triage")
    p.add_argument("--growth-sizes", nargs="+", type=int, help="image sizes (px) of the growth section")
    p.add_argument("--growth-batches", nargs="+", type=int)
    p.add_argument("--pool-sizes", nargs="+", type=int)
    p.add_argument("--phantom-size", type=int, help="phantom input size in px (default 2048)")
    p.add_argument("--no-pictures", action="store_true", help="skip the heatmap/saliency/overlay mode")
    p.add_argument("--skip", nargs="+", choices=SECTIONS, help="sections to leave out")
    p.add_argument("--checkpoint", nargs="*", help="naive baseline weights: COMPONENT=path/to/best.ckpt")
    p.add_argument("--tag", help="label for the result files")
    p.add_argument("--sweep", action="store_true",
                   help="instead: TorchServe batch size x workers per model (the numbers behind model-config.yaml)")
    p.add_argument("--sweep-batches", nargs="+", type=int, default=[1, 4, 8])
    p.add_argument("--sweep-clients", nargs="+", type=int, default=[1, 8])
    p.set_defaults(func=cmd_bench)


# --------------------------------------------------------------------------- tuning sweep
def run_sweep(opts: BenchOptions, batches: Sequence[int] = (1, 4, 8), layouts: Sequence[tuple[int, int]] = ((1, 0), (2, 1)),
              clients: Sequence[int] = (1, 8)) -> dict:
    """TorchServe batch size x worker layout per model: the numbers behind model-config.yaml.

    ``layouts`` are ``(workers, threads per worker)``; 0 threads = the libraries' default
    (every core). Each layout's variants share one TorchServe (started per model and
    layout, so idle workers of other models never hold memory).
    """
    progress = _Progress(opts.progress)
    device = _resolve_device(opts.device)
    store, cache = Path(opts.store), Path(opts.work) / "bench-cache"
    available = {p.stem: p for p in sorted(store.glob("*.mar"))}
    models = [m for m in (opts.models or MODELS) if m in available]
    inputs = real_inputs(Path(opts.data)) if opts.data else phantom_inputs(cache, opts.phantom_size,
                                                                          PHANTOM_MODEL_SYNTAXES)
    results: dict = {"format": RESULTS_FORMAT, "suite": "cxrserve bench --sweep", "tag": opts.tag,
                     "environment": environment(device), "inputs": [i.describe() for i in inputs], "sweep": []}
    for name in models:
        base = model_config(unpacked_archive(available[name], cache))
        for workers, threads in layouts:
            archives = {}
            for b in batches:
                vname = f"{name}-b{b}-w{workers}t{threads}"
                changes = {"batchSize": b, "minWorkers": workers, "maxWorkers": workers,
                           **({"deviceType": "gpu"} if device == "cuda" else {})}
                handler = {"threads": threads, "torch_threads": threads} if threads else {}
                archives[vname] = variant_archive(available[name], cache, vname, changes, handler)
            workdir = Path(tempfile.mkdtemp(prefix="cxrserve-sweep-"))
            run = TorchServeRun(archives, workdir, gpus=1 if device == "cuda" else 0)
            progress(f"{name}: {workers} worker(s) x {threads or 'all'} thread(s), batch sizes {list(batches)}")
            try:
                run.start()
                for vname, b in zip(archives, batches):
                    for c in clients:
                        row, _ = served_case(run, vname, inputs, {}, protocol="rest", concurrency=c,
                                             n=max(opts.requests, 2 * c), seconds=opts.seconds, model=name)
                        row.update({"model": name, "batch": b, "workers": workers, "threads": threads or "all",
                                    "clients": c, "maxBatchDelay": base.get("maxBatchDelay")})
                        results["sweep"].append(row)
                        progress(f"  batch {b}, {c} client(s): {row.get('throughput')} studies/s, "
                                 f"p50 {row.get('p50_ms')} ms, p99 {row.get('p99_ms')} ms")
            except Exception as err:
                log.exception("sweep %s failed", name)
                results["sweep"].append({"model": name, "workers": workers, "error": f"{type(err).__name__}: {err}"})
            finally:
                run.stop()
                shutil.rmtree(workdir, ignore_errors=True)
                for path in archives.values():
                    path.unlink(missing_ok=True)  # variants are large copies; the numbers are what stays
    results["environment"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return results


def sweep_markdown(results: dict) -> str:
    env = results["environment"]
    lines = ["# cxrserve TorchServe tuning sweep", "",
             f"{env['created']} | {env['cpu']}, {env['cores']} cores | torch {env['torch']}, onnxruntime "
             f"{env['onnxruntime']}, torchserve {env['torchserve']} | load average {env['load_average_start'][0]} "
             f"at start, {env.get('load_average_end', ['?'])[0]} at end | device {env['device']}", ""]
    rows = [[r["model"], r.get("batch", "-"), f"{r['workers']} x {r.get('threads', '-')}", r.get("clients", "-"),
             _fmt(r.get("throughput"), 2), _fmt(r.get("p50_ms"), 0), _fmt(r.get("p99_ms"), 0),
             _fmt(r.get("server_cpu_util"), 2), r.get("server_rss_peak_mb", r.get("error", "-"))]
            for r in results["sweep"]]
    lines += _table(["model", "batch", "workers x threads", "clients", "studies/s", "p50 ms", "p99 ms", "CPU",
                     "TorchServe RSS MB"], rows)
    return "\n".join(lines)
