"""``cxrserve node --config node.yaml``: a DICOM node that scores CR/DX/SC it receives and
sends SR + lung SEG + heatmap SCs back to the PACS (see :mod:`cxrserve.tools.node.service`)."""
from __future__ import annotations


def cmd_node(args) -> int:
    from cxrserve.tools.node.config import ConfigError, load_config
    from cxrserve.tools.node.service import run

    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(f"error: {err}")
        return 2
    return run(cfg)


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("node", help="DICOM node: Storage SCP that scores CR/DX and sends SR/SEG/SC results")
    p.add_argument("--config", required=True, help="node YAML (see deploy/node/node.yaml)")
    p.set_defaults(func=cmd_node)
