"""Which numbers "same outputs" compares: each served model's headline scores."""
from __future__ import annotations

import logging


log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- scores
def main_scores(model: str, response: dict) -> dict[str, float]:
    """The numbers "same outputs" is judged on: each model's headline scores (registry) and the gate's."""
    from cxrserve import families

    served = families.served().get(model)
    keys = served[1].headline if served else ()
    out: dict[str, float] = {}
    for key in keys:
        value = response
        for part in key.split("."):  # dotted paths: "probabilities.covid19", "change.distance"
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, dict):
            out.update({f"{key}.{k}": float(v) for k, v in value.items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    gate = response.get("input_gate")
    if isinstance(gate, dict) and "score" in gate:
        out["input_gate.score"] = float(gate["score"])
    return out


def served_names() -> tuple[str, ...]:
    """The models the suite measures one by one: every plain served model (a composed one,
    ``cxr-study``, has its own row against the six-call loop, :mod:`cxrserve.families.study.bench`)."""
    from cxrserve import families

    return tuple(name for name, (_, s) in families.served().items() if not s.compose)


def picture_option(model: str) -> str | None:
    """The request option that asks ``model`` for its picture (registry), if it has one."""
    from cxrserve import families

    served = families.served().get(model)
    return served[1].picture_option if served else None


def max_abs_diff(reference: dict[str, dict[str, float]], other: dict[str, dict[str, float]]) -> float | None:
    """Largest |difference| of any main score over the inputs both runs answered."""
    worst = None
    for name, scores in other.items():
        ref = reference.get(name)
        if not ref:
            continue
        for key, value in scores.items():
            if key in ref:
                diff = abs(value - ref[key])
                worst = diff if worst is None else max(worst, diff)
    return worst
