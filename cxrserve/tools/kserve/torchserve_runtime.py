"""``python -m cxrserve.tools.kserve.torchserve_runtime``: the store laid out for KServe's TorchServe runtime.

The other way to run cxrserve on KServe (the first is the native predictor, ``cxrserve
kserve``): KServe's own TorchServe runtime. Writes ``config/config.properties``
(``service_envelope=kservev2``, one worker and batch size 1 per model: the envelope
answers only a batch's first request), ``config/log4j2.xml`` and ``model-store/*.mar``;
see ``deploy/kserve/``.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

KSERVE_PROPERTIES = """\
# TorchServe configuration for KServe's TorchServe runtime (python -m cxrserve.tools.kserve.torchserve_runtime).
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
# The frontend's JVM as in the repository's config.properties (~130 MB instead of ~400-480), plus the log config.
vmargs=-XX:+UseSerialGC -Xms16m -XX:MinHeapFreeRatio=10 -XX:MaxHeapFreeRatio=30 -XX:ReservedCodeCacheSize=64m -Xss512k -XX:TieredStopAtLevel=1 -Dio.netty.allocator.type=unpooled -Dlog4j.configurationFile=file:///mnt/models/config/log4j2.xml
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
    import zipfile

    import yaml

    from cxrserve.tools.kserve.repository import config_name
    from cxrserve.tools.server import LOG_CONFIG

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
            config_file = config_name(manifest)
            for info in zin.infolist():
                data = zin.read(info.filename)
                if info.filename == config_file:
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
    shutil.copy(LOG_CONFIG, out / "config" / "log4j2.xml")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxrserve.tools.kserve.torchserve_runtime",
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
