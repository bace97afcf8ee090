"""KServe: the model repository layout, its config.properties, and KServe v2 requests.

A second TorchServe runs the repository written by ``python -m cxrserve.tools.kserve.torchserve_runtime`` with
the very ``config.properties`` KServe would mount (``service_envelope=kservev2``), only
its addresses moved to free loopback ports, and every served model is asked over the
Open Inference Protocol (``POST /v2/models/<name>/infer``), including concurrent
requests (the envelope loses all but the first request of a batch, so the repository
pins ``batchSize: 1``) and bad input.
"""
from __future__ import annotations

import base64
import re
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml

from cxrserve.core import kserve
from cxrserve.tools.kserve.torchserve_runtime import prepare_model_repository

from cxrserve.tools import server
from tsutil import REPO, free_port

pytestmark = [pytest.mark.serve, pytest.mark.slow]


def phantom_png(seed: int = 1) -> bytes:
    import cv2

    from cxrserve.synthetic.phantoms import render, sample_spec

    img = render(sample_spec(seed, kind="frontal", height=256, width=256)).image
    return cv2.imencode(".png", img)[1].tobytes()


@pytest.fixture(scope="module")
def repository(model_store, module_tmp) -> Path:
    return prepare_model_repository(model_store, module_tmp("kserve-repo"))


@pytest.fixture(scope="module")
def kserve_served(repository, tmp_path_factory):
    """TorchServe started from the KServe config.properties, moved to free loopback ports."""
    workdir = tmp_path_factory.mktemp("kserve-ts")
    text = (repository / "config" / "config.properties").read_text()
    port = free_port()
    for key, value in {"inference_address": f"http://127.0.0.1:{port}",
                       "management_address": f"http://127.0.0.1:{free_port()}",
                       "metrics_address": f"http://127.0.0.1:{free_port()}",
                       "grpc_inference_port": str(free_port()), "grpc_management_port": str(free_port()),
                       "model_store": str(repository / "model-store"),
                       "vmargs": f"-Dlog4j.configurationFile=file://{repository / 'config' / 'log4j2.xml'}"}.items():
        text = re.sub(rf"^{key}=.*$", f"{key}={value}", text, flags=re.M)
    config = workdir / "config.properties"
    config.write_text(text)
    try:
        info = server.start(config, repository / "model-store", workdir, timeout=600)
    except Exception:
        server.stop(workdir)
        raise
    yield {"url": f"http://127.0.0.1:{port}", "models": info["models"], "workdir": workdir}
    server.stop(workdir)


def test_repository_layout_pins_batch_size_one(repository, model_store):
    props = (repository / "config" / "config.properties").read_text()
    assert "service_envelope=kservev2" in props
    assert "model_store=/mnt/models/model-store" in props
    # management stays on loopback inside the pod; only metrics face the pod network
    assert re.search(r"^management_address=http://127\.0\.0\.1:", props, re.M)
    stores = sorted(p.name for p in (repository / "model-store").glob("*.mar"))
    assert stores == sorted(p.name for p in model_store.glob("*.mar"))
    snapshot = yaml.safe_load(re.search(r"^model_snapshot=(.*)$", props, re.M).group(1))
    assert set(snapshot["models"]) == {s[:-4] for s in stores}
    for mar in (repository / "model-store").glob("*.mar"):
        with zipfile.ZipFile(mar) as zf:
            config = yaml.safe_load(zf.read("model-config.yaml"))
        assert config["batchSize"] == 1, mar.name
        assert "handler" in config  # cxrserve's own settings survive the rewrite
    # the frontend's JVM runs with the repository's memory settings there too
    flags = server.read_properties(REPO / "config.properties")["vmargs"].split()
    kserve_flags = server.read_properties(repository / "config" / "config.properties")["vmargs"].split()
    assert flags and set(flags) <= set(kserve_flags)
    assert "-Dlog4j.configurationFile=file:///mnt/models/config/log4j2.xml" in kserve_flags


def test_v2_infer_every_model(kserve_served):
    png = phantom_png()
    for model in kserve_served["models"]:
        r = requests.post(f"{kserve_served['url']}/v2/models/{model}/infer",
                          json=kserve.v2_request(png, request_id=f"req-{model}"), timeout=180)
        assert r.status_code == 200, (model, r.text[:300])
        body = r.json()
        assert body["id"] == f"req-{model}" and body["model_name"] == model
        result = kserve.v2_response(body)
        assert result["model"] == model
        assert result["input"]["format"] == "png" and result["input"]["width"] == 256
        assert "input_gate" in result


def test_v2_options_and_errors(kserve_served):
    url = f"{kserve_served['url']}/v2/models/cxr-triage/infer"
    png = phantom_png(2)
    r = requests.post(url, json=kserve.v2_request(png, options={"heatmap": True}), timeout=180)
    assert r.status_code == 200
    heatmap = kserve.v2_response(r.json())["heatmap_png"]
    assert base64.b64decode(heatmap)[:8] == b"\x89PNG\r\n\x1a\n"
    r = requests.post(url, json=kserve.v2_request(b"not an image at all"), timeout=60)
    assert r.status_code == 415
    assert kserve.v2_response(r.json())["error"] == "unsupported_format"
    bad = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["***not base64***"]}]}
    r = requests.post(url, json=bad, timeout=60)
    assert r.status_code == 400
    assert "base64" in kserve.v2_response(r.json())["message"]


def test_v2_concurrent_requests_all_answered(kserve_served):
    """Several clients at once: with batchSize 1 none is lost by the envelope."""
    url = f"{kserve_served['url']}/v2/models/cxr-lungseg/infer"
    pngs = [phantom_png(10 + i) for i in range(6)]

    def call(i):
        r = requests.post(url, json=kserve.v2_request(pngs[i], options={"mask": False}, request_id=f"c{i}"),
                          timeout=300)
        return r.status_code, r.json().get("id")

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(call, range(6)))
    assert answers == [(200, f"c{i}") for i in range(6)]


def test_deploy_manifests_name_the_runtime_and_layout():
    folder = REPO / "deploy" / "kserve"
    docs = [d for f in sorted(folder.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    kinds = {d["kind"] for d in docs}
    assert {"InferenceService", "ClusterServingRuntime"} <= kinds
    runtime = next(d for d in docs if d["kind"] == "ClusterServingRuntime")
    args = " ".join(runtime["spec"]["containers"][0]["args"])
    assert "/mnt/models/config/config.properties" in args and "/mnt/models/model-store" in args
    for isvc in (d for d in docs if d["kind"] == "InferenceService"):
        model = isvc["spec"]["predictor"]["model"]
        assert model["protocolVersion"] == "v2"
        assert model["runtime"] == runtime["metadata"]["name"]


def test_batch_against_the_kserve_endpoint(kserve_served, tmp_path):
    """``cxrserve batch --kserve``: the batch client speaks v2 to a cluster endpoint."""
    import json

    from cxrserve.tools.batch.inputs import expand_inputs
    from cxrserve.tools.batch.run import run_batch
    from cxrserve.tools.batch.scorers import RemoteScorer
    from cxrserve.tools.client import CXRClient

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        (folder / f"s{i}.png").write_bytes(phantom_png(20 + i))
    (folder / "junk.bin").write_bytes(b"\x00junk" * 10)
    client = CXRClient(kserve_served["url"], protocol="kserve", token="cluster-token-is-ignored-here")
    out = tmp_path / "rows.jsonl"
    summary = run_batch(expand_inputs([folder]), out, scorer=RemoteScorer(client, "cxr-lungseg", {"mask": False}),
                        concurrency=2, root=folder, progress=False)
    rows = {json.loads(line)["file"]: json.loads(line) for line in out.read_text().splitlines()}
    assert summary.ok == 3 and {r["status"] for r in rows.values()} == {200, 415}
    assert rows["junk.bin"]["error"] == "unsupported_format"
    assert rows["s0.png"]["result"]["model"] == "cxr-lungseg" and "mask_png" not in rows["s0.png"]["result"]
