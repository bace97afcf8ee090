"""``cxrserve train pxs_pretrain``: stage 1 of PXS, contrastive pre-training on weak labels.

The code lives in :mod:`cxrserve.families.pxs.task` with stage 2; this module gives stage 1
its own task name (``train`` = :func:`cxrserve.families.pxs.task.pretrain`).
"""
from __future__ import annotations

from cxrserve.families.pxs.task import pretrain as train

__all__ = ["train"]
