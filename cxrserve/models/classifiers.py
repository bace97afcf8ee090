"""ResNet classifiers that return probabilities and class activation maps together.

For a network ending in global average pooling and one linear layer, Grad-CAM on the
last convolutional block equals CAM: d(logit_c)/dA_k is w_ck / (h w) at every
position, so the Grad-CAM map is ReLU(sum_k w_ck A_k) up to a positive factor.
``forward`` therefore returns ``(probabilities, cams)`` with ``cams`` = sum_k w_ck A_k
for every class (N x C x h x w, before ReLU): exact Grad-CAM from one pass, on any
backend (eager, TorchScript, ONNX Runtime), no autograd at serve time. The equality
is checked against autograd Grad-CAM in the tests.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

from cxrserve.models import register_model


class CAMResNet(nn.Module):
    def __init__(self, depth: int = 34, num_classes: int = 3, in_channels: int = 3, dropout: float = 0.0):
        super().__init__()
        factory = {18: torchvision.models.resnet18, 34: torchvision.models.resnet34}[depth]
        net = factory(weights=None)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.features = nn.Sequential(
            net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
        )
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(net.fc.in_features, num_classes)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features(x).mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.features(x)
        logits = self.fc(fmap.mean(dim=(2, 3)))
        cams = torch.einsum("ck,nkhw->nchw", self.fc.weight, fmap)
        return torch.softmax(logits, dim=1), cams


@register_model("resnet34_cam")
def resnet34_cam(num_classes: int = 3, in_channels: int = 3, dropout: float = 0.0) -> CAMResNet:
    return CAMResNet(34, num_classes, in_channels, dropout)


@register_model("resnet18_cam")
def resnet18_cam(num_classes: int = 2, in_channels: int = 3, dropout: float = 0.0) -> CAMResNet:
    return CAMResNet(18, num_classes, in_channels, dropout)
