"""The whole suite: options, sections, the run."""
from __future__ import annotations

import gc
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence


from cxrserve.tools.bench.archives import model_config, unpacked_archive, variant_archive, with_backend
from cxrserve.tools.bench.cases import forward_ceiling, load_served, naive_case, score_batches
from cxrserve.tools.bench.costs import decode_costs, growth_batch, growth_image_size, preprocess_costs, thread_pool_effect
from cxrserve.tools.bench.environment import environment
from cxrserve.tools.bench.inputs import PHANTOM_MODEL_SYNTAXES, PHANTOM_SYNTAXES, RESULTS_FORMAT, phantom_inputs, real_inputs
from cxrserve.tools.bench.measure import Clock, Monitor
from cxrserve.tools.bench.naive import NaiveBaseline
from cxrserve.tools.bench.scores import max_abs_diff, picture_option, served_names
from cxrserve.tools.bench.torchserve import TorchServeRun, served_case

log = logging.getLogger(__name__)


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
    lead_clients: tuple[int, ...] = (1, 2, 4, 8, 16)
    grpc_clients: tuple[int, ...] = (4,)
    ceiling_batches: tuple[int, ...] = (1, 4, 8)
    served_batches: tuple[int, ...] = (1, 8)  # sweep-model variants besides the store's own
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


SECTIONS = ("decode", "naive", "inprocess", "ceiling", "torchserve", "growth", "study")


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
    pics = sum(1 for m in models if picture_option(m) and opts.pictures)
    n = 0
    if opts.wants("naive"):
        n += len(models) + pics
    if opts.wants("inprocess"):
        n += max(1, len(opts.backends)) * (len(models) + pics)
    if opts.wants("ceiling"):
        n += max(1, len(opts.backends)) * len(models)
    if opts.wants("torchserve"):
        for m in models:
            n += len(opts.lead_clients if m == models[0] else opts.clients) + len(opts.grpc_clients)
            n += bool(picture_option(m) and opts.pictures) + (len(opts.served_batches) if m == models[0] else 0)
    if opts.wants("decode"):
        n += 3
    if opts.wants("growth"):
        n += len(opts.growth_sizes) + len(opts.growth_batches) + 1
    return n


def archive_preprocessing(model_dir: Path) -> tuple[str, ...]:
    """The preprocessing pipelines an unpacked archive's components run (from their cards), each once."""
    import json

    names = (json.loads(card.read_text()).get("preprocessing") for card in sorted(model_dir.glob("*/metadata.json")))
    return tuple(dict.fromkeys(n for n in names if n))


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
    models = [m for m in (opts.models or served_names()) if m in available and m in served_names()]
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
        "sweep_model": models[0],
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
        from cxrserve.core.imageio import decode

        image = decode(big.data).uint8
        results["preprocess"] = {"image": f"{image.shape[1]}x{image.shape[0]}",
                                 "rows": preprocess_costs(image, clock.take())}
        # the preprocessing the first model's components run (a composed model: every component's)
        steps = archive_preprocessing(unpacked_archive(available[models[0]], cache))
        results["threads_preprocessing"] = list(steps)
        results["threads"] = thread_pool_effect(inputs + syntax_inputs[:1], steps, clock.take())

    for name in models:
        model_dir = unpacked_archive(available[name], cache)
        config = model_config(model_dir)
        entry: dict = {"rows": [], "model_config": {k: config.get(k) for k in
                                                     ("batchSize", "maxBatchDelay", "minWorkers", "maxWorkers")},
                       "handler": config.get("handler", {}), "stages_ms": {}, "ceiling": {}, "notes": []}
        results["models"][name] = entry
        modes = [("scores", {})]
        if opts.pictures and picture_option(name):
            modes.append(("pictures", {picture_option(name): True}))
        naive_scores: dict[str, dict] = {}
        if opts.wants("naive"):
            try:
                progress(f"{name}: naive baseline (eager, one image at a time)")
                for mode, options in modes:
                    naive = NaiveBaseline(name, model_dir, checkpoints, device, pictures=mode == "pictures")
                    entry["naive_same_weights"] = naive.same_weights
                    if not all(naive.same_weights.values()):
                        entry["notes"].append("checkpoint cards differ from the archive's: outputs may differ")
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
                from cxrserve.core.imageio import decode

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

    if opts.wants("study"):
        _composed_section(opts, results, available, cache, progress)

    _finish(results, opts)
    for entry in results["models"].values():
        entry.pop("naive_scores", None)
    results["environment"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    results["elapsed_s"] = round(clock.elapsed, 1)
    return results


def _composed_section(opts, results, available, cache, progress) -> None:
    """Each composed model (cxr-study) against the naive loop over the models it composes (its own hook)."""
    from cxrserve import families
    from cxrserve.core.family import import_object

    for name, (_, served) in families.served().items():
        if not (served.compose and served.bench_suite and name in available) or (opts.models and name not in opts.models):
            continue
        progress(f"{name}: against the naive loop over every model it composes")
        quick = opts.requests <= 4
        results.setdefault("composed", {})[name] = import_object(served.bench_suite)(
            opts.store, opts.work, cache=cache / "composed", size=min(opts.phantom_size, 1024),
            n=max(opts.requests, 4), seconds=max(opts.seconds, 2.0), torchserve=opts.wants("torchserve") and not quick,
            clients=(4,) if quick else (4, 16), progress=progress)


def _torchserve_section(opts, results, models, available, inputs, cache, device, clock, progress) -> None:
    import torch

    archives: dict[str, Path] = {}
    for name in models:
        mar = available[name]
        if device == "cuda" and model_config(unpacked_archive(mar, cache)).get("deviceType") != "gpu":
            mar = variant_archive(mar, cache, name, {"deviceType": "gpu"})
        archives[name] = mar
    variants = {}
    sweep = models[0]  # batch sizes and client counts are swept on the first model
    if sweep:
        base = model_config(unpacked_archive(available[sweep], cache))
        for b in opts.served_batches:
            if b != base.get("batchSize"):
                changes = {"batchSize": b, **({"deviceType": "gpu"} if device == "cuda" else {})}
                vname = f"{sweep}-b{b}"
                archives[vname] = variant_archive(available[sweep], cache, vname, changes)
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
            cases = [("rest", c, "scores") for c in (opts.lead_clients if name == sweep else opts.clients)]
            cases += [("grpc", c, "scores") for c in opts.grpc_clients]
            if opts.pictures and picture_option(name):
                cases.append(("rest", max(opts.clients), "pictures"))
            for protocol, clients, mode in cases:
                options = {picture_option(name): True} if mode == "pictures" else {}
                progress(f"{name}: TorchServe {protocol}, {clients} client(s), {mode}")
                row, scores = served_case(run, name, inputs, options, protocol=protocol, concurrency=clients,
                                          n=max(opts.requests, 2 * clients), seconds=clock.take())
                entry["rows"].append({"path": f"torchserve-{protocol}", "mode": mode, "backend": entry["served_backend"],
                                      "batch": entry["served_config"]["batchSize"], "clients": clients, **row,
                                      "max_abs_diff": max_abs_diff(naive.get(mode, {}), scores)})
        for vname, b in variants.items():
            entry = results["models"][sweep]
            clients = max(opts.lead_clients)
            progress(f"{sweep}: TorchServe rest, batch size {b}, {clients} clients")
            row, scores = served_case(run, vname, inputs, {}, protocol="rest", concurrency=clients,
                                      n=max(opts.requests, 2 * clients), seconds=clock.take(), model=sweep)
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
    name = models[0]
    model_dir = unpacked_archive(available[name], cache)
    backend = model_config(model_dir).get("handler", {}).get("backend", "torchscript")
    pipeline = load_served(model_dir, backend, device)
    progress(f"growth: image size and batch size ({name}, {backend})")
    growth["model"] = name
    growth["image_size"] = [growth_image_size(pipeline, cache, [s], clock.take())[0] for s in opts.growth_sizes]
    growth["batch"] = [growth_batch(pipeline, inputs, [b], clock.take())[0] for b in opts.growth_batches]
    del pipeline
    gc.collect()
    from cxrserve import families
    from cxrserve.core.family import import_object

    for other in models:
        measure = families.get_served(other)[1].bench_growth
        if measure:
            progress(f"growth: {other}")
            growth.update(import_object(measure)(unpacked_archive(available[other], cache), opts.pool_sizes,
                                                 clock.take(), device))
    clients = [r for r in results["models"].get(models[0], {}).get("rows", [])
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
