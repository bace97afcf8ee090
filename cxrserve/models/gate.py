"""The input gate: a small CNN answering "is this a frontal chest radiograph?".

Input: the ``gate`` preprocessing (squash to 128 x 128, x/255, one channel). Output of
``forward``: class probabilities over :data:`GATE_LABELS`:

* ``frontal_cxr``: a frontal (PA/AP) chest radiograph, as the models expect;
* ``inverted_cxr``: a frontal chest film whose grey values are photometrically
  inverted (a MONOCHROME1/2 mix-up upstream): bone dark, lungs bright;
* ``other``: laterals, other body parts, photographs, documents, noise.

A strided stem, four conv blocks (BN, ReLU, max-pool) and global average pooling:
about 0.2 M parameters and 60 M multiply-adds, a few milliseconds per image on one CPU core, so screening every request
costs little next to the models it protects.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from cxrserve.models import register_model

GATE_LABELS = ("frontal_cxr", "inverted_cxr", "other")


def _block(c_in: int, c_out: int, stride: int = 1, pool: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
              nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)


class GateCNN(nn.Module):
    """Strided stem (128 -> 64) then four conv + max-pool blocks (64 -> 4) and GAP."""

    def __init__(self, num_classes: int = len(GATE_LABELS), in_channels: int = 1, width: int = 8,
                 dropout: float = 0.1):
        super().__init__()
        widths = [width * 2, width * 4, width * 6, width * 8]
        layers, c = [_block(in_channels, width, stride=2, pool=False)], width
        for w in widths:
            layers.append(_block(c, w))
            c = w
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(c, num_classes)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features(x).mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)


@register_model("gate_cnn")
def gate_cnn(num_classes: int = len(GATE_LABELS), in_channels: int = 1, width: int = 8,
             dropout: float = 0.1) -> GateCNN:
    return GateCNN(num_classes, in_channels, width, dropout)
