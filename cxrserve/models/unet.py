"""U-Net with a ResNet34 encoder for lung segmentation (seed 001).

Encoder: torchvision ResNet34 (``weights=None``; nothing is downloaded) with a
one-channel stem, skips at strides 2, 4, 8 and 16. Decoder: five up-sampling blocks
(nearest x2, concatenate skip, two 3x3 conv-BN-ReLU) with 256, 128, 64, 32, 16
channels, as in segmentation_models_pytorch's Unet. Two output classes (background,
lung); ``forward`` returns the lung probability, softmax channel 1, N x 1 x H x W.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from cxrserve.models import register_model


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DecoderBlock(nn.Module):
    def __init__(self, cin: int, skip: int, cout: int):
        super().__init__()
        self.conv1 = _conv_bn_relu(cin + skip, cout)
        self.conv2 = _conv_bn_relu(cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class UNetResNet34(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 2):
        super().__init__()
        enc = torchvision.models.resnet34(weights=None)
        if in_channels != 3:
            enc.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.stem = nn.Sequential(enc.conv1, enc.bn1, enc.relu)  # /2, 64
        self.pool = enc.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = enc.layer1, enc.layer2, enc.layer3, enc.layer4
        self.decoder = nn.ModuleList([
            DecoderBlock(512, 256, 256),
            DecoderBlock(256, 128, 128),
            DecoderBlock(128, 64, 64),
            DecoderBlock(64, 64, 32),
            DecoderBlock(32, 0, 16),
        ])
        self.head = nn.Conv2d(16, num_classes, 3, padding=1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.stem(x)  # /2
        s2 = self.layer1(self.pool(s1))  # /4
        s3 = self.layer2(s2)  # /8
        s4 = self.layer3(s3)  # /16
        x = self.layer4(s4)  # /32
        for block, skip in zip(self.decoder, (s4, s3, s2, s1, None)):
            x = block(x, skip)
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)[:, 1:2]


@register_model("unet_resnet34")
def unet_resnet34(in_channels: int = 1, num_classes: int = 2) -> UNetResNet34:
    return UNetResNet34(in_channels, num_classes)
