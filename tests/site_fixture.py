"""Site profiles for serving tests, bound to the archives of a store (``cxrserve site calibrate``
writes real ones; these fix known numbers so the tests can check the arithmetic end to end)."""
from __future__ import annotations

import json
from pathlib import Path

from cxrserve.core import site_profile as sp

#: A usable profile: triage softened (T = 2) with a low COVID-19 threshold, a mortality Platt step.
SITE = "testsite"
#: A profile made for other weights: serving refuses it (409, re-calibrate).
STALE = "stalesite"
COVID_THRESHOLD = 0.05
OPERATING_POINT = f"{SITE}:covid19.sensitivity>=0.90"


def profile_dict(store: Path, name: str = SITE, *, stale: bool = False) -> dict:
    triage = sp.archive_info(store / "cxr-triage.mar")
    mortality = sp.archive_info(store / "cxr-mortality.mar")
    bind = lambda b: {"version": b.version, "content_sha256": "0" * 64 if stale else b.content_sha256,  # noqa: E731
                      "sha256": b.sha256}
    return {
        "format": sp.PROFILE_FORMAT, "site": name, "created": "2026-12-07T00:00:00+00:00",
        "ae_titles": [name.upper()[:16]],
        "archives": {"cxr-triage": bind(triage), "cxr-mortality": bind(mortality)},
        "families": {
            "triage": {"model": "cxr-triage", "kind": "multiclass", "labels": ["covid19", "normal", "pneumonia"],
                       "calibration": {"method": "temperature", "T": 2.0},
                       "thresholds": {"covid19": {"threshold": COVID_THRESHOLD, "operating_point": OPERATING_POINT}}},
            "mortality": {"model": "cxr-mortality", "kind": "binary", "labels": ["risk"],
                          "calibration": {"method": "platt", "params": {"risk": [0.5, -1.0]}},
                          "answer_labels": {"positive": "high", "negative": "low"},
                          "served_thresholds": {"risk": 0.5}},
        },
        "gate": {"model": "cxr-triage", "threshold": 0.01, "max_refusal": 0.02},
    }


def write_sites(folder: Path, store: Path, *, default: str | None = None) -> Path:
    """``folder/<site>/profile.json`` for :data:`SITE` and :data:`STALE` (and ``sites.json``)."""
    for name, stale in ((SITE, False), (STALE, True)):
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / sp.PROFILE_FILE).write_text(json.dumps(profile_dict(store, name, stale=stale), indent=1))
    if default:
        (folder / "sites.json").write_text(json.dumps({"default": default}))
    return folder
