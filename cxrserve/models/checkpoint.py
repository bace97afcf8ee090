"""Checkpoints that carry their model card, so weights are never separated from meaning.

A checkpoint is a ``torch.save`` dict: ``card`` (a :class:`ModelCard` dict),
``state_dict``, and for resumable training ``optimizer``, ``scheduler``, ``epoch``,
``history`` and ``best``. :func:`load_model` rebuilds the network from the card's
architecture, so no caller needs to know which class made it.

Every value but the tensors is a plain type (dict, list, str, number, bool, None), so
checkpoints load with ``torch.load(weights_only=True)``: a checkpoint path comes from the
user (``store build --checkpoint``, ``train --set segmentation=PATH``, ``pool build``)
and a full unpickle would run whatever callable a crafted file names.
:func:`save_checkpoint` refuses to write anything else, so a checkpoint that trains for
an hour can always be read back.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from cxrserve.core.card import ModelCard
from cxrserve.models import build_model


class UnsafeCheckpoint(ValueError):
    """A checkpoint that needs more than tensors and plain types to load (possibly code)."""


def save_checkpoint(path: str | Path, model: torch.nn.Module, card: ModelCard, **state) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"card": card.to_dict(), "state_dict": model.state_dict(), **state}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    # Fail now, not when the checkpoint is next read: a numpy value or dataclass in the
    # card or state would make the file unloadable with weights_only=True.
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(tmp)
    if unsafe:
        tmp.unlink(missing_ok=True)
        raise TypeError(f"checkpoint {path.name} would hold non-plain objects {unsafe}: store plain types "
                        "(dict, list, str, int, float, bool, None) or tensors")
    tmp.replace(path)  # atomic: an interrupted save never leaves a half-written checkpoint
    return path


def safe_load(path: str | Path, map_location: str | torch.device = "cpu"):
    """``torch.load`` of a user-given file with ``weights_only=True`` (tensors and plain types only).

    A file that names any other global (``os.system`` in a crafted ``__reduce__``, a
    pickled class) is refused before anything in it is called.
    """
    try:
        return torch.load(Path(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message suggests weights_only=False; keep only the line naming the refused global.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = next((line for line in lines if "GLOBAL" in line), lines[-1] if lines else type(err).__name__)
        raise UnsafeCheckpoint(f"{path}: not a plain cxrserve checkpoint, refused to unpickle it "
                               f"({detail[:300]})") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    return safe_load(path, map_location)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelCard]:
    """Rebuild a model in eval mode from a checkpoint and return it with its card."""
    payload = load_checkpoint(path, device)
    card = ModelCard.from_dict(payload["card"])
    model = build_model(card.architecture, **card.arch_kwargs)
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval(), card
