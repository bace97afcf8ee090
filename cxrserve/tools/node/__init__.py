"""``cxrserve node --config node.yaml``: a DICOM node that scores CR/DX/SC it receives and
sends SR + lung SEG + heatmap SCs back to the PACS (see :mod:`cxrserve.tools.node.service`).

``cxrserve node status`` prints its health and failed instances (exit 1 when unhealthy);
``cxrserve node requeue [--all | HASH ...]`` sends failed instances round again."""
from __future__ import annotations


def cmd_node(args) -> int:
    import json

    from cxrserve.tools.node.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(f"error: {err}")
        return 2
    if args.action == "status":
        from cxrserve.tools.node.operate import status

        report = status(cfg)
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0 if report.get("healthy") else 1
    if args.action == "requeue":
        from cxrserve.tools.node.operate import requeue

        if not args.instances and not args.all:
            print("error: name the instances (sha256:... as in the audit log) or pass --all")
            return 2
        done = requeue(cfg, None if args.all else args.instances)
        for key, what in done:
            print(f"sha256:{key}: {what}")
        return 0 if all(what.startswith("requeued") for _, what in done) else 1
    from cxrserve.tools.node.service import run

    return run(cfg)


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("node", help="DICOM node: Storage SCP that scores CR/DX and sends SR/SEG/SC results")
    p.add_argument("action", nargs="?", default="run", choices=("run", "status", "requeue"),
                   help="run the node (default); status: health and failed instances; requeue: retry failed ones")
    p.add_argument("instances", nargs="*", help="requeue: hashed SOP UIDs (sha256:...) from the audit log")
    p.add_argument("--all", action="store_true", help="requeue: every failed instance")
    p.add_argument("--config", required=True, help="node YAML (see deploy/node/node.yaml)")
    p.set_defaults(func=cmd_node)
