"""``cxrserve train pxs_pretrain``: stage 1 of PXS, contrastive pre-training on weak labels.

The code lives in :mod:`cxrserve.tasks.pxs` with stage 2; this module gives stage 1
its own task name (``train`` = :func:`cxrserve.tasks.pxs.pretrain`).
"""
from __future__ import annotations

from .pxs import pretrain as train

__all__ = ["train"]
