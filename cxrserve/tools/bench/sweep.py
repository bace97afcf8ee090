"""Tuning sweep: batch sizes and worker layouts over TorchServe."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence


from cxrserve.tools.bench.archives import model_config, unpacked_archive, variant_archive
from cxrserve.tools.bench.environment import environment
from cxrserve.tools.bench.inputs import PHANTOM_MODEL_SYNTAXES, RESULTS_FORMAT, phantom_inputs, real_inputs
from cxrserve.tools.bench.report import _fmt, _table
from cxrserve.tools.bench.scores import served_names
from cxrserve.tools.bench.suite import BenchOptions, _Progress, _resolve_device
from cxrserve.tools.bench.torchserve import TorchServeRun, served_case

log = logging.getLogger(__name__)


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
    models = [m for m in (opts.models or served_names()) if m in available]
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
