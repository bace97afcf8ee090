"""Scorers: ``score(image_bytes, prior_bytes | None) -> cxr-study response dict``.

A 4xx about the input (decode failure, lateral, non-chest, gate rejection) is returned
as the error body (``{"error", "status", "message"}``), never raised: it is an answer.
A transient failure (server down, 5xx) raises :class:`ScoringUnavailable` and the
node tries again later.
"""
from __future__ import annotations

import importlib
from typing import Protocol

from cxrserve.tools.node.config import ScorerConfig


class ScoringUnavailable(RuntimeError):
    """The scorer could not answer now (connection, 5xx): retry with back-off."""


class Scorer(Protocol):
    #: ``site`` is passed only when the calling AE title maps to one (the request option ``site``)
    def score(self, image: bytes, prior: bytes | None = None, *, site: str | None = None) -> dict: ...


class RestStudyScorer:
    """``cxr-study`` on a running TorchServe, through :class:`cxrserve.tools.client.CXRClient` (token handled there)."""

    def __init__(self, cfg: ScorerConfig):
        from cxrserve.tools.client import CXRClient

        self.model, self.options = cfg.model, dict(cfg.options or {})
        self.client = CXRClient(cfg.url, protocol="rest", token=cfg.token, key_file=cfg.key_file,
                                management_url=cfg.management_url, timeout=cfg.timeout_s,
                                retries=cfg.client_retries)

    def score(self, image: bytes, prior: bytes | None = None, *, site: str | None = None) -> dict:
        from cxrserve.tools.client import AuthenticationError, CXRServeError, InputRejected

        options = {**self.options, "site": site} if site else self.options
        try:
            return self.client.predict(self.model, image, prior=prior, options=options)
        except InputRejected as err:
            return {"error": err.code, "status": err.status, "message": err.message}
        except AuthenticationError as err:
            raise ScoringUnavailable(f"authentication: {err.message}") from err
        except CXRServeError as err:
            raise ScoringUnavailable(f"{err.status} {err.code}: {err.message}") from err


class InProcessStudyScorer:
    """The ``cxr-study`` pipeline of an archive, loaded in this process (no server)."""

    def __init__(self, cfg: ScorerConfig):
        from cxrserve.core.loading import load_pipeline

        self.pipeline = load_pipeline(cfg.archive, device=cfg.device)
        self.options = dict(cfg.options or {})

    def score(self, image: bytes, prior: bytes | None = None, *, site: str | None = None) -> dict:
        from cxrserve.core.errors import CXRInputError

        extra = {"prior": prior} if prior is not None else {}
        options = {**self.options, "site": site} if site else self.options
        try:
            return self.pipeline.predict_bytes(image, options, **extra)
        except CXRInputError as err:
            return err.to_dict()


def make_scorer(cfg: ScorerConfig) -> Scorer:
    if cfg.kind == "rest":
        return RestStudyScorer(cfg)
    if cfg.kind == "in_process":
        return InProcessStudyScorer(cfg)
    module, _, func = cfg.factory.partition(":")
    if not module or not func:
        raise ValueError(f"scorer.factory must be 'module:function', got {cfg.factory!r}")
    return getattr(importlib.import_module(module), func)(cfg)
