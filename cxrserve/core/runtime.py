"""Inference backends behind one call: tensor batch in, tuple of numpy arrays out.

* ``torchscript``: ``torch.jit.load`` on the worker's device (CPU or CUDA).
* ``onnx``: ONNX Runtime; the CUDA provider is asked for only when the worker has a
  GPU (asking on a CPU machine fails loudly), with the CPU provider as fallback.
* ``eager``: a ``torch.nn.Module`` in memory (training, evaluation, tests).

Handlers pick the backend from ``model-config.yaml`` (``backend:``), so an ops team can
switch a model between TorchScript and ONNX Runtime without rebuilding code.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

BACKEND_FILES = {"torchscript": "model.pt", "onnx": "model.onnx"}


def cpu_has_bf16() -> bool:
    """True when this CPU has native bf16 arithmetic (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """bf16 where the hardware runs it natively (training speed), else None (fp32)."""
    if precision == "fp32":
        return None
    if precision == "bf16" or (precision == "auto" and (device.type == "cuda" or cpu_has_bf16())):
        return torch.bfloat16
    return None


def pick_device(gpu_id: int | None = None, want: str = "auto") -> torch.device:
    """CUDA device ``gpu_id`` when asked for and present, else CPU."""
    if want == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(f"cuda:{gpu_id or 0}")


class Runtime:
    """Callable ``runtime(batch) -> tuple[np.ndarray, ...]``."""

    backend = "base"
    device: torch.device

    def __call__(self, batch: torch.Tensor) -> tuple[np.ndarray, ...]:
        raise NotImplementedError

    def run_chunked(self, inputs: Sequence[torch.Tensor], max_batch: int = 16) -> list[tuple[np.ndarray, ...]]:
        """Stack per-item tensors, run in chunks of ``max_batch``, split back per item."""
        results: list[tuple[np.ndarray, ...]] = []
        for start in range(0, len(inputs), max_batch):
            outs = self(torch.stack(list(inputs[start : start + max_batch])))
            for i in range(len(inputs[start : start + max_batch])):
                results.append(tuple(o[i] for o in outs))
        return results


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


class TorchRuntime(Runtime):
    """Eager module or TorchScript program; both run under ``inference_mode``."""

    def __init__(self, module: torch.nn.Module, device: torch.device, backend: str = "eager"):
        self.module = module.to(device).eval()
        self.device = device
        self.backend = backend

    def __call__(self, batch: torch.Tensor) -> tuple[np.ndarray, ...]:
        with torch.inference_mode():
            outs = _as_tuple(self.module(batch.to(self.device, non_blocking=True)))
        return tuple(o.float().cpu().numpy() for o in outs)


#: ONNX Runtime CPU memory policy (``handler: ort_memory`` in the model config, or env
#: ``CXRSERVE_ORT_MEMORY`` which wins), measured in
#: docs/PERFORMANCE.md (benchmarks/memory.py): ``arena`` (ONNX Runtime's default: a
#: growing arena per session plus memory patterns cached per input shape), ``lean``
#: (no arena, no memory patterns, initializers allocated once outside any arena) or
#: ``shared`` (one arena for every session of the process, ``session.use_env_allocators``).
#: ``lean`` is the default: the whole store under TorchServe 4.60 -> 4.28 GB PSS after
#: serving (``shared`` 4.75), ONNX forward passes within +-4 % of ``arena``.
ORT_MEMORY_DEFAULT = "lean"
_shared_allocator_registered = False


def ort_session_options(threads: int = 0, memory: str | None = None):
    """SessionOptions for a CPU session under the memory policy ``memory`` (see above)."""
    import os

    import onnxruntime as ort

    global _shared_allocator_registered
    memory = (os.environ.get("CXRSERVE_ORT_MEMORY") or memory or ORT_MEMORY_DEFAULT).strip().lower()
    if memory not in ("arena", "lean", "shared"):
        raise ValueError(f"CXRSERVE_ORT_MEMORY={memory!r}: choose arena, lean or shared")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if memory == "lean":
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
        options.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
    elif memory == "shared":
        if not _shared_allocator_registered:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            # kNextPowerOfTwo growth off (arena_extend_strategy 1: only what is asked for)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))
            _shared_allocator_registered = True
        options.add_session_config_entry("session.use_env_allocators", "1")
    return options


class OnnxRuntime(Runtime):
    backend = "onnx"

    def __init__(self, path: str | Path, device: torch.device, threads: int = 0, memory: str | None = None):
        import onnxruntime as ort

        options = ort_session_options(threads, memory)
        providers: list = ["CPUExecutionProvider"]
        if device.type == "cuda":
            try:
                ort.preload_dlls()  # finds the CUDA/cuDNN libraries pip installed
            except Exception as err:  # older ORT or unusual layouts: the provider may still load
                log.info("onnxruntime.preload_dlls failed: %s", err)
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self.device = device if "CUDAExecutionProvider" in self.session.get_providers() else torch.device("cpu")
        if device.type == "cuda" and self.device.type == "cpu":
            log.warning("ONNX Runtime CUDA provider unavailable; running %s on CPU", path)
        self.input_name = self.session.get_inputs()[0].name

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def __call__(self, batch: torch.Tensor) -> tuple[np.ndarray, ...]:
        return tuple(self.session.run(None, {self.input_name: batch.detach().cpu().numpy()}))


def load_torchscript(path: str | Path, device: torch.device) -> torch.jit.ScriptModule:
    """``torch.jit.load`` onto ``device``; on CUDA with the JIT's optimising executor off.

    On an H100 (torch 2.11) the exported severity DenseNet121 ran its first CUDA call in
    0.9 s and did not return from its second within 60 s; with the optimising graph
    executor off (as ``torch.jit.optimized_execution(False)``) every call took about 9 ms.
    The switch is process-wide, so it is flipped only when a program is loaded onto a
    GPU; CPU serving is untouched.
    """
    if device.type == "cuda" and torch._C._get_graph_executor_optimize():
        log.info("TorchScript on CUDA: graph-executor optimisation off (it stalled on GPU)")
        torch._C._set_graph_executor_optimize(False)
    return torch.jit.load(str(path), map_location=device)


def load_runtime(model_dir: str | Path, backend: str, device: torch.device, threads: int = 0,
                 ort_memory: str | None = None) -> Runtime:
    """Load ``model.pt`` (TorchScript) or ``model.onnx`` from ``model_dir``."""
    model_dir = Path(model_dir)
    if backend not in BACKEND_FILES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {sorted(BACKEND_FILES)}")
    path = model_dir / BACKEND_FILES[backend]
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: build the archive with `cxrserve export`")
    if backend == "onnx":
        return OnnxRuntime(path, device, threads, ort_memory)
    return TorchRuntime(load_torchscript(path, device), device, "torchscript")
