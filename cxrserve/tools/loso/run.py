"""Drive the folds: the segmentation checkpoint once, every film's lung finding once, then one
fold per held-out site, each under its own budget; resumable (a finished fold is kept)."""
from __future__ import annotations

import importlib
import json
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def fold_modules() -> dict:
    """Training task -> the family module that runs its leave-one-site-out folds."""
    from cxrserve import families

    out = {}
    for name in families.tasks():
        package = families.get_task(name).__name__.rsplit(".", 1)[0]
        try:
            module = importlib.import_module(package + ".loso")
        except ModuleNotFoundError as err:
            if err.name != package + ".loso":
                raise
            continue
        if getattr(module, "TASK", None) == name:
            out[name] = module
    return out


def run(data, out, *, task: str | None = None, budget: float = 300.0, seg_budget: float = 240.0,
        segmentation=None, sites=None, settings: dict | None = None, device: str = "auto",
        records=None, progress: bool = False) -> dict:
    """Train and score every fold; returns ``{"folds": {site: fold.json}, "segmentation": ..., ...}``."""
    from cxrserve.training.common import load_records

    modules = fold_modules()
    if task is None:
        if len(modules) != 1:
            raise ValueError(f"name the task (--task): {sorted(modules)}")
        task = next(iter(modules))
    mod = modules[task]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    records = records if records is not None else load_records(data)
    seg = mod.segmentation(records, out, budget=seg_budget, given=segmentation, device=device, progress=progress)
    todo_sites = list(sites or mod.held_out_sites(records))
    findings = None
    folds = {}
    for site in todo_sites:
        if findings is None and not (out / site / "fold.json").exists():
            t = time.time()
            findings = mod.lung_findings(mod.usable_records(records), seg["checkpoint"], device, keep=out / "crops.json")
            seg["crop_seconds"] = round(time.time() - t, 1)
        log.info("fold: leaving out %s", site)
        folds[site] = mod.run_fold(records, site, out, segmentation=seg["checkpoint"], findings=findings,
                                   budget=budget, settings=dict(settings or {}), device=device, progress=progress)
    result = {"task": task, "segmentation": seg, "folds": folds, "skipped": mod.skipped_sites(records),
              "budget_per_fold_s": budget, "wall_seconds_this_call": round(time.time() - started, 1)}
    (out / "run.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result
