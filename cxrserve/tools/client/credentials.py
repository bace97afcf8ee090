"""The inference token and where to get a new one.

Given explicitly (or ``$CXRSERVE_TOKEN``), or read from TorchServe's ``key_file.json``
(``$CXRSERVE_KEY_FILE``, else the current folder or its parents, else ``.torchserve/``
where ``make serve`` runs TorchServe). When the server says the token is wrong or expired
the key file is read again (TorchServe rewrites it on restart) and, failing that, a fresh
inference token is minted with the API key through TorchServe's token API.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import requests

from cxrserve.tools import server

DEFAULT_MANAGEMENT = "http://127.0.0.1:8081"


def default_key_file() -> Path | None:
    """Where ``cxrserve predict`` looks for TorchServe's keys (see the module docstring)."""
    found = server.find_key_file()
    if found is not None:
        return found
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        candidate = folder / ".torchserve" / "key_file.json"
        if candidate.exists():
            return candidate
    return None


@dataclass
class Credentials:
    """The inference token and where to get a new one."""

    token: str | None = None
    key_file: Path | None = None
    management: str = DEFAULT_MANAGEMENT
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def resolve(cls, token: str | None = None, key_file: str | Path | None = None,
                management: str = DEFAULT_MANAGEMENT) -> "Credentials":
        if token is None:
            token = os.environ.get("CXRSERVE_TOKEN") or None
        path = Path(key_file) if key_file else (None if token else default_key_file())
        creds = cls(token=token, key_file=path, management=management)
        if creds.token is None and path is not None:
            creds.reload()
        return creds

    def reload(self) -> bool:
        """Re-read the key file; True when it held a different inference token."""
        if self.key_file is None or not Path(self.key_file).exists():
            return False
        try:
            keys = server.read_keys(self.key_file)
        except (OSError, ValueError, KeyError):
            return False
        new = keys.get("inference")
        changed = bool(new) and new != self.token
        self.token = new or self.token
        return changed

    def refresh(self, seen: str | None) -> bool:
        """Get a token other than ``seen``: re-read the key file, then mint one with the API key."""
        with self._lock:
            if self.token != seen:  # another thread already refreshed
                return True
            if self.reload():
                return True
            if self.key_file is None:
                return False
            try:
                api = server.read_keys(self.key_file).get("api")
                if not api:
                    return False
                r = requests.get(f"{self.management}/token", params={"type": "inference"},
                                  headers={"Authorization": f"Bearer {api}"}, timeout=10)
            except (requests.RequestException, OSError, ValueError, KeyError):
                return False
            if r.status_code != 200:
                return False
            return self.reload()

    def header(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}
