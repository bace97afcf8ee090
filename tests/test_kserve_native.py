"""The KServe-native predictor (``cxrserve kserve``) tried with clients nobody here wrote.

One predictor runs per module, started exactly as ops would (``python -m cxrserve kserve
--store ... --http-port P --grpc-port G``) on free loopback ports, serving every archive
of the store (so a ``cxr-study`` archive is served too when the store has one). It is
asked with ``tritonclient`` over HTTP (binary tensor extension and plain JSON) and gRPC,
and, in a subprocess (see ``kserve_sdk_probe.py``), with the ``kserve`` SDK's own REST
and gRPC clients. Every model must answer with the numbers the same archive gives in
process; bad inputs must get their HTTP status and gRPC code; concurrent requests must
all be answered. The last tests start one TorchServe with the ``kservev2`` envelope (as
KServe's TorchServe runtime runs it) to compare the same request on both engines, check
the binary extension there, the probe command and idempotent start/stop, and print a
short load test of both.
"""
from __future__ import annotations

import base64
import json
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from tsutil import REPO, free_port

pytestmark = [pytest.mark.slow]

tritonhttp = pytest.importorskip("tritonclient.http")
tritongrpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

#: Keys whose values legitimately differ between two runs of the same request.
VOLATILE = {"seconds", "timings_ms", "created", "request_id"}


def phantom_png(seed: int = 1, size: int = 256) -> bytes:
    import cv2

    from cxrserve.synthetic.phantoms import render, sample_spec

    return cv2.imencode(".png", render(sample_spec(seed, kind="frontal", height=size, width=size)).image)[1].tobytes()


def numbers(value, path: str = "") -> dict[str, float | str | bool]:
    """Every number, label and flag of a response, by path, pictures and timings left out."""
    out: dict = {}
    if isinstance(value, dict):
        for key, v in value.items():
            if key in VOLATILE or key.endswith("_png"):
                continue
            out.update(numbers(v, f"{path}.{key}" if path else key))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.update(numbers(v, f"{path}[{i}]"))
    elif isinstance(value, (int, float, str, bool)) or value is None:
        out[path] = value
    return out


def assert_same_numbers(got: dict, want: dict, what: str) -> None:
    a, b = numbers(got), numbers(want)
    assert a.keys() == b.keys(), (what, sorted(a.keys() ^ b.keys())[:10])
    for key, x in a.items():
        y = b[key]
        if isinstance(x, float) or isinstance(y, float):
            assert math.isclose(float(x), float(y), rel_tol=1e-4, abs_tol=1e-5), (what, key, x, y)
        else:
            assert x == y, (what, key, x, y)


# --------------------------------------------------------------------------- the predictor
def start_predictor(store: Path, tmp: Path, *extra: str, models: list[str] | None = None, sites: Path | None = None):
    """``python -m cxrserve kserve`` on free loopback ports; yields its addresses, stops it after."""
    http_port, grpc_port = free_port(), free_port()
    log_path = tmp / "predictor.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if sites is not None:
        env["CXRSERVE_SITES"] = str(sites)
    cmd = [sys.executable, "-m", "cxrserve", "kserve", "--store", str(store), "--http-port", str(http_port),
           "--grpc-port", str(grpc_port), "--unpack-dir", str(tmp / "unpacked"), *extra]
    if models:
        cmd += ["--models", *models]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    models = models or sorted(p.stem for p in store.glob("*.mar"))
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"predictor exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/v2/health/ready", timeout=2).status_code == 200 and \
                        "serving" in log_path.read_text(errors="replace"):
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                pytest.fail(f"predictor not ready in 300 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield {"url": url, "http": f"127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}", "models": models,
               "log": log_path, "proc": proc}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def predictor(model_store, module_tmp):
    from site_fixture import write_sites

    tmp = module_tmp("kserve-native")
    yield from start_predictor(model_store, tmp, sites=write_sites(tmp / "sites", model_store))


@pytest.fixture(scope="module")
def http(predictor):
    client = tritonhttp.InferenceServerClient(predictor["http"], network_timeout=300, connection_timeout=300)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpcc(predictor):
    client = tritongrpc.InferenceServerClient(predictor["grpc"])
    yield client
    client.close()


def http_inputs(image: bytes, binary: bool, **options):
    inp = tritonhttp.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([image if binary else base64.b64encode(image)], dtype=object),
                            binary_data=binary)
    inputs = [inp]
    for name, value in options.items():
        if isinstance(value, bool):
            opt = tritonhttp.InferInput(name, [1], "BOOL")
            opt.set_data_from_numpy(np.array([value]), binary_data=binary)
        else:
            opt = tritonhttp.InferInput(name, [1], "BYTES")
            opt.set_data_from_numpy(np.array([str(value).encode()], dtype=object), binary_data=binary)
        inputs.append(opt)
    return inputs


def grpc_inputs(image: bytes, **extra: bytes):
    inputs = []
    for name, data in {"image": image, **extra}.items():
        inp = tritongrpc.InferInput(name, [1], "BYTES")
        inp.set_data_from_numpy(np.array([data], dtype=object))
        inputs.append(inp)
    return inputs


def response_of(result) -> dict:
    return json.loads(result.as_numpy("response")[0])


def test_store_discovery_unpacks_once(model_store, tmp_path):
    """Archives unpack once (again only when rebuilt, old copies removed); folders serve as they are."""
    import shutil

    from cxrserve.tools.kserve.repository import discover

    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(model_store / "cxr-lungseg.mar", store / "cxr-lungseg.mar")
    (spec,) = discover(store, unpack_dir=tmp_path / "unpacked")
    assert spec.name == "cxr-lungseg" and (spec.folder / "pipeline.json").exists()
    import yaml

    config = yaml.safe_load((spec.folder / "model-config.yaml").read_text())  # the archive's TorchServe settings
    assert spec.device == {"cpu": "cpu", "gpu": "cuda"}.get(config.get("deviceType"), "auto")
    assert spec.max_batch == config["batchSize"] and spec.max_delay_ms == config["maxBatchDelay"]
    marker = spec.folder / "seen"
    marker.write_text("x")
    assert discover(store, unpack_dir=tmp_path / "unpacked")[0].folder == spec.folder and marker.exists()
    os.utime(store / "cxr-lungseg.mar", (time.time() + 10, time.time() + 10))  # "rebuilt"
    (again,) = discover(store, unpack_dir=tmp_path / "unpacked")
    assert again.folder != spec.folder and [p.name for p in (tmp_path / "unpacked").iterdir()] == [again.folder.name]
    shutil.copytree(again.folder, store / "cxr-lungseg")  # an unpacked folder wins over the archive
    assert discover(store, unpack_dir=tmp_path / "unpacked")[0].folder == store / "cxr-lungseg"
    with pytest.raises(FileNotFoundError, match="cxr-nope"):
        discover(store, models=["cxr-nope"])


# --------------------------------------------------------------------------- health and metadata
def test_health_and_metadata_with_tritonclient(predictor, http, grpcc):
    assert http.is_server_live() and http.is_server_ready()
    assert grpcc.is_server_live() and grpcc.is_server_ready()
    assert http.get_server_metadata()["name"] == "cxrserve"
    assert "binary_tensor_data" in grpcc.get_server_metadata(as_json=True)["extensions"]
    for model in predictor["models"]:
        assert http.is_model_ready(model) and grpcc.is_model_ready(model)
        meta = http.get_model_metadata(model)
        names = {i["name"]: i["datatype"] for i in meta["inputs"]}
        assert names["image"] == "BYTES" and meta["outputs"] == [{"name": "response", "datatype": "BYTES",
                                                                   "shape": [1]}]
        gmeta = grpcc.get_model_metadata(model, as_json=True)
        assert {i["name"] for i in gmeta["inputs"]} == set(names)
        config = http.get_model_config(model)
        assert config["model"] == model
        # every option is described (default and help) and accepted as an input of its datatype
        for key, option in config["options"].items():
            assert key in names and "default" in option and option["help"], (model, key)
    triage = http.get_model_metadata("cxr-triage")
    assert {"name": "heatmap", "datatype": "BOOL", "shape": [1]} in triage["inputs"]
    assert {"name": "prior", "datatype": "BYTES", "shape": [1]} in http.get_model_metadata("cxr-pxs")["inputs"]
    with pytest.raises(InferenceServerException):
        http.get_model_metadata("cxr-nope")


# --------------------------------------------------------------------------- same numbers
def test_every_model_answers_like_its_archive_in_process(predictor, http, grpcc, pipeline):
    """tritonclient HTTP (binary and JSON) and gRPC: the in-process numbers, for every model."""
    png = phantom_png(3)
    for model in predictor["models"]:
        want = pipeline(model).predict_bytes(png)
        got_binary = response_of(http.infer(model, http_inputs(png, True), request_id=f"b-{model}",
                                            outputs=[tritonhttp.InferRequestedOutput("response", binary_data=True)]))
        got_json = response_of(http.infer(model, http_inputs(png, False),
                                          outputs=[tritonhttp.InferRequestedOutput("response", binary_data=False)]))
        got_grpc = response_of(grpcc.infer(model, grpc_inputs(png)))
        for how, got in (("http-binary", got_binary), ("http-json", got_json), ("grpc", got_grpc)):
            assert got["model"] == model and got["input"]["format"] == "png", (model, how)
            assert_same_numbers(got, want, f"{model} over {how}")


def test_options_as_parameters_and_as_inputs(predictor, http, grpcc, pipeline):
    png, prior = phantom_png(4), phantom_png(5)
    as_param = response_of(http.infer("cxr-triage", http_inputs(png, True), parameters={"heatmap": True}))
    as_input = response_of(http.infer("cxr-triage", http_inputs(png, True, heatmap=True)))
    as_text = response_of(http.infer("cxr-triage", http_inputs(png, False, heatmap="true")))
    for body in (as_param, as_input, as_text):
        assert base64.b64decode(body["heatmap_png"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "heatmap_png" not in response_of(http.infer("cxr-triage", http_inputs(png, True)))
    over_grpc = response_of(grpcc.infer("cxr-triage", grpc_inputs(png), parameters={"heatmap": True}))
    assert base64.b64decode(over_grpc["heatmap_png"])[:8] == b"\x89PNG\r\n\x1a\n"
    # an extra image over gRPC: PXS with a prior answers the change, as in process
    got = response_of(grpcc.infer("cxr-pxs", grpc_inputs(png, prior=prior)))
    assert_same_numbers(got, pipeline("cxr-pxs").predict_bytes(png, prior=prior), "cxr-pxs with prior")
    assert "change" in got


def test_site_as_a_v2_parameter(predictor, http, grpcc, pipeline):
    """The v2 request parameter (or input) ``site`` applies that site's profile, as TorchServe does."""
    from site_fixture import SITE, STALE

    png = phantom_png(6)
    served = pipeline("cxr-triage").predict_bytes(png)
    for body in (response_of(http.infer("cxr-triage", http_inputs(png, True), parameters={"site": SITE})),
                 response_of(grpcc.infer("cxr-triage", grpc_inputs(png), parameters={"site": SITE})),
                 response_of(http.infer("cxr-triage", http_inputs(png, False, site=SITE)))):
        assert body["site"] == SITE and body["uncalibrated"]["probabilities"] == served["probabilities"]
    for name, status in (("nowhere", 400), (STALE, 409)):
        r = requests.post(f"{predictor['url']}/v2/models/cxr-triage/infer", timeout=60,
                          json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                            "data": [base64.b64encode(png).decode()]}], "parameters": {"site": name}})
        assert r.status_code == status, r.text


# --------------------------------------------------------------------------- errors
def bad_requests() -> dict[str, tuple[dict, int, str]]:
    """name -> (request parts, HTTP status, gRPC code)."""
    import cv2

    from cxrserve.synthetic.dicomwrite import to_dicom
    from cxrserve.synthetic.phantoms import render, sample_spec

    lateral = to_dicom(render(sample_spec(6, kind="frontal", height=128, width=128)).image, view_position="LL")
    huge = cv2.imencode(".png", np.zeros((8000, 8000), np.uint8))[1].tobytes()  # 64 Mpx, a few kB
    return {
        "garbage": ({"image": b"this is not an image"}, 415, "INVALID_ARGUMENT"),
        "truncated_png": ({"image": phantom_png(7)[:200]}, 400, "INVALID_ARGUMENT"),
        "bad_option": ({"image": phantom_png(8), "heatmap": b"maybe"}, 400, "INVALID_ARGUMENT"),
        "lateral": ({"image": lateral}, 422, "FAILED_PRECONDITION"),
        "pixel_bomb": ({"image": huge}, 413, "RESOURCE_EXHAUSTED"),
        **{name: ({"image": data}, 413, "RESOURCE_EXHAUSTED") for name, data in decompression_bombs().items()},
    }


def decompression_bombs() -> dict[str, bytes]:
    """A 300 MiB deflate bomb in ~300 KB, a 12000 x 12000 JPEG frame in a 128 x 128 DICOM header."""
    from test_decode_bombs import MiB, deflate_bomb, jpeg_dicom, set_sof, with_frame

    y, x = np.mgrid[0:128, 0:128]
    small = (40 + x + y // 2).clip(0, 255).astype(np.uint8)
    return {"deflate_bomb": deflate_bomb(300 * MiB), "frame_bomb": with_frame(jpeg_dicom(small), set_sof(12000, 12000))}


def test_decompression_bombs_leave_the_predictors_peak_memory_alone(predictor, http):
    """The predictor process's VmHWM (its peak resident memory) after both bombs, over HTTP:
    before bounded decoding the deflate bomb alone took +600 MB and was answered 200."""
    def peak_kb() -> int:
        status = Path(f"/proc/{predictor['proc'].pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])

    http.infer("cxr-triage", http_inputs(phantom_png(3), True))  # ordinary work sets the peak first
    before = peak_kb()
    for name, data in decompression_bombs().items():
        t0 = time.perf_counter()
        with pytest.raises(InferenceServerException) as err:
            http.infer("cxr-triage", http_inputs(data, True))
        assert err.value.status() == "413", (name, err.value)
        print(f"kserve-native {name}: 413 in {1000 * (time.perf_counter() - t0):.0f} ms")
    rise_mb = (peak_kb() - before) / 1024
    print(f"kserve-native peak memory rise: {rise_mb:.1f} MB")
    assert rise_mb < 48


def test_bad_inputs_get_their_http_status_and_grpc_code(predictor, http, grpcc):
    import grpc

    for name, (parts, status, code) in bad_requests().items():
        parts = dict(parts)
        image = parts.pop("image")
        with pytest.raises(InferenceServerException) as err:
            http.infer("cxr-triage", http_inputs(image, True, **{k: v.decode() for k, v in parts.items()}))
        assert err.value.status() == str(status), (name, err.value)
        with pytest.raises(InferenceServerException) as gerr:
            grpcc.infer("cxr-triage", grpc_inputs(image, **parts))
        assert gerr.value.status() == f"StatusCode.{code}", (name, gerr.value)
        body = json.loads(gerr.value.message().split(": ", 1)[-1] if not gerr.value.message().startswith("{")
                          else gerr.value.message())
        assert body["status"] == status and body["error"], (name, body)
    # the same over plain gRPC: the trailing metadata tells 400 from 415
    channel = grpc.insecure_channel(predictor["grpc"])
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    req = service_pb2.ModelInferRequest(model_name="cxr-triage")
    tensor = req.inputs.add(name="image", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(b"this is not an image")
    with pytest.raises(grpc.RpcError) as raw:
        stub.ModelInfer(req, timeout=60)
    trailers = dict(raw.value.trailing_metadata())
    assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert trailers["cxr-http-status"] == "415" and trailers["cxr-error"] == "unsupported_format"
    assert json.loads(raw.value.details())["error"] == "unsupported_format"
    channel.close()


def test_malformed_v2_requests_and_model_control(predictor):
    url = predictor["url"]
    infer = f"{url}/v2/models/cxr-triage/infer"
    r = requests.post(infer, json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                               "data": ["***not base64***"]}]}, timeout=60)
    assert r.status_code == 400 and "base64" in r.json()["message"]
    r = requests.post(infer, json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                                               "data": [base64.b64encode(phantom_png(1)).decode()] * 2}]}, timeout=60)
    assert r.status_code == 400 and "one study per request" in r.json()["message"]
    assert requests.post(infer, data=b"{not json", timeout=60).status_code == 400
    assert requests.post(infer, json={"instances": [1]}, timeout=60).status_code == 400
    r = requests.post(infer, data=b'{"inputs": []}' + b"\x00" * 10,
                      headers={"Inference-Header-Content-Length": "99999"}, timeout=60)
    assert r.status_code == 400
    assert requests.post(f"{url}/v2/models/cxr-nope/infer", json={"inputs": []}, timeout=60).status_code == 404
    version = requests.get(f"{url}/v2/models/cxr-triage/config", timeout=60).json()["model_version"]
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                        "data": [base64.b64encode(phantom_png(1)).decode()]}]}
    r = requests.post(f"{url}/v2/models/cxr-triage/versions/{version}/infer", json=body, timeout=120)
    assert r.status_code == 200 and json.loads(r.json()["outputs"][0]["data"][0])["model_version"] == version
    assert requests.post(f"{url}/v2/models/cxr-triage/versions/9.9/infer", json=body, timeout=60).status_code == 404
    # nobody may unload a model through the inference port
    assert requests.post(f"{url}/v2/repository/models/cxr-triage/unload", timeout=60).status_code == 403
    assert requests.get(f"{url}/v2/models/cxr-triage/ready", timeout=60).status_code == 200


def test_kserve_sdk_rest_and_grpc_clients(predictor, pipeline, tmp_path):
    png = phantom_png(9)
    (tmp_path / "image.png").write_bytes(png)
    (tmp_path / "bad.bin").write_bytes(b"not an image either")
    out = subprocess.run([sys.executable, str(REPO / "tests" / "kserve_sdk_probe.py"), predictor["url"],
                          predictor["grpc"], "cxr-triage", str(tmp_path / "image.png"), str(tmp_path / "bad.bin")],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(result[k] for k in ("rest_live", "rest_ready", "rest_model_ready", "grpc_live", "grpc_ready",
                                   "grpc_model_ready"))
    want = pipeline("cxr-triage").predict_bytes(png)
    assert_same_numbers(result["rest_binary"], want, "kserve SDK REST")
    assert result["rest_id"] == "sdk-1"
    grpc_body = dict(result["grpc"])
    assert grpc_body.pop("heatmap_png", "")  # the option went as a v2 parameter
    assert_same_numbers(grpc_body, want, "kserve SDK gRPC")
    assert result["rest_bad"] == 415 and result["rest_bad_body"]["error"] == "unsupported_format"
    assert result["grpc_bad"] == "INVALID_ARGUMENT" and result["grpc_bad_details"]["status"] == 415
    assert result["grpc_bad_trailers"]["cxr-http-status"] == "415"


def test_project_client_and_batch_speak_to_the_predictor(predictor, pipeline, tmp_path):
    from cxrserve.tools.client import CXRClient, InputRejected

    png = phantom_png(13)
    with CXRClient(predictor["url"], protocol="kserve", token="unused") as client:
        assert client.ping()
        assert_same_numbers(client.predict("cxr-severity", png), pipeline("cxr-severity").predict_bytes(png),
                            "CXRClient kserve")
        with pytest.raises(InputRejected) as err:
            client.predict("cxr-severity", b"not an image")
        assert err.value.status == 415 and err.value.code == "unsupported_format"
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(png)
    (folder / "b.png").write_bytes(b"not an image")
    from cxrserve.tools import cli

    assert cli.main(["batch", str(folder), "--model", "cxr-severity", "--out", str(tmp_path / "out.jsonl"),
                     "--kserve", "--url", predictor["url"], "--token", "unused"]) in (0, 1)
    rows = {Path(r["file"]).name: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert rows["a.png"]["status"] == 200 and rows["b.png"]["status"] == 415


def test_token_file_guards_everything_but_health_and_metrics(model_store, tmp_path):
    import grpc

    token = "t0ken-" + "x" * 20
    (tmp_path / "token").write_text(token + "\n")
    from contextlib import contextmanager

    with contextmanager(start_predictor)(model_store, tmp_path, "--token-file", str(tmp_path / "token"),
                                         models=["cxr-lungseg"]) as guarded:
        url, auth = guarded["url"], {"Authorization": f"Bearer {token}"}
        for path in ("/v2/health/live", "/v2/health/ready", "/metrics"):
            assert requests.get(url + path, timeout=10).status_code == 200, path
        assert requests.get(f"{url}/v2/models/cxr-lungseg", timeout=10).status_code == 401
        assert requests.get(f"{url}/v2/models/cxr-lungseg", headers={"Authorization": "Bearer wrong"},
                            timeout=10).status_code == 401
        assert requests.get(f"{url}/v2/models/cxr-lungseg", headers=auth, timeout=10).status_code == 200
        client = tritonhttp.InferenceServerClient(guarded["http"], network_timeout=300)
        with pytest.raises(InferenceServerException) as err:
            client.infer("cxr-lungseg", http_inputs(phantom_png(14), True))
        assert err.value.status() == "401"
        assert response_of(client.infer("cxr-lungseg", http_inputs(phantom_png(14), True), headers=auth))["model"]
        client.close()
        gclient = tritongrpc.InferenceServerClient(guarded["grpc"])
        assert gclient.is_server_live()  # probes stay open
        with pytest.raises(InferenceServerException) as gerr:
            gclient.infer("cxr-lungseg", grpc_inputs(phantom_png(14)))
        assert gerr.value.status() == f"StatusCode.{grpc.StatusCode.UNAUTHENTICATED.name}"
        assert response_of(gclient.infer("cxr-lungseg", grpc_inputs(phantom_png(14)),
                                         headers={"authorization": f"Bearer {token}"}))["model"]
        gclient.close()


# --------------------------------------------------------------------------- concurrency, metrics
def test_concurrent_requests_all_answered_and_batched(predictor):
    url = predictor["http"]
    pngs = [phantom_png(20 + i) for i in range(12)]
    pngs[5] = b"not an image"  # one bad neighbour must not fail the others

    def metric_sum(text: str, name: str) -> float:
        return sum(float(v) for v in re.findall(rf'^{name}\{{model="cxr-lungseg"\}} (\S+)$', text, re.M))

    before = requests.get(f"{predictor['url']}/metrics", timeout=30).text

    def call(i):
        client = tritonhttp.InferenceServerClient(url, network_timeout=300)
        try:
            body = response_of(client.infer("cxr-lungseg", http_inputs(pngs[i], True), request_id=f"c{i}"))
            return 200, body["model"]
        except InferenceServerException as err:
            return int(err.status()), ""
        finally:
            client.close()

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(call, range(12)))
    assert answers == [(415, "") if i == 5 else (200, "cxr-lungseg") for i in range(12)]
    after = requests.get(f"{predictor['url']}/metrics", timeout=30).text
    served = metric_sum(after, "cxrserve_batch_size_sum") - metric_sum(before, "cxrserve_batch_size_sum")
    calls = metric_sum(after, "cxrserve_batch_size_count") - metric_sum(before, "cxrserve_batch_size_count")
    assert served == 11  # the undecodable file never reaches the pipeline
    assert calls < served, "concurrent requests should share pipeline calls"
    assert re.search(r'^cxrserve_requests_total\{model="cxr-lungseg",outcome="ok",status="200"\} \d', after, re.M)
    assert re.search(r'^cxrserve_requests_total\{model="cxr-lungseg",outcome="rejected",status="415"\}', after, re.M)
    assert "cxrserve_stage_seconds_bucket" in after and "cxrserve_gate_score_bucket" in after


def test_predictor_logs_no_file_contents(predictor):
    """The failures above are logged by kind; never image bytes, option values or base64."""
    text = predictor["log"].read_text(errors="replace")
    assert "this is not an image" not in text and "maybe" not in text
    assert "iVBORw0KGgo" not in text and "\\x89PNG" not in text


# --------------------------------------------------------------------------- against TorchServe
@pytest.fixture(scope="module")
def torchserve_v2(model_store, tmp_path_factory, module_tmp):
    """TorchServe with the kservev2 envelope (KServe's TorchServe runtime) and token auth, cxr-triage only."""
    from cxrserve.tools import server
    from cxrserve.tools.kserve.torchserve_runtime import prepare_model_repository
    from tsutil import start_torchserve

    repo = prepare_model_repository(model_store, module_tmp("ts-v2-repo"), models=["cxr-triage"])
    store = repo / "model-store"
    workdir = tmp_path_factory.mktemp("ts-v2")
    try:
        served = start_torchserve(store, workdir, service_envelope="kservev2")
    except Exception:
        server.stop(workdir)
        raise
    yield {"served": served, "store": store, "workdir": workdir}
    server.stop(workdir)


pytest_serve = pytest.mark.serve


@pytest_serve
def test_torchserve_kservev2_binary_extension_and_same_numbers(torchserve_v2, http, pipeline):
    served = torchserve_v2["served"]
    client = tritonhttp.InferenceServerClient(served.inference.split("//", 1)[1], network_timeout=300)
    try:
        png = phantom_png(11)
        result = client.infer("cxr-triage", http_inputs(png, True), headers=served.headers())
        body = result.get_response()["outputs"][0]["data"][0]  # TorchServe's envelope: the JSON object itself
        native = response_of(http.infer("cxr-triage", http_inputs(png, True)))
        assert_same_numbers(body, native, "TorchServe kservev2 vs KServe-native")
        assert_same_numbers(body, pipeline("cxr-triage").predict_bytes(png), "TorchServe vs in process")
        # a bad file with the binary extension: the handler's own 415, not a 503
        with pytest.raises(InferenceServerException) as err:
            client.infer("cxr-triage", http_inputs(b"not an image", True), headers=served.headers())
        assert err.value.status() == "415"
    finally:
        client.close()
    url = f"{served.inference}/v2/models/cxr-triage/infer"
    r = requests.post(url, data=b"\x89PNG\r\n\x1a\n raw bytes, not v2", headers=served.headers(), timeout=60)
    assert r.status_code == 400, r.text[:300]
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 9999}}]}).encode()
    r = requests.post(url, data=header + b"\x05\x00\x00\x00short",
                      headers={**served.headers(), "Inference-Header-Content-Length": str(len(header))}, timeout=60)
    assert r.status_code == 400 and "binary_data_size" in r.text


@pytest_serve
def test_probe_and_idempotent_start_stop(torchserve_v2, capsys):
    from cxrserve.tools import cli
    from cxrserve.tools import server

    served, workdir = torchserve_v2["served"], torchserve_v2["workdir"]
    config = workdir / "config.properties"
    # the probe reads the key file itself: no token needed by the caller, yes/no only
    assert cli.main(["serve", "probe", "--config", str(config), "--workdir", str(workdir)]) == 0
    assert cli.main(["serve", "probe", "--ready", "--config", str(config), "--workdir", str(workdir)]) == 0
    assert capsys.readouterr().out.splitlines() == ["live", "ready (1 models)"]
    empty = workdir.parent / "nothing-runs-here"
    empty.mkdir(exist_ok=True)
    assert cli.main(["serve", "probe", "--config", str(config), "--workdir", str(empty)]) == 1
    # TorchServe's /ping wants the token; the probe is the tokenless check
    assert requests.get(f"{served.inference}/ping", timeout=10).status_code != 200
    # starting again is harmless and says so
    assert cli.main(["serve", "start", "--config", str(config), "--store", str(torchserve_v2["store"]),
                     "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert "already running" in out and "Traceback" not in out
    assert server.running(workdir) is not None
    assert cli.main(["serve", "stop", "--workdir", str(empty)]) == 0
    assert "not running" in capsys.readouterr().out


def batch_metric(url: str, model: str) -> tuple[float, float]:
    """(requests, pipeline calls) the predictor's micro-batcher has counted for ``model``."""
    text = requests.get(f"{url}/metrics", timeout=30).text

    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(rf'^{name}\{{model="{model}"\}} (\S+)$', text, re.M))

    return total("cxrserve_batch_size_sum"), total("cxrserve_batch_size_count")


@pytest_serve
def test_load_both_engines(torchserve_v2, predictor, pipeline):
    """4 clients sending the same v2 binary request to both engines: same answers, and batching.

    Every answer under load must equal the single request's answer in process, and the
    native predictor must have served the concurrent requests in fewer ``pipeline.predict``
    calls than requests (its micro-batcher, counted by ``cxrserve_batch_size``), which is
    where its throughput over TorchServe's forced ``batchSize: 1`` comes from. Timings are
    printed, not asserted (a shared 2-core machine): the numbers of docs and README.
    """
    served = torchserve_v2["served"]
    model, clients, per_client = "cxr-triage", 4, 6
    png = phantom_png(12)
    in_process = pipeline(model)
    want = in_process.predict_bytes(png)
    seq = []
    for _ in range(8):
        start = time.perf_counter()
        in_process.predict_bytes(png)
        seq.append(time.perf_counter() - start)
    sequential = {"in-process": 1000 * sorted(seq)[len(seq) // 2]}
    targets = {"kserve-native": (predictor["http"], {}, response_of),
               # TorchServe's envelope puts the JSON object itself in the output
               "torchserve-kservev2": (served.inference.split("//", 1)[1], served.headers(),
                                       lambda result: result.get_response()["outputs"][0]["data"][0])}
    report = {}
    for name, (address, headers, answer_of) in targets.items():
        def client_loop(n: int) -> tuple[list[tuple[float, float]], list[dict]]:
            # tritonclient's HTTP client is gevent-based: one per thread, made in that thread
            client = tritonhttp.InferenceServerClient(address, network_timeout=300)
            try:
                answers = [answer_of(client.infer(model, http_inputs(png, True), headers=headers))]  # warm up
                spans = []
                for _ in range(n):
                    start = time.perf_counter()
                    answers.append(answer_of(client.infer(model, http_inputs(png, True), headers=headers)))
                    spans.append((start, time.perf_counter()))
                return spans, answers
            finally:
                client.close()

        single, _ = client_loop(8)
        sequential[name] = 1000 * sorted(end - start for start, end in single)[len(single) // 2]
        before = batch_metric(predictor["url"], model)
        with ThreadPoolExecutor(clients) as pool:
            runs = list(pool.map(client_loop, [per_client] * clients))
        after = batch_metric(predictor["url"], model)
        spans = [span for run, _ in runs for span in run]
        for i, body in enumerate(body for _, answers in runs for body in answers):
            assert_same_numbers(body, want, f"{name}: answer {i} under load vs one request in process")
        wall = max(end for _, end in spans) - min(start for start, _ in spans)
        latencies = sorted(end - start for start, end in spans)
        report[name] = {"rps": len(spans) / wall, "p50_ms": 1000 * latencies[len(latencies) // 2],
                        "p99_ms": 1000 * latencies[min(len(latencies) - 1, math.ceil(0.99 * len(latencies)) - 1)],
                        "requests": after[0] - before[0], "calls": after[1] - before[1]}
    native = report["kserve-native"]
    sent = clients * (per_client + 1)  # with each client's warm-up request
    print(f"\nload ({model}, {clients * per_client} binary v2 requests, {clients} concurrent clients):")
    for name, r in report.items():
        print(f"  {name:22s} {r['rps']:6.2f} req/s  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms")
    print(f"  kserve-native served {native['requests']:.0f} requests in {native['calls']:.0f} pipeline calls "
          f"({native['requests'] / max(native['calls'], 1):.2f} per call); torchserve-kservev2 runs batchSize 1")
    print("one client in sequence, median of 8:")
    for name, ms in sequential.items():
        print(f"  {name:22s} {ms:7.1f} ms")
    assert native["requests"] == sent, native  # every request of the load reached the pipeline once
    assert native["calls"] < sent, f"{sent} concurrent requests took {native['calls']:.0f} pipeline calls: no batching"


def test_deploy_files_start_this_command_and_probe_real_paths(predictor):
    import yaml

    from cxrserve.tools import cli

    folder = REPO / "deploy" / "kserve-native"
    entry = re.search(r"^ENTRYPOINT (\[.*?\])\s*$", (folder / "Dockerfile").read_text().replace("\\\n", ""),
                      re.M | re.S)
    argv = json.loads(entry.group(1))
    assert argv[:2] == ["cxrserve", "kserve"]
    args = cli.build_parser().parse_args(argv[1:])
    assert (args.store, args.host, args.http_port, args.grpc_port) == ("/mnt/models", "0.0.0.0", 8080, 8081)
    docs = [d for d in yaml.safe_load_all((folder / "inferenceservice.yaml").read_text()) if d]
    assert docs and all(d["kind"] == "InferenceService" for d in docs)
    ports = set()
    for doc in docs:
        assert "model" not in doc["spec"]["predictor"]  # a custom container, no TorchServe runtime
        (container,) = doc["spec"]["predictor"]["containers"]
        assert any(e["name"] == "STORAGE_URI" for e in container["env"])
        ports |= {(p["name"], p["containerPort"]) for p in container["ports"]}
        for probe in ("readinessProbe", "livenessProbe"):
            path = container[probe]["httpGet"]["path"]
            assert requests.get(predictor["url"] + path, timeout=10).status_code == 200, path
    assert ports == {("http1", args.http_port), ("h2c", args.grpc_port)}
    # the TorchServe-runtime option stays
    assert (REPO / "deploy" / "kserve" / "servingruntime.yaml").exists()
