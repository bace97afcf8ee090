"""Seed 001's chain: lung segmentation -> lung crop -> COVID-19 / normal / pneumonia.

The same functions build the classifier's training inputs (``cxrserve train
triage``) and serve requests, so a crop is cut exactly the same way in both.
Served as two models: ``cxr-lungseg`` (mask, box, area) and ``cxr-triage`` (the chain
with an optional Grad-CAM heatmap over the original image).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .lungs import LungFinding, analyse_lungs, mask_to_image_size
from .overlays import heatmap_png, limit_size, overlay, png_base64
from .pipeline import Item, Option, Pipeline, parse_bool, register_pipeline
from .runtime import Runtime
from .transforms import build_transform

TRIAGE_LABELS = ("covid19", "normal", "pneumonia")


def find_lungs(images: Sequence[np.ndarray], seg: Runtime, preprocessing: str, thresholds: dict,
               max_batch: int = 16) -> list[LungFinding]:
    """Segment uint8 grey images and apply the box/confidence rules to each."""
    transform = build_transform(preprocessing)
    outputs = seg.run_chunked([transform(img) for img in images], max_batch)
    return [
        analyse_lungs(out[0][0], (img.shape[1], img.shape[0]), thresholds)
        for img, out in zip(images, outputs)
    ]


def classifier_input(image: np.ndarray, finding: LungFinding, preprocessing: str = "triage_crop",
                     transform=None) -> torch.Tensor:
    """The classifier's tensor for one image: crop (if trusted) then the seed's 3 channels."""
    transform = transform or build_transform(preprocessing)
    return transform(finding.crop(image))


@register_pipeline
class LungSegPipeline(Pipeline):
    name = "cxr-lungseg"
    components = ("lungseg",)
    OPTIONS = {
        "mask": Option(parse_bool, True, "return the lung mask as a PNG at the original size"),
        "overlay": Option(parse_bool, False, "return the mask and box drawn over the image"),
    }

    def _predict(self, items: list[Item]) -> list[dict]:
        seg = self.parts["lungseg"]
        images = [it.xray.uint8 for it in items]
        with self.timer.stage("preprocess"):
            inputs = [seg.transform()(img) for img in images]
        outputs = self.run("lungseg", inputs)  # what find_lungs does, with its stages timed
        results = []
        with self.timer.stage("postprocess"):
            findings = [analyse_lungs(out[0][0], (img.shape[1], img.shape[0]), seg.card.thresholds)
                        for img, out in zip(images, outputs)]
            for item, image, finding in zip(items, images, findings):
                out = self.base_response(item)
                out.update(
                    lung_bbox=finding.lung_bbox,
                    lung_area_fraction=round(finding.lung_area_fraction, 4),
                    segmentation_confidence=round(finding.segmentation_confidence, 4),
                )
                size = (image.shape[1], image.shape[0])
                threshold = seg.card.thresholds.get("mask", 0.5)
                if item.options["mask"] or item.options["overlay"]:
                    full_mask = mask_to_image_size(finding.probability, size, threshold)
                if item.options["mask"]:
                    out["mask_png"] = png_base64(full_mask)
                if item.options["overlay"]:
                    out["overlay_png"] = png_base64(limit_size(
                        overlay(image, full_mask.astype(np.float32), alpha=0.35, box=finding.lung_bbox)))
                results.append(out)
        return results


@register_pipeline
class TriagePipeline(Pipeline):
    name = "cxr-triage"
    components = ("lungseg", "triage_classifier")
    OPTIONS = {
        "heatmap": Option(parse_bool, False, "return a Grad-CAM heatmap PNG over the original image"),
    }

    def setup(self) -> None:
        self.classifier_transform = self.parts["triage_classifier"].transform()
        self.labels = list(self.parts["triage_classifier"].card.labels)

    def _predict(self, items: list[Item]) -> list[dict]:
        seg, cls = self.parts["lungseg"], self.parts["triage_classifier"]
        images = [it.xray.uint8 for it in items]
        with self.timer.stage("preprocess"):
            seg_inputs = [seg.transform()(img) for img in images]
        seg_out = self.run("lungseg", seg_inputs)
        with self.timer.stage("postprocess"):
            findings = [
                analyse_lungs(out[0][0], (img.shape[1], img.shape[0]), seg.card.thresholds)
                for img, out in zip(images, seg_out)
            ]
        with self.timer.stage("preprocess"):
            cls_inputs = [classifier_input(img, f, transform=self.classifier_transform)
                          for img, f in zip(images, findings)]
        cls_out = self.run("triage_classifier", cls_inputs)
        results = []
        for item, image, finding, (probs, cams) in zip(items, images, findings, cls_out):
            out = self.base_response(item)
            best = int(np.argmax(probs))
            out.update(
                label=self.labels[best],
                probabilities={label: round(float(p), 6) for label, p in zip(self.labels, probs)},
                lung_bbox=finding.lung_bbox,
                segmentation_confidence=round(finding.segmentation_confidence, 4),
                crop_used=finding.crop_used,
            )
            if not finding.crop_used:
                out["warnings"].append(
                    "lung segmentation not confident "
                    f"({finding.segmentation_confidence:.3f} <= {seg.card.thresholds.get('segmentation_confidence', 0.875)}): "
                    "the whole image was classified"
                )
            if item.options["heatmap"]:
                with self.timer.stage("heatmap"):
                    box = finding.lung_bbox if finding.crop_used else None
                    out["heatmap_png"] = heatmap_png(image, cams[best], box=box)
            results.append(out)
        return results
