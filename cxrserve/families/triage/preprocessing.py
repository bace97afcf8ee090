"""Seed 001's preprocessing pipelines (the names the lung U-Net's and the classifier's cards carry).

=================  =====================================================================
``lungseg``        squash to 224 x 224 -> [0, 1] -> (x - 0.5) / 0.25, 1 channel
``triage_crop``    lung crop (long side <= 512) -> Otsu | CLAHE(3.0, 8x8) | adaptive
                   Gaussian threshold after median blur -> squash to 224 -> [0, 1], 3 channels
=================  =====================================================================
"""
from __future__ import annotations

from cxrserve.core.preprocessing import Preprocessing, register_preprocessing


def _lungseg():
    from cxrserve.core.transforms import Compose, Normalize, Resize, ScaleIntensity, ToTensor

    return Compose([Resize(224), ScaleIntensity(1 / 255), Normalize(0.5, 0.25), ToTensor()])


def _triage_crop():
    from cxrserve.core.transforms import Compose, LimitLongSide, Resize, ScaleIntensity, SeedThreeChannel, ToTensor

    return Compose([LimitLongSide(512), SeedThreeChannel(), Resize(224), ScaleIntensity(1 / 255), ToTensor()])


LUNGSEG = register_preprocessing(Preprocessing(
    "lungseg", 1, 224, 1, _lungseg, (-2.0, 2.0), "squash to 224, (x/255 - 0.5)/0.25, grey"))
TRIAGE_CROP = register_preprocessing(Preprocessing(
    "triage_crop", 1, 224, 3, _triage_crop, (0.0, 1.0),
    "lung crop <= 512 px, Otsu | CLAHE | adaptive threshold, squash to 224, x/255",
    # the classifier reads a lung crop of up to 512 px long side; the crop is about half
    # to three quarters of the film, so the film must keep about 1,024 px
    source_need=1024))
