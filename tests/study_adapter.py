"""Test scorers of the cxr-study contract: the served ``cxr-study`` model itself
(:class:`StudyModelScorer`, what the node runs in production), and, for the SIGKILL burst
that restarts the node many times, the contract assembled from single-model pipelines
(loading one small archive per restart instead of the whole study).

Each section is exactly what that model answers (``Pipeline.predict_bytes``); a 4xx of the
whole input (decode, header check, gate) is the first pipeline's error body, as the
contract says. Used by the node as ``scorer: {kind: factory, factory: study_adapter:make}``
with ``$CXRSERVE_STORE`` (and optionally ``$CXR_ADAPTER_UNPACKED``, a JSON map name ->
unpacked folder, so a test session unpacks each archive once, and
``$CXR_ADAPTER_FAMILIES``, a comma list to score only some families).
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from cxrserve import families as _registry

# The study's sections, read from the registry (a section is the served name without ``cxr-``).
_SECTIONS = {name.removeprefix("cxr-"): _registry.get_served(name)[1]
             for name in _registry.composed(_registry.composed_model())}
FAMILIES = tuple(_SECTIONS)
PICTURES = {f: ({s.picture_option: True} if s.picture_option else {}) for f, s in _SECTIONS.items()}


class StudyModelScorer:
    """The ``cxr-study`` pipeline in process, every picture on (the SEG and SCs need them)."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.lock = threading.Lock()

    def score(self, image: bytes, prior: bytes | None = None, *, site: str | None = None) -> dict:
        from cxrserve.core.errors import CXRInputError

        extra = {"prior": prior} if prior is not None else {}
        options = {"pictures": True, "lungseg.overlay": False, **({"site": site} if site else {})}
        with self.lock:
            try:
                return self.pipeline.predict_bytes(image, options, **extra)
            except CXRInputError as err:
                return err.to_dict()


class SixPipelineStudyScorer:
    def __init__(self, pipelines: dict):
        self.pipelines = pipelines
        self.lock = threading.Lock()

    def score(self, image: bytes, prior: bytes | None = None) -> dict:
        from cxrserve.core.errors import CXRInputError

        results, versions, head = {}, [], None
        with self.lock:
            for family, pipe in self.pipelines.items():
                extra = {"prior": prior} if family == "pxs" and prior is not None else {}
                try:
                    out = pipe.predict_bytes(image, PICTURES[family], **extra)
                except CXRInputError as err:
                    if head is None:  # the input itself is rejected: the whole request is that 4xx
                        return err.to_dict()
                    results[family] = err.to_dict()
                    continue
                if head is None:
                    head = out
                results[family] = out
                versions.append(f"{family}:{out.get('model_version', '')}")
        return {"model": "cxr-study", "model_version": "+".join(versions), "input": head.get("input", {}),
                "input_gate": head.get("input_gate"), "warnings": [], "results": results, "timings_ms": {}}


def load(families=FAMILIES, unpacked: dict | None = None) -> SixPipelineStudyScorer:
    from cxrserve.core.loading import load_pipeline

    store = Path(os.environ.get("CXRSERVE_STORE", Path(__file__).resolve().parents[1] / "model_store"))
    pipes = {}
    for family in families:
        where = (unpacked or {}).get(f"cxr-{family}") or store / f"cxr-{family}.mar"
        pipes[family] = load_pipeline(where, device="cpu")
    return SixPipelineStudyScorer(pipes)


def make(cfg=None) -> SixPipelineStudyScorer:
    """``scorer.factory`` entry point for the node."""
    unpacked = json.loads(os.environ.get("CXR_ADAPTER_UNPACKED", "{}") or "{}")
    families = [f for f in os.environ.get("CXR_ADAPTER_FAMILIES", ",".join(FAMILIES)).split(",") if f]
    return load(families, unpacked)
