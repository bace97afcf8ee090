"""The skeleton every training task fills in: seed, build, fit, amend the best checkpoint, score as served.

A family's ``train()`` keeps what is its own (which records, the split, the card, the
batches, the loss, what validation measures, what it computes on the best weights) and
leaves the shared shape to these, done one way for every task:

* :class:`Run`: the settings every ``train()`` takes besides its own. :meth:`Run.start`
  seeds torch and resolves the device; :meth:`Run.model` builds the card's architecture
  with ``init`` applied; :meth:`Run.fit` makes the :class:`FitConfig` (warmup and cosine
  length from the number of training examples, the deadline) and runs :func:`fit`;
  :meth:`Run.amend_best` reopens ``best.ckpt`` for what a task computes on the best weights
  (calibration, score maps) and writes it back.
* :func:`in_chunks`: a function over a sequence a chunk at a time (eager validation passes).
* :func:`serve_records`: records through a served pipeline in chunks, with progress; every
  task ``evaluate()`` that ``cxrserve eval`` and the real store call scores this way.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from cxrserve.core.card import ModelCard
from cxrserve.core.imageio import read_file
from cxrserve.core.item import Item
from cxrserve.models import build_model
from cxrserve.models.checkpoint import load_checkpoint, save_checkpoint
from cxrserve.models.pretrained import apply_init
from cxrserve.training.common import batches, resolve_device
from cxrserve.training.datasets import Record
from cxrserve.training.trainer import FitConfig, fit


@dataclass
class Run:
    """One training run's shared settings, as every task's ``train()`` receives them."""

    out_dir: Path
    device: torch.device
    seed: int = 0
    epochs: int = 10
    steps_per_epoch: int | None = None
    batch_size: int = 8
    lr: float = 1e-3
    patience: int = 5
    resume: bool = False
    progress: bool = True
    deadline: float | None = None  # Unix time after which no epoch starts (FitConfig.deadline)

    @classmethod
    def start(cls, out_dir: str | Path, *, device: str | torch.device = "auto", seed: int = 0, **settings) -> Run:
        """A task's first step: seed torch's global generator (weight init, dropout), resolve ``device``."""
        torch.manual_seed(seed)
        device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        return cls(Path(out_dir), device, seed, **settings)

    @property
    def best(self) -> Path:
        return self.out_dir / "best.ckpt"

    def steps(self, n_train: int) -> int:
        """Optimiser steps per epoch: ``steps_per_epoch``, else one pass over ``n_train`` examples."""
        return self.steps_per_epoch or max(1, n_train // self.batch_size)

    def batches(self, n: int, epoch: int) -> list[np.ndarray]:
        """Shuffled index batches over ``n`` examples, a fresh order per epoch (from the seed)."""
        return batches(n, self.batch_size, self.seed, epoch)

    def model(self, card: ModelCard, init: str | Path | None = None) -> torch.nn.Module:
        """The card's architecture, from ``init`` (torchvision | PATH, recorded in the card) or from scratch."""
        model = build_model(card.architecture, **card.arch_kwargs)
        apply_init(model, card, init)
        return model

    def fit(self, model: torch.nn.Module, card: ModelCard, train_batches: Callable[[int], Iterable],
            step: Callable, evaluate: Callable[[torch.nn.Module], dict], *, n_train: int, monitor: str,
            mode: str = "max", warmup_steps: int | None = None, **config) -> Path:
        """:func:`fit` with this run's settings; returns ``best.ckpt``.

        ``n_train`` sizes an epoch when ``steps_per_epoch`` is not set; warmup defaults to
        ``min(20, steps per epoch)``; ``config`` holds further :class:`FitConfig` fields.
        """
        n_steps = self.steps(n_train)
        fit(model, card, train_batches, step, evaluate, FitConfig(
            out_dir=self.out_dir, epochs=self.epochs, lr=self.lr, steps_per_epoch=self.steps_per_epoch,
            monitor=monitor, mode=mode, patience=self.patience, resume=self.resume, progress=self.progress,
            warmup_steps=min(20, n_steps) if warmup_steps is None else warmup_steps,
            total_steps=self.epochs * n_steps, deadline=self.deadline, **config), self.device)
        return self.best

    def amend_best(self, model: torch.nn.Module, amend: Callable[[torch.nn.Module, ModelCard], None]) -> Path:
        """Load ``best.ckpt`` into ``model``, let ``amend(model, card)`` add to the card, save it back.

        Everything else in the checkpoint (epoch, history) is kept as :func:`fit` wrote it.
        """
        payload = load_checkpoint(self.best, self.device)
        model.load_state_dict(payload["state_dict"])
        card = ModelCard.from_dict(payload["card"])
        amend(model, card)
        save_checkpoint(self.best, model, card, **{k: v for k, v in payload.items() if k not in ("card", "state_dict")})
        return self.best


def in_chunks(items: Sequence, size: int, fn: Callable[[Sequence], Iterable], *, desc: str | None = None,
              progress: bool = False) -> list:
    """``fn`` over ``items`` ``size`` at a time, its per-item results in one list.

    The chunk size is the caller's: a model's batch can change the last bits of its
    outputs (kernels sum in another order), so each task keeps the size it validated with.
    """
    out: list = []
    with tqdm(total=len(items), desc=desc, disable=not progress, leave=False, dynamic_ncols=True) as bar:
        for start in range(0, len(items), size):
            part = items[start : start + size]
            out.extend(fn(part))
            bar.update(len(part))
    return out


def serve_records(pipeline, records: Sequence[Record], options: dict | None = None, *, chunk: int = 16,
                  progress: bool = True) -> list[dict | None]:
    """Each record's served answer, in order: the output dict, or ``None`` where the pipeline refused it.

    Files are decoded as the server decodes them and go through ``pipeline.predict`` with
    the request ``options`` (parsed once, shared by every item): input checks, the gate
    and the model, as a client would see them. A refusal (failed input check, enforced
    gate) is ``None``; tasks report how many there were beside their metrics.
    """
    parsed = pipeline.parse_options(dict(options or {}))

    def predict(part: Sequence[Record]) -> list[dict | None]:
        answers = pipeline.predict([Item(xray=read_file(r.path), options=parsed) for r in part])
        return [a if isinstance(a, dict) else None for a in answers]

    return in_chunks(list(records), chunk, predict, desc=f"{pipeline.name}: scoring", progress=progress)
