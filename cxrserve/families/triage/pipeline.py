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

from cxrserve.families.triage.lungs import LungFinding, analyse_lungs, mask_to_image_size
from cxrserve.core.options import Option, parse_bool
from cxrserve.core.overlays import fit_picture, heatmap_png, overlay, png_base64
from cxrserve.core.item import Item
from cxrserve.core.pipeline import Pipeline
from cxrserve.core.sites import SiteOutput
from cxrserve.core.runtime import Runtime
from cxrserve.core.transforms import build_transform

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


def original_bbox(finding: LungFinding, xray, thresholds: dict) -> list[int] | None:
    """The lung box in pixels of the image as stored (``finding`` is in the decoded image's)."""
    if not xray.reduced:
        return finding.lung_bbox
    return analyse_lungs(finding.probability, xray.full_size, thresholds).lung_bbox


def classifier_input(image: np.ndarray, finding: LungFinding, preprocessing: str = "triage_crop",
                     transform=None) -> torch.Tensor:
    """The classifier's tensor for one image: crop (if trusted) then the seed's 3 channels."""
    transform = transform or build_transform(preprocessing)
    return transform(finding.crop(image))


def lung_findings(pipeline: Pipeline, items: list[Item]) -> list[LungFinding]:
    """The lung U-Net's findings for each item, run once per study.

    A finding is kept in ``item.shared["lungs"]`` with the component that made it, so
    the pipelines of one ``cxr-study`` (lungseg and triage, sharing one component)
    segment each image once; a pipeline with other weights segments again.
    """
    seg = pipeline.parts["lungseg"]
    todo = [it for it in items if it.shared.get("lungs", (None, None))[0] is not seg]
    if todo:
        images = [it.xray.uint8 for it in todo]
        with pipeline.timer.stage("preprocess"):
            inputs = [seg.transform()(img) for img in images]
        outputs = pipeline.run("lungseg", inputs)  # what find_lungs does, with its stages timed
        with pipeline.timer.stage("postprocess"):
            for it, img, out in zip(todo, images, outputs):
                it.shared["lungs"] = (seg, analyse_lungs(out[0][0], (img.shape[1], img.shape[0]),
                                                         seg.card.thresholds))
    return [it.shared["lungs"][1] for it in items]


class LungSegPipeline(Pipeline):
    name = "cxr-lungseg"
    components = ("lungseg",)
    OPTIONS = {
        "mask": Option(parse_bool, True, "return the lung mask as a PNG at the original size",
                       picture=True),
        "overlay": Option(parse_bool, False, "return the mask and box drawn over the image",
                          picture=True),
    }

    def _predict(self, items: list[Item]) -> list[dict]:
        seg = self.parts["lungseg"]
        images = [it.xray.uint8 for it in items]
        findings = lung_findings(self, items)
        results = []
        with self.timer.stage("postprocess"):
            for item, image, finding in zip(items, images, findings):
                out = self.base_response(item)
                out.update(
                    lung_bbox=original_bbox(finding, item.xray, seg.card.thresholds),
                    lung_area_fraction=round(finding.lung_area_fraction, 4),
                    segmentation_confidence=round(finding.segmentation_confidence, 4),
                )
                size = (image.shape[1], image.shape[0])
                threshold = seg.card.thresholds.get("mask", 0.5)
                if item.options["mask"]:  # at the stored size, from the model-resolution map
                    out["mask_png"] = png_base64(mask_to_image_size(finding.probability, item.xray.full_size,
                                                                    threshold))
                if item.options["overlay"]:
                    mask = mask_to_image_size(finding.probability, size, threshold)
                    out["overlay_png"] = png_base64(fit_picture(
                        overlay(image, mask.astype(np.float32), alpha=0.35, box=finding.lung_bbox),
                        item.xray.full_size))
                results.append(out)
        return results



class TriagePipeline(Pipeline):
    name = "cxr-triage"
    score_maps = ("probabilities",)
    components = ("lungseg", "triage_classifier")
    #: a site's temperature, priors and operating points decide the label (cxrserve.core.sites)
    SITE_OUTPUT = SiteOutput("multiclass", scores="probabilities", answer="label")
    OPTIONS = {
        "heatmap": Option(parse_bool, False, "return a Grad-CAM heatmap PNG over the original image",
                          picture=True),
    }

    def setup(self) -> None:
        self.classifier_transform = self.parts["triage_classifier"].transform()
        self.labels = list(self.parts["triage_classifier"].card.labels)

    def _predict(self, items: list[Item]) -> list[dict]:
        seg = self.parts["lungseg"]
        images = [it.xray.uint8 for it in items]
        findings = lung_findings(self, items)
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
                lung_bbox=original_bbox(finding, item.xray, seg.card.thresholds),
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
                    out["heatmap_png"] = heatmap_png(image, cams[best], box=box, full_size=item.xray.full_size)
            results.append(out)
        return results
