"""Checkpoints that carry their model card, so weights are never separated from meaning.

A checkpoint is a ``torch.save`` dict: ``card`` (a :class:`ModelCard` dict),
``state_dict``, and for resumable training ``optimizer``, ``scheduler``, ``epoch``,
``history`` and ``best``. :func:`load_model` rebuilds the network from the card's
architecture, so no caller needs to know which class made it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from cxrserve.core.card import ModelCard
from cxrserve.models import build_model


def save_checkpoint(path: str | Path, model: torch.nn.Module, card: ModelCard, **state) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"card": card.to_dict(), "state_dict": model.state_dict(), **state}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: an interrupted save never leaves a half-written checkpoint
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    return torch.load(Path(path), map_location=map_location, weights_only=False)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelCard]:
    """Rebuild a model in eval mode from a checkpoint and return it with its card."""
    payload = load_checkpoint(path, device)
    card = ModelCard.from_dict(payload["card"])
    model = build_model(card.architecture, **card.arch_kwargs)
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval(), card
