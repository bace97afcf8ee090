"""``cxrserve pxs crossval``: patient-level k-fold of PXS stage 2, the model card's held-out numbers.

Each fold trains (:func:`cxrserve.families.pxs.task.train` with ``fold=k``, last epoch),
exports, builds its pool, and is evaluated on its held-out images
(:func:`cxrserve.families.pxs.task.evaluate`); the out-of-fold numbers are then pooled.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from cxrserve.families.pxs.task import correlations, change_report, evaluate, train
from cxrserve.families.pxs.training import NAME
from cxrserve.training.datasets import Record
from cxrserve.training.jsonable import to_jsonable

log = logging.getLogger(__name__)


def crossval(records: Sequence[Record], out_dir: str | Path, *, pool_data: Sequence[str | Path],
             folds: int = 5, seed: int = 0, pool_max_images: int = 64, device: str = "auto",
             n_boot: int = 2000, progress: bool = True, **train_kwargs) -> dict:
    """Patient-level k-fold: per fold train (last epoch), export, pool, evaluate held-out; pool results.

    Each fold leaves ``fold_<k>/model`` (a pipeline folder: ``cxrserve eval pxs --model``
    re-scores it) and ``fold_<k>/eval.json``; finished folds are skipped on a rerun.
    """
    from cxrserve.core.loading import load_pipeline, write_pipeline_spec
    from cxrserve.families.pxs.pipeline import PXSPipeline
    from cxrserve.families.pxs.pool import build_pool
    from cxrserve.packaging.export import export_component

    out = Path(out_dir)
    reports = []
    for k in range(folds):
        fold_dir = out / f"fold_{k}"
        eval_path = fold_dir / "eval.json"
        if not eval_path.exists():
            ckpt = train(records, fold_dir / "train", fold=k, folds=folds, seed=seed, select="last", device=device,
                         progress=progress, resume=True, **train_kwargs)
            model_dir = fold_dir / "model"
            component = model_dir / NAME
            if not (component / "pool.json").exists():
                export_component(ckpt, component, formats=("torchscript",))
                build_pool(component, pool_data, component, max_images=pool_max_images, seed=seed, progress=progress)
            write_pipeline_spec(model_dir, PXSPipeline, name=PXSPipeline.name, handler={"backend": "torchscript"})
            pipeline = load_pipeline(model_dir, device="cpu")
            report = evaluate(pipeline, records, n_boot=n_boot)
            eval_path.write_text(json.dumps(to_jsonable(report), indent=2) + "\n")
            log.info("fold %d: PXS vs extent Spearman %s, vs opacity %s", k,
                     report.get("pxs_vs_extent", {}).get("spearman"), report.get("pxs_vs_opacity", {}).get("spearman"))
        reports.append(json.loads(eval_path.read_text()))
    summary = summarize_folds(reports, n_boot=n_boot)
    summary.update(folds=folds, seed=seed, train=to_jsonable(train_kwargs), pool_max_images=pool_max_images,
                   pool_data=[Path(p).name for p in pool_data])
    (out / "crossval.json").write_text(json.dumps(to_jsonable(summary), indent=2) + "\n")
    return summary


def summarize_folds(reports: Sequence[dict], n_boot: int = 2000) -> dict:
    """Out-of-fold predictions of every fold pooled, plus the per-fold spread."""
    preds = [p for r in reports for p in r["predictions"] if p["extent"] is not None]
    pairs = [p for r in reports for p in r.get("pairs", [])]
    files = [p["file"] for p in preds]
    if len(set(files)) != len(files):
        raise ValueError("an image is held out by two folds: folds must come from one patient_kfold")
    # Bootstrap clusters: patients, recovered from the same-patient pairs of the folds.
    cluster = {f: i for i, f in enumerate(files)}
    for p in pairs:
        old, new = cluster[p["later"]], cluster[p["prior"]]
        cluster = {f: (new if c == old else c) for f, c in cluster.items()}
    groups = [cluster[f] for f in files]
    pxs = np.array([p["pxs"] for p in preds])
    target = reports[0]["target"]
    extent = np.array([p["extent"] for p in preds], dtype=float)
    opacity = np.array([p["opacity"] for p in preds], dtype=float)
    tgt = {"extent": extent, "opacity": opacity, "extent+opacity": extent + opacity}[target]
    per_fold = {key: [r[key]["spearman"] for r in reports if key in r]
                for key in ("pxs_vs_extent", "pxs_vs_opacity")}
    threshold = reports[0]["change"].get("direction_threshold", 1.0)
    return {
        "target": target,
        "n_images": len(preds), "n_patients": len(set(groups)),
        "pxs_vs_extent": correlations(pxs, extent, groups, n_boot),
        "pxs_vs_opacity": correlations(pxs, opacity, groups, n_boot),
        "pxs_vs_target": correlations(pxs, tgt, groups, n_boot),
        "per_fold_spearman": {k: {"values": v, "mean": float(np.mean(v)), "sd": float(np.std(v))}
                              for k, v in per_fold.items() if v},
        "change": change_report(np.array([p["distance"] for p in pairs]), np.array([p["pxs_delta"] for p in pairs]),
                                np.array([p["target_delta"] for p in pairs]), threshold),
    }


def register_cli(subparsers) -> None:
    """``cxrserve pxs crossval``: the model card's held-out numbers in one command."""

    p = subparsers.add_parser("pxs", help="PXS evaluation helpers")
    actions = p.add_subparsers(dest="action", required=True)
    c = actions.add_parser("crossval", help="patient-level k-fold of stage 2: train, export, pool, evaluate")
    c.add_argument("--data", nargs="+", required=True, help="labels.csv folders or a data root")
    c.add_argument("--sources", nargs="+")
    c.add_argument("--pool-data", nargs="+", required=True, help="normal CXRs for each fold's reference pool")
    c.add_argument("--out", required=True)
    c.add_argument("--folds", type=int, default=5)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--pool-max-images", type=int, default=64)
    c.add_argument("--recipe", help="stage-2 settings: 'real' (the family's real block) or a YAML file with a `pxs:` block")
    c.add_argument("--set", nargs="*", help="further train() arguments, NAME=VALUE (e.g. pretrained=runs/...)")
    c.add_argument("--device", default="auto")

    def run(args) -> int:
        from cxrserve.training.common import load_records

        from cxrserve.training.recipes import parse_settings, task_settings

        kwargs = task_settings(args.recipe, NAME)
        kwargs.update(parse_settings(args.set))
        for key in ("fold", "folds", "seed", "select"):
            kwargs.pop(key, None)
        summary = crossval(load_records(args.data, sources=args.sources), args.out, pool_data=args.pool_data,
                           folds=args.folds, seed=args.seed, pool_max_images=args.pool_max_images,
                           device=args.device, **kwargs)
        print(json.dumps(to_jsonable({k: v for k, v in summary.items()}), indent=2))
        return 0

    c.set_defaults(func=run)
