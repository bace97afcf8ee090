"""``cxrserve ui``: its arguments, and starting the viewer (optionally opening a browser)."""
from __future__ import annotations

import html
import logging
import os
import shutil
import tempfile
import threading
import webbrowser
from pathlib import Path

from cxrserve.core.imageio import MAX_BYTES
from cxrserve.tools.client.client import DEFAULT_REST
from cxrserve.tools.client.credentials import DEFAULT_MANAGEMENT
from cxrserve.tools.ui.config import UIConfig, read_secret_file
from cxrserve.tools.ui.server import make_server

log = logging.getLogger(__name__)


def add_arguments(p) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default loopback; 0.0.0.0 exposes the token-holding proxy)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--inference", default=DEFAULT_REST, help="TorchServe inference address")
    p.add_argument("--management", default=DEFAULT_MANAGEMENT, help="TorchServe management address (model list)")
    p.add_argument("--key-file", help="TorchServe's key_file.json (default: $CXRSERVE_KEY_FILE, ./, .torchserve/)")
    p.add_argument("--max-mb", type=float, default=MAX_BYTES / 2**20, help="largest upload per image, MiB")
    p.add_argument("--open", action="store_true", help="open the page in the default browser")
    p.add_argument("--site", help="site whose installed calibration profile answers when the form names none "
                                  "(cxrserve site install); default: the store's default site, if any")
    p.add_argument("--secret-file",
                   help="fixed secret for tests/automation, from a file only you can read (chmod 600); "
                        "default: a new random secret at each start")
    p.add_argument("--conn-timeout", type=float, default=30.0,
                   help="seconds a client has to send a whole request (slow senders are dropped; "
                        "raise it for large uploads over a slow network)")
    p.add_argument("--max-connections", type=int, default=32,
                   help="connections served at once; more get 503")


def open_in_browser(url: str) -> Path:
    """Opens ``url`` through a launcher file only this user can read, in a new private folder
    (returned, for removal): a URL on a browser's command line is visible to every local user (ps)."""
    folder = Path(tempfile.mkdtemp(prefix="cxrserve-ui-"))
    launcher = folder / "open.html"
    fd = os.open(launcher, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(f'<!doctype html><meta charset="utf-8"><meta http-equiv="refresh" content="0; url={html.escape(url)}">'
                f'<title>cxrserve viewer</title><a href="{html.escape(url)}">open the viewer</a>\n')
    webbrowser.open(launcher.as_uri())
    return folder


def cmd_ui(args) -> int:
    try:
        secret = read_secret_file(Path(args.secret_file)) if args.secret_file else None
    except (OSError, ValueError) as err:
        log.error("--secret-file: %s", err)
        return 2
    config = UIConfig(site=args.site or None, inference=args.inference, management=args.management,
                      key_file=Path(args.key_file) if args.key_file else None, host=args.host, port=args.port,
                      max_bytes=int(args.max_mb * 2**20), secret=secret, conn_timeout=args.conn_timeout,
                      max_connections=args.max_connections)
    server = make_server(config)
    if server.allowed_hosts() is None:
        log.warning("listening on every interface: the viewer's secret and the studies cross the network "
                    "unencrypted (plain http on port %d)", config.port)
    if server.backend.client.credentials.token is None:
        log.warning("no TorchServe key file found: pass --key-file .torchserve/key_file.json")
    # The secret is the viewer's login: only whoever started it (and reads this terminal) gets it.
    print(f"cxrserve viewer at {server.secret_url}  (open this address; Ctrl+C stops it)", flush=True)
    launchers: list[Path] = []
    if args.open:
        opener = threading.Timer(0.5, lambda: launchers.append(open_in_browser(server.secret_url)))
        opener.daemon = True
        opener.start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        for folder in launchers:
            shutil.rmtree(folder, ignore_errors=True)
    return 0
