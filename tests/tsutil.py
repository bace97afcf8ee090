"""Test helpers: a TorchServe on free loopback ports, and a TorchServe-like handler context."""
from __future__ import annotations

import re
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import requests

from cxrserve.tools import server

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    inference: str
    management: str
    metrics: str
    grpc_inference_port: int
    grpc_management_port: int
    keys: dict
    workdir: Path
    models: list[str]

    def headers(self, kind: str = "inference") -> dict:
        return {"Authorization": f"Bearer {self.keys[kind]}"}

    def post(self, model: str, data: bytes | None = None, **kwargs) -> requests.Response:
        headers = {**self.headers(), **kwargs.pop("headers", {})}
        if data is not None:
            headers.setdefault("Content-Type", "application/octet-stream")
        return requests.post(f"{self.inference}/predictions/{model}", data=data, headers=headers,
                             timeout=kwargs.pop("timeout", 120), **kwargs)


def write_config(workdir: Path, store: Path, **overrides) -> tuple[Path, dict]:
    """config.properties with every port replaced by a free one (several servers may run)."""
    ports = {name: free_port() for name in ("inference", "management", "metrics", "grpc_inference", "grpc_management")}
    text = (REPO / "config.properties").read_text()
    text = re.sub(r"^inference_address=.*$", f"inference_address=http://127.0.0.1:{ports['inference']}", text, flags=re.M)
    text = re.sub(r"^management_address=.*$", f"management_address=http://127.0.0.1:{ports['management']}", text, flags=re.M)
    text = re.sub(r"^metrics_address=.*$", f"metrics_address=http://127.0.0.1:{ports['metrics']}", text, flags=re.M)
    text = re.sub(r"^grpc_inference_port=.*$", f"grpc_inference_port={ports['grpc_inference']}", text, flags=re.M)
    text = re.sub(r"^grpc_management_port=.*$", f"grpc_management_port={ports['grpc_management']}", text, flags=re.M)
    text = re.sub(r"^model_store=.*$", f"model_store={store}", text, flags=re.M)
    for key, value in overrides.items():
        if re.search(rf"^{key}=", text, flags=re.M):
            text = re.sub(rf"^{key}=.*$", f"{key}={value}", text, flags=re.M)
        else:
            text += f"\n{key}={value}\n"
    path = workdir / "config.properties"
    path.write_text(text)
    return path, ports


def start_torchserve(store: Path, workdir: Path, timeout: float = 600, extra_env: dict | None = None,
                     **overrides) -> Served:
    """Start TorchServe on ``store`` from ``workdir``; caller must ``server.stop(workdir)``."""
    workdir.mkdir(parents=True, exist_ok=True)
    config, ports = write_config(workdir, store, **overrides)
    info = server.start(config, store, workdir, timeout=timeout, extra_env=extra_env)
    return Served(
        inference=f"http://127.0.0.1:{ports['inference']}",
        management=f"http://127.0.0.1:{ports['management']}",
        metrics=f"http://127.0.0.1:{ports['metrics']}",
        grpc_inference_port=ports["grpc_inference"],
        grpc_management_port=ports["grpc_management"],
        keys=server.read_keys(info["key_file"]),
        workdir=workdir,
        models=info["models"],
    )


@dataclass
class HandlerContext:
    """What TorchServe hands a handler, with per-request headers and statuses recorded.

    TorchServe's own MockContext lacks request-level methods (statuses, headers), which
    are exactly what cxrserve's handlers use to answer each request on its own.
    """

    model_dir: str
    model_yaml_config: dict = field(default_factory=dict)
    headers: list[dict] = field(default_factory=list)
    statuses: dict[int, tuple[int, str]] = field(default_factory=dict)

    def __post_init__(self):
        from ts.metrics.metrics_store import MetricsStore

        self.system_properties = {"model_dir": self.model_dir}
        self.manifest = {"model": {}}
        self.metrics = MetricsStore(uuid.uuid4(), "test")
        self.explain = False

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0):
        self.statuses[idx] = (code, phrase)

    def get_all_request_header(self, idx: int) -> dict:
        return self.headers[idx] if idx < len(self.headers) else {}

    def get_request_header(self, idx: int, key: str):
        return self.get_all_request_header(idx).get(key)

    def status(self, idx: int) -> int:
        return self.statuses.get(idx, (200, ""))[0]


def png(img) -> bytes:
    """An image array (grey, RGB or RGBA) as PNG bytes, the upload most tests send."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()
