"""``cxrserve bench-study``: the study model against the six-call loop (issue 11).

Rows, on the same inputs (phantom DICOMs and a PNG, see :func:`cxrserve.tools.bench.phantom_inputs`):

* **naive six-call loop**: the seeds' way, :class:`cxrserve.tools.bench.NaiveBaseline` for each of
  the six models, called one after the other, one image at a time, each decoding the
  file itself (the baseline every ratio is against);
* **six single pipelines**: cxrserve's own six served pipelines in process, called one
  after the other per study, each decoding and gating the file (what a client posting to
  six endpoints costs, minus HTTP);
* **cxr-study in process**: one :class:`~cxrserve.families.study.pipeline.StudyPipeline`, batches of
  ``--batch`` studies decoded in parallel threads, each family's network once per batch;
* optionally (``--torchserve``) both over TorchServe REST with ``--clients`` concurrent
  clients (six requests per study against one), and the PSS of one study worker beside
  the sum of the six single-model workers' PSS.

Outputs must match: the largest difference of every family's main scores (those
:func:`cxrserve.tools.bench.main_scores` compares) between each row and the naive loop is
reported. The helpers (inputs, timing, latency summaries, TorchServe runs, PSS) are
:mod:`cxrserve.tools.bench`'s; this module only adds the study rows.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

from cxrserve.tools.bench.archives import unpacked_archive
from cxrserve.tools.bench.environment import environment
from cxrserve.tools.bench.inputs import BenchInput, phantom_inputs
from cxrserve.tools.bench.measure import latency_summary, run_concurrent, run_serial
from cxrserve.tools.bench.naive import NaiveBaseline
from cxrserve.tools.bench.report import _fmt
from cxrserve.tools.bench.scores import main_scores, max_abs_diff
from cxrserve.tools.bench.suite import _pss, find_checkpoints
from cxrserve.tools.bench.torchserve import TorchServeRun

log = logging.getLogger(__name__)

STUDY = "cxr-study"
#: Pictures off on every row (the study's default): lungseg's own default is a mask PNG.
NO_PICTURES = {"cxr-lungseg": {"mask": False}}


def family_models() -> list[str]:
    from cxrserve.families.study.pipeline import family_classes

    return [f"cxr-{key}" for key in family_classes()]


def study_scores(result: dict) -> dict[str, float]:
    """Every family's main scores of one study response, keyed ``<model>:<score>``."""
    out: dict[str, float] = {}
    for key, section in (result.get("results") or {}).items():
        if "error" not in section:
            out.update({f"cxr-{key}:{k}": v for k, v in main_scores(f"cxr-{key}", section).items()})
    return out


def loop_scores(results: dict[str, dict]) -> dict[str, float]:
    return {f"{model}:{k}": v for model, r in results.items() for k, v in main_scores(model, r).items()}


def six_call_case(callers: dict, inputs: Sequence[BenchInput], *, n: int, seconds: float) -> tuple[dict, dict]:
    """Each model called on its own per study (``callers``: model -> fn(bytes, options) -> dict)."""
    scores: dict[str, dict[str, float]] = {}

    def call(i: int) -> None:
        inp = inputs[i % len(inputs)]
        results = {model: fn(inp.data, NO_PICTURES.get(model, {})) for model, fn in callers.items()}
        scores.setdefault(inp.name, loop_scores(results))

    call(0)  # warm-up
    scores.clear()
    latencies, wall, _ = run_serial(call, n=max(n, len(inputs)), seconds=seconds, min_n=len(inputs))
    return latency_summary(latencies, wall), scores


def study_case(study, inputs: Sequence[BenchInput], *, batch: int, n: int, seconds: float
               ) -> tuple[dict, dict, dict]:
    """The study in process, ``batch`` studies per call, decoded in parallel as its handler does."""
    scores: dict[str, dict[str, float]] = {}

    def call(i: int) -> int:
        chunk = [inputs[(i * batch + k) % len(inputs)] for k in range(batch)]
        for inp, result in zip(chunk, study.predict(study.make_items([({"image": inp.data}, {}) for inp in chunk]))):
            if isinstance(result, dict):
                scores.setdefault(inp.name, study_scores(result))
        return len(chunk)

    call(0)
    scores.clear()
    study.timer.reset()
    batches = max(1, -(-n // batch))
    latencies, wall, sizes = run_serial(call, n=batches, seconds=seconds, min_n=max(1, -(-len(inputs) // batch)))
    studies = sum(sizes)
    stages = {k: round(v * 1000 / studies, 2) for k, v in study.timer.reset().items()}
    return (latency_summary([t for t, s in zip(latencies, sizes) for _ in range(s)], wall, studies),
            scores, stages)


def _row(name: str, summary: dict, scores: dict, reference: dict, baseline: dict | None) -> dict:
    row = {"case": name, **summary, "max_abs_diff_vs_naive": max_abs_diff(reference, scores)}
    if baseline and baseline.get("throughput") and summary.get("throughput"):
        row["ratio_vs_naive"] = round(summary["throughput"] / baseline["throughput"], 2)
    return row


def served_rows(archives: dict[str, Path], inputs, workdir: Path, *, clients: Sequence[int], n: int,
                seconds: float, reference: dict, baseline: dict, progress) -> tuple[list[dict], dict]:
    """TorchServe REST: the six endpoints per study vs one cxr-study request; worker PSS."""
    run = TorchServeRun(archives, workdir)
    progress(f"TorchServe: starting {len(archives)} models")
    run.start()
    rows, memory = [], {}
    try:
        pss = {name: sum(_pss(pid) for pid in run.worker_pids(name)) for name in archives}
        singles = [m for m in archives if m != STUDY]
        memory = {"study_worker_pss_mib": round(pss.get(STUDY, 0) / 2**20, 1),
                  "six_workers_pss_mib": round(sum(pss[m] for m in singles) / 2**20, 1),
                  "per_worker_pss_mib": {k: round(v / 2**20, 1) for k, v in pss.items()}}
        if memory["study_worker_pss_mib"]:
            memory["ratio"] = round(memory["six_workers_pss_mib"] / memory["study_worker_pss_mib"], 2)
        client = run.client("rest")
        for c in clients:
            def six(i: int) -> dict:
                inp = inputs[i % len(inputs)]
                return loop_scores({m: client.predict(m, inp.data, options=NO_PICTURES.get(m, {})) for m in singles})

            def one(i: int) -> dict:
                return study_scores(client.predict(STUDY, inputs[i % len(inputs)].data))

            for label, fn in (("six REST calls per study", six), ("cxr-study over REST", one)):
                progress(f"TorchServe REST, {c} clients: {label}")
                fn(0)
                lat, wall, results, failures = run_concurrent(fn, n=n, seconds=seconds, concurrency=c,
                                                                min_n=len(inputs))
                scores = {inputs[i % len(inputs)].name: r for i, r in enumerate(results) if r}
                row = _row(f"{label}, {c} clients", latency_summary(lat, wall), scores, reference, baseline)
                row["failures"] = failures
                rows.append(row)
            six_row, study_row = rows[-2], rows[-1]
            if six_row.get("throughput") and study_row.get("throughput"):
                study_row["ratio_vs_six_rest"] = round(study_row["throughput"] / six_row["throughput"], 2)
    finally:
        run.stop()
    return rows, memory


def run_study_bench(store: Path, work: Path, *, cache: Path | None = None, size: int = 1024,
                    syntaxes: Sequence[str] = ("explicit_le", "jpeg_lossless"), batch: int = 4, n: int = 24,
                    seconds: float = 20.0, threads: int = 2, torchserve: bool = False,
                    clients: Sequence[int] = (4,), in_process: bool = True, progress=print) -> dict:
    import torch

    from cxrserve.core.loading import load_pipeline

    torch.set_num_threads(threads)
    cache = Path(cache or Path(work) / "bench-cache")
    models = family_models()
    mars = {m: Path(store) / f"{m}.mar" for m in [*models, STUDY]}
    missing = [m for m, p in mars.items() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{missing} not in {store}: run `make store`")
    dirs = {m: unpacked_archive(p, cache) for m, p in mars.items()}
    inputs = phantom_inputs(cache, size, syntaxes)
    checkpoints = find_checkpoints(Path(work), {})
    results: dict = {"environment": environment("cpu"), "threads": threads, "batch": batch,
                     "inputs": [i.describe() for i in inputs], "rows": []}
    results["environment"]["load_before"] = list(__import__("os").getloadavg())

    progress("naive six-call loop (eager, one image at a time, each model decodes)")
    naive = {m: NaiveBaseline(m, dirs[m], checkpoints) for m in models}
    base, reference = six_call_case({m: nv.predict for m, nv in naive.items()}, inputs,
                                    n=n if in_process else len(inputs), seconds=seconds if in_process else 0)
    results["rows"].append(_row("naive six-call loop", base, reference, reference, base))
    del naive
    if not in_process:
        return _served(results, mars, inputs, cache, clients, n, seconds, reference, base, progress)

    progress("six cxrserve pipelines, called one after the other")
    singles = {m: load_pipeline(dirs[m], device="cpu") for m in models}
    summary, scores = six_call_case({m: p.predict_bytes for m, p in singles.items()}, inputs, n=n, seconds=seconds)
    results["rows"].append(_row("six single pipelines in process", summary, scores, reference, base))
    del singles

    progress(f"cxr-study in process, batches of {batch} and of 1")
    study = load_pipeline(dirs[STUDY], device="cpu")
    for b in sorted({1, batch}):
        summary, scores, stages = study_case(study, inputs, batch=b, n=n, seconds=seconds)
        row = _row(f"cxr-study in process, batch {b}", summary, scores, reference, base)
        row["stages_ms_per_study"] = stages
        results["rows"].append(row)
    del study
    if torchserve:
        return _served(results, mars, inputs, cache, clients, n, seconds, reference, base, progress)
    results["environment"]["load_after"] = list(__import__("os").getloadavg())
    return results


def _served(results, mars, inputs, cache, clients, n, seconds, reference, base, progress) -> dict:
    rows, memory = served_rows(mars, inputs, cache / "torchserve-study", clients=clients, n=n,
                               seconds=seconds, reference=reference, baseline=base, progress=progress)
    results["rows"].extend(rows)
    results["memory"] = memory
    results["environment"]["load_after"] = list(__import__("os").getloadavg())
    return results


def suite_section(store: Path, work: Path, *, cache: Path, size: int, n: int, seconds: float, torchserve: bool,
                  clients: Sequence[int], progress=print) -> dict:
    """``cxrserve bench``'s study row (every section of :func:`run_study_bench`) and its headline line."""
    results = run_study_bench(store, work, cache=cache, size=size, n=n, seconds=seconds, torchserve=torchserve,
                              clients=clients, progress=progress)
    naive = results["rows"][0].get("throughput")
    best = max((r for r in results["rows"] if r["case"].startswith(f"{STUDY} in process")),
               key=lambda r: r.get("throughput") or 0, default=None)
    if naive and best and best.get("throughput"):
        results["headline"] = (f"study: {best['throughput']:.2f} studies/s vs naive {naive:.2f} studies/s "
                               f"({best['throughput'] / naive:.2f}x)")
    results["markdown"] = markdown(results)
    return results


def markdown(results: dict) -> str:
    lines = [f"cxr-study vs the six-call loop, {results['threads']} torch threads, "
             f"{len(results['inputs'])} inputs ({', '.join(i['name'] for i in results['inputs'])})", "",
             "| case | studies/s | p50 ms | p99 ms | x naive | max abs diff vs naive |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        diff = r.get("max_abs_diff_vs_naive")
        lines.append(f"| {r['case']} | {_fmt(r.get('throughput'), 2)} | {_fmt(r.get('p50_ms'))} | "
                     f"{_fmt(r.get('p99_ms'))} | {_fmt(r.get('ratio_vs_naive'), 2)} | "
                     f"{'-' if diff is None else f'{diff:.1e}'} |")
    memory = results.get("memory")
    if memory:
        lines += ["", f"Worker memory (PSS): one cxr-study worker {memory['study_worker_pss_mib']} MiB, "
                      f"the six single-model workers {memory['six_workers_pss_mib']} MiB together "
                      f"({memory.get('ratio', '-')}x)."]
    return "\n".join(lines) + "\n"


def cmd_bench_study(args) -> int:
    logging.basicConfig(level=logging.WARNING)
    results = run_study_bench(Path(args.store), Path(args.work), cache=args.cache and Path(args.cache),
                              size=args.size, batch=args.batch, n=args.requests, seconds=args.seconds,
                              threads=args.threads, torchserve=args.torchserve or args.served_only,
                              clients=tuple(args.clients), in_process=not args.served_only)
    text = markdown(results)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        (out / f"study-{stamp}.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / f"study-{stamp}.md").write_text(text)
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("bench-study", help="benchmark cxr-study against the six-call loop")
    p.add_argument("--store", default="model_store")
    p.add_argument("--work", default="build", help="holds checkpoints/ (naive baseline) and the bench cache")
    p.add_argument("--cache", help="unpacked archives and phantom inputs (default <work>/bench-cache)")
    p.add_argument("--size", type=int, default=1024, help="phantom size in pixels")
    p.add_argument("--batch", type=int, default=4, help="studies per in-process study batch")
    p.add_argument("--requests", type=int, default=24, help="studies per case (at most)")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds per case (at most)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in process (2 = a 2-core machine)")
    p.add_argument("--torchserve", action="store_true", help="also over TorchServe REST, with worker PSS")
    p.add_argument("--clients", type=int, nargs="+", default=[4], help="concurrent REST clients")
    p.add_argument("--served-only", action="store_true",
                   help="only TorchServe and PSS (the naive loop still runs once per input, for the outputs check)")
    p.add_argument("--out", default="benchmarks/results", help="where JSON and markdown go ('' to skip)")
    p.set_defaults(func=cmd_bench_study)
