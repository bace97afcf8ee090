"""The viewer's side of TorchServe: which models are served, and one model's answer.

Calls go through :class:`~cxrserve.tools.client.CXRClient`, so TorchServe's token stays in
this process; every answer, including TorchServe's errors, becomes ``(HTTP status, body)``
for the page (4xx bodies are the model's own error JSON; 404 ``not_served``; 502 when
TorchServe is unreachable or refuses the token).
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import requests

from cxrserve.tools.client import AuthenticationError, CXRClient, CXRServeError, InputRejected, ServerUnavailable
from cxrserve.tools.ui.config import UIConfig
from cxrserve.tools.ui.views import ModelView, viewer_inputs, views


class Backend:
    """What the page needs from TorchServe, through the project's REST client."""

    def __init__(self, config: UIConfig):
        self.config = config
        self.client = CXRClient(config.inference, token=config.token, key_file=config.key_file,
                                management_url=config.management, timeout=config.timeout, retries=2)
        self.views = {v.name: v for v in views()}
        self.inputs = viewer_inputs(tuple(self.views.values()))

    def _management_token(self) -> str | None:
        from cxrserve.tools.server import read_keys

        key_file = self.client.credentials.key_file
        if key_file is None or not Path(key_file).exists():
            return None
        try:
            return read_keys(key_file).get("management")
        except (OSError, ValueError, KeyError):
            return None

    def served_models(self) -> list[str] | None:
        """Registered model names from the management API, or None when it cannot be asked."""
        token = self._management_token()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            r = requests.get(f"{self.config.management.rstrip('/')}/models", params={"limit": 1000},
                             headers=headers, timeout=5)
            if r.status_code != 200:
                return None
            return sorted(m["modelName"] for m in r.json().get("models", []))
        except (requests.RequestException, ValueError, KeyError, TypeError):
            return None

    def models(self) -> dict:
        served = self.served_models()
        listed = [{**asdict(v), "served": None if served is None else v.name in served} for v in self.views.values()]
        extra = [{**asdict(ModelView(name, name, "")), "served": True} for name in (served or []) if name not in self.views]
        return {"models": listed + extra, "inputs": list(self.inputs.values()), "max_bytes": self.config.max_bytes,
                "management": "ok" if served is not None else "unavailable"}

    def predict(self, model: str, image: bytes, extra: dict | None = None, site: str | None = None) -> tuple[int, dict]:
        """``(HTTP status, body)`` for one model; never raises for the server's answers.

        ``extra``: the form's extra inputs by name (bytes of a second image, or a list of
        strings for a list option); a model gets those it takes (a model the registry does
        not know gets them all). ``site``: the form's site (else ``cxrserve ui --site``), sent as
        the option ``site`` (an unknown one is serving's 400, shown on the cards)."""
        view = self.views.get(model)
        options = dict(view.options) if view else {}
        if site or self.config.site:
            options["site"] = site or self.config.site
        images = {}
        for name, value in (extra or {}).items():
            if view is not None and name not in view.inputs:
                continue
            if isinstance(value, bytes):
                images[name] = value
            else:
                options[name] = list(value)  # sent as JSON: any Unicode survives the header
        try:
            return 200, self.client.predict(model, image, extra_images=images, options=options)
        except InputRejected as err:
            if err.status == 404:
                return 404, {"error": "not_served", "status": 404,
                             "message": f"{model} is not served by this TorchServe"}
            body = err.body if isinstance(err.body, dict) and err.body.get("message") else err.to_dict()
            return err.status, {**body, "status": err.status}
        except AuthenticationError:
            return 502, {"error": "unauthenticated", "status": 502,
                         "message": "TorchServe refused the viewer's token: start `cxrserve ui` with --key-file "
                                    "pointing at TorchServe's key_file.json"}
        except ServerUnavailable as err:
            return 502, {"error": "unavailable", "status": 502,
                         "message": f"TorchServe is not answering at {self.config.inference} ({err.message})"}
        except CXRServeError as err:
            return 502, {"error": "server_error", "status": err.status or 502, "message": err.message}
