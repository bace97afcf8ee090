"""TorchServe's workers forked from cxrserve's fork server: served, replaced, stopped, and optional.

A throwaway archive whose handler answers with its own process ids keeps these tests about
the process plumbing (seconds), not about the models (the rest of the suite serves those
through the same fork server).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests
from tsutil import start_torchserve

from cxrserve.tools import forkserver, server

HANDLER = '''
import os, sys
from ts.torch_handler.base_handler import BaseHandler

class Handler(BaseHandler):
    def initialize(self, context):
        self.initialized = True

    def handle(self, data, context):
        import torch
        return [{"pid": os.getpid(), "ppid": os.getppid(), "sum": float(torch.ones(3).sum()),
                 "tmpdir": os.environ.get("TMPDIR"), "path": sys.path, "env": dict(os.environ), "cwd": os.getcwd()}
                for _ in data]
'''


@pytest.fixture(scope="module")
def echo_store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("echo")
    (folder / "handler.py").write_text(HANDLER)
    store = folder / "store"
    store.mkdir()
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "torch-model-archiver"), "--model-name", "echo",
                    "--version", "1", "--handler", str(folder / "handler.py"), "--export-path", str(store)],
                   check=True)
    return store


def ask(served) -> dict:
    r = requests.post(f"{served.inference}/predictions/echo", data=b"x", headers=served.headers(), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def worker_pids(served) -> list[int]:
    r = requests.get(f"{served.management}/models/echo", headers=served.headers("management"), timeout=10)
    return sorted(int(w["pid"]) for w in r.json()[0]["workers"] if w["status"] == "READY" and w.get("pid"))


def wait_for(condition, seconds: float = 60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    return condition()


def test_workers_are_forked_replaced_and_stopped(echo_store, tmp_path):
    workdir = tmp_path / "run"
    served = start_torchserve(echo_store, workdir, timeout=180, default_workers_per_model=2)
    try:
        parent = server.forkserver_pid(workdir)
        assert parent is not None, "no fork server running"
        answer = ask(served)
        assert answer["ppid"] == parent and answer["sum"] == 3.0
        assert answer["tmpdir"] == str(workdir.resolve() / "tmp"), "the worker must get TorchServe's environment"
        before = worker_pids(served)
        assert len(before) == 2 and all(psutil.Process(p).ppid() == parent for p in before)

        # A worker killed outright is replaced by TorchServe, again from the fork server.
        os.kill(before[0], signal.SIGKILL)
        after = wait_for(lambda: (lambda pids: pids if len(pids) == 2 and before[0] not in pids else None)(
            worker_pids(served)))
        assert after and before[0] not in after
        assert all(psutil.Process(p).ppid() == parent for p in after)

        # The process TorchServe holds is the launcher; killing it (what TorchServe does to a
        # stuck worker) takes its forked worker down too, and TorchServe starts another.
        launchers = psutil.Process(server.running(workdir)).children()
        assert len(launchers) == 2 and not {p.pid for p in launchers} & set(after)
        launchers[0].kill()
        assert wait_for(lambda: any(not psutil.pid_exists(p) for p in after), 30), "a worker outlived its launcher"
        assert wait_for(lambda: (lambda pids: len(pids) == 2 and set(pids) != set(after))(worker_pids(served)), 90)
        assert ask(served)["sum"] == 3.0
    finally:
        server.stop(workdir)
    assert server.forkserver_pid(workdir) is None
    assert wait_for(lambda: not any(p.info["ppid"] == parent for p in psutil.process_iter(["ppid"])), 30), \
        "workers survived the stop"


def test_forked_worker_sees_what_an_ordinary_worker_sees(echo_store, tmp_path, monkeypatch):
    """Same module path, environment and folder as TorchServe's own start (`CXRSERVE_FORKSERVER=0`)."""
    answers = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("CXRSERVE_FORKSERVER", mode)
        workdir = tmp_path / "run"  # the same run folder, so the same TMPDIR and paths
        served = start_torchserve(echo_store, workdir, timeout=180)
        try:
            answers[mode] = ask(served)
            frontend = server.running(workdir)
            expected_parent = frontend if mode == "0" else server.forkserver_pid(workdir)
            assert answers[mode]["ppid"] == expected_parent
        finally:
            server.stop(workdir)
    # TorchServe extracts the archive to a fresh models/<id> folder per start: compare without it.
    ordinary, forked = (json.loads(re.sub(r"/models/[0-9a-f]{32}", "/models/ID", json.dumps(answers[m])))
                        for m in ("0", "1"))
    assert forked["path"] == ordinary["path"]
    assert forked["cwd"] == ordinary["cwd"]
    assert {k: v for k, v in forked["env"].items() if k != "CXRSERVE_FORKSERVER"} == \
        {k: v for k, v in ordinary["env"].items() if k != "CXRSERVE_FORKSERVER"}


def test_launcher_without_a_server_runs_the_real_python(tmp_path):
    """A stopped fork server must never stop workers from starting: the client execs Python."""
    script = forkserver.launcher(tmp_path, tmp_path / "absent.sock")
    worker = tmp_path / "fake" / "ts" / "model_service_worker.py"
    worker.parent.mkdir(parents=True)
    worker.write_text("import json, sys; print(json.dumps(sys.argv[1:]))")
    out = subprocess.run([script, str(worker), "--sock-type", "unix"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == ["--sock-type", "unix"]
    # Anything that is not a worker goes straight to the real interpreter.
    out = subprocess.run([script, "-c", "import sys; print(sys.version_info[0])"], capture_output=True, text=True)
    assert out.stdout.strip() == "3"


def test_forked_worker_reports_its_exit_status(tmp_path):
    """The launcher exits with the worker's status, as a directly started worker would."""
    sock = tmp_path / "fs.sock"
    proc = subprocess.Popen([sys.executable, forkserver.__file__, "serve", str(sock)])
    try:
        assert wait_for(sock.exists, 120), "fork server did not come up"
        # A malformed request (no descriptors) is dropped; the server keeps serving.
        import socket

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bad:
            bad.connect(str(sock))
            bad.sendall(b"\x00\x00\x00\x02{}")
            assert bad.recv(16) == b"", "a malformed request should be closed, not answered"
        script = forkserver.launcher(tmp_path, sock)
        worker = tmp_path / "ts" / "model_service_worker.py"
        worker.parent.mkdir()
        worker.write_text("import os, sys, torch\nprint('child of', os.getppid(), 'torch' in sys.modules, flush=True)\n"
                          "sys.exit(int(sys.argv[1]))\n")
        out = subprocess.run([script, str(worker), "7"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 7, out.stderr
        assert out.stdout.split() == ["child", "of", str(proc.pid), "True"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert not sock.exists()


# --------------------------------------------------------------------------- the socket's place
def run_worker(script: str, tmp_path, timeout: float = 60) -> subprocess.CompletedProcess:
    """One worker start through the launcher: it prints its parent pid."""
    worker = tmp_path / "ts" / "model_service_worker.py"
    worker.parent.mkdir(exist_ok=True)
    worker.write_text("import os\nprint(os.getppid(), flush=True)\n")
    return subprocess.run([script, str(worker)], capture_output=True, text=True, timeout=timeout)


def listening(path) -> "socket.socket":
    import socket

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    listener.setblocking(False)
    return listener


def got_a_connection(listener) -> bool:
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


def test_a_long_run_folder_gets_a_private_socket_folder_not_the_old_predictable_path(tmp_path):
    import hashlib
    import stat
    import tempfile

    workdir = tmp_path / ("r" * 110)  # <run>/tmp/forkserver/forkserver.sock would pass AF_UNIX's limit
    (workdir / "logs").mkdir(parents=True)
    # Someone else listening first at the path the old code always used for this run folder.
    old = Path(tempfile.gettempdir()) / f"cxrserve-{hashlib.sha1(str(workdir).encode()).hexdigest()[:12]}.sock"
    planted = listening(old)
    try:
        script = server._start_forkserver(workdir, dict(os.environ))
        assert script is not None, (workdir / "logs" / "forkserver.log").read_text()[-2000:]
        sock = Path(json.loads(server._forkserver_state(workdir).read_text())["socket"])
        folder = sock.parent
        assert sock != old and folder.parent == Path(tempfile.gettempdir()) and folder.name.startswith("cxrserve-")
        st = os.lstat(folder)
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
        assert stat.S_ISSOCK(os.lstat(sock).st_mode)
        out = run_worker(script, tmp_path)
        assert out.returncode == 0 and int(out.stdout) == server.forkserver_pid(workdir), out.stderr
        assert not got_a_connection(planted), "a worker was sent to the planted socket"
    finally:
        server._stop_forkserver(workdir)
        planted.close()
        old.unlink(missing_ok=True)
    assert not folder.exists(), "the private socket folder outlived the stop"


def test_a_short_run_folder_keeps_its_socket_in_a_0700_folder_of_the_run(tmp_path):
    import stat

    tmp = tmp_path / "run" / "tmp"
    tmp.mkdir(parents=True)
    (tmp / "forkserver").mkdir(mode=0o755)
    os.chmod(tmp / "forkserver", 0o755)  # left open by an older run: made private again
    folder, temporary = server._socket_folder(tmp)
    assert folder == tmp / "forkserver" and not temporary
    assert stat.S_IMODE(os.lstat(folder).st_mode) == 0o700


def test_the_launcher_refuses_a_socket_it_cannot_trust(tmp_path):
    """A socket in a folder others can enter, a non-socket or a symlink: the worker starts directly."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o755)
    planted = listening(shared / "fs.sock")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "file.sock").write_text("")
    os.symlink(shared / "fs.sock", private / "link.sock")
    try:
        assert "mode 755" in forkserver.socket_problem(shared / "fs.sock")
        assert "not a socket" in forkserver.socket_problem(private / "file.sock")
        assert "not a socket" in forkserver.socket_problem(private / "link.sock")  # lstat: the link itself
        for path in (shared / "fs.sock", private / "link.sock"):
            out = run_worker(forkserver.launcher(tmp_path, path), tmp_path, timeout=30)
            assert out.returncode == 0 and "socket refused" in out.stderr, out.stderr
            assert not got_a_connection(planted), f"the launcher connected to {path}"
    finally:
        planted.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a socket to another user needs root")
def test_a_socket_of_another_user_is_refused(tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    planted = listening(private / "fs.sock")
    try:
        os.chown(private / "fs.sock", 65534, 65534)
        assert "belongs to uid 65534" in forkserver.socket_problem(private / "fs.sock")
        os.chown(private / "fs.sock", 0, 0)
        os.chown(private, 65534, 65534)
        assert "belongs to uid 65534" in forkserver.socket_problem(private / "fs.sock")
    finally:
        planted.close()


def test_the_server_will_not_listen_in_a_folder_others_can_enter(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    out = subprocess.run([sys.executable, forkserver.__file__, "serve", str(shared / "fs.sock")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "refusing to listen" in out.stderr, out.stderr
    assert not list(shared.iterdir())
