"""Write weights files exactly as torchxrayvision publishes them, without torchxrayvision.

torchxrayvision's ``densenet121-res224-all`` file is ``torch.save(model)`` of an
``xrv.models.DenseNet`` built from ``nn.Sequential`` subclasses ``_DenseLayer``
(``norm1 relu1 conv1 norm2 relu2 conv2``), ``_DenseBlock`` (``denselayerN``) and
``_Transition`` (``norm relu conv pool``), pickled by reference under the module
``torchxrayvision.models``. :func:`save_xrv_style` builds a randomly initialised network
with that class layout, installs stand-in ``torchxrayvision`` modules in
``sys.modules`` only while pickling (so the file names exactly those classes), and
saves it in the legacy (torch < 1.6, the published file's era) or zip container.
The stand-in classes are the tests' own; :func:`reference_logits` runs them, as
torchxrayvision's forward does, to give the numbers an import must reproduce.
"""
from __future__ import annotations

import sys
import types
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

MODULE = "torchxrayvision.models"


class _DenseLayer(nn.Sequential):
    def __init__(self, n_in: int, growth: int, bn_size: int):
        super().__init__()
        self.add_module("norm1", nn.BatchNorm2d(n_in))
        self.add_module("relu1", nn.ReLU(inplace=True))
        self.add_module("conv1", nn.Conv2d(n_in, bn_size * growth, 1, bias=False))
        self.add_module("norm2", nn.BatchNorm2d(bn_size * growth))
        self.add_module("relu2", nn.ReLU(inplace=True))
        self.add_module("conv2", nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False))
        self.drop_rate = 0

    def forward(self, x):
        return torch.cat([x, super().forward(x)], 1)


class _DenseBlock(nn.Sequential):
    def __init__(self, layers: int, n_in: int, bn_size: int, growth: int):
        super().__init__()
        for i in range(layers):
            self.add_module(f"denselayer{i + 1}", _DenseLayer(n_in + i * growth, growth, bn_size))


class _Transition(nn.Sequential):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(n_in))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(n_in, n_out, 1, bias=False))
        self.add_module("pool", nn.AvgPool2d(2, 2))


class DenseNet(nn.Module):
    def __init__(self, blocks=(6, 12, 24, 16), growth: int = 32, n_init: int = 64, bn_size: int = 4,
                 num_classes: int = 18, op_threshs_buffer: torch.Tensor | None = None, modern: bool = False):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(1, n_init, 7, 2, 3, bias=False)),
            ("norm0", nn.BatchNorm2d(n_init)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(3, 2, 1)),
        ]))
        n = n_init
        for i, layers in enumerate(blocks):
            self.features.add_module(f"denseblock{i + 1}", _DenseBlock(layers, n, bn_size, growth))
            n += layers * growth
            if i != len(blocks) - 1:
                self.features.add_module(f"transition{i + 1}", _Transition(n, n // 2))
                n //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(n))
        self.classifier = nn.Linear(n, num_classes)
        if modern:  # torchxrayvision >= 0.0.3x: a buffer and a targets list
            self.register_buffer("op_threshs", op_threshs_buffer)
            self.targets = ["Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema",
                            "Emphysema", "Fibrosis", "Effusion", "Pneumonia", "Pleural_Thickening",
                            "Cardiomegaly", "Nodule", "Mass", "Hernia", "Lung Lesion", "Fracture",
                            "Lung Opacity", "Enlarged Cardiomediastinum"][:num_classes]
        else:  # the published file's era: a plain attribute, None at training time
            self.op_threshs = None

    def forward(self, x):
        features = self.features(x)
        out = F.adaptive_avg_pool2d(F.relu(features), (1, 1)).view(features.size(0), -1)
        return self.classifier(out)


for _cls in (_DenseLayer, _DenseBlock, _Transition, DenseNet):
    _cls.__module__ = MODULE


@contextmanager
def fake_torchxrayvision():
    """Make ``torchxrayvision.models`` importable (for pickling by reference) for a moment."""
    package = types.ModuleType("torchxrayvision")
    models = types.ModuleType(MODULE)
    for cls in (_DenseLayer, _DenseBlock, _Transition, DenseNet):
        setattr(models, cls.__name__, cls)
    package.models = models
    saved = {name: sys.modules.get(name) for name in ("torchxrayvision", MODULE)}
    sys.modules["torchxrayvision"], sys.modules[MODULE] = package, models
    try:
        yield models
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def random_xrv_densenet(seed: int = 0, *, modern: bool = False, op_threshs: torch.Tensor | None = None) -> DenseNet:
    """A DenseNet121 in torchxrayvision's layout with random weights and BatchNorm statistics.

    Random running statistics make a wrong key mapping show up in the outputs.
    """
    torch.manual_seed(seed)
    model = DenseNet(op_threshs_buffer=op_threshs, modern=modern)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1, generator=g)
                module.running_var.uniform_(0.5, 1.5, generator=g)
                module.weight.uniform_(0.5, 1.5, generator=g)
                module.bias.normal_(0, 0.1, generator=g)
            elif isinstance(module, nn.Linear):
                module.bias.normal_(0, 0.5, generator=g)
    return model.eval()


def save_xrv_style(model: DenseNet, path: Path, *, legacy: bool = True) -> Path:
    """``torch.save(model)`` as torchxrayvision's training script did."""
    with fake_torchxrayvision(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Couldn't retrieve source code")  # ours live in a test module
        torch.save(model, path, _use_new_zipfile_serialization=not legacy)
    return path


def reference_logits(model: DenseNet, x: torch.Tensor) -> torch.Tensor:
    """Pre-sigmoid outputs as torchxrayvision computes them (op_threshs unset)."""
    with torch.no_grad():
        return model.eval()(x)
