"""Smoke test of the benchmark suite (``cxrserve bench``) on a tiny configuration.

No timing assertions: numbers from a shared test machine mean nothing. What is checked
is what a reader of the results relies on: every path (naive, in process, TorchServe over
REST and gRPC, the ceiling) produced a row from real answers, the served outputs equal
the naive baseline's (same weights, same decoder and preprocessing), the ratios were
computed in the run, and the JSON and markdown were written and read back.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import yaml

from cxrserve.tools.bench.archives import variant_archive
from cxrserve.tools.bench.cli import quick
from cxrserve.tools.bench.measure import latency_summary
from cxrserve.tools.bench.report import write_results
from cxrserve.tools.bench.scores import max_abs_diff
from cxrserve.tools.bench.suite import BenchOptions, run_suite

ROOT = Path(__file__).resolve().parents[1]
MODEL = "cxr-lungseg"  # the smallest served chain: input gate + U-Net


@pytest.fixture(scope="module")
def suite(model_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    opts = quick(BenchOptions(
        store=model_store, work=model_store.parent / "build",  # checkpoints beside the store
        out=root / "results", cache=root / "cache", models=(MODEL,), data=None, progress=False))
    results = run_suite(opts)
    return results, write_results(results, opts.out)


def test_every_path_answers(suite):
    results, _ = suite
    entry = results["models"][MODEL]
    assert not entry["notes"], entry["notes"]
    assert "error" not in results.get("torchserve", {}), results["torchserve"]
    rows = entry["rows"]
    assert {r["path"] for r in rows} == {"naive", "in-process", "torchserve-rest", "torchserve-grpc"}
    for row in rows:
        assert row["n"] >= 1 and row["throughput"] > 0, row
        assert not row.get("errors"), row
        assert row["rss_peak_mb" if "rss_peak_mb" in row else "server_rss_peak_mb"] > 0


def test_served_outputs_equal_the_naive_baseline(suite):
    results, _ = suite
    entry = results["models"][MODEL]
    assert all(entry["naive_same_weights"].values()), "checkpoints beside the store are not the archive's weights"
    for row in entry["rows"]:
        if row["path"] == "naive":
            continue
        # Exported graphs agree with eager to 1e-4 on probabilities (export parity).
        assert row["max_abs_diff"] is not None and row["max_abs_diff"] < 1e-3, row
        assert row["vs_naive"] is not None and row["vs_naive"] > 0


def test_ceiling_and_stages_cover_every_component(suite):
    results, _ = suite
    entry = results["models"][MODEL]
    ceiling = next(iter(entry["ceiling"].values()))
    assert set(ceiling["components"]) == {"lungseg", "gate"}
    assert ceiling["studies_per_s"] > 0
    stages = next(iter(entry["stages_ms"].values()))
    assert {"decode", "preprocess", "model_lungseg", "model_gate"} <= set(stages)
    assert entry["slowest_stage"] in stages


def test_sections_and_files(suite):
    results, (json_path, md_path) = suite
    saved = json.loads(json_path.read_text())
    assert saved["models"][MODEL]["rows"] == json.loads(json.dumps(results["models"][MODEL]["rows"]))
    env = saved["environment"]
    assert env["cores"] >= 1 and env["torch"] and env["onnxruntime"] and len(env["load_average_start"]) == 3
    assert saved["decode"] and saved["preprocess"]["rows"] and saved["threads"]
    assert saved["growth"]["image_size"] and saved["growth"]["batch"]  # PXS pool growth: the pxs family's own test
    assert all(not i["name"].endswith(".dcm") for i in saved["inputs"])  # never a file name (SOP UIDs)
    text = md_path.read_text()
    assert "| model | path | mode |" in text and f"| {MODEL} | naive |" in text
    if not saved["gpu_measured"]:
        assert "No GPU measured" in text


def test_variant_archive_changes_only_its_model_config(model_store, tmp_path):
    mar = model_store / f"{MODEL}.mar"
    variant = variant_archive(mar, tmp_path, f"{MODEL}-b1", {"batchSize": 1}, {"threads": 1})
    with zipfile.ZipFile(mar) as a, zipfile.ZipFile(variant) as b:
        assert a.namelist() == b.namelist()
        config = yaml.safe_load(b.read("model-config.yaml"))
        assert config["batchSize"] == 1 and config["handler"]["threads"] == 1
        assert config["handler"]["backend"] == yaml.safe_load(a.read("model-config.yaml"))["handler"]["backend"]
        assert json.loads(b.read("MAR-INF/MANIFEST.json"))["model"]["modelName"] == f"{MODEL}-b1"
        for name in a.namelist():
            if name not in ("model-config.yaml", "MAR-INF/MANIFEST.json"):
                assert a.read(name) == b.read(name), name


def test_latency_summary_and_diff():
    summary = latency_summary([0.1, 0.2, 0.3, 0.4], wall=1.0)
    assert summary["throughput"] == 4.0 and summary["p50_ms"] == 250.0 and summary["p99_ms"] == 400.0
    assert max_abs_diff({"a": {"x": 0.5, "y": 1.0}}, {"a": {"x": 0.25}, "b": {"x": 9.0}}) == 0.25
    assert max_abs_diff({}, {"a": {"x": 1.0}}) is None


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")))
def test_benchmark_scripts_start(script):
    """Every script in benchmarks/ that PERFORMANCE.md tells readers to run still imports
    and parses its options (a moved helper once broke four of them unnoticed)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
