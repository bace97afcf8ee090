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
pairs, :mod:`cxrserve.families.zeroshot.task`) or from CheXzero checkpoints (OpenAI CLIP
state-dict layout) through :func:`import_checkpoints`:
``cxrserve zeroshot import best_64_*.pt --out runs/chexzero.ckpt``.
"""
from __future__ import annotations

import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from cxrserve.core.item import Item
from cxrserve.core.pipeline import Pipeline
from cxrserve.core.sites import SiteOutput
from cxrserve.core.options import Option

log = logging.getLogger(__name__)

#: The 14 CheXpert observations, CheXzero's default ``cxr_labels`` (in its order).
from cxrserve.families.zeroshot.labels import CHEXPERT_LABELS  # noqa: E402  (re-used by every zero-shot module)
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
    from cxrserve.core.runtime import load_torchscript  # the GPU-safe loader every TorchScript program uses

    return load_torchscript(path, device).eval()



class ZeroShotPipeline(Pipeline):
    """``cxr-zeroshot``: probability of each finding from prompt-pair similarities."""

    name = "cxr-zeroshot"
    score_maps = ("probabilities",)
    components = (COMPONENT,)
    #: a site's per-finding Platt scaling (cxrserve.core.sites); findings stay independent scores
    SITE_OUTPUT = SiteOutput("multilabel", scores="probabilities")
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
