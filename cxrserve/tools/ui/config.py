"""How ``cxrserve ui`` is started: its addresses, limits and secret."""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cxrserve.core.imageio import MAX_BYTES
from cxrserve.tools.client.client import DEFAULT_REST
from cxrserve.tools.client.credentials import DEFAULT_MANAGEMENT


@dataclass
class UIConfig:
    inference: str = DEFAULT_REST
    management: str = DEFAULT_MANAGEMENT
    key_file: Path | None = None
    token: str | None = None
    host: str = "127.0.0.1"
    port: int = 8765
    max_bytes: int = MAX_BYTES
    timeout: float = 180.0  # for TorchServe's answer
    secret: str | None = None  # None: a new random one at each start
    conn_timeout: float = 30.0  # a request (line, headers, body) must arrive within this
    max_connections: int = 32  # a browser opens ~6; beyond this, 503
    site: str | None = None  # the site whose calibration profile answers when the form names none


def read_secret_file(path: Path) -> str:
    """A fixed secret for tests and automation, from a file only its owner can read."""
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"{path} is readable or writable by group/others (mode {stat.S_IMODE(mode):o}): "
                         f"chmod 600 it")
    value = Path(path).read_text(encoding="utf-8").strip()
    if len(value) < 16 or not value.isascii() or any(c.isspace() or c in ";,&=" for c in value):
        raise ValueError(f"{path}: the secret must be at least 16 printable ASCII characters "
                         f"without spaces, ';', ',', '&' or '='")
    return value
