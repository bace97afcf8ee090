"""How ``cxr-mortality`` answers are shown and coded (SR risk and category, the Grad-CAM SC, viewer card)."""
from __future__ import annotations

from cxrserve.core.family import NO_UNITS, CardLine, Coded, Num, Picture, Presentation, Report, private

CODES = {
    "mortality_risk": private("CXR0030", "Predicted mortality risk"),
    "mortality_label": private("CXR0031", "Mortality risk category"),
    "mortality_high": private("CXR0032", "High mortality risk"),
    "mortality_low": private("CXR0033", "Low mortality risk"),
    "mortality_threshold": private("CXR0034", "High mortality risk threshold"),
    "family_mortality": private("CXR0104", "Mortality risk prediction"),
}

PRESENTATION = Presentation(
    codes=CODES,
    reports={"cxr-mortality": Report(CODES["family_mortality"], (
        Num("risk", CODES["mortality_risk"], NO_UNITS),
        Num("threshold", CODES["mortality_threshold"], NO_UNITS, optional=True),
        Coded("risk_label", CODES["mortality_label"], {"high": CODES["mortality_high"], "low": CODES["mortality_low"]}),
    ))},
    pictures={"cxr-mortality": (
        Picture("overlay", "overlay_png", "Mortality risk Grad-CAM", kind="sc-mortality", series_number=9905,
                caption="Grad-CAM of the predicted risk class"),
    )},
    cards={"cxr-mortality": (
        CardLine("headline", "risk {risk:%} ({risk_label})"),
        CardLine("fact", "{threshold}", label="high-risk threshold"),
        CardLine("note", "{research_only}", when="research_only"),
    )},
)
