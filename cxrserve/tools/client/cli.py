"""``cxrserve predict FILE...``: score files with a running server through :class:`CXRClient`.

Prints a few readable lines per study (or the responses as JSON), writes every picture
as a PNG and a ``summary.json`` next to them; ``--<flag>`` for every picture and flag the
families declare. :func:`add_connection_args` and :func:`protocol_of` are shared with
``cxrserve batch``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cxrserve.tools.client.client import DEFAULT_GRPC, DEFAULT_REST, CXRClient
from cxrserve.tools.client.credentials import DEFAULT_MANAGEMENT
from cxrserve.tools.client.errors import AuthenticationError, CXRServeError, ServerUnavailable

PNG_SUFFIX = "_png"


def save_pngs(result: dict, out_dir: Path, stem: str) -> dict:
    """Write every ``*_png`` field of ``result`` as ``<stem>.<field>.png``; return the result
    with those fields replaced by the file names (the summary stays small and readable)."""
    import base64

    out = {}
    for key, value in result.items():
        if key.endswith(PNG_SUFFIX) and isinstance(value, str):
            path = out_dir / f"{stem}.{key[: -len(PNG_SUFFIX)]}.png"
            path.write_bytes(base64.b64decode(value))
            out[key[: -len(PNG_SUFFIX)] + "_file"] = path.name
        elif isinstance(value, dict):  # nested: a cxr-study section (results.triage.heatmap_png)
            out[key] = save_pngs(value, out_dir, f"{stem}.{key}") if _has_png(value) else value
        else:
            out[key] = value
    return out


def _has_png(value: dict) -> bool:
    return any((k.endswith(PNG_SUFFIX) and isinstance(v, str)) or (isinstance(v, dict) and _has_png(v))
               for k, v in value.items())


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: -kv[1] if isinstance(kv[1], (int, float)) else 0)
        return ", ".join(f"{k} {_fmt_value(v)}" for k, v in items)
    if isinstance(value, list):
        return "[" + ", ".join(_fmt_value(v) for v in value) + "]"
    return str(value)


def format_human(name: str, result: dict) -> str:
    """A few readable lines per study: main fields, gate, warnings, saved pictures."""
    lines = [f"{name}: {result.get('model', '')} {result.get('model_version', '')}".rstrip()]
    skip = {"model", "model_version", "warnings", "input", "input_gate", "results", "timings_ms"}
    for key, value in result.items():
        if key in skip or key.endswith("_file"):  # saved pictures are listed by the caller
            continue
        lines.append(f"  {key}: {_fmt_value(value)}")
    for family, section in (result.get("results") or {}).items():  # cxr-study: one block per family
        if "error" in section:
            lines.append(f"  {family}: error {section.get('status')} {section['error']}: {section.get('message', '')}")
            continue
        lines.append(f"  {family}:")
        for key, value in section.items():
            if key not in skip and not key.endswith("_file"):
                lines.append(f"    {key}: {_fmt_value(value)}")
        own = [w for w in section.get("warnings", []) if w not in result.get("warnings", [])]
        lines.extend(f"    warning: {w}" for w in own)
    gate = result.get("input_gate")
    if gate:
        lines.append(f"  input gate: {gate['verdict']} (score {gate['score']:.3f}, threshold {gate['threshold']:g})")
    info = result.get("input") or {}
    if info:
        lines.append(f"  input: {info.get('format')} {info.get('width')}x{info.get('height')} "
                     f"{info.get('photometric', '')} {info.get('view', '')}".rstrip())
    for warning in result.get("warnings", []):
        lines.append(f"  warning: {warning}")
    return "\n".join(lines)


def _parse_option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise SystemExit(f"--option expects NAME=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value


def cmd_predict(args) -> int:
    from cxrserve import families

    model = args.model or families.default_served()
    options = dict(_parse_option(o) for o in (args.option or []))
    if args.site:
        options["site"] = args.site
    for flag in families.flags():  # the pictures (and other flags) the families declare
        if getattr(args, flag, False):
            options[flag] = True
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    client = CXRClient(args.url, protocol=protocol_of(args), token=args.token, key_file=args.key_file,
                       management_url=args.management_url, timeout=args.timeout, model_version=args.version)
    if client.credentials.token is None:
        print("warning: no token given and no key_file.json found (set --key-file or CXRSERVE_KEY_FILE); "
              "TorchServe will refuse the request", flush=True)
    summary, failures = [], 0
    with client:
        for i, path in enumerate(args.files):
            name = Path(path).name
            stem = f"{i:03d}_{Path(path).stem}"
            try:
                result = client.predict(model, path, prior=args.prior, options=options)
                entry = {"file": str(path), "status": 200, "result": save_pngs(result, out_dir, stem)}
                if not args.json:
                    print(format_human(name, entry["result"]))
                    for key, value in _saved_files(entry["result"]):
                        print(f"  saved {key[:-5]}: {out_dir / value}")
            except AuthenticationError as err:
                print(f"error: {err.message} (HTTP 401 semantics; TorchServe itself answered 400)")
                return 2
            except ServerUnavailable as err:
                print(f"error: {err.message}")
                return 2
            except CXRServeError as err:
                failures += 1
                entry = {"file": str(path), "status": err.status, "error": err.code, "message": err.message}
                if not args.json:
                    print(f"{name}: rejected, {err.status} {err.code}: {err.message}")
            except OSError as err:
                failures += 1
                entry = {"file": str(path), "status": 0, "error": "unreadable", "message": str(err)}
                if not args.json:
                    print(f"{name}: cannot read: {err}")
            summary.append(entry)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"summary: {out_dir / 'summary.json'} ({len(summary) - failures} scored, {failures} rejected)")
    return 1 if failures else 0


def _saved_files(result: dict, prefix: str = ""):
    """``(field, file)`` of every picture :func:`save_pngs` wrote, sections included."""
    for key, value in result.items():
        if key.endswith("_file") and isinstance(value, str):
            yield prefix + key, value
        elif isinstance(value, dict):
            yield from _saved_files(value, "" if key == "results" else f"{prefix}{key}.")


def protocol_of(args) -> str:
    return "grpc" if getattr(args, "grpc", False) else "kserve" if getattr(args, "kserve", False) else "rest"


def add_connection_args(p) -> None:
    p.add_argument("--url", help=f"inference address (REST default {DEFAULT_REST}, gRPC default {DEFAULT_GRPC})")
    p.add_argument("--grpc", action="store_true", help="use gRPC (TorchServe's port 7070) instead of REST")
    p.add_argument("--kserve", action="store_true",
                   help="KServe v2 protocol (an InferenceService from deploy/kserve; --url is its address)")
    p.add_argument("--token", help="inference token (default: $CXRSERVE_TOKEN, else key_file.json)")
    p.add_argument("--key-file", help="TorchServe key_file.json (default: $CXRSERVE_KEY_FILE, ./, .torchserve/)")
    p.add_argument("--management-url", default=DEFAULT_MANAGEMENT, help="for minting a new token when it expired")
    p.add_argument("--timeout", type=float, default=120.0)


def register_cli(subparsers) -> None:
    from cxrserve import families

    p = subparsers.add_parser("predict", help="score files with a running cxrserve (REST or gRPC)")
    p.add_argument("files", nargs="+", help="DICOM, PNG or JPEG files")
    p.add_argument("--model", help="served model name (default: the registry's first; a composed model when the "
                                   "store has one: every model on one upload)")
    p.add_argument("--version", help="model version (default: the server's default)")
    p.add_argument("--prior", help="prior study, for models that compare two")
    for flag, help_text in families.flags().items():  # declared by each family (its pictures, its flags)
        p.add_argument(f"--{flag}", action="store_true", help=help_text)
    p.add_argument("--option", action="append", help="any model option, NAME=VALUE (repeatable)")
    p.add_argument("--site", help="the site whose installed calibration profile answers (cxrserve site install)")
    p.add_argument("--json", action="store_true", help="print the responses as JSON (machines)")
    p.add_argument("--out", default="cxrserve-predictions", help="folder for summary.json and PNGs")
    add_connection_args(p)
    p.set_defaults(func=cmd_predict)
