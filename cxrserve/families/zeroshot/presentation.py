"""How ``cxr-zeroshot`` answers are shown and coded: one SR number per finding, the viewer's bars and findings input.

A finding is coded by :func:`finding_code`: SNOMED CT for the labels in :data:`FINDINGS_SCT`,
else the private ``ZS<hash>`` (any label a caller asks for gets a stable code).
"""
from __future__ import annotations

import hashlib

from cxrserve.core.family import NO_UNITS, CardLine, Concept, NumEach, Presentation, Report, ViewerInput, private

CODES = {"family_zeroshot": private("CXR0105", "Zero-shot findings")}
#: zero-shot labels with a SNOMED CT finding; the others get a private code ZS<hash>.
FINDINGS_SCT = {
    "atelectasis": Concept("46621007", "SCT", "Atelectasis"),
    "cardiomegaly": Concept("8186001", "SCT", "Cardiomegaly"),
    "consolidation": Concept("95436008", "SCT", "Lung consolidation"),
    "edema": Concept("19242006", "SCT", "Pulmonary edema"),
    "pleural effusion": Concept("60046008", "SCT", "Pleural effusion"),
    "pneumonia": Concept("233604007", "SCT", "Pneumonia"),
    "pneumothorax": Concept("36118008", "SCT", "Pneumothorax"),
    "fracture": Concept("125605004", "SCT", "Fracture of bone"),
}


def finding_code(label: str) -> Concept:
    """The finding concept of a zero-shot label: SNOMED CT when mapped, else private ``ZS<hash>``."""
    key = label.strip().lower()
    if key in FINDINGS_SCT:
        return FINDINGS_SCT[key]
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:10].upper()
    return private(f"ZS{digest}", label.strip()[:64] or "unnamed")


PRESENTATION = Presentation(
    codes=CODES,
    reports={"cxr-zeroshot": Report(CODES["family_zeroshot"], (
        NumEach("probabilities", "cxrserve.families.zeroshot.presentation:finding_code", NO_UNITS),
    ), lung_site=False)},  # findings anywhere in the image (a fracture, support devices)
    cards={"cxr-zeroshot": (
        CardLine("note", 'p = exp(sim "{{finding}}") / (exp(sim "{{finding}}") + exp(sim "no {{finding}}")); '
                         "findings: {labels_source}, ensemble of {ensemble_size}"),
        CardLine("bars", "probabilities", sort=True, top=False),
    )},
    inputs=(ViewerInput("labels", "Zero-shot findings (optional, comma-separated; default: the 14 CheXpert findings)",
                        kind="list", placeholder="e.g. Pneumonia, Pleural Effusion, Pneumothorax"),),
)
