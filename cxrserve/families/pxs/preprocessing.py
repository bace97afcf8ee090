"""Seed 000's preprocessing pipeline (the name the PXS Siamese network's card carries).

``pxs``: trim near-black border -> global histogram equalisation -> short side 336 ->
centre crop 320 -> [0, 1] -> grey x 3 channels.
"""
from __future__ import annotations

from cxrserve.core.preprocessing import Preprocessing, register_preprocessing


def _pxs():
    from cxrserve.core.transforms import (CenterCrop, Compose, EqualizeHist, RepeatChannels, ResizeShortSide,
                                          ScaleIntensity, ToTensor, TrimBorder)

    return Compose([TrimBorder(2), EqualizeHist(), ResizeShortSide(336), CenterCrop(320),
                    ScaleIntensity(1 / 255), RepeatChannels(3), ToTensor()])


PXS = register_preprocessing(Preprocessing(
    "pxs", 1, 320, 3, _pxs, (0.0, 1.0),
    "trim border, histogram equalisation, short side 336, centre crop 320, x/255, x3"))
