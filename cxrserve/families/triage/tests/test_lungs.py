"""Seed 001's box and confidence rules, in numbers a reader can check by hand."""
from __future__ import annotations

import numpy as np
import pytest

from cxrserve.families.triage.lungs import analyse_lungs, components_bbox, mask_to_image_size, pad_and_scale_bbox


def two_lungs(h=100, w=100) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    mask[20:80, 10:40] = True  # right lung (image left)
    mask[25:85, 60:90] = True  # left lung
    return mask


def test_union_box_of_8_connected_components():
    assert components_bbox(two_lungs()) == (10, 20, 90, 85)
    diagonal = np.zeros((10, 10), bool)
    diagonal[2, 2] = diagonal[3, 3] = True  # one 8-connected component
    assert components_bbox(diagonal) == (2, 2, 4, 4)
    assert components_bbox(np.zeros((5, 5), bool)) is None


def test_specks_are_dropped_only_when_asked():
    mask = two_lungs()
    mask[98, 98] = True  # one stray pixel in the corner
    assert components_bbox(mask, 0.0) == (10, 20, 99, 99)  # the seed's rule
    assert components_bbox(mask, 0.02) == (10, 20, 90, 85)


def test_padding_clipping_and_scaling():
    # box 80 x 65 at mask scale 100x100, 5 % padding = 4 and 3.25 px, image 1000 x 2000
    assert pad_and_scale_bbox((10, 20, 90, 85), (100, 100), (1000, 2000), 0.05) == [60, 335, 940, 1765]
    # a box touching the border is clipped to the image
    assert pad_and_scale_bbox((0, 0, 100, 100), (100, 100), (640, 480), 0.05) == [0, 0, 640, 480]


def test_confidence_rule_decides_the_crop():
    prob = np.where(two_lungs(), 0.95, 0.02).astype(np.float32)
    sure = analyse_lungs(prob, (200, 200))
    assert sure.crop_used and sure.segmentation_confidence == pytest.approx(0.95)
    # (10 - 4) * 2, (20 - 3.25) * 2 floored, (90 + 4) * 2, (85 + 3.25) * 2 ceiled
    assert sure.lung_bbox == [12, 33, 188, 177]
    assert sure.lung_area_fraction == pytest.approx(two_lungs().mean())
    unsure = analyse_lungs(np.where(two_lungs(), 0.8, 0.02).astype(np.float32), (200, 200))
    assert not unsure.crop_used and unsure.segmentation_confidence == pytest.approx(0.8)
    image = np.arange(200 * 200, dtype=np.uint8).reshape(200, 200)
    assert unsure.crop(image) is image
    assert sure.crop(image).shape == (177 - 33, 188 - 12)
    threshold_moved = analyse_lungs(np.where(two_lungs(), 0.8, 0.02).astype(np.float32), (200, 200),
                                    {"segmentation_confidence": 0.7})
    assert threshold_moved.crop_used


def test_empty_mask_classifies_whole_image():
    finding = analyse_lungs(np.full((50, 50), 0.1, np.float32), (300, 300))
    assert finding.lung_bbox is None and not finding.crop_used and finding.segmentation_confidence == 0.0


def test_mask_back_to_original_size():
    prob = np.where(two_lungs(), 0.9, 0.0).astype(np.float32)
    full = mask_to_image_size(prob, (400, 300))
    assert full.shape == (300, 400)
    assert abs(full.mean() - two_lungs().mean()) < 0.01
