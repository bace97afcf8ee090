"""The machine a benchmark ran on: CPU, cores, libraries, load."""
from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import subprocess
from pathlib import Path

import numpy as np

from cxrserve.tools.bench.inputs import REPO

log = logging.getLogger(__name__)


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

    from cxrserve.core.runtime import cpu_has_bf16

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
