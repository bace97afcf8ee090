"""PXS: a continuous severity score against a pool of normal radiographs (seed 000).

A Siamese DenseNet121 maps each study to an embedding (:mod:`cxrserve.models.siamese`).

* **PXS** = the *median* Euclidean distance between a study's embedding and the
  embeddings of a fixed pool of normal frontal radiographs.
* **Percentile**: the pool's own scores, each pool image scored leave-one-out against
  the other pool images, form the reference distribution of "normal"; a study's
  percentile is the share of those scores that are <= its PXS (about 50 for a typical
  normal film, 100 for anything further from the pool than every normal in it).
* **Change** between two studies of one patient = the distance between their
  embeddings (Li et al., npj Digit Med 2020); its ``direction`` compares the PXS
  difference with the card's ``change_pxs_delta`` threshold: ``worse`` above it,
  ``better`` below minus it, ``stable`` between.

The pool travels with the weights: ``pool.npz`` (embeddings float32, leave-one-out
scores) and ``pool.json`` (provenance: sha256 of every image file, count, the model it
was embedded with, backend, date, source) sit in the exported component folder and so
inside the ``.mar``. :class:`PXSPipeline` loads the pool once per worker, refuses a pool
embedded by other weights, and computes distances with torch on the worker's device.
``cxrserve pool build`` (:mod:`.pool`) builds a pool from a folder, a ``labels.csv`` or a data root.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cxrserve.core.card import ModelCard
from cxrserve.core.errors import CXRInputError
from cxrserve.core.item import Item
from cxrserve.core.pipeline import Pipeline

log = logging.getLogger(__name__)

POOL_FORMAT = 1
POOL_ARRAYS = "pool.npz"
POOL_INFO = "pool.json"
DIRECTIONS = ("worse", "better", "stable")


# --------------------------------------------------------------------------- pool math
def distances(embeddings: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """N x M Euclidean distances (exact: no matrix-product shortcut, reproducible)."""
    return torch.cdist(embeddings.float(), pool.float(), compute_mode="donot_use_mm_for_euclid_dist")


def median(values: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Median as numpy computes it (mean of the two middle values for an even count)."""
    return torch.quantile(values, 0.5, dim=dim)


def pxs_scores(embeddings: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """PXS of each embedding: median distance to the pool's embeddings."""
    return median(distances(embeddings, pool), dim=1)


def leave_one_out_scores(pool: torch.Tensor) -> torch.Tensor:
    """Each pool image's PXS against the other pool images (its own distance left out)."""
    n = pool.shape[0]
    if n < 2:
        raise ValueError("a reference pool needs at least 2 images")
    d = distances(pool, pool)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=d.device)
    return median(d[off_diagonal].reshape(n, n - 1), dim=1)


def percentiles(scores: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Share (in %) of ``reference`` scores that are <= each score."""
    ref = torch.sort(reference.float()).values
    below = torch.searchsorted(ref, scores.float().contiguous(), right=True)
    return below.float() * (100.0 / ref.numel())


def change_direction(pxs_now: float, pxs_prior: float, threshold: float) -> str:
    """``worse`` / ``better`` / ``stable`` from the PXS difference and the card's threshold."""
    delta = pxs_now - pxs_prior
    if delta > threshold:
        return "worse"
    if delta < -threshold:
        return "better"
    return "stable"


# --------------------------------------------------------------------------- the pool
def model_identity(card: ModelCard) -> dict:
    """What ties a pool to one set of weights (the card's ``created`` is set at training)."""
    return {"name": card.name, "version": card.version, "architecture": card.architecture,
            "created": card.created, "data_fingerprint": card.data_fingerprint,
            "preprocessing": card.preprocessing, "preprocessing_version": card.preprocessing_version}


class PoolError(RuntimeError):
    """A missing, malformed or mismatched reference pool (a deployment error, not a 4xx)."""


@dataclass
class ReferencePool:
    """Embeddings of normal frontal CXRs, their leave-one-out PXS, and provenance."""

    embeddings: np.ndarray  # N x D float32
    loo_scores: np.ndarray  # N float32, in image order
    provenance: dict

    @property
    def size(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def version(self) -> str:
        return str(self.provenance["version"])

    @staticmethod
    def content_version(embeddings: np.ndarray) -> str:
        """Short hash of the embeddings: equal pools have equal versions."""
        return hashlib.sha256(np.ascontiguousarray(embeddings, dtype=np.float32).tobytes()).hexdigest()[:16]

    @classmethod
    def from_embeddings(cls, embeddings: np.ndarray, *, card: ModelCard, image_hashes: Sequence[str],
                        source: str, backend: str) -> "ReferencePool":
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(image_hashes):
            raise ValueError(f"need one embedding row per image, got {emb.shape} for {len(image_hashes)} images")
        loo = leave_one_out_scores(torch.from_numpy(emb)).numpy().astype(np.float32)
        provenance = {
            "format": POOL_FORMAT,
            "version": cls.content_version(emb),
            "size": int(emb.shape[0]),
            "embedding_dim": int(emb.shape[1]),
            "source": source,
            "model": model_identity(card),
            "backend": backend,
            "score": "median Euclidean distance to the pool embeddings",
            "percentile": "share (%) of the pool's leave-one-out scores <= the study's PXS",
            "loo_scores": {q: float(np.quantile(loo, p)) for q, p in
                           (("min", 0.0), ("p05", 0.05), ("median", 0.5), ("p95", 0.95), ("max", 1.0))},
            "images": [{"sha256": h} for h in image_hashes],
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        return cls(emb, loo, provenance)

    def save(self, folder: str | Path) -> Path:
        """Write ``pool.npz`` + ``pool.json`` (each atomically) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (POOL_ARRAYS + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, embeddings=self.embeddings, loo_scores=self.loo_scores)
        tmp.replace(folder / POOL_ARRAYS)
        tmp = folder / (POOL_INFO + ".tmp")
        tmp.write_text(json.dumps(self.provenance, indent=2) + "\n")
        tmp.replace(folder / POOL_INFO)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "ReferencePool":
        folder = Path(folder)
        arrays, info = folder / POOL_ARRAYS, folder / POOL_INFO
        if not arrays.exists() or not info.exists():
            raise PoolError(f"no reference pool in {folder} ({POOL_ARRAYS} + {POOL_INFO}): "
                            "build one with `cxrserve pool build`")
        provenance = json.loads(info.read_text())
        with np.load(arrays, allow_pickle=False) as data:
            emb = data["embeddings"].astype(np.float32)
            loo = data["loo_scores"].astype(np.float32)
        pool = cls(emb, loo, provenance)
        if provenance.get("format") != POOL_FORMAT:
            raise PoolError(f"{info}: pool format {provenance.get('format')!r}, this cxrserve reads {POOL_FORMAT}")
        if pool.content_version(emb) != pool.version or len(loo) != len(emb) or len(emb) != provenance.get("size"):
            raise PoolError(f"{folder}: {POOL_ARRAYS} does not match {POOL_INFO} (corrupt or edited pool)")
        return pool

    def check_model(self, card: ModelCard) -> None:
        """Refuse a pool embedded with other weights or another preprocessing."""
        expected, found = model_identity(card), self.provenance.get("model", {})
        if found != expected:
            diff = {k: (found.get(k), v) for k, v in expected.items() if found.get(k) != v}
            raise PoolError(f"reference pool was embedded with another model: {diff} (pool, weights); "
                            "rebuild it with `cxrserve pool build`")

    def summary(self) -> dict:
        """Pool facts for ``describe()`` (no per-image list)."""
        return {k: v for k, v in self.provenance.items() if k != "images"}


# --------------------------------------------------------------------------- serving

class PXSPipeline(Pipeline):
    """``cxr-pxs``: PXS with its pool percentile; with a ``prior``, both scores and the change."""

    name = "cxr-pxs"
    components = ("pxs",)
    extra_images = ("prior",)

    def setup(self) -> None:
        part = self.parts["pxs"]
        self.pool = ReferencePool.load(part.path)
        self.pool.check_model(part.card)
        self.pool_embeddings = torch.from_numpy(self.pool.embeddings).to(self.device)
        self.pool_loo = torch.from_numpy(self.pool.loo_scores).to(self.device)
        # model-config.yaml's `handler: change_threshold` overrides the card (as gate_threshold does).
        threshold = self.config.get("change_threshold", part.card.thresholds.get("change_pxs_delta"))
        if threshold is None:
            raise PoolError(f"{part.path}/metadata.json has no thresholds.change_pxs_delta "
                            "(and model-config.yaml's handler block no change_threshold)")
        self.change_threshold = float(threshold)
        self.transform = part.transform()

    def describe(self) -> dict:
        info = super().describe()
        info["pool"] = self.pool.summary()
        info["change_threshold"] = self.change_threshold
        return info

    def score_embeddings(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(pxs, percentile)`` for N x D embeddings, computed on the worker's device."""
        emb = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)).to(self.device)
        scores = pxs_scores(emb, self.pool_embeddings)
        return scores.cpu().numpy(), percentiles(scores, self.pool_loo).cpu().numpy()

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """N x D embeddings of uint8 grey images (preprocessed as the card says)."""
        with self.timer.stage("preprocess"):
            inputs = [self.transform(img) for img in images]
        return np.stack([out[0] for out in self.run("pxs", inputs)])

    def _predict(self, items: list[Item]) -> list[dict | CXRInputError]:
        # One forward pass for every image in the batch, studies and priors together.
        images = [it.xray.uint8 for it in items]
        prior_of: dict[int, int] = {}
        for i, it in enumerate(items):
            if "prior" in it.images:
                prior_of[i] = len(images)
                images.append(it.images["prior"].uint8)
        embeddings = self.embed(images)
        with self.timer.stage("distances"):
            scores, pcts = self.score_embeddings(embeddings)
            change: dict[int, float] = {}
            if prior_of:
                now, before = zip(*sorted(prior_of.items()))
                gaps = (torch.from_numpy(embeddings[list(now)]).to(self.device)
                        - torch.from_numpy(embeddings[list(before)]).to(self.device))
                change = dict(zip(now, gaps.norm(dim=1).cpu().numpy().tolist()))
        results: list[dict | CXRInputError] = []
        for i, item in enumerate(items):
            out = self.base_response(item)
            out["pxs"] = round(float(scores[i]), 4)
            out["pxs_percentile"] = round(float(pcts[i]), 2)
            out["pool"] = {"size": self.pool.size, "version": self.pool.version}
            if i in prior_of:
                j = prior_of[i]
                prior = item.images["prior"]
                out["warnings"].extend(f"prior: {w}" for w in prior.warnings)
                out["prior"] = {"pxs": round(float(scores[j]), 4), "pxs_percentile": round(float(pcts[j]), 2),
                                "input": prior.info()}
                out["change"] = {
                    "distance": round(change[i], 4),
                    "pxs_difference": round(float(scores[i]) - float(scores[j]), 4),
                    "direction": change_direction(float(scores[i]), float(scores[j]), self.change_threshold),
                    "threshold": self.change_threshold,
                }
            results.append(out)
        return results
