"""What one output row of ``cxrserve batch`` holds: the core columns, the answer without its
pictures, and for a composed model each section's status and headline numbers
(``<key>_status``, ``<key>_<headline path>``, from ``Served.headline`` in the registry), then
its worklist priority (``priority``: urgent / routine / not assessed, ``priority_reasons``:
``<code> <meaning>`` of each reason, ``; ``-separated; see :mod:`cxrserve.core.priority`).
"""
from __future__ import annotations

import json

from cxrserve.tools.batch.inputs import BatchInput

CORE_COLUMNS = ("input_id", "file", "format", "status", "error", "message", "model", "model_version",
                "gate_verdict", "gate_score", "seconds", "result")
#: A composed model's worklist priority, after its sections' columns.
PRIORITY_COLUMNS = ("priority", "priority_reasons")



def strip_pictures(result: dict) -> dict:
    """Drop base64 PNG fields (heatmaps, masks): rows stay small; use ``predict`` for pictures."""
    return {k: (strip_pictures(v) if isinstance(v, dict) else v) for k, v in result.items()
            if not k.endswith("_png")}


def make_row(item: BatchInput, *, status: int, result: dict | None = None, error: str = "", message: str = "",
             seconds: float = 0.0) -> dict:
    gate = (result or {}).get("input_gate") or {}
    row = {
        "input_id": item.input_id, "file": item.file, "format": item.format or (result or {}).get("input", {}).get("format", ""),
        "status": status, "error": error, "message": message,
        "model": (result or {}).get("model", ""), "model_version": (result or {}).get("model_version", ""),
        "gate_verdict": gate.get("verdict", ""), "gate_score": gate.get("score", ""),
        "seconds": round(seconds, 4), "result": strip_pictures(result) if result is not None else None,
    }
    if isinstance((result or {}).get("results"), dict):  # a composed model: every family's main numbers
        row.update(headline_values(result))
    return row


def section_headlines(model: str) -> dict[str, tuple[str, ...]]:
    """Section key -> dotted paths of its main numbers (``Served.headline``), for each model a
    composed model answers for (empty for a plain or unknown model)."""
    from cxrserve import families

    if model not in families.served():
        return {}
    return {families.get_served(n)[1].key: families.get_served(n)[1].headline for n in families.composed(model)}


def headline_columns(model: str) -> list[str]:
    """Extra CSV columns of a composed model's rows: per section ``<key>_status`` and its headline fields."""
    columns = []
    for key, headline in section_headlines(model).items():
        columns.append(f"{key}_status")
        columns.extend(f"{key}_{path.replace('.', '_')}" for path in headline)
    return columns + list(PRIORITY_COLUMNS) if columns else columns


def _lookup(section: dict, path: str):
    value = section
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return ""
        value = value[part]
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def headline_values(result: dict) -> dict:
    """The :func:`headline_columns` of one composed answer (``""`` where a section did not answer)."""
    from cxrserve import families

    row = {}
    sections = result.get("results") or {}
    model = result.get("model") if result.get("model") in families.served() else families.composed_model()
    for key, headline in section_headlines(model or "").items():
        section = sections.get(key)
        row[f"{key}_status"] = "" if section is None else int(section.get("status", 200))
        for path in headline:
            row[f"{key}_{path.replace('.', '_')}"] = "" if section is None or "error" in section \
                else _lookup(section, path)
    row.update(priority_values(result))
    return row


def priority_values(result: dict) -> dict:
    """The :data:`PRIORITY_COLUMNS` of one composed answer (``""`` when it has no priority)."""
    priority = result.get("priority")
    if not isinstance(priority, dict):
        return dict.fromkeys(PRIORITY_COLUMNS, "")
    reasons = "; ".join(f"{r.get('code', '')} {r.get('meaning', '')}".strip() for r in priority.get("reasons") or [])
    return {"priority": priority.get("level", ""), "priority_reasons": reasons}
