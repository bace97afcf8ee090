"""KServe v2 (Open Inference Protocol) requests for every cxrserve handler.

With ``service_envelope=kservev2`` (how KServe's TorchServe runtime runs TorchServe,
see ``deploy/kserve/``) TorchServe's envelope turns one v2 request

.. code-block:: json

    {"id": "study-1",
     "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["<base64 DICOM/PNG/JPEG>"]},
                {"name": "prior", "datatype": "BYTES", "shape": [1], "data": ["<base64>"]},
                {"name": "heatmap", "datatype": "BOOL", "shape": [1], "data": [true]}]}

into a handler batch of one entry per named input (``{"name", "datatype", "shape",
"data"}``, BYTES reduced to their first element) and wraps what the handler returns
as ``{"id", "model_name", "model_version", "outputs": [{"name", "datatype": "BYTES",
"shape": [1], "data": [<response>]}]}``. :func:`is_v2_batch` recognises that shape and
:func:`merge_v2_inputs` folds the inputs back into one study (image, extra images,
options), so the handler answers with one response named after the first input.

TorchServe 0.12's envelope reads only the first request of a batch, so models served
through it must run with ``batchSize: 1`` (``deploy/kserve/config/config.properties``
sets it per model); the other requests of a larger batch would never be answered.
"""
from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

from .errors import MalformedInput

V2_KEYS = {"name", "datatype", "data"}
IMAGE_NAMES = ("image", "data", "body", "file", "input-0")


def is_v2_batch(requests: list) -> bool:
    """True when ``requests`` are the per-input dicts the kservev2 envelope produces."""
    return bool(requests) and all(isinstance(r, dict) and V2_KEYS <= set(r) and isinstance(r.get("name"), str)
                                  for r in requests)


def _unwrap(value: Any) -> Any:
    while isinstance(value, list) and len(value) == 1:
        value = value[0]
    return value


def _bytes(value: Any, name: str) -> bytes:
    value = _unwrap(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as err:
            raise MalformedInput(f"KServe v2 input {name!r}: BYTES data must be base64: {err}") from err
    raise MalformedInput(f"KServe v2 input {name!r}: expected BYTES data (base64 file)")


def merge_v2_inputs(inputs: list[dict], extra_images: tuple[str, ...] = ()) -> tuple[dict[str, bytes], dict]:
    """Per-input dicts -> ``({"image": bytes, "prior": bytes}, options)`` for one study."""
    images: dict[str, bytes] = {}
    options: dict = {}
    for entry in inputs:
        name = entry["name"]
        if name in IMAGE_NAMES:
            if "image" in images:
                raise MalformedInput("KServe v2 request has more than one image input: send one study per request")
            images["image"] = _bytes(entry.get("data"), name)
        elif name in extra_images:
            images[name] = _bytes(entry.get("data"), name)
        else:
            options[name] = _unwrap(entry.get("data"))
    return images, options


def v2_request(image: bytes, *, model_inputs: dict[str, bytes] | None = None, options: dict | None = None,
               request_id: str | None = None) -> dict:
    """Build a v2 request body for one study (clients, tests, the README)."""
    inputs = [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(image).decode()]}]
    for name, data in (model_inputs or {}).items():
        inputs.append({"name": name, "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(data).decode()]})
    for name, value in (options or {}).items():
        if isinstance(value, bool):
            inputs.append({"name": name, "datatype": "BOOL", "shape": [1], "data": [value]})
        elif isinstance(value, (int, float)):
            inputs.append({"name": name, "datatype": "FP64", "shape": [1], "data": [float(value)]})
        else:
            inputs.append({"name": name, "datatype": "BYTES", "shape": [1], "data": [str(value)]})
    body: dict = {"inputs": inputs}
    if request_id:
        body["id"] = request_id
    return body


def v2_response(body: dict) -> dict:
    """The cxrserve response inside a v2 answer (``outputs[0].data[0]``)."""
    try:
        return body["outputs"][0]["data"][0]
    except (KeyError, IndexError, TypeError) as err:
        raise ValueError(f"not a KServe v2 response: {str(body)[:200]}") from err


# --------------------------------------------------------------------------- model repository
KSERVE_PROPERTIES = """\
# TorchServe configuration for KServe's TorchServe runtime (written by `python -m cxrserve.kserve`).
# KServe mounts the storageUri at /mnt/models: this file is /mnt/models/config/config.properties
# and the archives are in /mnt/models/model-store.
#
# The KServe wrapper in the same container forwards v2 requests to TorchServe on loopback;
# only the metrics port listens on the pod network (Prometheus scraping).
inference_address=http://127.0.0.1:8085
management_address=http://127.0.0.1:8081
metrics_address=http://0.0.0.0:8082
grpc_inference_address=127.0.0.1
grpc_management_address=127.0.0.1
grpc_inference_port=7070
grpc_management_port=7071
service_envelope=kservev2
# The KServe wrapper sends no TorchServe token: authentication is the cluster's job
# (Istio / Knative AuthorizationPolicy in front of the InferenceService, see README).
disable_token_authorization=true
enable_model_api=false
install_py_dep_per_model=false
enable_envvars_config=false
model_store=/mnt/models/model-store
load_models=all
max_request_size=67108864
max_response_size=67108864
limit_max_image_pixels=true
enable_metrics_api=true
metrics_mode=prometheus
model_metrics_auto_detect=true
default_response_timeout=120
job_queue_size=200
vmargs=-Dlog4j.configurationFile=file:///mnt/models/config/log4j2.xml
"""


def prepare_model_repository(store: str | Path, out: str | Path, models: list[str] | None = None,
                             workers: int = 1) -> Path:
    """Lay out ``store``'s archives the way KServe's TorchServe runtime expects.

    ``out/config/config.properties`` (with ``model_snapshot`` naming every model, which
    the KServe wrapper reads), ``out/config/log4j2.xml`` and ``out/model-store/*.mar``.
    Each archive is copied with ``batchSize: 1`` in its ``model-config.yaml``: TorchServe
    0.12's kservev2 envelope answers only the first request of a batch (see module
    docstring); scale with replicas and workers instead.
    """
    import json
    import shutil
    import zipfile

    import yaml

    store, out = Path(store), Path(out)
    names = models or sorted(p.stem for p in store.glob("*.mar"))
    if not names:
        raise FileNotFoundError(f"no .mar archives in {store}")
    (out / "config").mkdir(parents=True, exist_ok=True)
    (out / "model-store").mkdir(parents=True, exist_ok=True)
    snapshot = {"name": "startup.cfg", "modelCount": len(names), "models": {}}
    for name in names:
        src = store / f"{name}.mar"
        dst = out / "model-store" / f"{name}.mar"
        with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst.with_suffix(".tmp"), "w") as zout:
            manifest = json.loads(zin.read("MAR-INF/MANIFEST.json"))
            config_name = manifest["model"].get("configFile", "model-config.yaml")
            for info in zin.infolist():
                data = zin.read(info.filename)
                if info.filename == config_name:
                    config = yaml.safe_load(data) or {}
                    config.update(batchSize=1, maxBatchDelay=0, minWorkers=workers, maxWorkers=workers)
                    data = yaml.safe_dump(config, sort_keys=False).encode()
                # Weights are already compressed-ish and large: store them, don't re-deflate.
                zout.writestr(info, data, compress_type=info.compress_type)
        dst.with_suffix(".tmp").replace(dst)
        version = manifest["model"].get("modelVersion", "1.0")
        snapshot["models"][name] = {version: {"defaultVersion": True, "marName": dst.name, "minWorkers": workers,
                                              "maxWorkers": workers, "batchSize": 1, "maxBatchDelay": 0,
                                              "responseTimeout": 120}}
    (out / "config" / "config.properties").write_text(
        KSERVE_PROPERTIES + f"model_snapshot={json.dumps(snapshot, separators=(',', ':'))}\n")
    shutil.copy(Path(__file__).with_name("log4j2.xml"), out / "config" / "log4j2.xml")
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cxrserve.kserve",
                                     description="lay out a model store for KServe's TorchServe runtime")
    parser.add_argument("--store", default="model_store")
    parser.add_argument("--out", default="build/kserve", help="upload this folder as the storageUri")
    parser.add_argument("--models", nargs="+", help="archives to include (default: all)")
    parser.add_argument("--workers", type=int, default=1, help="TorchServe workers per model and replica")
    args = parser.parse_args(argv)
    out = prepare_model_repository(args.store, args.out, args.models, args.workers)
    print(f"KServe model repository in {out}: upload it as the InferenceService storageUri")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
