"""Report text for each phantom (zero-shot training pairs)."""
from __future__ import annotations

import numpy as np

# ---------------------------------------------------------------------------- reports

_SIDE = ("right", "left")


def _zone_word(z):
    yn = z["ynorm"]
    return "upper" if yn < 0.38 else ("mid" if yn < 0.6 else "lower")


def _report(spec, kind, zones, devices, look, rr):
    if kind != "frontal":
        return {
            "lateral": ["Lateral view.", "Lateral view of the chest.", "Lateral chest radiograph."],
            "hand": ["Radiograph of the hand.", "PA view of the hand."],
            "knee": ["Frontal view of the knee.", "AP radiograph of the knee."],
            "pelvis": ["AP view of the pelvis.", "Pelvic radiograph."],
            "natural": ["Not a radiograph.", "Non-medical photograph."],
        }[kind][int(rr.integers(2 if kind != "lateral" else 3))]
    parts = []
    if not zones:
        parts.append(str(rr.choice([
            "No acute cardiopulmonary abnormality. Lungs are clear.",
            "The lungs are clear. No focal consolidation, effusion or pneumothorax.",
            "Normal chest radiograph.",
            "Clear lungs. Heart size is normal.",
            "No focal airspace opacity. Cardiomediastinal silhouette within normal limits.",
        ])))
    else:
        grades = {z["grade"] for z in zones}
        sides = sorted({z["lung"] for z in zones})
        total = sum(z["frac"] for z in zones) / 2.0
        if 3 in grades and len(zones) == 1:
            z = zones[0]
            side = _SIDE[z["lung"]]
            if z["frac"] >= 0.75:
                parts.append(str(rr.choice([f"Complete opacification (white-out) of the {side} hemithorax.",
                                            f"Extensive opacification of the {side} hemithorax."])))
            else:
                parts.append(str(rr.choice([
                    f"Dense {side} {_zone_word(z)} zone consolidation with near white-out.",
                    f"Dense opacification of the {side} {_zone_word(z)} zone.",
                ])))
        elif len(sides) == 2 and all(z["grade"] == 1 for z in zones):
            extent = "Extensive bilateral" if total > 0.5 else ("Bilateral" if total > 0.2 else "Mild bilateral")
            where = []
            if np.mean([z["periph"] for z in zones]) > 0.55:
                where.append("predominantly peripheral")
            if np.mean([z["lower"] for z in zones]) > 0.55:
                where.append("in the lower zones")
            tail = (", " + " and ".join(where)) if where else ""
            noun = str(rr.choice(["patchy ground-glass opacities", "hazy ground-glass opacities",
                                  "ground-glass opacities"]))
            parts.append(f"{extent} {noun}{tail}.")
        elif len(sides) == 2:
            extent = "Extensive bilateral" if total > 0.5 else "Bilateral"
            parts.append(str(rr.choice([f"{extent} mixed ground-glass and consolidative opacities.",
                                        f"{extent} airspace opacities with areas of consolidation."])))
        else:
            for z in zones:
                if z["grade"] == 1:
                    parts.append(f"Ground-glass opacity in the {_SIDE[z['lung']]} {_zone_word(z)} zone.")
                else:
                    lobe = {"upper": "upper lobe", "mid": ("middle lobe" if z["lung"] == 0 else "lingula"),
                            "lower": "lower lobe"}[_zone_word(z)]
                    parts.append(str(rr.choice([
                        f"{_SIDE[z['lung']].capitalize()} {lobe} consolidation.",
                        f"Consolidation in the {_SIDE[z['lung']]} {lobe}, consistent with pneumonia.",
                        f"Focal {_SIDE[z['lung']]} {_zone_word(z)} zone airspace consolidation.",
                    ])))
    if devices and rr.random() < 0.8:
        parts.append(" ".join(f"{d[0].upper()}{d[1:]} in place." for d in devices[:2]))
    if look == "ap_portable" and rr.random() < 0.3:
        parts.insert(0, "Portable AP view.")
    return " ".join(parts)
