"""``cxrserve kserve``: load every model of a store and serve it with the KServe SDK.

``cxrserve kserve --store model_store --http-port 8090 --grpc-port 8091`` (also
``python -m cxrserve.tools.kserve``): discover the store's models, load each pipeline,
make the process's one :class:`~cxrserve.tools.kserve.metrics.Metrics`, build the server
and its routes, and add token authentication when ``--token-file`` is given.
"""
from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger(__name__)


def serve(args) -> int:
    from cxrserve.tools.kserve.auth import install_rest_auth, read_token
    from cxrserve.tools.kserve.metrics import Metrics
    from cxrserve.tools.kserve.model import load_models
    from cxrserve.tools.kserve.repository import discover
    from cxrserve.tools.kserve.server import build_server, install_routes

    specs = discover(args.store, args.models, args.unpack_dir, args.device)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    models = load_models(specs, Metrics(), max_batch=args.max_batch, max_delay_ms=args.max_batch_delay_ms)
    max_bytes = max(m.pipeline.limits.max_bytes for m in models)
    # base64 in JSON grows files by 4/3; leave room for the request's own JSON.
    max_body = max_bytes * 4 // 3 + (1 << 20)
    token = read_token(args.token_file) if args.token_file else None
    server = build_server(args.host, args.http_port, args.grpc_port, max_message=max_bytes + (1 << 20),
                          grpc_threads=args.grpc_threads, token=token)
    from kserve.model_server import app

    install_routes(app, server, max_body)
    if token:
        install_rest_auth(app, token)
    elif args.host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("serving on %s without --token-file: put the cluster's authentication in front", args.host)
    print(f"cxrserve kserve: serving {', '.join(m.name for m in models)} on http://{args.host}:{args.http_port} "
          f"(REST) and {args.host}:{args.grpc_port} (gRPC)", flush=True)
    server.start(models)
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("kserve", help="serve the store with the KServe SDK (Open Inference Protocol, "
                                             "REST + gRPC), without TorchServe")
    p.add_argument("--store", default="model_store", help="folder of .mar archives and/or unpacked model folders")
    p.add_argument("--models", nargs="+", help="serve only these (default: all in the store)")
    p.add_argument("--host", default="127.0.0.1", help="address both servers bind (0.0.0.0 in a container)")
    p.add_argument("--http-port", type=int, default=8080)
    p.add_argument("--grpc-port", type=int, default=8081)
    p.add_argument("--unpack-dir", help="where archives are unpacked once (default $CXRSERVE_CACHE/kserve, "
                                        "else ~/.cache/cxrserve/kserve)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"],
                   help="default: each archive's deviceType (cpu -> cpu, gpu -> cuda, else auto)")
    p.add_argument("--max-batch", type=int, help="requests per pipeline call (default: the archive's batchSize)")
    p.add_argument("--max-batch-delay-ms", type=float,
                   help="how long a batch waits to fill (default: the archive's maxBatchDelay)")
    p.add_argument("--token-file", help="require 'Authorization: Bearer <token>' (the file's first line) on every "
                                        "call but /v2/health/* and /metrics")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--grpc-threads", type=int, default=4)
    p.set_defaults(func=serve)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxrserve.tools.kserve")
    sub = parser.add_subparsers(dest="command", required=True)
    register_cli(sub)
    args = parser.parse_args(["kserve", *(argv if argv is not None else sys.argv[1:])])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)
