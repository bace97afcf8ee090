"""Seed 003's preprocessing pipeline (torchxrayvision / Cohen et al.; the severity network's card).

``xrv``: centre crop square -> 224 -> (2x/255 - 1) * 1024, 1 channel.
"""
from __future__ import annotations

from cxrserve.core.preprocessing import Preprocessing, register_preprocessing


def _xrv():
    from cxrserve.core.transforms import CenterCropSquare, Compose, Resize, ScaleIntensity, ToTensor

    return Compose([CenterCropSquare(), Resize(224), ScaleIntensity(2048 / 255, -1024), ToTensor()])


XRV = register_preprocessing(Preprocessing(
    "xrv", 1, 224, 1, _xrv, (-1024.0, 1024.0), "centre crop square, 224, (2x/255 - 1) * 1024, grey"))
