"""Building PXS reference pools: ``cxrserve pool build`` / ``pool show`` (a tool, never served).

Finds normal frontal films in folders, ``labels.csv`` files or data roots, embeds them
exactly as served and saves ``pool.npz`` + ``pool.json`` beside the weights
(:class:`~cxrserve.families.pxs.pipeline.ReferencePool`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cxrserve.core.card import ModelCard
from cxrserve.core.files import sha256_file
from cxrserve.core.imageio import check_frontal_chest_header, read_file
from cxrserve.core.runtime import Runtime
from cxrserve.core.transforms import build_transform
from cxrserve.families.pxs.pipeline import ReferencePool

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


# --------------------------------------------------------------------------- building
def find_normal_images(data: str | Path | Sequence[str | Path], *, max_images: int | None = None,
                       seed: int = 0) -> list[Path]:
    """Normal adult frontal images from folders / ``labels.csv`` files / data roots.

    A folder with ``labels.csv`` (or the csv itself) contributes its rows labelled
    normal that are not flagged lateral or paediatric; a data root contributes every
    such folder under it; a folder without ``labels.csv`` contributes every image file
    in it (the caller vouches that they are normal). More than ``max_images``: a seeded
    sample of the path-sorted list, so the same inputs give the same pool.
    """
    from cxrserve.training.datasets import read_folder, read_shared

    paths: list[Path] = []
    for entry in ([data] if isinstance(data, (str, Path)) else list(data)):
        entry = Path(entry)
        if entry.is_file() and entry.name == "labels.csv":
            entry = entry.parent
        if (entry / "labels.csv").is_file():
            records = read_folder(entry)
        elif entry.is_dir() and any((p / "labels.csv").is_file() for p in entry.iterdir() if p.is_dir()):
            records = read_shared(entry, link=False)
        elif entry.is_dir():
            paths.extend(p for p in entry.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            continue
        else:
            raise FileNotFoundError(f"{entry}: expected a folder of images, a labels.csv or a data root")
        paths.extend(r.path for r in records
                     if r.triage_label == "normal" and r.is_frontal is not False and r.is_adult is not False)
    paths = sorted(set(paths))
    if not paths:
        raise ValueError(f"no normal frontal images found in {data}")
    if max_images and len(paths) > max_images:
        keep = np.sort(np.random.default_rng(seed).permutation(len(paths))[:max_images])
        paths = [paths[i] for i in keep]
    return paths


def embed_files(runtime: Runtime, preprocessing: str, paths: Sequence[Path], *, max_batch: int = 8,
                progress: bool = False) -> np.ndarray:
    """Embeddings of image files, decoded and preprocessed exactly as served."""
    from tqdm.auto import tqdm

    transform = build_transform(preprocessing)
    out: list[np.ndarray] = []
    bar = tqdm(total=len(paths), desc="embedding pool", disable=not progress, leave=False)
    for start in range(0, len(paths), max_batch):
        chunk = paths[start : start + max_batch]
        tensors = []
        for path in chunk:
            xray = read_file(path)
            check_frontal_chest_header(xray)
            tensors.append(transform(xray.uint8))
        out.append(runtime(torch.stack(tensors))[0].astype(np.float32))
        bar.update(len(chunk))
    bar.close()
    return np.concatenate(out)


def load_embedder(model: str | Path, *, backend: str = "auto", device: str = "cpu") -> tuple[Runtime, ModelCard, str]:
    """A component folder (``metadata.json`` + ``model.pt``/``model.onnx``) or a checkpoint."""
    from cxrserve.core.runtime import TorchRuntime, load_runtime, pick_device

    model = Path(model)
    dev = pick_device(0, device)
    if model.is_file():
        from cxrserve.models.checkpoint import load_model

        net, card = load_model(model, dev)
        return TorchRuntime(net, dev), card, "eager"
    card = ModelCard.load(model / "metadata.json")
    if backend == "auto":
        backend = "torchscript" if (model / "model.pt").exists() else "onnx"
    return load_runtime(model, backend, dev), card, backend


def build_pool(model: str | Path, data, out_dir: str | Path | None = None, *, max_images: int | None = 64,
               seed: int = 0, source: str | None = None, backend: str = "auto", device: str = "cpu",
               max_batch: int = 8, progress: bool = True) -> ReferencePool:
    """Embed the normal images found in ``data`` with ``model`` and save the pool.

    ``out_dir`` defaults to the component folder ``model`` (so the pool ships with it).
    """
    runtime, card, used_backend = load_embedder(model, backend=backend, device=device)
    if card.task != "embedding":
        raise ValueError(f"{model}: card task is {card.task!r}, a pool needs an embedding model")
    paths = find_normal_images(data, max_images=max_images, seed=seed)
    log.info("embedding %d reference images with %s %s (%s)", len(paths), card.name, card.version, used_backend)
    embeddings = embed_files(runtime, card.preprocessing, paths, max_batch=max_batch, progress=progress)
    pool = ReferencePool.from_embeddings(
        embeddings, card=card, image_hashes=[sha256_file(p) for p in paths], backend=used_backend,
        source=source or _describe_source(data),
    )
    if out_dir is None:
        if Path(model).is_file():
            raise ValueError("give out_dir when building a pool from a checkpoint")
        out_dir = model
    pool.save(out_dir)
    log.info("pool %s: %d images, leave-one-out PXS median %.3f, saved to %s",
             pool.version, pool.size, pool.provenance["loo_scores"]["median"], out_dir)
    return pool


def _describe_source(data) -> str:
    entries = [data] if isinstance(data, (str, Path)) else list(data)
    # Folder names only: absolute paths say nothing useful inside a shipped archive.
    return ", ".join(Path(e).name if Path(e).name != "labels.csv" else Path(e).parent.name for e in entries)


# --------------------------------------------------------------------------- CLI
def cmd_pool_build(args) -> int:
    pool = build_pool(args.model, args.data, args.out, max_images=args.max_images, seed=args.seed,
                      source=args.source, backend=args.backend, device=args.device)
    print(json.dumps(pool.summary(), indent=2))
    return 0


def cmd_pool_show(args) -> int:
    pool = ReferencePool.load(args.folder)
    print(json.dumps(pool.provenance if args.images else pool.summary(), indent=2))
    return 0


def register_cli(subparsers) -> None:
    """``cxrserve pool build`` / ``cxrserve pool show``."""
    p = subparsers.add_parser("pool", help="PXS reference pools of normal CXRs")
    actions = p.add_subparsers(dest="action", required=True)
    b = actions.add_parser("build", help="embed normal frontal CXRs and store the pool beside the weights")
    b.add_argument("model", help="exported component folder (metadata.json + model.pt/onnx) or a checkpoint")
    b.add_argument("--data", nargs="+", required=True,
                   help="folder of normal images, labels.csv folder (rows labelled normal), or a data root")
    b.add_argument("--out", help="where pool.npz/pool.json go (default: the component folder)")
    b.add_argument("--max-images", type=int, default=64, help="seeded sample when more are found (0: all)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--source", help="provenance text (default: the data folder names)")
    b.add_argument("--backend", default="auto", choices=["auto", "torchscript", "onnx"])
    b.add_argument("--device", default="cpu")
    b.set_defaults(func=cmd_pool_build)
    s = actions.add_parser("show", help="print a pool's provenance")
    s.add_argument("folder")
    s.add_argument("--images", action="store_true", help="include the sha256 of every image")
    s.set_defaults(func=cmd_pool_show)

