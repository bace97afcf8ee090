"""``cxrserve monitor``: reference, feedback, report, simulate, bench (see README "Monitoring")."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cmd_reference(args) -> int:
    from cxrserve.core import monitor as M
    from cxrserve.tools.monitor.scoring import labelled, load, score_files

    pipeline = load(args.store, args.model, device=args.device)
    rows = labelled(args.images)
    records = score_files(pipeline, [p for p, _ in rows], progress=not args.quiet)
    ref = M.fit_reference(records, window=args.window, step=args.step, target_rate=args.target_rate,
                          resamples=args.resamples, seed=args.seed, exclude=args.exclude)
    out = Path(args.out) if args.out else (
        Path(args.state) / M.safe_name(args.site) / M.safe_name(pipeline.name) / "reference.json")
    ref.save(out)
    print(f"reference of {len(records)} studies ({pipeline.name} {pipeline.version}, site {args.site}): "
          f"threshold {ref.threshold:.2f} for {ref.target_rate:g} false alarms per study -> {out}")
    return 0


def cmd_feedback(args) -> int:
    from cxrserve.tools.monitor.feedback import feedback

    result = feedback(args.labels, args.state, site=args.site, model=args.model, root=args.root,
                      positive=args.positive)
    print(json.dumps(result["summary"], indent=2))
    return 0


def cmd_report(args) -> int:
    from cxrserve.tools.monitor.report import report

    alert = report(args.state, args.site, args.out, model=args.model)
    print(f"wrote {Path(args.out) / 'report.html'}" + ("  (ALERT ACTIVE)" if alert else ""))
    return 1 if alert else 0


def cmd_simulate(args) -> int:
    from cxrserve.tools.monitor.simulate import run

    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


def cmd_bench(args) -> int:
    from cxrserve.tools.monitor.bench import run

    print(json.dumps(run(args), indent=2))
    return 0


def _labels(path, state, root=None) -> dict[str, str] | None:
    if not path:
        return None
    import csv

    from cxrserve.core import monitor as M
    from cxrserve.tools.monitor.feedback import row_key

    secret = M.monitor_secret(Path(state))
    with Path(path).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = {}
    for row in rows:
        key = row_key(row, secret, Path(root) if root else Path(path).parent)
        if key and row.get("label"):
            out[key] = row["label"]
    return out


def cmd_compare(args) -> int:
    from cxrserve.tools.monitor.shadow import compare

    print(json.dumps(compare(args.state, args.site, args.model, _labels(args.labels, args.state)), indent=2))
    return 0


def cmd_promote(args) -> int:
    from cxrserve.tools.monitor.shadow import promote

    print(json.dumps(promote(args.store, args.candidate, args.model, args.state, args.reason), indent=2))
    print("restart the servers to load it")
    return 0


def cmd_rollback(args) -> int:
    from cxrserve.tools.monitor.shadow import rollback

    print(json.dumps(rollback(args.store, args.model, args.state, args.reason), indent=2))
    print("restart the servers to load it")
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("monitor", help="drift and performance monitoring: reference, feedback, report")
    sub = p.add_subparsers(dest="monitor_command", required=True)

    r = sub.add_parser("reference", help="fit a site's monitor reference (and its alert threshold) from in-distribution studies")
    r.add_argument("images", help="folder of the site's typical studies (labels.csv or images)")
    r.add_argument("--model", required=True)
    r.add_argument("--store", default="model_store")
    r.add_argument("--site", default="default")
    r.add_argument("--state", default="build/monitor/state", help="monitor folder (CXRSERVE_MONITOR_DIR of the servers)")
    r.add_argument("--out", help="write here instead (e.g. <profile dir>/monitor/<model>.json)")
    r.add_argument("--window", type=int, default=50)
    r.add_argument("--step", type=int, default=5)
    r.add_argument("--target-rate", type=float, default=1e-4, help="false alarms per study")
    r.add_argument("--resamples", type=int, default=2000)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--exclude", nargs="*", default=[], help="signals (prefixes) not watched, e.g. image.aspect")
    r.add_argument("--device", default="cpu")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=cmd_reference)

    f = sub.add_parser("feedback", help="returned labels (CSV) -> realised sensitivity, specificity, AUC per window")
    f.add_argument("labels", help="CSV: label and one of sop_instance_uid, file (path), key")
    f.add_argument("--state", default="build/monitor/state")
    f.add_argument("--site", default="default")
    f.add_argument("--model")
    f.add_argument("--root", help="folder the CSV's file paths are relative to (default: the CSV's)")
    f.add_argument("--positive", help="the label to report (default: every label)")
    f.set_defaults(func=cmd_feedback)

    o = sub.add_parser("report", help="HTML report of a site's signals; exit 1 while an alert is active")
    o.add_argument("--site", default="default")
    o.add_argument("--out", required=True)
    o.add_argument("--state", default="build/monitor/state")
    o.add_argument("--model")
    o.set_defaults(func=cmd_report)

    s = sub.add_parser("simulate", help="detection delay, false-alarm rate and estimate tracking on ../shared/data streams")
    s.add_argument("--data", default="../shared/data")
    s.add_argument("--store", default="model_store")
    s.add_argument("--model", required=True, help="served model whose answers are simulated")
    s.add_argument("--work", default="build/monitor")
    s.add_argument("--reference", default="nih_cxr8_darkcovidnet")
    s.add_argument("--shifted", nargs="+", default=["hannover_covid", "kermany_pediatric_subset",
                                                     "openist_normal_lungmasks", "ieee8023_jun2020"])
    s.add_argument("--fit-fraction", type=float, default=0.6)
    s.add_argument("--window", type=int, default=50)
    s.add_argument("--step", type=int, default=5)
    s.add_argument("--target-rate", type=float, default=1e-4)
    s.add_argument("--resamples", type=int, default=2000)
    s.add_argument("--fa-studies", type=int, default=100000)
    s.add_argument("--trials", type=int, default=100)
    s.add_argument("--lead", type=int, default=100, help="in-distribution studies before the switch")
    s.add_argument("--horizon", type=int, default=200)
    s.add_argument("--track-label", default="pneumonia")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--exclude", nargs="*", default=[], help="signals (prefixes) not watched, e.g. image.aspect")
    s.add_argument("--out")
    s.set_defaults(func=cmd_simulate)

    c = sub.add_parser("compare", help="a shadow candidate against the active model (CXRSERVE_SHADOW_STORE)")
    c.add_argument("--model", required=True)
    c.add_argument("--site", default="default")
    c.add_argument("--state", default="build/monitor/state")
    c.add_argument("--labels", help="returned labels CSV (as for feedback): each one's accuracy too")
    c.set_defaults(func=cmd_compare)
    for name, func, text in (("promote", cmd_promote, "candidate archive into the active store (audit log)"),
                             ("rollback", cmd_rollback, "the previous archive back (audit log)")):
        q = sub.add_parser(name, help=text)
        q.add_argument("--model", required=True)
        q.add_argument("--store", default="model_store")
        if name == "promote":
            q.add_argument("--candidate", required=True, help="the shadow store")
        q.add_argument("--state", default="build/monitor/state", help="monitor folder: audit.jsonl")
        q.add_argument("--reason", default="")
        q.set_defaults(func=func)

    b = sub.add_parser("bench", help="serving throughput with and without the monitor, same session")
    b.add_argument("--data", default="../shared/data/nih_cxr8_darkcovidnet")
    b.add_argument("--store", default="model_store")
    b.add_argument("--model", required=True)
    b.add_argument("--n", type=int, default=64)
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--rounds", type=int, default=3)
    b.set_defaults(func=cmd_bench)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="cxrserve")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
