"""torchxrayvision-compatible DenseNet121: one input channel, 18 pathology outputs.

Cohen et al. (seed 003) read COVID-19 severity off torchxrayvision's DenseNet121
"all" model: one grey channel scaled to [-1024, 1024], 224 x 224, and 18 outputs in
torchxrayvision's shared label space (:data:`XRV_PATHOLOGIES`; a model without a
head for some finding keeps the slot and names it ``''``).

:class:`XRVDenseNet` reproduces that network so torchxrayvision weights load
unchanged: its ``state_dict`` keys are exactly those of ``xrv.models.DenseNet``
(``features.conv0``, ``features.denseblockN.denselayerM.norm1`` ...,
``features.transitionN``, ``features.norm5``, ``classifier``), built from
torchvision's DenseNet blocks, which have the same layout and arithmetic. The
optional ``op_threshs`` buffer holds torchxrayvision's per-finding operating points;
:func:`op_norm` maps sigmoid outputs so each operating point lands on 0.5, as
torchxrayvision does, written with ``torch.where`` so TorchScript and ONNX export it.

``forward`` returns ``(logits, probabilities)``: the pre-sigmoid outputs (what the
severity maps read) and the sigmoid outputs, operating-point normalised when the
buffer is present. ``embed`` gives the 1024-d pooled features (the paper's
"intermediate network features").
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from cxrserve.models import register_model

#: torchxrayvision's 18-slot label space (``xrv.datasets.default_pathologies``), in output order.
XRV_PATHOLOGIES = (
    "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema",
    "Fibrosis", "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule",
    "Mass", "Hernia", "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum",
)

#: DenseNet121's shape, torchxrayvision's ``get_densenet_params("densenet121")``.
DENSENET121 = {"growth_rate": 32, "block_config": (6, 12, 24, 16), "num_init_features": 64, "bn_size": 4}


def op_norm(probabilities: torch.Tensor, op_threshs: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear rescale putting each finding's operating point at 0.5.

    Below the threshold t: p / (2 t); above: 1 - (1 - p) / (2 (1 - t)). Slots whose
    threshold is NaN (no head) come out as 0.5, as in torchxrayvision.
    """
    t = op_threshs.unsqueeze(0).expand_as(probabilities)
    low = probabilities / (t * 2)
    high = 1.0 - (1.0 - probabilities) / ((1.0 - t) * 2)
    out = torch.where(probabilities < t, low, high)
    return torch.where(torch.isnan(t), torch.full_like(out, 0.5), out)


class XRVDenseNet(nn.Module):
    """DenseNet-BC with torchxrayvision's parameter names and optional operating points."""

    def __init__(self, num_classes: int = len(XRV_PATHOLOGIES), in_channels: int = 1, growth_rate: int = 32,
                 block_config: Sequence[int] = (6, 12, 24, 16), num_init_features: int = 64, bn_size: int = 4,
                 drop_rate: float = 0.0, op_threshs: bool = False):
        super().__init__()
        net = torchvision.models.DenseNet(growth_rate=growth_rate, block_config=tuple(block_config),
                                          num_init_features=num_init_features, bn_size=bn_size,
                                          drop_rate=drop_rate, num_classes=num_classes)
        if in_channels != 3:
            net.features.conv0 = nn.Conv2d(in_channels, num_init_features, kernel_size=7, stride=2, padding=3,
                                           bias=False)
            nn.init.kaiming_normal_(net.features.conv0.weight)
        self.features = net.features
        self.classifier = net.classifier
        # Values arrive with the state dict; None keeps the key out of it (as in xrv).
        self.register_buffer("op_threshs", torch.full((num_classes,), float("nan")) if op_threshs else None)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """1024-d features after the final ReLU and global average pooling (xrv ``features2``)."""
        return F.adaptive_avg_pool2d(F.relu(self.features(x)), 1).flatten(1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(x)
        probabilities = torch.sigmoid(logits)
        if self.op_threshs is not None:
            probabilities = op_norm(probabilities, self.op_threshs)
        return logits, probabilities


@register_model("xrv_densenet121")
def xrv_densenet121(num_classes: int = len(XRV_PATHOLOGIES), in_channels: int = 1, drop_rate: float = 0.0,
                    op_threshs: bool = False) -> XRVDenseNet:
    return XRVDenseNet(num_classes=num_classes, in_channels=in_channels, drop_rate=drop_rate,
                       op_threshs=op_threshs, **DENSENET121)
