"""Python client for a cxrserve TorchServe: REST and gRPC behind one interface.

>>> from cxrserve.tools.client import CXRClient
>>> with CXRClient() as client:                      # REST on 127.0.0.1:8080, key file found
...     result = client.predict("cxr-triage", "study.dcm", heatmap=True)
>>> with CXRClient(protocol="grpc") as client:       # gRPC on 127.0.0.1:7070
...     result = client.predict("cxr-pxs", "follow_up.dcm", prior="baseline.dcm")
>>> with CXRClient() as client:                      # every model in one request
...     study = client.predict("cxr-study", "follow_up.dcm", prior="baseline.dcm", pictures=True)
...     study["results"]["triage"]["label"], study["results"]["pxs"]["change"]["direction"]

:class:`CXRClient` (``client``) speaks REST, gRPC and KServe v2, with retries; its token
comes from ``credentials`` (explicit, ``$CXRSERVE_TOKEN`` or TorchServe's key file,
refreshed when the server refuses it); every failure is one of the exceptions in
``errors``, which this package exports with the client (``from cxrserve.tools.client
import CXRClient, InputRejected``). ``cxrserve predict FILE...`` is ``cli``.
"""
from __future__ import annotations

from cxrserve.tools.client.client import CXRClient
from cxrserve.tools.client.errors import AuthenticationError, CXRServeError, InputRejected, ServerUnavailable

__all__ = ["CXRClient", "CXRServeError", "AuthenticationError", "InputRejected", "ServerUnavailable"]
