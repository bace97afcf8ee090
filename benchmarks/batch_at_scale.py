"""``cxrserve batch`` at scale against the server's own best REST throughput.

    PYTHONPATH=$PWD python benchmarks/batch_at_scale.py [--store /work/main/model_store]
        [--model cxr-triage] [--files 1000] [--out benchmarks/results/batch-....json]

One private TorchServe (free loopback ports, own run folder) serves ``--model`` from
``--store``. In that one session:

1. the server's best REST throughput: closed-loop clients (``cxrserve.tools.bench.served_case``,
   the bench's REST load generator) at 4, 8 and 16 in flight over the same files; the best
   of the three is the reference;
2. ``cxrserve batch`` (a subprocess, so its own peak RSS is measured) over ``--files``
   small phantom files (half 256-px PNGs, half DICOMs with distinct SOP instances), with
   its default ``--concurrency``, and over a tenth of them, to show memory stays flat;
3. the ratio batch / best REST throughput.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cxrserve.tools.bench.inputs import BenchInput  # noqa: E402
from cxrserve.tools.bench.torchserve import TorchServeRun, served_case  # noqa: E402


def make_files(folder: Path, n: int, distinct: int = 40) -> list[Path]:
    from cxrserve.synthetic.dicomwrite import to_dicom
    from cxrserve.synthetic.phantoms import render, sample_spec

    folder.mkdir(parents=True, exist_ok=True)
    images = [render(sample_spec(9000 + i, kind="frontal", height=256, width=256)).image for i in range(distinct)]
    files = []
    for i in range(n):
        img = images[i % distinct]
        if i % 2 == 0:
            path = folder / f"study_{i:05d}.png"
            cv2.imwrite(str(path), img)
        else:
            path = folder / f"study_{i:05d}.dcm"
            path.write_bytes(to_dicom(img, tags={"SOPInstanceUID": f"1.2.826.0.1.3680043.8.498.77.{i}"}))
        files.append(path)
    return files


def run_batch_process(files: list[Path], out: Path, run: TorchServeRun, model: str, extra: list[str]) -> dict:
    listing = out.with_suffix(".inputs.csv")
    listing.write_text("path\n" + "".join(f"{p}\n" for p in files))
    cmd = [sys.executable, "-m", "cxrserve", "batch", str(listing), "--model", model, "--out", str(out),
           "--url", run.inference, "--key-file", str(run.workdir / "key_file.json"), "--no-progress",
           "--overwrite", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env={**os.environ})
    wall = time.perf_counter() - start
    summary = json.loads(Path(str(out) + ".summary.json").read_text())
    rows = sum(1 for _ in open(out)) - 1
    return {"files": len(files), "rows": rows, "returncode": proc.returncode, "wall_s": round(wall, 2),
            **summary, "stdout_tail": proc.stdout.strip().splitlines()[-3:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default=os.environ.get("CXRSERVE_STORE", "model_store"))
    parser.add_argument("--model", default="cxr-triage")
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--rest-requests", type=int, default=240, help="requests per REST concurrency level")
    parser.add_argument("--levels", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--batch-concurrency", type=int, nargs="*", default=[],
                        help="also run batch with these --concurrency values")
    parser.add_argument("--out")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cxrserve-batchscale-"))
    files = make_files(work / "files", args.files)
    inputs = [BenchInput(f"f{i}", "png" if p.suffix == ".png" else "dicom", "", 256, 256, "phantom", p.read_bytes())
              for i, p in enumerate(files[:40])]
    run = TorchServeRun({args.model: Path(args.store) / f"{args.model}.mar"}, work / "ts")
    result: dict = {"model": args.model, "load_average_start": os.getloadavg()}
    run.start()
    try:
        print(f"TorchServe up ({run.served_config(args.model)}); REST closed loop, {args.rest_requests} requests per level")
        rest = []

        def rest_level(level: int) -> None:
            row, _ = served_case(run, args.model, inputs, {}, protocol="rest", concurrency=level,
                                 n=args.rest_requests, seconds=3600)
            rest.append({"concurrency": level, "studies_per_s": row["throughput"], "p50_ms": row.get("p50_ms"),
                         "server_rss_peak_mb": row.get("server_rss_peak_mb"), "load_average": os.getloadavg()[0]})
            print(f"  REST {level:3d} in flight: {row['throughput']:.2f} studies/s (load {os.getloadavg()[0]:.1f})",
                  flush=True)

        for level in args.levels:
            rest_level(level)
        result["rest"] = rest
        batch_rows = []
        variants = [([], files), ([], files[: max(1, len(files) // 10)])]
        variants += [(["--concurrency", str(c)], files) for c in args.batch_concurrency]
        # The machine is shared: REST levels are measured again between batch runs, and
        # each batch run is set against the best REST figure of the whole session.
        for n, (extra, chosen) in enumerate(variants):
            if n:
                rest_level(max(args.levels))
            out = work / f"batch-{len(chosen)}-{'-'.join(extra) or 'default'}.csv"
            b = run_batch_process(chosen, out, run, args.model, extra)
            b["args"] = extra or ["(default)"]
            b["load_average"] = os.getloadavg()[0]
            batch_rows.append(b)
            print(f"  batch {len(chosen):5d} files {' '.join(extra) or '(default concurrency)'}: "
                  f"{b['throughput_per_s']:.2f} studies/s; rows {b['rows']}, peak RSS {b['peak_rss_mb']:.0f} MB, "
                  f"ok {b['ok']} (load {b['load_average']:.1f})", flush=True)
        rest_level(max(args.levels))
        best = max(r["studies_per_s"] for r in rest)
        for b in batch_rows:
            b["vs_best_rest"] = round(b["throughput_per_s"] / best, 3)
            print(f"  batch {b['files']} files {' '.join(b['args'])}: {100 * b['vs_best_rest']:.0f} % of the best REST "
                  f"figure {best:.2f} studies/s")
        result["batch"] = batch_rows
        result["best_rest_studies_per_s"] = best
    finally:
        run.stop()
    result["load_average_end"] = os.getloadavg()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
