"""``cxrserve``: one command line for phantoms, training, export, serving and scoring.

Each subcommand is a thin layer over a package function; feature modules may add
their own subcommands through a ``register_cli(subparsers)`` function listed in
:data:`PLUGINS`, so this file does not grow with every model.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

import yaml

from . import __version__

PLUGINS = ("cxrserve.pxs", "cxrserve.client", "cxrserve.batch", "cxrserve.ui", "cxrserve.bench", "cxrserve.xrv_import",
           "cxrserve.zeroshot")


def _kv(values: list[str] | None) -> dict[str, str]:
    out = {}
    for item in values or []:
        if "=" not in item:
            raise SystemExit(f"expected NAME=PATH, got {item!r}")
        key, value = item.split("=", 1)
        out[key] = value
    return out


# --------------------------------------------------------------------------- commands
def cmd_phantoms(args) -> int:
    from .phantoms import write_dataset

    root = write_dataset(args.out, args.n, seed=args.seed, kinds=tuple(args.kinds), height=args.size,
                         width=args.size, studies_per_patient=args.studies_per_patient,
                         dicom_every=args.dicom_every, progress=True)
    print(f"wrote {args.n} phantoms to {root}")
    return 0


def cmd_train(args) -> int:
    from .tasks import get_task
    from .tasks.common import load_records

    task = get_task(args.task)
    kwargs = {}
    if args.recipe:
        kwargs.update(yaml.safe_load(Path(args.recipe).read_text()).get(args.task, {}))
    for key in ("epochs", "steps_per_epoch", "batch_size", "lr", "val_fraction", "seed", "patience"):
        value = getattr(args, key)
        if value is not None:
            kwargs[key] = value
    kwargs.update({k: v for k, v in _kv(args.set).items()})
    for key, value in list(kwargs.items()):
        if isinstance(value, str):
            try:
                kwargs[key] = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
    records = load_records(args.data, sources=args.sources)
    best = task.train(records, out_dir=args.out, resume=args.resume, device=args.device,
                      demo=args.demo, **kwargs)
    print(f"best checkpoint: {best}")
    return 0


def cmd_export(args) -> int:
    from .export import export_component

    out = export_component(args.checkpoint, args.out, formats=tuple(args.formats))
    print(json.dumps(json.loads((out / "parity.json").read_text()), indent=2))
    return 0


def cmd_store(args) -> int:
    from .store import StoreBuilder

    builder = StoreBuilder(args.store, args.work, recipe=args.recipe, checkpoints=_kv(args.checkpoint),
                           device=args.device)
    for path in builder.build(args.only):
        print(f"{path}  ({path.stat().st_size / 2**20:.0f} MiB)")
    return 0


def cmd_eval(args) -> int:
    from .datasets import patient_split
    from .metrics import to_jsonable
    from .pipeline import load_pipeline
    from .tasks import get_task
    from .tasks.common import load_records

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
    from . import server

    if args.action == "start":
        info = server.start(args.config, args.store, args.workdir, timeout=args.timeout)
        print(f"TorchServe is serving {', '.join(info['models'])} at {info['inference']}")
        print(f"inference token: see {info['key_file']} (\"inference\" key)")
    elif args.action == "stop":
        server.stop(args.workdir)
        print("TorchServe stopped")
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

    p = sub.add_parser("train", help="train one model on folders in the shared-data layout")
    p.add_argument("task", help="lungseg | triage | ...")
    p.add_argument("--data", nargs="+", required=True, help="labels.csv folders or a data root")
    p.add_argument("--sources", nargs="+", help="only these source folders")
    p.add_argument("--out", required=True, help="run folder (best.ckpt, last.ckpt, history.json)")
    p.add_argument("--recipe", help="YAML with defaults per task (training/real.yaml)")
    for name, typ in (("epochs", int), ("steps-per-epoch", int), ("batch-size", int), ("lr", float),
                      ("val-fraction", float), ("seed", int), ("patience", int)):
        p.add_argument(f"--{name}", type=typ)
    p.add_argument("--set", nargs="*", help="further task arguments, NAME=VALUE (e.g. segmentation=runs/lungseg/best.ckpt)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.ckpt")
    p.add_argument("--device", default="auto")
    p.add_argument("--demo", action="store_true", help="mark the model as a demo in its card")
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
    p.add_argument("task", help="lungseg | triage | ...")
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

    p = sub.add_parser("serve", help="start or stop TorchServe with config.properties")
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument("--config", default="config.properties")
    p.add_argument("--store", default="model_store")
    p.add_argument("--workdir", default=".torchserve", help="run folder: key_file.json, logs/, tmp/")
    p.add_argument("--timeout", type=float, default=600)
    p.set_defaults(func=cmd_serve)

    for module in PLUGINS:
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
