"""Seed 004's preprocessing pipeline (the mortality network's card).

``mortality``: squash to 224 -> [0, 1] -> ImageNet mean/std, 3 channels.
"""
from __future__ import annotations

from cxrserve.core.preprocessing import Preprocessing, register_preprocessing

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _mortality():
    from cxrserve.core.transforms import Compose, Normalize, RepeatChannels, Resize, ScaleIntensity, ToTensor

    return Compose([Resize(224), ScaleIntensity(1 / 255), RepeatChannels(3),
                    Normalize(IMAGENET_MEAN, IMAGENET_STD), ToTensor()])


MORTALITY = register_preprocessing(Preprocessing(
    "mortality", 1, 224, 3, _mortality, (-2.2, 2.7), "squash to 224, x/255, x3, ImageNet mean/std"))
