"""``cxrserve bench``: the command line."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path


from cxrserve.tools.bench.inputs import REPO
from cxrserve.tools.bench.report import headline, markdown, write_results
from cxrserve.tools.bench.suite import BenchOptions, SECTIONS, run_suite
from cxrserve.tools.bench.sweep import run_sweep, sweep_markdown

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- CLI
def quick(opts: BenchOptions) -> BenchOptions:
    """The smoke-test configuration: every section, a few studies each, small phantoms."""
    opts.requests, opts.seconds, opts.budget, opts.max_inputs = 2, 0.3, 90, 2
    opts.backends = ()  # each model's served backend only
    opts.clients, opts.lead_clients, opts.grpc_clients = (1,), (1,), (1,)
    opts.ceiling_batches, opts.served_batches = (1, 2), ()
    opts.growth_sizes, opts.growth_batches, opts.pool_sizes = (256,), (1, 2), (8, 32)
    opts.phantom_size = 256
    return opts


def _default_data() -> Path | None:
    env = os.environ.get("CXRSERVE_SHARED_DATA")
    root = Path(env) if env else REPO.parent / "shared" / "data"
    return root if (root / "dicom_samples").is_dir() else None


def options_from_args(args) -> BenchOptions:
    opts = BenchOptions(store=Path(args.store), work=Path(args.work), out=Path(args.out), device=args.device,
                        models=tuple(args.models or ()), tag=args.tag or "",
                        cache=Path(args.cache) if args.cache else None)
    if args.data == "none":
        opts.data = None
    elif args.data:
        opts.data = Path(args.data)
    else:
        opts.data = _default_data()
    if args.quick:
        quick(opts)
    for key in ("requests", "seconds", "budget", "phantom_size"):
        if getattr(args, key) is not None:
            setattr(opts, key, getattr(args, key))
    for key in ("backends", "clients", "lead_clients", "grpc_clients", "ceiling_batches", "served_batches",
                "growth_sizes", "growth_batches", "pool_sizes"):
        if getattr(args, key) is not None:
            setattr(opts, key, tuple(getattr(args, key)))
    opts.skip = tuple(args.skip or ())
    opts.pictures = not args.no_pictures
    from cxrserve.tools.cli import _kv

    opts.checkpoints = _kv(args.checkpoint)
    return opts


def cmd_bench(args) -> int:
    opts = options_from_args(args)
    if args.sweep:
        results = run_sweep(opts, batches=tuple(args.sweep_batches), clients=tuple(args.sweep_clients))
        out = Path(opts.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"sweep-{results['environment']['created'].replace(':', '').replace('-', '').replace('+0000', 'Z')}"
        (out / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
        text = sweep_markdown(results)
        (out / f"{stem}.md").write_text(text + "\n")
        print(text)
        print(f"\nwrote {out / stem}.json and .md")
        return 0
    results = run_suite(opts)
    json_path, md_path = write_results(results, opts.out)
    print(markdown(results))
    for line in headline(results):
        print(line)
    print(f"\nwrote {json_path} and {md_path}")
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark the served models against the naive baseline and the ceiling",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default="model_store", help="model store (.mar archives)")
    p.add_argument("--work", default="build", help="build folder beside the store (checkpoints; bench cache)")
    p.add_argument("--models", nargs="+", help="served models (default: every served model of the registry in the store)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--data", help="real data root (default ../shared/data when present; 'none': phantoms)")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON and markdown results")
    p.add_argument("--cache", help="where exported backends, variant archives and phantom inputs are kept "
                                   "(default WORK/bench-cache)")
    p.add_argument("--quick", action="store_true", help="tiny configuration (smoke test): every section, seconds")
    p.add_argument("--requests", type=int, help="studies per case at most (default 24)")
    p.add_argument("--seconds", type=float, help="seconds per case at most (default 6)")
    p.add_argument("--budget", type=float, help="whole-run budget in seconds; cases shrink to fit (default 540)")
    p.add_argument("--backends", nargs="+", choices=["onnx", "torchscript"])
    p.add_argument("--clients", nargs="+", type=int, help="concurrent REST clients per model (default 1 4)")
    p.add_argument("--lead-clients", nargs="+", type=int, help="concurrent REST clients for the lead model (the run's first model)")
    p.add_argument("--grpc-clients", nargs="+", type=int)
    p.add_argument("--ceiling-batches", nargs="+", type=int, help="batch sizes of the forward-only ceiling")
    p.add_argument("--served-batches", nargs="+", type=int, help="TorchServe batch sizes tried for the sweep model")
    p.add_argument("--growth-sizes", nargs="+", type=int, help="image sizes (px) of the growth section")
    p.add_argument("--growth-batches", nargs="+", type=int)
    p.add_argument("--pool-sizes", nargs="+", type=int)
    p.add_argument("--phantom-size", type=int, help="phantom input size in px (default 2048)")
    p.add_argument("--no-pictures", action="store_true", help="skip the heatmap/saliency/overlay mode")
    p.add_argument("--skip", nargs="+", choices=SECTIONS, help="sections to leave out")
    p.add_argument("--checkpoint", nargs="*", help="naive baseline weights: COMPONENT=path/to/best.ckpt")
    p.add_argument("--tag", help="label for the result files")
    p.add_argument("--sweep", action="store_true",
                   help="instead: TorchServe batch size x workers per model (the numbers behind model-config.yaml)")
    p.add_argument("--sweep-batches", nargs="+", type=int, default=[1, 4, 8])
    p.add_argument("--sweep-clients", nargs="+", type=int, default=[1, 8])
    p.set_defaults(func=cmd_bench)
