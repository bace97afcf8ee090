"""A fork server for TorchServe's Python workers: import torch once, fork every worker from it.

Every TorchServe worker is its own ``python model_service_worker.py`` process. With the
CUDA build of torch (the pinned wheel, also on CPU-only hosts) importing torch, ONNX
Runtime and OpenCV costs about 300 MB of private memory per process (cuBLASLt's load
alone about 100 MB), so six workers pay it six times. Forked from one parent that has
already imported them, the workers share those pages copy-on-write: six idle workers
measured 2,170 MB PSS started separately and 607 MB forked (``docs/PERFORMANCE.md``).

How it plugs in (``cxrserve serve start`` does all of it; ``CXRSERVE_FORKSERVER=0`` turns
it off):

- ``serve SOCKET`` runs the server: it imports third-party libraries only (never
  ``cxrserve``: each archive imports its own bundled copy), freezes the garbage
  collector's heap so reference counting does not dirty the shared pages, and forks one
  child per connection.
- TorchServe starts workers with the Python it was started with; :func:`launcher` writes
  a script that TorchServe is started with instead. For ``model_service_worker.py`` it
  calls :func:`connect` from this file: the client sends its argv,
  environment, working folder and its stdin/stdout/stderr descriptors; the forked child
  takes them over and runs the worker, so TorchServe reads the worker's log lines (and
  its ``[PID]``) exactly as before. Anything else runs the real Python.
- The client stays as the process TorchServe holds: it forwards SIGTERM/SIGINT, exits
  with the worker's status, and if it is killed (TorchServe's ``destroyForcibly``) the
  child sees its connection close and exits. If the server is unreachable the client
  becomes an ordinary worker (``exec`` of the real Python), so nothing depends on it.
- The socket lives in a folder only this user can enter (0700, ours; :func:`socket_problem`
  is checked by the server before it listens and by the client before it connects), since
  whoever listens there would receive every worker's argv, environment and stdio.

The client half uses the standard library only and runs with ``python -IS``.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import sys

#: Third-party modules every worker imports (missing ones are skipped). Never cxrserve's own.
PRELOAD = ("numpy", "torch", "torchvision", "onnxruntime", "cv2", "PIL.Image", "scipy.ndimage", "yaml",
           "pydicom", "pylibjpeg", "simplejpeg", "open_clip", "ts.model_loader", "ts.service",
           "ts.protocol.otf_message_handler", "ts.arg_parser", "ts.torch_handler.base_handler")
_HEADER_LIMIT = 4 << 20
_REQUEST_TIMEOUT = 10.0


# ----------------------------------------------------------------------------- the socket's place


def folder_problem(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` cannot hold the socket (None: it can): a real directory of ours, 0700.

    Whoever can create the socket's path first receives every worker's argv, environment
    (tokens included) and stdio, so the folder must be one that only this user can enter.
    """
    try:
        st = os.lstat(folder)  # lstat: a symlink to someone else's folder is not ours
    except OSError as err:
        return f"{os.fspath(folder)}: {err.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{os.fspath(folder)} is not a directory"
    if st.st_uid != os.getuid():
        return f"{os.fspath(folder)} belongs to uid {st.st_uid}, not {os.getuid()}"
    if stat.S_IMODE(st.st_mode) & 0o077:
        return f"{os.fspath(folder)} has mode {stat.S_IMODE(st.st_mode):o}, not 700"
    return None


def socket_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` must not be connected to (None: it may): our socket in a :func:`folder_problem`-free folder."""
    problem = folder_problem(os.path.dirname(os.path.abspath(path)))
    if problem:
        return problem
    try:
        st = os.lstat(path)
    except OSError as err:
        return f"{os.fspath(path)}: {err.strerror}"
    if not stat.S_ISSOCK(st.st_mode):
        return f"{os.fspath(path)} is not a socket"
    if st.st_uid != os.getuid():
        return f"{os.fspath(path)} belongs to uid {st.st_uid}, not {os.getuid()}"
    return None


# ----------------------------------------------------------------------------- client


def _send_request(conn: socket.socket, argv: list[str]) -> None:
    header = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
    socket.send_fds(conn, [len(header).to_bytes(4, "big") + header], [0, 1, 2])


def connect(path: str, argv: list[str], real_python: str) -> int:
    """Run ``argv`` (a worker command line) as a child of the server at ``path``; its exit status."""
    problem = socket_problem(path)
    if problem:
        # Never hand argv, environment and stdio to a socket someone else could have made.
        if os.path.lexists(path):  # (no socket at all: the server is stopped, nothing to report)
            print(f"cxrserve fork server socket refused ({problem}): starting the worker directly",
                  file=sys.stderr, flush=True)
        os.execv(real_python, [real_python, *argv])
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        _send_request(conn, argv)
        reply = conn.makefile("rb")
        first = reply.readline().split()
        if len(first) != 2 or first[0] != b"pid":
            raise ConnectionError("no pid from the fork server")
    except OSError:
        conn.close()
        # No server (stopped, or never started): be the worker ourselves.
        os.execv(real_python, [real_python, *argv])
    child = int(first[1])

    def forward(signum, _frame):
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for line in reply:
        parts = line.split()
        if len(parts) == 2 and parts[0] == b"exit":
            return int(parts[1])
    return 1  # the connection closed without a status: the worker was killed


# ----------------------------------------------------------------------------- server


def _recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    # A client that stalls must not hold up every other worker's start.
    conn.settimeout(_REQUEST_TIMEOUT)
    data, fds, _flags, _addr = socket.recv_fds(conn, 65536, 3)
    try:
        if len(data) < 4 or len(fds) != 3:
            raise ValueError("malformed request")
        size = int.from_bytes(data[:4], "big")
        if size > _HEADER_LIMIT:
            raise ValueError("request too large")
        body = data[4:]
        while len(body) < size:
            chunk = conn.recv(size - len(body))
            if not chunk:
                raise ValueError("truncated request")
            body += chunk
        request = json.loads(body)
    except (OSError, ValueError):
        for fd in fds:
            os.close(fd)
        raise
    conn.settimeout(None)  # the child's lifeline blocks on it
    return request, fds


def _run_child(listener: socket.socket, conn: socket.socket, request: dict, fds: list[int]) -> None:
    """In the forked child: become the worker that the client asked for. Never returns."""
    code = 1
    try:
        listener.close()
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        script, *args = request["argv"]
        # The path a fresh `python script` would have: the script's folder, then $PYTHONPATH.
        extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [os.path.dirname(os.path.abspath(script)), *extra, *[p for p in sys.path if p not in extra]]
        sys.argv = [script, *args]
        import logging
        import threading

        logging.root.handlers.clear()  # the worker's basicConfig must take effect
        conn.sendall(b"pid %d\n" % os.getpid())

        def lifeline():
            # The client is the process TorchServe holds; when it goes, so does the worker.
            while conn.recv(4096):
                pass
            os._exit(1)

        threading.Thread(target=lifeline, name="forkserver-lifeline", daemon=True).start()
        import runpy

        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # noqa: BLE001 - report and exit, never return into the server's loop
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        try:
            conn.sendall(b"exit %d\n" % code)
        except OSError:
            pass
        os._exit(code)


def serve(path: str) -> None:
    """Import :data:`PRELOAD`, then fork a worker for every connection on the socket ``path``."""
    import gc
    import importlib

    problem = folder_problem(os.path.dirname(os.path.abspath(path)))
    if problem:
        raise SystemExit(f"fork server: refusing to listen there ({problem})")
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)  # run as a script: cxrserve/tools must not shadow anything
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a missing optional module only costs its sharing
            pass
    gc.collect()
    gc.freeze()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    os.chmod(path + ".tmp", 0o600)  # only this user's TorchServe may start workers here
    listener.listen(16)
    os.rename(path + ".tmp", path)  # appears only once the imports are done
    try:
        while True:
            conn, _ = listener.accept()
            try:
                request, fds = _recv_request(conn)
            except (OSError, ValueError):
                conn.close()
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _run_child(listener, conn, request, fds)
            for fd in fds:
                os.close(fd)
            conn.close()
    finally:
        listener.close()
        if os.path.exists(path):
            os.unlink(path)


# ----------------------------------------------------------------------------- wiring


def launcher(folder: str | os.PathLike, socket_path: str | os.PathLike, real_python: str | None = None) -> str:
    """Write the executable that TorchServe starts workers with; its path.

    A Python script (not a shell one, which would rewrite ``$PWD``) on the real interpreter
    with ``-IS``: no site-packages, so it starts in ~20 ms and holds ~10 MB.
    """
    real_python = real_python or sys.executable
    script = os.path.join(os.fspath(folder), "cxrserve-python")
    text = (f"#!{real_python} -IS\n"
            "# Written by cxrserve serve start: TorchServe workers come from the fork server\n"
            "# (cxrserve/tools/forkserver.py); everything else runs the real Python.\n"
            "import os, sys\n"
            f"REAL, SOCKET, HERE = {real_python!r}, {os.fspath(socket_path)!r}, {os.path.dirname(__file__)!r}\n"
            "if len(sys.argv) > 1 and sys.argv[1].endswith('model_service_worker.py'):\n"
            "    sys.path.insert(0, HERE)\n"
            "    import forkserver\n"
            "    sys.exit(forkserver.connect(SOCKET, sys.argv[1:], REAL))\n"
            "os.execv(REAL, [REAL, *sys.argv[1:]])\n")
    with open(script, "w") as f:
        f.write(text)
    os.chmod(script, 0o755)
    return script


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "serve":
        serve(argv[1])
        return 0
    print("usage: forkserver.py serve SOCKET", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
