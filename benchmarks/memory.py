"""The whole store's memory (PSS) under TorchServe, per ONNX Runtime memory policy.

    PYTHONPATH=$PWD python benchmarks/memory.py [--store /work/main/model_store]
        [--modes main arena lean shared] [--workers forked separate] [--vmargs FLAGS ...]
        [--out benchmarks/results/memory-....json]

For each mode one private TorchServe (free loopback ports) loads every archive of the
store, one worker each; every model then answers 8 requests (4 in flight, so batches of
up to 4 form) on a 2048 x 2048 JPEG-baseline phantom DICOM and a 2048-px PNG; PSS
(proportional set size: shared library pages counted once) is summed over the frontend
and every worker, after loading and after the requests; then cxr-triage's REST
throughput with 8 in flight (``--requests`` requests) checks the policy costs no speed.
Each mode runs with workers forked from cxrserve's fork server (``forked``, what ``cxrserve
serve start`` does) and started by TorchServe as separate interpreters (``separate``), and
with each ``--vmargs`` line for the Java frontend (default: ``config.properties`` as it is).

Modes: ``arena`` / ``lean`` / ``shared`` serve copies of the store's archives whose
bundled ``cxrserve`` package is this checkout's (same weights, same model config) with
``handler: ort_memory`` set (:func:`cxrserve.core.runtime.ort_session_options`); ``main``
serves the store's archives as built (their bundled code: full-resolution decode, ONNX
Runtime defaults), for the before figure.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cxrserve.tools.bench.inputs import phantom_inputs  # noqa: E402
from cxrserve.tools.bench.measure import run_concurrent  # noqa: E402
from cxrserve.tools.bench.suite import _pss  # noqa: E402
from cxrserve.tools.bench.torchserve import TorchServeRun  # noqa: E402
from cxrserve.tools.server import read_properties  # noqa: E402


def total_pss_mb(run: TorchServeRun) -> float:
    return round(sum(_pss(p) for p in run.all_pids()) / 2**20, 1)


def branch_archive(mar: Path, folder: Path, handler_changes: dict) -> Path:
    """``mar`` with its bundled ``cxrserve/`` replaced by this checkout's and ``handler`` updated."""
    import zipfile

    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / mar.name
    package = ROOT / "cxrserve"
    with zipfile.ZipFile(mar) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as dst:
        manifest = json.loads(src.read("MAR-INF/MANIFEST.json"))
        config_name = manifest["model"].get("configFile", "model-config.yaml")
        for info in src.infolist():
            if info.filename.startswith("cxrserve/"):
                continue
            data = src.read(info.filename)
            if info.filename == config_name:
                config = yaml.safe_load(data) or {}
                config["handler"] = {**config.get("handler", {}), **handler_changes}
                data = yaml.safe_dump(config, sort_keys=False).encode()
            dst.writestr(info.filename, data)
        for path in sorted(package.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                dst.writestr(f"cxrserve/{path.relative_to(package)}", path.read_bytes())
    return target


def measure(mode: str, archives: dict[str, Path], inputs, requests: int, work: Path, workers: str = "forked",
            vmargs: str | None = None, run_name: str = "ts") -> dict:
    if mode != "main":
        archives = {name: branch_archive(mar, work / f"store-{mode}", {"ort_memory": mode})
                    for name, mar in archives.items()}
    # vmargs None: the repository's config.properties as it is; "" or flags: that JVM line instead
    config = {} if vmargs is None else {"vmargs": vmargs}
    run = TorchServeRun(archives, work / run_name, config=config)
    row: dict = {"mode": mode, "workers": workers,
                 "vmargs": vmargs if vmargs is not None else read_properties(ROOT / "config.properties").get("vmargs", "")}
    try:
        start = time.perf_counter()
        # forked: every worker from cxrserve's fork server (the default); separate: TorchServe's own start
        os.environ["CXRSERVE_FORKSERVER"] = "1" if workers == "forked" else "0"
        run.start()
        row["start_s"] = round(time.perf_counter() - start, 1)
        time.sleep(3)
        row["pss_loaded_mb"] = total_pss_mb(run)
        client = run.client("rest")
        for name in archives:
            calls = lambda i, name=name: client.predict(name, inputs[i % len(inputs)].data)  # noqa: E731
            run_concurrent(calls, n=8, seconds=600, concurrency=4)
        row["pss_after_requests_mb"] = total_pss_mb(run)
        row["worker_pss_mb"] = {name: round(sum(_pss(p) for p in run.worker_pids(name)) / 2**20, 1)
                                for name in archives}
        if "cxr-triage" in archives:
            calls = lambda i: client.predict("cxr-triage", inputs[i % len(inputs)].data)  # noqa: E731
            latencies, wall, _, failures = run_concurrent(calls, n=requests, seconds=900, concurrency=8)
            row["triage_rest_studies_per_s"] = round(len(latencies) / wall, 3)
            row["triage_failures"] = failures
        row["pss_end_mb"] = total_pss_mb(run)
        row["frontend_pss_mb"] = round(_pss(run.server_pid()) / 2**20, 1)
        client.close()
    finally:
        run.stop()
    print(f"  {mode:7s} {workers:8s} vmargs {row['vmargs']!r}: frontend {row.get('frontend_pss_mb')} MB, PSS loaded {row.get('pss_loaded_mb')} MB, after requests {row.get('pss_after_requests_mb')} MB, "
          f"triage REST {row.get('triage_rest_studies_per_s')} studies/s; workers {row.get('worker_pss_mb')}", flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default=os.environ.get("CXRSERVE_STORE", "model_store"))
    parser.add_argument("--modes", nargs="+", default=["main", "arena", "lean", "shared"])
    parser.add_argument("--workers", nargs="+", choices=("forked", "separate"), default=["forked", "separate"],
                        help="how TorchServe's workers start: from the fork server, or each its own interpreter")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--vmargs", nargs="+", metavar="FLAGS",
                        help="the frontend's JVM flags to compare (each one run; '' is the JVM's defaults); "
                             "default: config.properties as it is")
    parser.add_argument("--out")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cxrserve-memory-"))
    archives = {p.stem: p for p in sorted(Path(args.store).glob("cxr-*.mar"))}
    inputs = phantom_inputs(ROOT / "build" / "bench-cache", 2048, ("jpeg_baseline",), png=True)
    result = {"archives": sorted(archives), "load_average_start": os.getloadavg(), "modes": []}
    print(f"{len(archives)} archives: {', '.join(archives)}")
    runs = [(mode, workers, vmargs) for mode in args.modes for workers in args.workers for vmargs in args.vmargs or [None]]
    try:
        for k, (mode, workers, vmargs) in enumerate(runs):
            result["modes"].append(measure(mode, archives, inputs, args.requests, work, workers, vmargs, f"ts-{k}"))
    finally:
        shutil.rmtree(work, ignore_errors=True)  # archive copies and TorchServe run folders: GBs
    result["load_average_end"] = os.getloadavg()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
