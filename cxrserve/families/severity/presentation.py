"""How ``cxr-severity`` answers are shown and coded (SR scores, the saliency Secondary Capture, viewer card)."""
from __future__ import annotations

from cxrserve.core.family import NO_UNITS, SCORE, CardLine, Num, Picture, Presentation, Report, private

CODES = {
    "geographic_extent": private("CXR0020", "Geographic extent score (0-8)"),
    "opacity": private("CXR0021", "Opacity score (0-6)"),
    "lung_opacity_probability": private("CXR0022", "Probability of lung opacity"),
    "family_severity": private("CXR0103", "Lung opacity severity"),
}

PRESENTATION = Presentation(
    codes=CODES,
    reports={"cxr-severity": Report(CODES["family_severity"], (
        Num("geographic_extent", CODES["geographic_extent"], SCORE),
        Num("opacity", CODES["opacity"], SCORE),
        Num("lung_opacity_probability", CODES["lung_opacity_probability"], NO_UNITS, optional=True),
    ))},
    pictures={"cxr-severity": (
        Picture("saliency", "saliency_png", "Severity saliency map", kind="sc-severity", series_number=9904,
                caption="saliency: squared gradient of the predicted extent"),
    )},
    cards={"cxr-severity": (
        CardLine("headline", "extent {geographic_extent:.1} / 8 · opacity {opacity:.1} / 6"),
        CardLine("fact", "{lung_opacity_logit}", label="lung opacity logit"),
        CardLine("fact", "{lung_opacity_probability}", label="lung opacity probability"),
    )},
)
