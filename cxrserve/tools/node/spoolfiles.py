"""The node's files on disk: private folders and files (they hold patient data), the audit log."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_dir(path: Path) -> Path:
    """``path`` created (or made) 0700: it holds patient data."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def private_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` as a new 0600 file, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


class AuditLog:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.lock = threading.Lock()
        self._last: dict[tuple, list] = {}  # rate-limited key -> [last written, suppressed since]
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        os.chmod(path, 0o600)
        if path.exists() and path.stat().st_size:
            with open(path, "rb+") as fh:  # a line torn by a crash stays alone on its line
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")

    def logged_outcomes(self) -> set[tuple[str, str]]:
        """(instance, outcome) pairs already in the log (read at start-up only)."""
        out = set()
        if self.path.exists():
            with open(self.path, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a torn last line from a crash
                    if record.get("event") == "instance":
                        out.add((record.get("instance"), record.get("outcome")))
        return out

    def write(self, record: dict) -> None:
        line = json.dumps({"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **record}, sort_keys=True)
        with self.lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def write_limited(self, key: tuple, record: dict, every_s: float) -> None:
        """``record`` once per ``every_s`` for ``key``; the next line counts what was held back
        (a flood of refused associations must not become a flood of fsynced lines)."""
        now = time.monotonic()
        with self.lock:
            last = self._last.get(key)
            if last is not None and now - last[0] < every_s:
                last[1] += 1
                return
            suppressed = last[1] if last else 0
            self._last[key] = [now, 0]
            if len(self._last) > 4096:  # bounded: forget the oldest keys
                for old in sorted(self._last, key=lambda k: self._last[k][0])[:1024]:
                    del self._last[old]
        self.write({**record, "repeated": suppressed} if suppressed else record)


