"""``cxrserve loso DATA --out DIR --budget SECONDS``: leave-one-site-out folds, then the summary.

Each fold trains the task with its family's ``real:`` recipe (``--set`` overrides, e.g.
``epochs=2``) under ``--budget`` seconds of wall clock, on every site but one, and scores that
one; ``--summary-only`` recomputes ``loso.json`` / ``loso.md`` / the PNG from finished folds.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path


def cmd_loso(args) -> int:
    from cxrserve.tools.loso.run import fold_modules, run
    from cxrserve.tools.loso.summary import write_summary
    from cxrserve.training.recipes import parse_settings, task_settings

    if not args.summary_only:
        task = args.task or (next(iter(fold_modules())) if len(fold_modules()) == 1 else None)
        settings = {**task_settings("real", task), **parse_settings(args.set)} if task else parse_settings(args.set)
        run(args.data, args.out, task=task, budget=args.budget, seg_budget=args.seg_budget,
            segmentation=args.segmentation, sites=args.sites, settings=settings, device=args.device,
            progress=not args.quiet)
    summary = write_summary(args.out, draws=args.draws, ns=tuple(args.n), n_boot=args.n_boot, seed=args.seed,
                            image=args.image)
    print(json.dumps(summary["targets"], indent=1))
    print(f"wrote {Path(args.out) / 'loso.json'} and {Path(args.out) / 'loso.md'}")
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("loso", help="leave-one-site-out: train on all sites but one, score it, "
                                           "calibrate with N of its films")
    p.add_argument("data", nargs="?", default="../shared/data", help="data root (shared-data layout)")
    p.add_argument("--out", required=True, help="run folder: one sub-folder per held-out site, loso.json, loso.md")
    p.add_argument("--task", help="training task whose family declares the folds (default: the only one)")
    p.add_argument("--budget", type=float, default=300.0, help="training seconds per fold (wall clock)")
    p.add_argument("--seg-budget", type=float, default=240.0, help="seconds for the one segmentation model")
    p.add_argument("--segmentation", help="use this segmentation checkpoint instead of training one")
    p.add_argument("--sites", nargs="+", help="only these held-out sites")
    p.add_argument("--set", nargs="*", help="recipe overrides for each fold, NAME=VALUE (e.g. epochs=2)")
    p.add_argument("--n", nargs="+", type=int, default=[10, 20, 50], help="labelled films of the left-out site")
    p.add_argument("--draws", type=int, default=50, help="random patient-grouped draws per N")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates (by patient)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image", help="also write the curve PNG here (e.g. docs/images/loso_calibration.png)")
    p.add_argument("--summary-only", action="store_true", help="only recompute the summary from finished folds")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_loso)
