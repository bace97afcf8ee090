"""Preprocessing as small named transforms, composed into one pipeline per model.

Each transform stores its parameters in ``__init__`` and does its work in
``__call__`` (MONAI style). Transforms take and return numpy arrays; the last step of
a pipeline turns the array into a float32 CHW tensor. Training, evaluation, export,
handlers and the batch client all call :func:`build_transform` with the name stored in
the model's card, so a model never sees a different preprocessing at serve time than
it saw at evaluation time.

The named pipelines (input: the decoder's uint8 grey image, see :mod:`cxrserve.core.imageio`)
are registered by their owners in :mod:`cxrserve.core.preprocessing`: the input gate's
there, each family's in its own ``preprocessing.py``.

Random augmentation is kept apart (:func:`build_augment`), applied to the uint8 image
before the deterministic pipeline, with its own RNG.
"""
from __future__ import annotations

from typing import Callable, Sequence

import cv2
import numpy as np
import torch

from cxrserve.core.preprocessing import Preprocessing, get_preprocessing, register_preprocessing

Array = np.ndarray


def _odd(value: float, minimum: int) -> int:
    k = max(minimum, int(round(value)))
    return k if k % 2 == 1 else k + 1


# --------------------------------------------------------------------------- geometry
class Resize:
    """Resize to ``(size, size)`` ignoring aspect ratio ("squash", as seed 001 does)."""

    def __init__(self, size: int, interpolation: int = cv2.INTER_AREA):
        self.size = size
        self.interpolation = interpolation

    def __call__(self, img: Array) -> Array:
        if img.shape[:2] == (self.size, self.size):
            return img
        # INTER_AREA only antialiases when shrinking; enlarge with bilinear.
        interp = self.interpolation
        if interp == cv2.INTER_AREA and min(img.shape[:2]) < self.size:
            interp = cv2.INTER_LINEAR
        return cv2.resize(img, (self.size, self.size), interpolation=interp)


class ResizeShortSide:
    """Scale so the shorter side equals ``size``, keeping the aspect ratio."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: Array) -> Array:
        h, w = img.shape[:2]
        scale = self.size / min(h, w)
        new_w, new_h = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        return cv2.resize(img, (new_w, new_h), interpolation=interp)


class ResizeLongSide:
    """Scale so the longer side equals ``size`` (shrinks and enlarges)."""

    def __init__(self, size: int, interpolation: int | None = None):
        self.size = size
        self.interpolation = interpolation

    def __call__(self, img: Array) -> Array:
        h, w = img.shape[:2]
        scale = self.size / max(h, w)
        new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
        interp = self.interpolation
        if interp is None:
            interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        return cv2.resize(img, (new_w, new_h), interpolation=interp)


class LimitLongSide(ResizeLongSide):
    """Shrink only, so the longer side is at most ``size``."""

    def __call__(self, img: Array) -> Array:
        return img if max(img.shape[:2]) <= self.size else super().__call__(img)


class CenterCrop:
    """Central ``size`` x ``size`` window (image must be at least that large)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: Array) -> Array:
        h, w = img.shape[:2]
        top, left = (h - self.size) // 2, (w - self.size) // 2
        return img[top : top + self.size, left : left + self.size]


class CenterCropSquare:
    """Largest central square (torchxrayvision ``XRayCenterCrop``)."""

    def __call__(self, img: Array) -> Array:
        h, w = img.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        return img[top : top + side, left : left + side]


class PadToSquare:
    """Zero-pad (black) to ``size`` x ``size``, image centred (CheXzero)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: Array) -> Array:
        h, w = img.shape[:2]
        out = np.zeros((self.size, self.size) + img.shape[2:], dtype=img.dtype)
        top, left = (self.size - h) // 2, (self.size - w) // 2
        out[top : top + h, left : left + w] = img
        return out


class TrimBorder:
    """Cut off rows/columns whose every pixel is <= ``threshold`` (black film borders)."""

    def __init__(self, threshold: int = 2):
        self.threshold = threshold

    def __call__(self, img: Array) -> Array:
        content = img > self.threshold
        rows, cols = np.flatnonzero(content.any(axis=1)), np.flatnonzero(content.any(axis=0))
        if rows.size < 2 or cols.size < 2:
            return img  # blank image: nothing sensible to trim
        return img[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


# --------------------------------------------------------------------------- intensity
class EqualizeHist:
    """Global histogram equalisation of a uint8 image (PXS; not CLAHE)."""

    def __call__(self, img: Array) -> Array:
        return cv2.equalizeHist(np.ascontiguousarray(img))


class SeedThreeChannel:
    """Seed 001's classifier input: Otsu | CLAHE | adaptive threshold, stacked HxWx3.

    Channel 1: Otsu binary. Channel 2: CLAHE, clip limit 3.0, 8 x 8 tiles. Channel 3:
    inverse-binary adaptive Gaussian threshold (block odd(0.02 min(h, w)) >= 7, C = 2)
    after a median blur (kernel odd(0.005 min(h, w)) >= 7).
    """

    def __init__(self, clip_limit: float = 3.0, tiles: int = 8):
        self.clip_limit, self.tiles = clip_limit, tiles

    def __call__(self, img: Array) -> Array:
        img = np.ascontiguousarray(img)
        short = min(img.shape[:2])
        _, otsu = cv2.threshold(img, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        # A CLAHE object keeps working buffers: one per call (microseconds) keeps the
        # transform safe to share between preprocessing threads.
        clahe = cv2.createCLAHE(clipLimit=self.clip_limit, tileGridSize=(self.tiles, self.tiles)).apply(img)
        blurred = cv2.medianBlur(img, _odd(0.005 * short, 7))
        adaptive = cv2.adaptiveThreshold(
            blurred, 255, cv2.ADAPTIVE_THRESH_GAUSSIAN_C, cv2.THRESH_BINARY_INV,
            _odd(0.02 * short, 7), 2,
        )
        return np.dstack([otsu, clahe, adaptive])


class ScaleIntensity:
    """``x * scale + offset`` as float32 (e.g. 0..255 -> 0..1, or xrv's [-1024, 1024])."""

    def __init__(self, scale: float, offset: float = 0.0):
        self.scale, self.offset = scale, offset

    def __call__(self, img: Array) -> Array:
        return img.astype(np.float32) * np.float32(self.scale) + np.float32(self.offset)


class Normalize:
    """``(x - mean) / std`` per channel (last axis) or for all channels."""

    def __init__(self, mean: float | Sequence[float], std: float | Sequence[float]):
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    def __call__(self, img: Array) -> Array:
        return (img.astype(np.float32) - self.mean) / self.std


class RepeatChannels:
    """Grey HxW -> HxWxC by repetition."""

    def __init__(self, channels: int = 3):
        self.channels = channels

    def __call__(self, img: Array) -> Array:
        return np.repeat(img[..., None], self.channels, axis=-1) if img.ndim == 2 else img


class ToTensor:
    """HxW or HxWxC array -> float32 CxHxW tensor (copies, contiguous)."""

    def __call__(self, img: Array) -> torch.Tensor:
        arr = img[None] if img.ndim == 2 else np.transpose(img, (2, 0, 1))
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


class Compose:
    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, img):
        for transform in self.transforms:
            img = transform(img)
        return img

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(type(t).__name__ for t in self.transforms) + ")"


# --------------------------------------------------------------------------- named pipelines
#: The input gate's pipeline, the core's own: its component runs in every archive, whatever family it serves.
GATE = register_preprocessing(Preprocessing(
    "gate", 1, 128, 1, lambda: Compose([Resize(128), ScaleIntensity(1 / 255), ToTensor()]),
    (0.0, 1.0), "squash to 128, x/255, grey"))


def build_transform(name: str) -> Compose:
    """The deterministic eval/serve pipeline registered under ``name`` (:mod:`cxrserve.core.preprocessing`)."""
    return get_preprocessing(name).build()


# --------------------------------------------------------------------------- augmentation
class RandomAffine:
    """Rotation, zoom and shift of a uint8 image (and its mask), with its own RNG."""

    def __init__(self, degrees: float = 10, zoom: tuple[float, float] = (0.9, 1.1),
                 shift: float = 0.05, seed: int | None = None):
        self.degrees, self.zoom, self.shift = degrees, zoom, shift
        self.rng = np.random.default_rng(seed)

    def matrix(self, h: int, w: int) -> Array:
        angle = self.rng.uniform(-self.degrees, self.degrees)
        scale = self.rng.uniform(*self.zoom)
        m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
        m[:, 2] += self.rng.uniform(-self.shift, self.shift, 2) * (w, h)
        return m

    def __call__(self, img: Array, mask: Array | None = None):
        h, w = img.shape[:2]
        m = self.matrix(h, w)
        out = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        if mask is None:
            return out
        return out, cv2.warpAffine(mask, m, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT)


class RandomIntensity:
    """Gamma and contrast jitter plus Gaussian noise: film and detector variety."""

    def __init__(self, gamma: tuple[float, float] = (0.7, 1.4), contrast: float = 0.15,
                 noise: float = 4.0, seed: int | None = None):
        self.gamma, self.contrast, self.noise = gamma, contrast, noise
        self.rng = np.random.default_rng(seed)

    def __call__(self, img: Array) -> Array:
        x = img.astype(np.float32) / 255.0
        x = x ** self.rng.uniform(*self.gamma)
        c = 1.0 + self.rng.uniform(-self.contrast, self.contrast)
        x = (x - 0.5) * c + 0.5
        x = x * 255.0 + self.rng.normal(0.0, self.noise * self.rng.uniform(0, 1), x.shape)
        return np.clip(x, 0, 255).astype(np.uint8)


def build_augment(strength: str = "standard", seed: int | None = None) -> Callable:
    """Training-only augmentation of ``(uint8 image, mask or None)``; returns the same pair.

    ``standard``: seed 001's segmentation recipe (rotation <= 10 degrees, zoom 0.9-1.1,
    small shift) plus intensity jitter. No horizontal flips: the heart is on one side.
    """
    if strength == "none":
        return lambda img, mask=None: (img, mask)
    affine = RandomAffine(seed=seed)
    intensity = RandomIntensity(seed=None if seed is None else seed + 1)

    def augment(img: Array, mask: Array | None = None):
        if mask is None:
            return intensity(affine(img)), None
        img, mask = affine(img, mask)
        return intensity(img), mask

    return augment
