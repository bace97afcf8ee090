"""``cxrserve``: one command line for phantoms, training, export, serving and scoring.

Each subcommand is a thin layer over a package function; tools (:data:`TOOL_PLUGINS`)
and families (``Family.cli`` in the registry) add their own subcommands through a
``register_cli(subparsers)`` function, so this file does not grow with every model.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path

from cxrserve import __version__

#: The tools' own subcommands (and the real-store options of ``store build``); each family adds its
#: own (``Family.cli``, read from the registry).
TOOL_PLUGINS = ("cxrserve.tools.client.cli", "cxrserve.tools.batch.cli", "cxrserve.tools.ui",
                "cxrserve.tools.bench.cli", "cxrserve.tools.kserve.cli", "cxrserve.tools.node",
                "cxrserve.tools.site", "cxrserve.tools.loso.cli", "cxrserve.tools.monitor",
                "cxrserve.packaging.real_store")


def _kv(values: list[str] | None) -> dict[str, str]:
    from cxrserve.core.options import parse_pairs

    return parse_pairs(values, "NAME=PATH")


# --------------------------------------------------------------------------- commands
def cmd_phantoms(args) -> int:
    from cxrserve.synthetic.phantoms import write_dataset

    root = write_dataset(args.out, args.n, seed=args.seed, kinds=tuple(args.kinds), height=args.size,
                         width=args.size, studies_per_patient=args.studies_per_patient,
                         dicom_every=args.dicom_every, progress=True)
    print(f"wrote {args.n} phantoms to {root}")
    return 0


def cmd_train(args) -> int:
    from cxrserve.families import get_task
    from cxrserve.training.common import load_records
    from cxrserve.training.recipes import parse_settings, task_settings

    task = get_task(args.task)
    kwargs = task_settings(args.recipe, args.task)
    for key in ("epochs", "steps_per_epoch", "batch_size", "lr", "val_fraction", "seed", "patience"):
        value = getattr(args, key)
        if value is not None:
            kwargs[key] = value
    kwargs.update(parse_settings(args.set))
    records = load_records(args.data, sources=args.sources)
    best = task.train(records, out_dir=args.out, resume=args.resume, device=args.device,
                      demo=args.demo, deadline=args.deadline, **kwargs)
    print(f"best checkpoint: {best}")
    return 0


def cmd_export(args) -> int:
    from cxrserve.packaging.export import export_component

    out = export_component(args.checkpoint, args.out, formats=tuple(args.formats))
    print(json.dumps(json.loads((out / "parity.json").read_text()), indent=2))
    return 0


def cmd_store(args) -> int:
    from cxrserve.packaging.store import StoreBuilder

    builder = StoreBuilder(args.store, args.work, recipe=args.recipe, checkpoints=_kv(args.checkpoint),
                           device=args.device)
    for path in builder.build(args.only):
        print(f"{path}  ({path.stat().st_size / 2**20:.0f} MiB)")
    return 0


def cmd_eval(args) -> int:
    from cxrserve.training.datasets import patient_split
    from cxrserve.training.jsonable import to_jsonable
    from cxrserve.core.loading import load_pipeline
    from cxrserve.families import get_task
    from cxrserve.training.common import load_records

    pipeline = load_pipeline(args.model, device=args.device)
    records = load_records(args.data, sources=args.sources)
    task = get_task(args.task)
    notes = []
    if args.split != "all":
        if hasattr(task, "training_split"):  # exactly the images training held out (or used)
            train_set, val_set = task.training_split(records, val_fraction=args.val_fraction, seed=args.seed)
            records = {"train": train_set, "val": val_set}[args.split]
        else:
            records = patient_split(records, val_fraction=args.val_fraction, seed=args.seed)[args.split]
            notes.append(f"{args.task} has no training_split: a plain patient split of all records, "
                         "which may overlap the images the model was trained on")
    report = task.evaluate(pipeline, records)
    if notes:
        report["warnings"] = list(report.get("warnings", [])) + notes
    report = {"task": args.task, "model": pipeline.name, "model_version": pipeline.version,
              "data": [str(d) for d in args.data], "split": args.split, "seed": args.seed,
              "val_fraction": args.val_fraction, **report}
    text = json.dumps(to_jsonable(report), indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def cmd_serve(args) -> int:
    from cxrserve.tools import server

    if args.action == "start":
        try:
            info = server.start(args.config, args.store, args.workdir, timeout=args.timeout)
        except server.AlreadyRunning as err:
            print(f"{err}: nothing to do (`make stop` or `cxrserve serve stop` first to restart it)")
            return 0
        print(f"TorchServe is serving {', '.join(info['models'])} at {info['inference']}")
        print(f"inference token: see {info['key_file']} (\"inference\" key)")
    elif args.action == "stop":
        if server.stop(args.workdir):
            print("TorchServe stopped")
        else:
            print(f"TorchServe is not running from {Path(args.workdir).resolve()}: nothing to stop")
    elif args.action == "probe":
        ok, what = server.probe(args.config, args.workdir, ready=args.ready)
        print(what)
        return 0 if ok else 1
    return 0


def cmd_families(args) -> int:
    """What the registry holds: every family, its served models and training tasks."""
    from cxrserve import families

    for family in families.families().values():
        print(f"{family.name}  ({family.package})")
        for served in family.served:
            print(f"  serves {served.name}: components {', '.join(families.archive_components(served.name))}")
        for task in family.tasks:
            print(f"  task   {task}")
    return 0


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxrserve", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cxrserve {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantoms", help="write synthetic CXR phantoms in the shared-data layout")
    p.add_argument("out")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=384)
    p.add_argument("--kinds", nargs="+", default=["frontal"])
    p.add_argument("--studies-per-patient", type=int, default=1)
    p.add_argument("--dicom-every", type=int, default=0)
    p.set_defaults(func=cmd_phantoms)

    p = sub.add_parser("families", help="list the model families: served models and training tasks")
    p.set_defaults(func=cmd_families)

    p = sub.add_parser("train", help="train one model on folders in the shared-data layout")
    p.add_argument("task", help="a training task of the family registry (cxrserve families lists them)")
    p.add_argument("--data", nargs="+", required=True, help="labels.csv folders or a data root")
    p.add_argument("--sources", nargs="+", help="only these source folders")
    p.add_argument("--out", required=True, help="run folder (best.ckpt, last.ckpt, history.json)")
    p.add_argument("--recipe", help="settings per task: 'real' (every family's real block), 'demo', or a YAML file")
    for name, typ in (("epochs", int), ("steps-per-epoch", int), ("batch-size", int), ("lr", float),
                      ("val-fraction", float), ("seed", int), ("patience", int)):
        p.add_argument(f"--{name}", type=typ)
    p.add_argument("--set", nargs="*", help="further task arguments, NAME=VALUE (e.g. segmentation=runs/<component>/best.ckpt)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.ckpt")
    p.add_argument("--device", default="auto")
    p.add_argument("--demo", action="store_true", help="mark the model as a demo in its card")
    # The environment variable is only this option's default: docs/MODEL_CARD.md's GPU runs set it.
    p.add_argument("--deadline", type=float, default=os.environ.get("CXRSERVE_TRAIN_DEADLINE"),
                   help="Unix time after which no epoch starts; the best checkpoint so far is kept "
                        "(default: $CXRSERVE_TRAIN_DEADLINE)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="checkpoint -> TorchScript + ONNX component with parity check")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--formats", nargs="+", default=["torchscript", "onnx"], choices=["torchscript", "onnx"])
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("store", help="build the model store (.mar archives)")
    p.add_argument("action", choices=["build"])
    p.add_argument("--store", default="model_store")
    p.add_argument("--work", default="build")
    p.add_argument("--recipe", help="demo recipe YAML (default training/demo.yaml)")
    p.add_argument("--only", nargs="+", help="archive names to build")
    p.add_argument("--checkpoint", nargs="*", help="use real weights: COMPONENT=path/to/best.ckpt")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_store)

    p = sub.add_parser("eval", help="score a labelled folder with a served pipeline, in process")
    p.add_argument("task", help="a training task of the family registry (cxrserve families lists them)")
    p.add_argument("--model", required=True, help="unpacked archive folder or .mar file")
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--sources", nargs="+")
    p.add_argument("--split", default="all", choices=["all", "train", "val"],
                   help="patient-level split to score (same seed/fraction as training)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="write metrics JSON here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", help="start, stop or probe TorchServe with config.properties")
    p.add_argument("action", choices=["start", "stop", "probe"],
                   help="probe: exit 0 when live (--ready: every model has a ready worker), for health checks")
    p.add_argument("--ready", action="store_true", help="probe readiness, not only liveness")
    p.add_argument("--config", default="config.properties")
    p.add_argument("--store", default="model_store")
    p.add_argument("--workdir", default=".torchserve", help="run folder: key_file.json, logs/, tmp/")
    p.add_argument("--timeout", type=float, default=600)
    p.set_defaults(func=cmd_serve)

    from cxrserve import families

    for module in (*TOOL_PLUGINS, *families.cli_modules()):
        try:
            plugin = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name == module:
                continue
            raise
        register = getattr(plugin, "register_cli", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
