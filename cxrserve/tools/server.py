"""Start, stop and wait for a local TorchServe with the project's configuration.

``start`` runs ``torchserve --start`` in the background from a run folder (where
TorchServe writes ``key_file.json`` and ``logs/``), then returns once ``/ping`` is
healthy and every archive in the store has a ready worker, or raises with the tail of
the model log (TorchServe otherwise buries load failures there).

TorchServe keeps its pid file in the temp folder, so two servers on one machine (a
running service and a test run, say) would fight over it; each run folder therefore
gets its own ``TMPDIR``, and ``stop`` must be given the same run folder.

Workers are forked from a fork server (:mod:`cxrserve.tools.forkserver`) that has imported
torch and the other heavy libraries once, so they share those pages instead of each
paying ~300 MB; ``CXRSERVE_FORKSERVER=0`` starts them the ordinary way.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import requests

from cxrserve.core.sites import SITES_ENV, SITES_FOLDER
from cxrserve.tools import forkserver

DEFAULT_INFERENCE = "http://127.0.0.1:8080"
#: TorchServe's logging with request bytes redacted from exception messages (see the file).
LOG_CONFIG = Path(__file__).resolve().parent / "log4j2.xml"
DEFAULT_MANAGEMENT = "http://127.0.0.1:8081"


def read_keys(key_file: str | Path) -> dict:
    """``{"inference": ..., "management": ..., "api": ...}`` from TorchServe's key file."""
    data = json.loads(Path(key_file).read_text())
    return {kind.lower(): entry["key"] for kind, entry in data.items() if isinstance(entry, dict) and "key" in entry}


def find_key_file(start: str | Path | None = None) -> Path | None:
    """``$CXRSERVE_KEY_FILE``, else ``key_file.json`` in the folder or its parents."""
    env = os.environ.get("CXRSERVE_KEY_FILE")
    if env:
        return Path(env)
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "key_file.json").exists():
            return folder / "key_file.json"
    return None


def _torchserve() -> str:
    exe = Path(sys.executable).parent / "torchserve"
    return str(exe) if exe.exists() else (shutil.which("torchserve") or "torchserve")


def read_properties(path: str | Path) -> dict:
    """``key=value`` lines of a TorchServe ``config.properties`` (comments skipped)."""
    props = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


class AlreadyRunning(RuntimeError):
    """``start`` found a TorchServe of this run folder alive (``pid``)."""

    def __init__(self, pid: int, workdir: Path):
        super().__init__(f"TorchServe is already running (pid {pid}) from {workdir}")
        self.pid, self.workdir = pid, workdir


def running(workdir: str | Path = ".") -> int | None:
    """The pid of the TorchServe started from ``workdir`` if it is alive, else None.

    TorchServe writes its pid to ``$TMPDIR/.model_server.pid``; ``start`` gives each run
    folder its own ``TMPDIR`` (``workdir/tmp``), so this is that folder's server only.
    """
    pid_file = Path(workdir).resolve() / "tmp" / ".model_server.pid"
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def start(config: str | Path = "config.properties", store: str | Path = "model_store", workdir: str | Path = ".",
          timeout: float = 600, extra_env: dict | None = None) -> dict:
    """Start TorchServe and wait until it serves; returns addresses and key-file path."""
    config, store, workdir = Path(config).resolve(), Path(store).resolve(), Path(workdir).resolve()
    pid = running(workdir)
    if pid is not None:
        raise AlreadyRunning(pid, workdir)
    archives = sorted(p.stem for p in store.glob("*.mar"))
    if not archives:
        raise FileNotFoundError(f"no .mar archives in {store}: run `make store` first")
    props = read_properties(config)
    inference = props.get("inference_address", DEFAULT_INFERENCE)
    management = props.get("management_address", DEFAULT_MANAGEMENT)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TMPDIR": str(_tmpdir(workdir)), **(extra_env or {})}
    # Workers read the store's site profiles (cxrserve site install) once, when they start.
    env.setdefault(SITES_ENV, str(store / SITES_FOLDER))
    cmd = [_torchserve(), "--start", "--ncs", "--model-store", str(store), "--ts-config", str(config)]
    python = _start_forkserver(workdir, env)
    if python:
        # TorchServe starts workers with the interpreter its CLI runs under (`--python
        # sys.executable`, which overrides the config's `python=`): run the CLI with
        # sys.executable set to the launcher that hands workers to the fork server.
        cmd = [sys.executable, "-c", "import sys; sys.executable = sys.argv.pop(1); "
               "from ts.model_server import start; sys.argv[0] = 'torchserve'; sys.exit(start())",
               python, *cmd[1:]]
    if LOG_CONFIG.exists() and "log4j.configurationFile" not in config.read_text():
        cmd += ["--log-config", str(LOG_CONFIG)]
    try:
        subprocess.run(cmd, cwd=workdir, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except subprocess.CalledProcessError:
        _stop_forkserver(workdir)  # no TorchServe to serve: leave nothing behind
        raise
    # With token authorization disabled (KServe's configuration) there is no key file.
    tokens = props.get("disable_token_authorization", "false").strip().lower() != "true"
    key_file = workdir / "key_file.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (key_file.exists() or not tokens) and _ready(inference, management, key_file if tokens else None, archives):
            return {"inference": inference, "management": management, "key_file": str(key_file) if tokens else None,
                    "models": archives}
        time.sleep(1.0)
    tail = _log_tail(workdir / "logs" / "model_log.log")
    raise TimeoutError(f"TorchServe did not get ready within {timeout:.0f} s. model_log.log ends:\n{tail}")


def _ready(inference: str, management: str, key_file: Path | None, models: list[str]) -> bool:
    try:
        keys = read_keys(key_file) if key_file is not None else {}
        ping = requests.get(f"{inference}/ping", timeout=2,
                            headers={"Authorization": f"Bearer {keys['inference']}"} if keys else {})
        if ping.status_code != 200:
            return False
        auth = {"Authorization": f"Bearer {keys['management']}"} if keys else {}
        for name in models:
            r = requests.get(f"{management}/models/{name}", headers=auth, timeout=5)
            if r.status_code != 200:
                return False
            workers = r.json()[0].get("workers", [])
            if not any(w.get("status") == "READY" for w in workers):
                return False
        return True
    except (requests.RequestException, ValueError, KeyError, json.JSONDecodeError):
        return False


def _tmpdir(workdir: Path) -> Path:
    path = Path(workdir).resolve() / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path


def stop(workdir: str | Path = ".") -> bool:
    """Stop the TorchServe of ``workdir`` (and its fork server); False when none was running."""
    if running(workdir) is None:
        _stop_forkserver(Path(workdir))
        return False
    env = {**os.environ, "TMPDIR": str(_tmpdir(Path(workdir)))}
    subprocess.run([_torchserve(), "--stop"], cwd=workdir, env=env, check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _stop_forkserver(Path(workdir))
    return True


def _forkserver_state(workdir: Path) -> Path:
    return _tmpdir(workdir) / "forkserver.json"


def forkserver_pid(workdir: str | Path = ".") -> int | None:
    """The pid of the fork server of ``workdir``'s TorchServe if it is alive (its children are the workers)."""
    try:
        pid = int(json.loads(_forkserver_state(Path(workdir)).read_text())["pid"])
        # alive and still ours (a stale state file must never name a reused pid)
        return pid if b"forkserver.py" in Path(f"/proc/{pid}/cmdline").read_bytes() else None
    except (OSError, ValueError, KeyError):
        return None


def _start_forkserver(workdir: Path, env: dict, timeout: float = 120) -> str | None:
    """Start the fork server for ``workdir``; the worker launcher's path, or None (off or failed)."""
    _stop_forkserver(workdir)
    if env.get("CXRSERVE_FORKSERVER", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    tmp = _tmpdir(workdir)
    folder, temporary = _socket_folder(tmp)
    sock = folder / "forkserver.sock"
    log = open(workdir / "logs" / "forkserver.log", "ab")
    proc = subprocess.Popen([sys.executable, forkserver.__file__, "serve", str(sock)], cwd=workdir, env=env,
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    log.close()
    _forkserver_state(workdir).write_text(json.dumps(
        {"pid": proc.pid, "socket": str(sock), **({"folder": str(folder)} if temporary else {})}))
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.lexists(sock):
            if forkserver.socket_problem(sock) is None:
                return forkserver.launcher(tmp, sock)
            break  # something else is at our socket's path: never send workers there
        time.sleep(0.2)
    _stop_forkserver(workdir)  # workers then start the ordinary way
    return None


def _socket_folder(tmp: Path) -> tuple[Path, bool]:
    """A folder only this user can enter for the fork server's socket; (folder, made by mkdtemp).

    ``<run>/tmp/forkserver`` (0700) when its socket path fits AF_UNIX's 108 bytes, else a
    fresh ``tempfile.mkdtemp`` folder: unpredictable, 0700, removed on stop. (A fixed name in
    /tmp could be taken first by another user, who would then receive every worker's argv,
    environment with its tokens, and stdio.)
    """
    import tempfile

    folder = tmp / "forkserver"
    if len(str(folder / "forkserver.sock")) + len(".tmp") <= 100:
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            st = os.lstat(folder)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
                os.chmod(folder, 0o700)  # ours, left with another mode: make it private again
        if forkserver.folder_problem(folder) is None:
            return folder, False
    return Path(tempfile.mkdtemp(prefix="cxrserve-")), True


def _is_socket_tempdir(folder: Path) -> bool:
    """A folder :func:`_socket_folder` made with mkdtemp (ours, 0700, not a symlink): safe to remove."""
    import tempfile

    return (folder.parent == Path(tempfile.gettempdir()) and folder.name.startswith("cxrserve-")
            and forkserver.folder_problem(folder) is None)


def _stop_forkserver(workdir: Path) -> None:
    pid = forkserver_pid(workdir)
    try:
        folder = json.loads(_forkserver_state(workdir).read_text()).get("folder")
    except (OSError, ValueError, AttributeError):
        folder = None
    if pid is not None:
        import signal

        os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:  # our own child: reap it
                    break
            except ChildProcessError:  # started by another process: poll it
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
            time.sleep(0.1)
    if folder and _is_socket_tempdir(Path(folder)):
        shutil.rmtree(folder, ignore_errors=True)
    _forkserver_state(workdir).unlink(missing_ok=True)


def probe(config: str | Path = "config.properties", workdir: str | Path = ".", ready: bool = False,
          timeout: float = 5.0) -> tuple[bool, str]:
    """Liveness (``/ping`` Healthy) or readiness (every model has a READY worker) for probes.

    Reads the tokens from the run folder's key file, so a Kubernetes ``exec`` probe or a
    load balancer's check command needs no token of its own, and answers only yes/no:
    nothing about models, inputs or metrics leaves this function.
    """
    config, workdir = Path(config).resolve(), Path(workdir).resolve()
    props = read_properties(config)
    inference = props.get("inference_address", DEFAULT_INFERENCE)
    management = props.get("management_address", DEFAULT_MANAGEMENT)
    tokens = props.get("disable_token_authorization", "false").strip().lower() != "true"
    key_file = workdir / "key_file.json"
    try:
        keys = read_keys(key_file) if tokens else {}
    except (OSError, ValueError, KeyError):
        return False, f"no readable key file at {key_file}: is TorchServe running from {workdir}?"
    auth = {"Authorization": f"Bearer {keys['inference']}"} if keys else {}
    try:
        r = requests.get(f"{inference}/ping", headers=auth, timeout=timeout)
        if r.status_code != 200 or r.json().get("status") != "Healthy":
            return False, f"not healthy: HTTP {r.status_code}"
    except (requests.RequestException, ValueError) as err:
        return False, f"not reachable: {type(err).__name__}"
    if not ready:
        return True, "live"
    auth = {"Authorization": f"Bearer {keys['management']}"} if keys else {}
    try:
        r = requests.get(f"{management}/models", headers=auth, timeout=timeout)
        names = [m["modelName"] for m in r.json().get("models", [])] if r.status_code == 200 else []
    except (requests.RequestException, ValueError, KeyError):
        return False, "management API not reachable"
    if not names:
        return False, "no models registered"
    if not _ready(inference, management, key_file if tokens else None, names):
        return False, "not every model has a ready worker"
    return True, f"ready ({len(names)} models)"


def _log_tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return "(no model log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
