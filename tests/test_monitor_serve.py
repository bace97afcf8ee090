"""End to end: TorchServe's handler exports the drift monitor's gauges on :8082/metrics, a real
Prometheus (Debian's package, installed like ``make dicomtools`` does) scrapes them with
deploy/prometheus/cxrserve-drift.rules.yml, and the drift alert fires once shifted studies come in.

One TorchServe start (minutes on a small machine), one model, one Prometheus.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import cv2
import pytest
import requests

from cxrserve.core import monitor as M
from cxrserve.synthetic.phantoms import render, sample_spec

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "deploy" / "prometheus" / "cxrserve-drift.rules.yml"
MODEL = "cxr-triage"


def prometheus_binary() -> str:
    """Debian's prometheus, installed through ``make prometheus`` (apt, as root) when missing."""
    if not shutil.which("prometheus"):
        subprocess.run(["make", "-s", "-C", str(REPO), "prometheus"], check=False, timeout=900)
    path = shutil.which("prometheus")
    if not path:
        pytest.skip("prometheus not installed (make prometheus needs root and apt-get)")
    return path


def png(kind: str, seed: int) -> bytes:
    return cv2.imencode(".png", render(sample_spec(seed, kind=kind, height=256, width=256)).image)[1].tobytes()


def metric(url: str, name: str, **labels) -> float | None:
    from test_metrics_endpoint import scrape

    values = [v for n, lab, v in scrape(url) if n == name and all(lab.get(k) == w for k, w in labels.items())]
    return max(values) if values else None


@pytest.mark.serve
def test_drift_alert_fires_through_torchserve_and_prometheus(model_store, unpacked, tmp_path, monkeypatch):
    from cxrserve.core.loading import load_pipeline
    from cxrserve.tools import server
    from cxrserve.tools.monitor.scoring import score_files
    from tsutil import free_port, start_torchserve

    binary = prometheus_binary()
    # the reference: frontal phantoms scored in process by the same archive
    pipeline = load_pipeline(unpacked(MODEL), device="cpu")
    files = []
    for seed in range(60):
        path = tmp_path / "ref" / f"{seed}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(png("frontal", 1000 + seed))
        files.append(path)
    ref = M.fit_reference(score_files(pipeline, files), window=10, step=5, target_rate=1e-3, resamples=300)
    state = tmp_path / "monitor"
    ref.save(state / M.DEFAULT_SITE / MODEL / "reference.json")

    store = tmp_path / "store"
    store.mkdir()
    (store / f"{MODEL}.mar").symlink_to(model_store / f"{MODEL}.mar")
    monkeypatch.setenv("CXRSERVE_MONITOR_DIR", str(state))  # the workers inherit it
    workdir = tmp_path / "ts"
    served = start_torchserve(store, workdir)
    prom = None
    try:
        for seed in range(15):  # in distribution: windows scored, no alert
            assert served.post(MODEL, png("frontal", 2000 + seed)).status_code == 200
        time.sleep(1.0)
        assert metric(served.metrics, "cxrserve_drift_alert", site="default", model=MODEL) == 0
        assert metric(served.metrics, "cxrserve_drift_score", site="default", model=MODEL, signal="combined") is not None

        port = free_port()
        (tmp_path / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: ['{RULES}']\n"
            "scrape_configs:\n  - job_name: cxrserve\n    static_configs:\n"
            f"      - targets: ['{served.metrics.split('//')[1]}']\n")
        prom = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for n, kind in enumerate(("hand", "knee", "pelvis") * 7):  # shifted studies
            served.post(MODEL, png(kind, 3000 + n))
        served.post(MODEL, png("hand", 3999))  # the gauges are refreshed after each batch
        assert metric(served.metrics, "cxrserve_drift_alert", site="default", model=MODEL) == 1
        deadline, firing = time.time() + 90, []
        while time.time() < deadline and not firing:
            time.sleep(1.0)
            try:
                alerts = requests.get(f"http://127.0.0.1:{port}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
            except (requests.RequestException, ValueError, KeyError):
                continue
            firing = [a for a in alerts if a["labels"].get("alertname") == "CXRServeInputDrift"
                      and a["state"] == "firing" and a["labels"].get("model") == MODEL
                      and a["labels"].get("site") == "default"]
        assert firing, "the drift alert did not fire in Prometheus"
        # no identifiers in the monitor's files: keyed hashes and technical facts only
        text = "".join(p.read_text() for p in state.rglob("*.jsonl"))
        assert '"key"' in text and ".png" not in text
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(timeout=30)
        server.stop(workdir)
