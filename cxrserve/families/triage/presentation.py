"""How ``cxr-lungseg`` and ``cxr-triage`` answers are shown and coded (SR, SEG, SC, viewer card).

Read through the registry (``Family.presentation``) by the SR writer, the client and the
viewer; the code table is in ``docs/DICOM.md``.
"""
from __future__ import annotations

from cxrserve.core.family import (NO_UNITS, CardLine, Coded, Concept, Num, Picture, Presentation, Report,
                                  Segment, private)

CODES = {
    "class_covid19": Concept("840539006", "SCT", "COVID-19"),
    "class_normal": Concept("17621005", "SCT", "Normal"),
    "class_pneumonia": Concept("233604007", "SCT", "Pneumonia"),
    "triage_class": private("CXR0001", "Chest X-ray triage class"),
    "p_covid19": private("CXR0002", "Probability of COVID-19 pattern"),
    "p_normal": private("CXR0003", "Probability of normal chest X-ray"),
    "p_pneumonia": private("CXR0004", "Probability of non-COVID pneumonia pattern"),
    "lung_area_fraction": private("CXR0060", "Lung area fraction of image"),
    "segmentation_confidence": private("CXR0061", "Lung segmentation confidence"),
    "family_lungseg": private("CXR0100", "Lung segmentation"),
    "family_triage": private("CXR0101", "Triage classification"),
}
CLASSES = ("covid19", "normal", "pneumonia")

LUNG_BOX = CardLine("fact", "{lung_bbox}", label="lung box")
CONFIDENCE = CardLine("fact", "{segmentation_confidence}", label="segmentation confidence")

PRESENTATION = Presentation(
    codes=CODES,
    reports={
        "cxr-lungseg": Report(CODES["family_lungseg"], (
            Num("lung_area_fraction", CODES["lung_area_fraction"], NO_UNITS, optional=True),
            Num("segmentation_confidence", CODES["segmentation_confidence"], NO_UNITS, optional=True),
        )),
        "cxr-triage": Report(CODES["family_triage"], (
            *(Num(f"probabilities.{c}", CODES[f"p_{c}"], NO_UNITS) for c in CLASSES),
            Coded("label", CODES["triage_class"], {c: CODES[f"class_{c}"] for c in CLASSES}),
        )),
    },
    pictures={
        "cxr-lungseg": (
            Picture("mask", "mask_png", "Lung mask", kind="seg", series_number=9902, segment=Segment(
                label="Lungs", category=Concept("91723000", "SCT", "Anatomical Structure"),
                type=Concept("39607008", "SCT", "Lung"), content_label="LUNGS", tracking_id="cxrserve lungs",
                content_description="Lung segmentation (AI) - RESEARCH USE ONLY",
                series_description="AI lung segmentation (cxrserve) - RESEARCH USE ONLY")),
            Picture("overlay", "overlay_png", "Lung mask and box", caption="lung mask and box over the image"),
        ),
        "cxr-triage": (
            Picture("heatmap", "heatmap_png", "Triage Grad-CAM heatmap", kind="sc-triage", series_number=9903,
                    caption="Grad-CAM heatmap of the predicted class; green box: lung crop"),
        ),
    },
    cards={
        "cxr-lungseg": (
            CardLine("headline", "lungs: {lung_area_fraction:%} of the image"),
            LUNG_BOX, CONFIDENCE,
        ),
        "cxr-triage": (
            CardLine("headline", "{label} ({probabilities:max%})"),
            CardLine("bars", "probabilities"),
            LUNG_BOX, CONFIDENCE,
            CardLine("fact", "{crop_used}", label="crop used"),
        ),
    },
)
