"""``cxrserve batch``: the command line (see :mod:`cxrserve.tools.batch` for what it guarantees)."""
from __future__ import annotations

import sys
from pathlib import Path

from cxrserve.core.errors import CXRInputError
from cxrserve.core.sites import SITE_OPTION
from cxrserve.tools.batch.inputs import common_root, iter_inputs
from cxrserve.tools.batch.rows import headline_columns
from cxrserve.tools.batch.run import run_batch
from cxrserve.tools.batch.scorers import InProcessScorer, RemoteScorer

#: Default requests in flight: TorchServe batches 4 per worker (export/model-config); twice
#: that keeps a full batch queued while one runs (measured in docs/PERFORMANCE.md).
REMOTE_CONCURRENCY = 8
IN_PROCESS_CONCURRENCY = 2


def cmd_batch(args) -> int:
    from cxrserve.tools.client import CXRClient
    from cxrserve.tools.client.cli import protocol_of

    options = {}
    for text in args.option or []:
        if "=" not in text:
            raise SystemExit(f"--option expects NAME=VALUE, got {text!r}")
        key, value = text.split("=", 1)
        options[key.strip()] = value
    if args.site:
        options[SITE_OPTION] = args.site
    # Two streaming passes over the inputs (a 10,000-file list is never held with its data):
    # the first finds the folder row paths are shown relative to, and counts them.
    count = 0

    def counted():
        nonlocal count
        for p in iter_inputs(args.inputs, args.csv_column):
            count += 1
            yield p

    root = common_root(counted())
    inputs = iter_inputs(args.inputs, args.csv_column)
    scorer = in_process = None
    dicom_out = Path(args.dicom_out) if args.dicom_out else None
    hl7_out = Path(args.hl7_out) if args.hl7_out else None
    fhir_out = Path(args.fhir_out) if args.fhir_out else None
    if dicom_out is not None or hl7_out is not None or fhir_out is not None:
        from cxrserve import families

        if args.model != families.composed_model():
            raise SystemExit(f"--dicom-out, --hl7-out and --fhir-out need --model {families.composed_model()} "
                             "(the SR and the messages hold every family's results)")
    if dicom_out is not None:
        options.setdefault("pictures", "true")  # the lung mask and heatmaps for the SEG and SCs
    if args.in_process:
        from cxrserve.core.loading import load_pipeline

        model = Path(args.in_process)
        if model.is_dir() and (model / f"{args.model}.mar").exists():
            model = model / f"{args.model}.mar"
        pipeline = load_pipeline(model, device=args.device)
        pipeline.parse_options(options)  # a bad value fails now, not on every input
        try:
            pipeline.resolve_site(options)  # so does an unknown site or a refused profile
        except CXRInputError as err:
            raise SystemExit(f"--site: {err.message}") from None
        in_process = InProcessScorer(pipeline, options, dicom_out=dicom_out, hl7_out=hl7_out, fhir_out=fhir_out)
    else:
        client = CXRClient(args.url, protocol=protocol_of(args), token=args.token,
                           key_file=args.key_file, management_url=args.management_url, timeout=args.timeout)
        scorer = RemoteScorer(client, args.model, options, attempts=args.attempts, dicom_out=dicom_out,
                              hl7_out=hl7_out, fhir_out=fhir_out)
    from cxrserve.tools.client import AuthenticationError

    try:
        concurrency = args.concurrency or (IN_PROCESS_CONCURRENCY if in_process else REMOTE_CONCURRENCY)
        summary = run_batch(inputs, args.out, scorer=scorer, in_process=in_process, concurrency=concurrency,
                            root=root, dicom_paths=args.dicom_paths, overwrite=args.overwrite,
                            progress=not args.no_progress, total=count, columns=headline_columns(args.model))
    except AuthenticationError as err:
        print(f"error: {err.message} (401). Rows so far are kept; rerun to resume.")
        return 2
    print(summary.text())
    print(f"rows: {args.out}   summary: {args.out}.summary.json")
    return 0 if summary.errors == 0 else 1


def register_cli(subparsers) -> None:
    from cxrserve.tools.client.cli import add_connection_args

    p = subparsers.add_parser("batch", help="score a folder / glob / CSV of files into CSV or JSONL (resumable)")
    p.add_argument("inputs", nargs="+", help="folders (recursive), glob patterns, files, or CSVs of paths")
    p.add_argument("--model", required=True, help="served model name (`cxrserve families` lists them)")
    p.add_argument("--out", required=True, help="results file: .csv or .jsonl (appended to on resume)")
    p.add_argument("--option", action="append", help="model option NAME=VALUE for every input (repeatable)")
    p.add_argument("--site", help="the site whose installed calibration profile answers (cxrserve site install); "
                                  "same as --option site=NAME")
    p.add_argument("--concurrency", type=int, default=None,
                   help=f"requests in flight (default {REMOTE_CONCURRENCY} over REST/gRPC/KServe: enough to "
                        f"fill the server's batches of 4 with the next batch queued; {IN_PROCESS_CONCURRENCY} "
                        "chunks with --in-process)")
    p.add_argument("--attempts", type=int, default=3, help="tries per input on 5xx (a worker restarting)")
    p.add_argument("--in-process", metavar="MODEL", help="no server: a .mar, an unpacked archive or a store folder")
    p.add_argument("--device", default="auto", help="with --in-process: cpu | cuda | auto")
    p.add_argument("--csv-column", default="path", help="column of file paths in an input CSV (default: path)")
    p.add_argument("--dicom-paths", choices=["hash", "clear"], default="hash",
                   help="DICOM file paths often name the patient: written hashed unless 'clear'")
    p.add_argument("--overwrite", action="store_true", help="start afresh instead of resuming")
    p.add_argument("--dicom-out", metavar="DIR", help="with a composed model (the study): write the SR, SEGs and "
                   "SCs of every DICOM input under DIR/<hashed SOP UID>/ (docs/DICOM.md)")
    p.add_argument("--hl7-out", metavar="DIR", help="with the composed model: an HL7 v2.5.1 ORU^R01 of every DICOM "
                   "input's result as DIR/<hashed SOP UID>.hl7 (docs/HL7_FHIR.md)")
    p.add_argument("--fhir-out", metavar="DIR", help="with the composed model: a FHIR R4 transaction Bundle of every "
                   "DICOM input's result as DIR/<hashed SOP UID>.json (docs/HL7_FHIR.md)")
    p.add_argument("--no-progress", action="store_true")
    add_connection_args(p)
    p.set_defaults(func=cmd_batch)


if __name__ == "__main__":  # pragma: no cover
    from cxrserve.tools.cli import main

    sys.exit(main(["batch", *sys.argv[1:]]))
