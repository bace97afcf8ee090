"""``cxrserve site audit``, ``calibrate``, ``install`` and ``list``.

Exit status: 0 every target met (audit) / profile written (calibrate), 3 a target not met,
2 usage or configuration error (site file, data folder, store), 1 anything else.
"""
from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger(__name__)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_TARGET = 0, 1, 2, 3


def _run(fn, args) -> int:
    from cxrserve.core.site_profile import ProfileError
    from cxrserve.tools.site.config import SiteConfigError

    try:
        return fn(args)
    except (SiteConfigError, ProfileError) as err:
        print(f"cxrserve site {args.site_command}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:  # noqa: BLE001 - an error is exit 1 with its type, never a traceback of data
        log.debug("site %s failed", args.site_command, exc_info=True)
        print(f"cxrserve site {args.site_command}: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_ERROR


def cmd_audit(args) -> int:
    from cxrserve.tools.site.audit import write_audit
    from cxrserve.tools.site.config import load_site
    from cxrserve.tools.site.scoring import score_folder

    site = load_site(args.site_file)
    table = score_folder(args.data, site, args.store, progress=not args.quiet, device=args.device)
    audit = write_audit(table, site, args.out, n_boot=args.n_boot)
    for t in audit["targets"]:
        state = {True: "met", False: "NOT MET", None: "not measurable"}[t["met"]]
        print(f"{t['target']} {t['direction']} {t['value']:g}: {t['estimate']} [{t['low']}, {t['high']}] {state}")
    print(f"wrote {args.out}/audit.json and {args.out}/report.html")
    return EXIT_OK if audit["all_met"] else EXIT_TARGET


def cmd_calibrate(args) -> int:
    from cxrserve.tools.site.calibrate import write_calibration
    from cxrserve.tools.site.config import load_site
    from cxrserve.tools.site.scoring import score_folder, score_unlabelled

    site = load_site(args.site_file)
    table = score_folder(args.data, site, args.store, progress=not args.quiet, device=args.device)
    unlabelled = None
    if args.unlabelled:
        unlabelled = score_unlabelled(args.unlabelled, site, args.store, progress=not args.quiet, device=args.device)
    profile = write_calibration(table, site, args.out, unlabelled=unlabelled, folds=args.folds, n_boot=args.n_boot,
                                seed=args.seed)
    for fam, f in profile["families"].items():
        for label, op in (f.get("thresholds") or {}).items():
            print(f"{fam}.{label}: threshold {op['threshold']:.4f} ({op['operating_point']})")
    print(f"wrote {args.out}/profile.json and {args.out}/calibration.html")
    return EXIT_OK


def cmd_install(args) -> int:
    from cxrserve.tools.site.install import install

    target = install(args.profile, args.store, default=args.default)
    print(f"installed {target}{' (the store default)' if args.default else ''}; "
          "restart the servers that serve this store (cxrserve serve / make serve, cxrserve kserve, the node) "
          "to load it")
    return EXIT_OK


def cmd_list(args) -> int:
    import json

    from cxrserve.tools.site.install import listing

    rows = listing(args.store)
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print(f"no site profiles in {args.store}/sites (cxrserve site install DIR --store {args.store})")
    for r in rows:
        extra = f"models {', '.join(r.get('models') or [])}" if r["state"] == "ok" else r["why"]
        print(f"{r['site']}{' (default)' if r.get('default') else ''}: {r['state']}: {extra}")
    return EXIT_OK if all(r["state"] == "ok" for r in rows) else EXIT_TARGET


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("site", help="a hospital's acceptance test (audit) and calibration profile")
    sub = p.add_subparsers(dest="site_command", required=True)

    def common(q):
        q.add_argument("data", help="labelled folder: labels.csv (filename,label[,patient_id,...]) and images")
        q.add_argument("--site-file", required=True, help="SITE.yaml: the site's words in model terms, targets")
        q.add_argument("--out", required=True, help="output folder")
        q.add_argument("--store", default="model_store", help="model store with the archives that serve")
        q.add_argument("--device", default="cpu")
        q.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates (by patient)")
        q.add_argument("--quiet", action="store_true", help="no progress bar")

    a = sub.add_parser("audit", help="score a labelled sample; audit.json + report.html; exit 3 if a target is missed")
    common(a)
    a.set_defaults(func=lambda args: _run(cmd_audit, args))
    c = sub.add_parser("calibrate", help="fit thresholds, calibration, prior shift with patient-grouped CV; profile.json")
    common(c)
    c.add_argument("--unlabelled", help="folder of the site's unlabelled studies (images, or labels.csv) for the prior shift")
    c.add_argument("--folds", type=int, default=5, help="patient-grouped cross-validation folds")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=lambda args: _run(cmd_calibrate, args))
    i = sub.add_parser("install", help="check a profile against the store's archives and install it under STORE/sites/")
    i.add_argument("profile", help="folder written by cxrserve site calibrate (or its profile.json)")
    i.add_argument("--store", default="model_store", help="model store the servers serve")
    i.add_argument("--default", action="store_true", help="also make it the site of requests that name none")
    i.set_defaults(func=lambda args: _run(cmd_install, args))
    ls = sub.add_parser("list", help="installed sites and whether the store's archives accept them (exit 3 if not)")
    ls.add_argument("--store", default="model_store")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=lambda args: _run(cmd_list, args))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="cxrserve")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
