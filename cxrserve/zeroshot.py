"""Zero-shot findings as in CheXzero (seed 002): image-text similarity with prompt pairs.

For each finding ``label`` the text encoder embeds a positive prompt ``"{label}"`` and
a negative prompt ``"no {label}"``; both text embeddings and the image embedding are
L2-normalised, the scores are their cosine similarities, and

    p(label) = exp(pos) / (exp(pos) + exp(neg))

(a softmax over the pair at temperature 1, as CheXzero's ``run_softmax_eval``). With
several checkpoints (an ensemble) each member scores on its own and the
probabilities are averaged, as CheXzero averages its models' predictions.

Served as ``cxr-zeroshot``: the image encoder is the exported graph (TorchScript or
ONNX, parity-checked like every component); the text encoder ships beside it as a
TorchScript program (``text.pt``) with the CLIP BPE vocabulary, and runs inside the
worker. The default labels (the 14 CheXpert findings) are embedded once when the worker
starts; labels a request names itself are embedded on first use and kept in a bounded
LRU cache. Tokenisation is OpenAI's CLIP BPE through :mod:`open_clip` (its vocabulary
file ships with the package and is copied into the archive; nothing is fetched).

Weights come from ``cxrserve train zeroshot`` (contrastive training on image/report
pairs, :mod:`cxrserve.tasks.zeroshot`) or from CheXzero checkpoints (OpenAI CLIP
state-dict layout) through :func:`import_checkpoints`:
``cxrserve zeroshot import best_64_*.pt --out runs/chexzero.ckpt``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from .card import ModelCard
from .checkpoint import load_model, save_checkpoint
from .pipeline import Item, Option, Pipeline, register_pipeline

log = logging.getLogger(__name__)

#: The 14 CheXpert observations, CheXzero's default ``cxr_labels`` (in its order).
CHEXPERT_LABELS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
)
#: CheXzero's ``pair_template``.
POSITIVE_TEMPLATE, NEGATIVE_TEMPLATE = "{}", "no {}"
COMPONENT = "zeroshot"
TEXT_FILE = "text.pt"
TEXT_PARITY_FILE = "text_parity.json"
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
PREPROCESSING = "chexzero"
MAX_LABELS = 64
MAX_LABEL_CHARS = 200


# --------------------------------------------------------------------------- text
def default_bpe_path() -> Path:
    """The CLIP BPE merges file shipped inside the ``open_clip`` package."""
    from open_clip.tokenizer import default_bpe

    return Path(default_bpe())


class Tokenizer:
    """OpenAI's CLIP BPE tokenizer (lower-cased, ftfy-cleaned) padded to ``context_length``.

    Too-long texts are cut and end with the end-of-text token, as CheXzero's
    ``preprocess_text`` does.
    """

    def __init__(self, bpe_path: str | Path | None = None, context_length: int = 77):
        from open_clip.tokenizer import SimpleTokenizer

        self.bpe_path = Path(bpe_path) if bpe_path else default_bpe_path()
        self.context_length = context_length
        self._tokenizer = SimpleTokenizer(bpe_path=str(self.bpe_path), context_length=context_length)
        self.eot_token_id = self._tokenizer.eot_token_id

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        return self._tokenizer(list(texts), context_length=self.context_length)


def trim_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Cut a padded token batch after its longest sequence's end-of-text token.

    CLIP's text transformer is causal and reads its features at the end-of-text
    token (the largest id), so the padding after it never changes the result.
    """
    if tokens.numel() == 0:
        return tokens
    return tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]


def prompt_pair(label: str) -> tuple[str, str]:
    return POSITIVE_TEMPLATE.format(label), NEGATIVE_TEMPLATE.format(label)


def embed_labels(encode: Callable[[torch.Tensor], torch.Tensor], tokenizer: Tokenizer, labels: Sequence[str],
                 device: torch.device | str = "cpu", chunk: int = 64) -> torch.Tensor:
    """Normalised text embeddings of each label's prompt pair: ``[labels, 2, members, dim]``.

    ``encode`` maps token ids ``[T, L]`` to normalised embeddings ``[T, members, dim]``
    (the eager :meth:`ZeroShotCLIP.encode_text` or the exported ``text.pt``).
    """
    texts = [text for label in labels for text in prompt_pair(label)]
    tokens = tokenizer(texts)
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), chunk):
            part = trim_tokens(tokens[start : start + chunk]).to(device)
            out.append(encode(part).float())
    emb = torch.cat(out) if out else torch.empty(0)
    return emb.reshape(len(labels), 2, *emb.shape[1:])


def pair_probabilities(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """CheXzero's softmax over each prompt pair, averaged over ensemble members.

    Args:
        image_embeddings: ``[N, members, dim]``, L2-normalised.
        text_embeddings: ``[labels, 2, members, dim]`` (positive, negative), L2-normalised.

    Returns:
        ``[N, labels]``: ``mean_m exp(pos_m) / (exp(pos_m) + exp(neg_m))``.
    """
    sims = torch.einsum("nmd,lkmd->nlmk", image_embeddings.float(), text_embeddings.float())
    return torch.softmax(sims, dim=-1)[..., 0].mean(dim=2)


class TextEmbeddingCache:
    """Bounded LRU of per-label prompt-pair embeddings (``[2, members, dim]`` each)."""

    def __init__(self, max_labels: int = 1024):
        self.max_labels = max(1, int(max_labels))
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, label: str) -> bool:
        return label in self._items

    def get(self, label: str) -> torch.Tensor | None:
        value = self._items.get(label)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(label)
        return value

    def put(self, label: str, value: torch.Tensor) -> None:
        self._items[label] = value
        self._items.move_to_end(label)
        while len(self._items) > self.max_labels:
            self._items.popitem(last=False)


def parse_labels(value: Any) -> tuple[str, ...]:
    """Request option ``labels``: a JSON list, or a comma / newline separated string.

    Raises:
        ValueError: empty, too many, too long, or with control characters (-> 400).
    """
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"not a JSON list: {err.msg}") from None
        else:
            value = [part for line in text.splitlines() for part in line.split(",")]
    if not isinstance(value, (list, tuple)):
        raise ValueError("expected a list of finding names, or a comma-separated string")
    labels: list[str] = []
    for raw in value:
        if not isinstance(raw, str):
            raise ValueError(f"every label must be a string, got {type(raw).__name__}")
        label = " ".join(raw.split())
        if not label:
            continue
        if len(label) > MAX_LABEL_CHARS:
            raise ValueError(f"label longer than {MAX_LABEL_CHARS} characters")
        if any(ord(c) < 32 or ord(c) == 127 for c in label):
            raise ValueError("labels may not contain control characters")
        if label not in labels:
            labels.append(label)
    if not labels:
        raise ValueError("no labels given")
    if len(labels) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels per request, got {len(labels)}")
    return tuple(labels)


# --------------------------------------------------------------------------- serving
def load_text_encoder(component_dir: str | Path, device: torch.device) -> torch.jit.ScriptModule:
    path = Path(component_dir) / TEXT_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} missing: export with `cxrserve zeroshot export CKPT FOLDER` or `cxrserve store build`"
        )
    from .runtime import load_torchscript  # the GPU-safe loader every TorchScript program uses

    return load_torchscript(path, device).eval()


@register_pipeline
class ZeroShotPipeline(Pipeline):
    """``cxr-zeroshot``: probability of each finding from prompt-pair similarities."""

    name = "cxr-zeroshot"
    components = (COMPONENT,)
    OPTIONS = {
        "labels": Option(parse_labels, None,
                         "findings to score (JSON list or comma-separated); default: the 14 CheXpert findings"),
    }

    def setup(self) -> None:
        part = self.parts[COMPONENT]
        bpe = part.path / BPE_FILE
        context_length = int(part.card.arch_kwargs.get("context_length", 77))
        self.tokenizer = Tokenizer(bpe if bpe.exists() else None, context_length)
        self.text_encoder = load_text_encoder(part.path, self.device)
        self.transform = part.transform()
        self.default_labels = tuple(part.card.labels) or CHEXPERT_LABELS
        self.ensemble_size = int(part.card.arch_kwargs.get("members", 1))
        self.cache = TextEmbeddingCache(int(self.config.get("text_cache_size", 1024)))
        with self.timer.stage("text"):
            self.default_embeddings = self.embed(self.default_labels)
        self.timer.reset()  # worker start-up is not a request's cost

    def embed(self, labels: Sequence[str]) -> torch.Tensor:
        """``[labels, 2, members, dim]`` on the worker's device, from the exported text encoder."""
        return embed_labels(self.text_encoder, self.tokenizer, labels, self.device)

    def label_embeddings(self, labels: Sequence[str]) -> torch.Tensor:
        if tuple(labels) == self.default_labels:
            return self.default_embeddings
        index = {label: i for i, label in enumerate(self.default_labels)}
        missing = [label for label in labels if label not in index and self.cache.get(label) is None]
        if missing:
            with self.timer.stage("text"):
                for label, emb in zip(missing, self.embed(missing)):
                    self.cache.put(label, emb)
        rows = []
        for label in labels:
            if label in index:
                rows.append(self.default_embeddings[index[label]])
            else:
                cached = self.cache.get(label)
                if cached is None:  # evicted by this very request (more labels than the cache holds)
                    cached = self.embed([label])[0]
                rows.append(cached)
        return torch.stack(rows)

    def _predict(self, items: list[Item]) -> list[dict]:
        with self.timer.stage("preprocess"):
            inputs = [self.transform(it.xray.uint8) for it in items]
        outputs = self.run(COMPONENT, inputs)
        results = []
        with self.timer.stage("score"):
            image_embeddings = torch.from_numpy(np.stack([out[0] for out in outputs])).to(self.device)
            for i, item in enumerate(items):
                labels = item.options["labels"] or self.default_labels
                probs = pair_probabilities(image_embeddings[i : i + 1], self.label_embeddings(labels))[0]
                out = self.base_response(item)
                out.update(
                    probabilities={label: round(float(p), 6) for label, p in zip(labels, probs.tolist())},
                    labels_source="request" if item.options["labels"] else "default",
                    ensemble_size=self.ensemble_size,
                    prompts={"positive": POSITIVE_TEMPLATE, "negative": NEGATIVE_TEMPLATE},
                )
                results.append(out)
        return results

    def describe(self) -> dict:
        info = super().describe()
        info["default_labels"] = list(self.default_labels)
        info["text_cache"] = {"size": len(self.cache), "max": self.cache.max_labels,
                              "hits": self.cache.hits, "misses": self.cache.misses}
        return info


# --------------------------------------------------------------------------- export
def example_tokens(tokenizer: Tokenizer, labels: Sequence[str] = CHEXPERT_LABELS) -> torch.Tensor:
    return trim_tokens(tokenizer([text for label in labels for text in prompt_pair(label)]))


def export_text_encoder(checkpoint: str | Path, folder: str | Path, *, atol: float | None = None) -> Path:
    """Trace the checkpoint's text encoder to ``folder/text.pt`` and copy the BPE vocabulary.

    Parity against eager runs on a batch size and token length the trace never saw
    (the full 77-token context), so a frozen shape fails here, not in production.
    """
    from .export import PARITY_ATOL, ParityError
    from .models.clip import TextEncoder

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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_checkpoints(paths: Iterable[str | Path], out: str | Path, *, version: str = "chexzero-1",
                       labels: Sequence[str] = CHEXPERT_LABELS,
                       trained_on: str = "CheXzero checkpoints (MIMIC-CXR image/impression pairs)") -> Path:
    """Turn local CheXzero checkpoints (OpenAI CLIP layout) into one ensemble checkpoint.

    Every file must hold the same configuration (checked); the result is a cxrserve
    checkpoint with its card, ready for ``cxrserve store build --checkpoint zeroshot=OUT``.
    """
    from .models.clip import ZeroShotCLIP

    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("give at least one checkpoint file")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(path)
    model = ZeroShotCLIP.from_state_dicts([_read_state_dict(p) for p in paths])
    config = model.config
    from .transforms import PREPROCESSING as _PRE

    size = _PRE[PREPROCESSING].input_size
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
    from .export import export_component

    out = Path(out)
    export_component(checkpoint, out / COMPONENT, formats=formats)
    export_text_encoder(checkpoint, out / COMPONENT)
    backend = "onnx" if "onnx" in formats else "torchscript"
    (out / "pipeline.json").write_text(json.dumps({"pipeline": ZeroShotPipeline.name, "name": ZeroShotPipeline.name,
                                                   "handler": {"backend": backend}}, indent=2))
    return out


def _cmd_export(args) -> int:
    out = export_model_folder(args.checkpoint, args.out, tuple(args.formats))
    print(f"exported to {out}; score with: cxrserve zeroshot score FILE --model {out}")
    return 0


def _cmd_score(args) -> int:
    from .pipeline import load_pipeline

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
    parser = argparse.ArgumentParser(prog="python -m cxrserve.zeroshot", description=__doc__.splitlines()[0])
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
