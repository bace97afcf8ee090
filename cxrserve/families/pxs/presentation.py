"""How ``cxr-pxs`` answers are shown and coded (SR content with the change, viewer card, the prior input)."""
from __future__ import annotations

from cxrserve.core.family import (PERCENT, SCORE, CardLine, Coded, Concept, Num, Presentation, Report, ViewerInput,
                                  private)

CODES = {
    "change_worse": Concept("230993007", "SCT", "Worsening"),
    "change_better": Concept("385425000", "SCT", "Improved"),
    "change_stable": Concept("260388006", "SCT", "No status change"),
    "pxs": private("CXR0010", "Pulmonary X-ray severity score"),
    "pxs_percentile": private("CXR0011", "PXS percentile in normal reference pool"),
    "prior_pxs": private("CXR0012", "PXS of prior study"),
    "prior_pxs_percentile": private("CXR0013", "PXS percentile of prior study"),
    "pxs_difference": private("CXR0014", "PXS difference from prior study"),
    "pxs_distance": private("CXR0015", "Embedding distance from prior study"),
    "pxs_change": private("CXR0016", "Change since prior study"),
    "pxs_change_threshold": private("CXR0017", "PXS change threshold"),
    "family_pxs": private("CXR0102", "Pulmonary X-ray severity"),
}

PRESENTATION = Presentation(
    codes=CODES,
    reports={"cxr-pxs": Report(CODES["family_pxs"], (
        Num("pxs", CODES["pxs"], SCORE),
        Num("pxs_percentile", CODES["pxs_percentile"], PERCENT, optional=True),
        Num("prior.pxs", CODES["prior_pxs"], SCORE, when="prior"),
        Num("prior.pxs_percentile", CODES["prior_pxs_percentile"], PERCENT, optional=True, when="prior"),
        Num("change.pxs_difference", CODES["pxs_difference"], SCORE, when="change"),
        Num("change.distance", CODES["pxs_distance"], SCORE, when="change"),
        Num("change.threshold", CODES["pxs_change_threshold"], SCORE, when="change"),
        Coded("change.direction", CODES["pxs_change"],
              {d: CODES[f"change_{d}"] for d in ("worse", "better", "stable")}, when="change"),
    ))},
    cards={"cxr-pxs": (
        CardLine("headline", "PXS {pxs:.2}"),
        CardLine("fact", "{pxs_percentile:.1} (of {pool.size} normal references)", label="pool percentile"),
        CardLine("fact", "{prior.pxs:.2} (percentile {prior.pxs_percentile:.1})", label="prior PXS", when="change"),
        CardLine("fact", "{change.pxs_difference:+.2}", label="PXS change", when="change"),
        CardLine("fact", "{change.distance:.2}", label="embedding distance", when="change"),
        CardLine("tag", "change vs prior: {change.direction} (threshold {change.threshold:.2})",
                 label="change.direction", when="change", otherwise="Add a prior study to see the change."),
    )},
    inputs=(ViewerInput("prior", "Prior study of the same patient (optional, for PXS change)"),),
)
