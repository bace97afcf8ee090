"""CheXzero weights in and zero-shot folders out: import, text-encoder export, ``cxrserve zeroshot``.

A tool, never served: the served side is :mod:`cxrserve.families.zeroshot.pipeline`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import torch

from cxrserve.core.card import ModelCard
from cxrserve.core.files import sha256_file
from cxrserve.core.loading import write_pipeline_spec
from cxrserve.families.zeroshot.pipeline import (BPE_FILE, CHEXPERT_LABELS, COMPONENT, NEGATIVE_TEMPLATE,
                                                 POSITIVE_TEMPLATE, PREPROCESSING, TEXT_FILE, TEXT_PARITY_FILE,
                                                 Tokenizer, ZeroShotPipeline, prompt_pair, trim_tokens)
from cxrserve.models.checkpoint import load_model, save_checkpoint

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- export
def example_tokens(tokenizer: Tokenizer, labels: Sequence[str] = CHEXPERT_LABELS) -> torch.Tensor:
    return trim_tokens(tokenizer([text for label in labels for text in prompt_pair(label)]))


def export_text_encoder(checkpoint: str | Path, folder: str | Path, *, atol: float | None = None) -> Path:
    """Trace the checkpoint's text encoder to ``folder/text.pt`` and copy the BPE vocabulary.

    Parity against eager runs on a batch size and token length the trace never saw
    (the full 77-token context), so a frozen shape fails here, not in production.
    """
    from cxrserve.packaging.export import PARITY_ATOL, ParityError
    from cxrserve.models.clip import TextEncoder

    atol = PARITY_ATOL if atol is None else atol
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model, card = load_model(checkpoint)
    encoder = TextEncoder(model).eval()
    tokenizer = Tokenizer(context_length=model.context_length)
    example = example_tokens(tokenizer, ("Pneumonia", "Pleural Effusion"))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(encoder, example, check_trace=False)
    torch.jit.save(traced, str(folder / TEXT_FILE), _extra_files={"metadata.json": json.dumps(card.to_dict())})
    check = tokenizer([text for label in CHEXPERT_LABELS + ("a much longer finding name to test the padding",)
                       for text in prompt_pair(label)])
    reloaded = torch.jit.load(str(folder / TEXT_FILE))
    with torch.no_grad():
        full = encoder(check)
        worst = max(float((reloaded(check) - full).abs().max()),
                    float((reloaded(trim_tokens(check)) - full).abs().max()))
    report = {"atol": atol, "torchscript": [worst], "max_abs_diff": worst, "checked": "77 tokens and trimmed"}
    if worst > atol:
        raise ParityError(f"{card.name} text encoder: exported output differs from eager by {worst:.2e} > {atol:.0e}")
    (folder / TEXT_PARITY_FILE).write_text(json.dumps(report, indent=2))
    shutil.copy2(tokenizer.bpe_path, folder / BPE_FILE)
    log.info("exported %s text encoder to %s, max |diff| vs eager %.1e", card.name, folder / TEXT_FILE, worst)
    return folder / TEXT_FILE


# --------------------------------------------------------------------------- import
def _read_state_dict(path: Path) -> dict:
    """A plain state dict (CheXzero's ``torch.save(model.state_dict())``), a ``{"state_dict": ...}``
    wrapper, or an OpenAI TorchScript archive."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except RuntimeError as err:
        if "TorchScript" not in str(err) and "constants.pkl" not in str(err):
            raise
        obj = torch.jit.load(str(path), map_location="cpu").state_dict()
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path.name}: not a state dict of tensors")
    return dict(obj)


def import_checkpoints(paths: Iterable[str | Path], out: str | Path, *, version: str = "chexzero-1",
                       labels: Sequence[str] = CHEXPERT_LABELS,
                       trained_on: str = "CheXzero checkpoints (MIMIC-CXR image/impression pairs)") -> Path:
    """Turn local CheXzero checkpoints (OpenAI CLIP layout) into one ensemble checkpoint.

    Every file must hold the same configuration (checked); the result is a cxrserve
    checkpoint with its card, ready for ``cxrserve store build --checkpoint zeroshot=OUT``.
    """
    from cxrserve.models.clip import ZeroShotCLIP

    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("give at least one checkpoint file")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(path)
    model = ZeroShotCLIP.from_state_dicts([_read_state_dict(p) for p in paths])
    config = model.config
    from cxrserve.families.zeroshot.preprocessing import CHEXZERO

    size = CHEXZERO.input_size
    if config["image_resolution"] != size:
        raise ValueError(f"checkpoints take {config['image_resolution']} px images; the '{PREPROCESSING}' "
                         f"preprocessing feeds {size} px (CheXzero's released ViT-B/32 checkpoints)")
    hashes = [{"file": p.name, "sha256": sha256_file(p)} for p in paths]
    card = ModelCard(
        name=COMPONENT, architecture="clip", task="image_text", preprocessing=PREPROCESSING,
        labels=list(labels), arch_kwargs={**config, "members": len(paths)}, version=version,
        trained_on=trained_on,
        data_fingerprint=hashlib.sha256("".join(h["sha256"] for h in hashes).encode()).hexdigest()[:16],
        license="CheXzero weights: see the CheXzero repository's licence",
        extra={"source": "imported", "ensemble": hashes,
               "prompts": {"positive": POSITIVE_TEMPLATE, "negative": NEGATIVE_TEMPLATE}},
    )
    out = save_checkpoint(out, model, card)
    log.info("imported %d checkpoint(s) into %s", len(paths), out)
    return out


# --------------------------------------------------------------------------- CLI
def _cmd_import(args) -> int:
    out = import_checkpoints(args.checkpoints, args.out, version=args.version)
    print(f"wrote {out}; build the archive with: cxrserve store build --only cxr-zeroshot "
          f"--checkpoint {COMPONENT}={out}")
    return 0


def export_model_folder(checkpoint: str | Path, out: str | Path,
                        formats: tuple[str, ...] = ("torchscript", "onnx")) -> Path:
    """A loadable ``cxr-zeroshot`` folder without building an archive (evaluation, ``score``).

    ``out/zeroshot`` holds the exported image encoder (parity-checked), ``text.pt`` and
    the vocabulary; ``out/pipeline.json`` names the pipeline.
    """
    from cxrserve.packaging.export import export_component

    out = Path(out)
    export_component(checkpoint, out / COMPONENT, formats=formats)
    export_text_encoder(checkpoint, out / COMPONENT)
    backend = "onnx" if "onnx" in formats else "torchscript"
    write_pipeline_spec(out, ZeroShotPipeline, name=ZeroShotPipeline.name, handler={"backend": backend})
    return out


def _cmd_export(args) -> int:
    out = export_model_folder(args.checkpoint, args.out, tuple(args.formats))
    print(f"exported to {out}; score with: cxrserve zeroshot score FILE --model {out}")
    return 0


def _cmd_score(args) -> int:
    from cxrserve.core.loading import load_pipeline

    pipeline = load_pipeline(args.model, device=args.device)
    options = {"labels": args.labels} if args.labels else {}
    for path in args.files:
        result = pipeline.predict_bytes(Path(path).read_bytes(), options)
        ranked = sorted(result["probabilities"].items(), key=lambda kv: -kv[1])
        print(Path(path).name)
        for label, p in ranked:
            print(f"  {p:.3f}  {label}")
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("zeroshot", help="CheXzero import, text-encoder export, zero-shot scoring")
    sub = p.add_subparsers(dest="zeroshot_command", required=True)
    q = sub.add_parser("import", help="CheXzero / OpenAI-layout CLIP checkpoints -> one ensemble checkpoint")
    q.add_argument("checkpoints", nargs="+", help="local .pt files (several = an averaged ensemble)")
    q.add_argument("--out", required=True)
    q.add_argument("--version", default="chexzero-1")
    q.set_defaults(func=_cmd_import)
    q = sub.add_parser("export", help="checkpoint -> loadable cxr-zeroshot folder (image + text encoders, parity)")
    q.add_argument("checkpoint")
    q.add_argument("out")
    q.add_argument("--formats", nargs="+", default=["torchscript", "onnx"], choices=["torchscript", "onnx"])
    q.set_defaults(func=_cmd_export)
    q = sub.add_parser("score", help="score files in process with a cxr-zeroshot archive or folder")
    q.add_argument("files", nargs="+")
    q.add_argument("--model", required=True, help="cxr-zeroshot.mar or an unpacked archive folder")
    q.add_argument("--labels", help="comma-separated findings (default: the 14 CheXpert findings)")
    q.add_argument("--device", default="auto")
    q.set_defaults(func=_cmd_score)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxrserve.families.zeroshot.pipeline", description=__doc__.splitlines()[0])
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
