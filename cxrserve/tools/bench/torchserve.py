"""TorchServe end to end: a private server over the store, REST and gRPC cases."""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Sequence


from cxrserve.tools.bench.inputs import BenchInput, REPO
from cxrserve.tools.bench.measure import Monitor, latency_summary, run_concurrent
from cxrserve.tools.bench.scores import main_scores

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- TorchServe
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TorchServeRun:
    """A private TorchServe (free loopback ports, own run folder) over chosen archives.

    ``archives`` maps served name -> ``.mar`` path; they are linked into a private
    store so the server loads exactly these (variants of one archive included).
    """

    def __init__(self, archives: dict[str, Path], workdir: Path, *, gpus: int = 0, timeout: float = 600,
                 config: dict[str, str] | None = None):
        self.archives = archives
        self.config = config or {}  # config.properties keys to set (e.g. vmargs), after the repository's
        self.workdir = Path(workdir)
        self.gpus = gpus
        self.timeout = timeout
        self.ports: dict[str, int] = {}
        self.keys: dict = {}

    def _config(self, store: Path) -> Path:
        import re

        self.ports = {k: _free_port() for k in ("inference", "management", "metrics", "grpc", "grpc_management")}
        source = REPO / "config.properties"
        text = source.read_text() if source.exists() else "disable_token_authorization=false\nenable_model_api=false\n"
        settings = {
            "inference_address": f"http://127.0.0.1:{self.ports['inference']}",
            "management_address": f"http://127.0.0.1:{self.ports['management']}",
            "metrics_address": f"http://127.0.0.1:{self.ports['metrics']}",
            "grpc_inference_address": "127.0.0.1",
            "grpc_management_address": "127.0.0.1",
            "grpc_inference_port": str(self.ports["grpc"]),
            "grpc_management_port": str(self.ports["grpc_management"]),
            "model_store": str(store),
            "load_models": ",".join(f"{name}={name}.mar" for name in self.archives),
            "max_request_size": "67108864",
            "max_response_size": "67108864",
            "number_of_gpu": str(self.gpus),
            **self.config,
        }
        for key, value in settings.items():
            if re.search(rf"^{re.escape(key)}=", text, flags=re.M):
                text = re.sub(rf"^{re.escape(key)}=.*$", lambda m: f"{key}={value}", text, flags=re.M)
            else:
                text += f"\n{key}={value}\n"
        path = self.workdir / "config.properties"
        path.write_text(text)
        return path

    def start(self) -> None:
        import requests

        from cxrserve.tools import server

        store = self.workdir / "store"
        shutil.rmtree(store, ignore_errors=True)
        store.mkdir(parents=True)
        for name, path in self.archives.items():
            # Linked under the served name: server.start waits for every <name>.mar in the store.
            (store / f"{name}.mar").symlink_to(Path(path).resolve())
        config = self._config(store)
        info = server.start(config, store, self.workdir, timeout=self.timeout)
        self.keys = server.read_keys(info["key_file"])
        deadline = time.time() + self.timeout
        pending = set(self.archives)  # names registered from variant archives are not in info["models"]
        while pending and time.time() < deadline:
            for name in list(pending):
                try:
                    r = requests.get(f"{self.management}/models/{name}", headers=self.auth("management"), timeout=5)
                    if r.status_code == 200 and any(w.get("status") == "READY" for w in r.json()[0]["workers"]):
                        pending.discard(name)
                except (requests.RequestException, ValueError, KeyError, IndexError):
                    pass
            if pending:
                time.sleep(1)
        if pending:
            raise TimeoutError(f"TorchServe workers for {sorted(pending)} not ready in {self.timeout:.0f} s")

    def stop(self) -> None:
        from cxrserve.tools import server

        server.stop(self.workdir)

    @property
    def inference(self) -> str:
        return f"http://127.0.0.1:{self.ports['inference']}"

    @property
    def management(self) -> str:
        return f"http://127.0.0.1:{self.ports['management']}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    def auth(self, kind: str = "inference") -> dict:
        return {"Authorization": f"Bearer {self.keys[kind]}"}

    def client(self, protocol: str):
        from cxrserve.tools.client import CXRClient

        url = self.grpc if protocol == "grpc" else self.inference
        return CXRClient(url, protocol=protocol, token=self.keys["inference"], timeout=300, retries=2)

    def server_pid(self) -> int | None:
        pidfile = self.workdir / "tmp" / ".model_server.pid"
        try:
            return int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def all_pids(self) -> list[int]:
        """The Java frontend, its worker launchers, the fork server and every Python worker."""
        import psutil

        from cxrserve.tools import server

        pids = []
        for root in (self.server_pid(), server.forkserver_pid(self.workdir)):
            if root is None:
                continue
            try:
                pids += [root] + [c.pid for c in psutil.Process(root).children(recursive=True)]
            except psutil.Error:
                pids.append(root)
        return sorted(set(pids))

    def worker_pids(self, name: str) -> list[int]:
        import requests

        try:
            r = requests.get(f"{self.management}/models/{name}", headers=self.auth("management"), timeout=5)
            return [int(w["pid"]) for w in r.json()[0]["workers"] if w.get("pid")]
        except (requests.RequestException, ValueError, KeyError, IndexError):
            return []

    def served_config(self, name: str) -> dict:
        import requests

        r = requests.get(f"{self.management}/models/{name}", headers=self.auth("management"), timeout=5)
        d = r.json()[0]
        return {k: d.get(k) for k in ("batchSize", "maxBatchDelay", "minWorkers", "maxWorkers")}


def served_case(run: TorchServeRun, name: str, inputs: Sequence[BenchInput], options: dict, *, protocol: str,
                concurrency: int, n: int, seconds: float, model: str | None = None) -> tuple[dict, dict]:
    """``concurrency`` clients sending ``inputs`` (cycled) to served model ``name``.

    Returns the row (latency summary, CPU use and peak RSS of TorchServe, of the model's
    worker, and of the client process) and the main scores per input.
    """
    client = run.client(protocol)
    scores: dict[str, dict[str, float]] = {}
    model = model or name

    def call(i: int) -> dict:
        inp = inputs[i % len(inputs)]
        result = client.predict(name, inp.data, options=options)
        scores.setdefault(inp.name, main_scores(model, result))
        return result

    from cxrserve.tools.client import InputRejected

    try:
        for i in range(min(concurrency, 2)):  # warm-up: connections, first-run allocations
            try:
                call(i)
            except InputRejected:  # an answer (e.g. an enforced gate's 422): counted in the case itself
                pass
        scores.clear()
        with (Monitor(run.all_pids) as server_mon, Monitor() as client_mon,
              Monitor(lambda: run.worker_pids(name)) as worker_mon):
            latencies, wall, _, failures = run_concurrent(call, n=n, seconds=seconds, concurrency=concurrency,
                                                          min_n=min(n, len(inputs), 2 * concurrency))
    finally:
        client.close()
    row = latency_summary(latencies, wall)
    row.update(server_mon.report("server_"))
    row.update({"worker_rss_peak_mb": worker_mon.report()["rss_peak_mb"]})
    row.update(client_mon.report("client_"))
    if failures:
        row["errors"] = failures
    return row, scores
