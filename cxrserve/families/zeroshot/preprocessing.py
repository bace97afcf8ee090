"""Seed 002's preprocessing pipeline (CheXzero; the CLIP image encoder's card).

``chexzero``: long side 320 -> zero pad 320 x 320 -> (x - 101.48761) / 83.43944 ->
x 3 channels -> bicubic 224.
"""
from __future__ import annotations

from cxrserve.core.preprocessing import Preprocessing, register_preprocessing

CHEXZERO_MEAN, CHEXZERO_STD = 101.48761, 83.43944


def _chexzero():
    import cv2

    from cxrserve.core.transforms import Compose, Normalize, PadToSquare, RepeatChannels, Resize, ResizeLongSide, ToTensor

    return Compose([ResizeLongSide(320), PadToSquare(320), Normalize(CHEXZERO_MEAN, CHEXZERO_STD),
                    Resize(224, cv2.INTER_CUBIC), RepeatChannels(3), ToTensor()])


CHEXZERO = register_preprocessing(Preprocessing(
    "chexzero", 1, 224, 3, _chexzero, (-1.6, 2.2),
    "long side 320, zero pad 320, (x - 101.48761)/83.43944, bicubic 224 (may overshoot), x3"))
