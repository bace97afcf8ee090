"""From a lung probability map to the facts the chain needs: mask, box, confidence.

Seed 001's rules, with their defaults in the segmentation model's card:

* mask: probability > ``mask`` threshold (0.5);
* bounding box: 8-connected components of the mask, union box of all of them, padded
  by 5 % of the box width/height on each side, clipped to the image, scaled back to
  the original pixels. Better than the seed: components smaller than
  ``min_component_fraction`` of the mask (default 2 %) are dropped first, so one
  stray speck cannot stretch the box across the image (0 restores the seed);
* segmentation confidence: mean lung probability inside the mask; at or below
  ``segmentation_confidence`` (0.875) the crop is not trusted and the whole image is
  classified instead.

Boxes are ``[x0, y0, x1, y1]`` in pixels of the original image, ``x1``/``y1``
exclusive, so ``image[y0:y1, x0:x1]`` is the crop.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

DEFAULT_THRESHOLDS = {
    "mask": 0.5,
    "segmentation_confidence": 0.875,
    "bbox_padding": 0.05,
    "min_component_fraction": 0.02,
}


@dataclass
class LungFinding:
    probability: np.ndarray  # model-resolution lung probability, float32
    mask: np.ndarray  # model-resolution bool mask
    lung_bbox: list[int] | None  # [x0, y0, x1, y1] in original pixels
    segmentation_confidence: float
    crop_used: bool
    lung_area_fraction: float  # of the image area

    def crop(self, image: np.ndarray) -> np.ndarray:
        """The classifier's input region: the lung box if trusted, else the whole image."""
        if not self.crop_used or self.lung_bbox is None:
            return image
        x0, y0, x1, y1 = self.lung_bbox
        return image[y0:y1, x0:x1]


def components_bbox(mask: np.ndarray, min_component_fraction: float = 0.0) -> tuple[int, int, int, int] | None:
    """Union box ``(x0, y0, x1, y1)`` (exclusive ends) of the mask's 8-connected components."""
    mask_u8 = mask.astype(np.uint8)
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask_u8, connectivity=8)
    if count <= 1:
        return None
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = areas >= min_component_fraction * areas.sum()
    if not keep.any():
        keep = areas == areas.max()
    boxes = stats[1:][keep]
    x0 = int(boxes[:, cv2.CC_STAT_LEFT].min())
    y0 = int(boxes[:, cv2.CC_STAT_TOP].min())
    x1 = int((boxes[:, cv2.CC_STAT_LEFT] + boxes[:, cv2.CC_STAT_WIDTH]).max())
    y1 = int((boxes[:, cv2.CC_STAT_TOP] + boxes[:, cv2.CC_STAT_HEIGHT]).max())
    return x0, y0, x1, y1


def pad_and_scale_bbox(
    box: tuple[int, int, int, int], mask_size: tuple[int, int], image_size: tuple[int, int], padding: float
) -> list[int]:
    """Pad a mask-resolution box by ``padding`` of its size, clip, scale to image pixels.

    Args:
        box: ``(x0, y0, x1, y1)`` in mask pixels, exclusive ends.
        mask_size: ``(width, height)`` of the mask.
        image_size: ``(width, height)`` of the original image.
        padding: fraction of the box width (height) added left and right (top and bottom).
    """
    x0, y0, x1, y1 = box
    mw, mh = mask_size
    iw, ih = image_size
    pad_x, pad_y = (x1 - x0) * padding, (y1 - y0) * padding
    sx, sy = iw / mw, ih / mh
    left = max(0.0, (x0 - pad_x) * sx)
    top = max(0.0, (y0 - pad_y) * sy)
    right = min(float(iw), (x1 + pad_x) * sx)
    bottom = min(float(ih), (y1 + pad_y) * sy)
    out = [int(np.floor(left)), int(np.floor(top)), int(np.ceil(right)), int(np.ceil(bottom))]
    # Degenerate boxes (one-pixel masks) still give at least one original pixel.
    out[2], out[3] = max(out[2], out[0] + 1), max(out[3], out[1] + 1)
    return out


def analyse_lungs(probability: np.ndarray, image_size: tuple[int, int], thresholds: dict | None = None) -> LungFinding:
    """Apply the seed's mask, box and confidence rules to one probability map.

    Args:
        probability: H x W lung probability at model resolution.
        image_size: ``(width, height)`` of the original image.
        thresholds: overrides of :data:`DEFAULT_THRESHOLDS` (from the card/model config).
    """
    t = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    probability = np.asarray(probability, dtype=np.float32)
    mask = probability > t["mask"]
    box = components_bbox(mask, t["min_component_fraction"])
    confidence = float(probability[mask].mean()) if mask.any() else 0.0
    bbox = None
    if box is not None:
        mh, mw = probability.shape
        bbox = pad_and_scale_bbox(box, (mw, mh), image_size, t["bbox_padding"])
    return LungFinding(
        probability=probability,
        mask=mask,
        lung_bbox=bbox,
        segmentation_confidence=confidence,
        crop_used=bbox is not None and confidence > t["segmentation_confidence"],
        lung_area_fraction=float(mask.mean()),
    )


def mask_to_image_size(probability: np.ndarray, image_size: tuple[int, int], threshold: float = 0.5) -> np.ndarray:
    """Model-resolution probability -> bool mask at the original ``(width, height)``."""
    resized = cv2.resize(probability.astype(np.float32), image_size, interpolation=cv2.INTER_LINEAR)
    return resized > threshold
