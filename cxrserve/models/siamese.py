"""Siamese embedding network of the PXS score (seed 000).

Both branches of the seed's Siamese network are one DenseNet121 trunk with shared
weights, and the seed kept torchvision's 1000-way classifier as the embedding layer,
so an image's embedding is the trunk's 1000-d output. Only the trunk is exported and
served: the pair distance, the pool median (PXS) and the change between two studies
are computed from embeddings in :mod:`cxrserve.families.pxs.pipeline`, on the worker's device.

Input: the ``pxs`` preprocessing (3 x 320 x 320, 0..1, no ImageNet mean/std).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

from cxrserve.models import register_model


class SiameseDenseNet(nn.Module):
    """One DenseNet121 trunk; ``forward(x)`` is the N x ``embedding_dim`` embedding."""

    def __init__(self, embedding_dim: int = 1000, in_channels: int = 3, head_gain: float = 1.0):
        super().__init__()
        trunk = torchvision.models.densenet121(weights=None, num_classes=embedding_dim)
        if in_channels != 3:
            trunk.features.conv0 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        if head_gain != 1.0:
            # From scratch, torchvision's init puts pair distances near 1 while severity
            # differences reach 14: a larger embedding layer lets the first steps order
            # the studies instead of only growing the output.
            with torch.no_grad():
                trunk.classifier.weight.mul_(head_gain)
        self.trunk = trunk
        self.embedding_dim = embedding_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)


def euclidean(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Row-wise Euclidean distance, with a gradient that stays finite at zero distance."""
    return ((a - b).pow(2).sum(dim=-1) + eps).sqrt()


@register_model("siamese_densenet121")
def siamese_densenet121(embedding_dim: int = 1000, in_channels: int = 3, head_gain: float = 1.0) -> SiameseDenseNet:
    return SiameseDenseNet(embedding_dim, in_channels, head_gain)
