"""Plumbing shared by the training tasks: records, decoded-image cache, batches, splits."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np
import torch

from cxrserve.training.datasets import Record, patient_split, read_folder, read_shared
from cxrserve.core.imageio import read_file
from cxrserve.core.transforms import LimitLongSide

log = logging.getLogger(__name__)


def load_records(data: Sequence[str | Path] | str | Path, *, sources: Sequence[str] | None = None) -> list[Record]:
    """Records from folders in the shared layout, or from a data root holding several."""
    paths = [data] if isinstance(data, (str, Path)) else list(data)
    records: list[Record] = []
    for path in map(Path, paths):
        if (path / "labels.csv").exists():
            records.extend(read_folder(path))
        elif path.is_dir():
            records.extend(read_shared(path, sources=sources))
        else:
            raise FileNotFoundError(f"{path}: expected a folder with labels.csv, or a data root of such folders")
    if sources:
        records = [r for r in records if r.source in sources]
    return records


class ImageCache:
    """Decode each record once, through the same decoder the server uses.

    ``max_side`` shrinks very large files for training memory; ``None`` keeps them as
    decoded (parity tests). Shared-data images are <= 512 px and phantoms 384 px, so
    the default changes nothing for them.
    """

    def __init__(self, max_side: int | None = 1024):
        self.limit = LimitLongSide(max_side) if max_side else None
        self.images: dict[Path, np.ndarray] = {}
        self.masks: dict[Path, np.ndarray] = {}

    def image(self, record: Record) -> np.ndarray:
        img = self.images.get(record.path)
        if img is None:
            img = read_file(record.path).uint8
            if self.limit is not None:
                img = self.limit(img)
            self.images[record.path] = img
        return img

    def mask(self, record: Record) -> np.ndarray:
        """Ground-truth lung mask (bool) at the cached image's size."""
        mask = self.masks.get(record.path)
        if mask is None:
            if record.mask_path is None:
                raise ValueError(f"{record.relpath} has no lung mask")
            raw = cv2.imread(str(record.mask_path), cv2.IMREAD_GRAYSCALE)
            if raw is None:
                raise FileNotFoundError(record.mask_path)
            h, w = self.image(record).shape[:2]
            if raw.shape != (h, w):
                raw = cv2.resize(raw, (w, h), interpolation=cv2.INTER_NEAREST)
            mask = raw > 127
            self.masks[record.path] = mask
        return mask


def batch_images(records: Sequence[Record], idx: Iterable[int], precomputed: dict, transform, cache: ImageCache,
                 augment_fn=None) -> torch.Tensor:
    """Stacked inputs of ``records[idx]``: augmented on the fly when ``augment_fn`` is given,
    else the tensors ``precomputed`` once per run (keyed by path)."""
    if augment_fn is not None:
        return torch.stack([transform(augment_fn(cache.image(records[i]))[0]) for i in idx])
    return torch.stack([precomputed[records[i].path] for i in idx])


def batches(n: int, batch_size: int, seed: int, epoch: int, drop_last: bool = True) -> list[np.ndarray]:
    """Shuffled index batches, a fresh order per epoch, reproducible from (seed, epoch)."""
    order = np.random.default_rng((seed, epoch)).permutation(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    return [order[i : i + batch_size] for i in range(0, stop, batch_size)]


def split(records: Sequence[Record], val_fraction: float, seed: int, stratify=True) -> tuple[list[Record], list[Record]]:
    parts = patient_split(list(records), val_fraction=val_fraction, seed=seed, stratify=stratify)
    log.info("patient split: %d train / %d val images", len(parts["train"]), len(parts["val"]))
    return parts["train"], parts["val"]


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def describe_data(records: Iterable[Record]) -> str:
    from collections import Counter

    counts = Counter(r.source for r in records)
    return ", ".join(f"{src} ({n})" for src, n in sorted(counts.items()))
