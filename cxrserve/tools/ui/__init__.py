"""``cxrserve ui``: a local web viewer for every served model.

One static page (HTML + JavaScript, no framework, no CDN) served by a small stdlib
``ThreadingHTTPServer`` that proxies to TorchServe's REST inference API through
:class:`cxrserve.tools.client.CXRClient`, so the inference token stays on the server side
(read from TorchServe's key file) and never reaches the browser. A user uploads a
PNG, JPEG or DICOM (and optionally a prior study) and sees, per model, what it
answered: triage probabilities with the Grad-CAM heatmap and lung box, the lung mask
overlay, PXS with its pool percentile and the change against the prior, geographic
extent and opacity with the saliency map, mortality risk with its overlay, and the
zero-shot findings. A model the store lacks shows "not served"; a rejected input shows
its status and message (400/413/415/422).

Why not Gradio (the seed's choice): it would add a large dependency tree (FastAPI,
uvicorn, pandas, a bundled front end) and a second web stack beside TorchServe, and
it calls Python functions in-process rather than the served models; this viewer shows
exactly what the served models return, in about 500 lines with no new dependency.

Security: binds to 127.0.0.1 by default; rejects requests whose ``Host`` is not the
address it serves (DNS rebinding) and API calls without the ``X-CXR-UI`` header (a
cross-site form post cannot set it, so other web pages cannot use the proxy); strict
Content-Security-Policy; only known model names are proxied. A per-start secret (in the
URL it prints, then an HttpOnly SameSite cookie) is needed for every API call, so other
local users cannot use the server's token through it; request lengths are checked before
a body is read (411/400/413), each request must arrive within ``--conn-timeout`` and at
most ``--max-connections`` are served at once.
"""
from __future__ import annotations


def register_cli(subparsers) -> None:
    from cxrserve.tools.ui.cli import add_arguments, cmd_ui

    p = subparsers.add_parser("ui", help="web viewer for the served models (local page, proxies to TorchServe)")
    add_arguments(p)
    p.set_defaults(func=cmd_ui)
