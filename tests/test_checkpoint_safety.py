"""Checkpoints are read with ``torch.load(weights_only=True)``: a crafted file runs no code.

Checkpoint paths come from the user (``store build --checkpoint``, ``train --set
segmentation=PATH``, ``pool build``). Each public function that reads one is given a
checkpoint whose pickle calls ``os.system("touch <marker>")`` through ``__reduce__``;
with ``weights_only=False`` (the old code) the marker appeared. A real checkpoint (one
made here, and the demo store's under ``build/`` when it has been built) still loads.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cxrserve.core.card import ModelCard
from cxrserve.models import build_model
from cxrserve.models.checkpoint import UnsafeCheckpoint, load_checkpoint, load_model, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


class RunsAShellCommand:
    """Unpickling this calls ``os.system(command)``: what a crafted checkpoint carries."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def small_card() -> ModelCard:
    return ModelCard(name="gate", architecture="gate_cnn", task="gate", preprocessing="gate",
                     labels=["other", "frontal_cxr"], arch_kwargs={"num_classes": 2, "in_channels": 1})


def small_model() -> torch.nn.Module:
    return build_model("gate_cnn", num_classes=2, in_channels=1).eval()


@pytest.fixture()
def crafted(tmp_path):
    """A checkpoint that looks like a real one (card, weights) plus the payload; and its marker."""
    marker = tmp_path / "pwned"
    path = tmp_path / "crafted.ckpt"
    torch.save({"card": small_card().to_dict(), "state_dict": small_model().state_dict(),
                "history": [RunsAShellCommand(f"touch {marker}")]}, path)
    return path, marker


def _mark_real(path):
    from cxrserve.packaging.real_store import RealStoreBuilder

    RealStoreBuilder._mark_real(SimpleNamespace(version="0.2.0-real"), path)


def _card(path):
    from cxrserve.packaging.real_eval import checkpoint_card as _card

    return _card(path)


def _export(path):
    from cxrserve.packaging.export import export_component

    return export_component(path, path.parent / "exported", formats=("torchscript",))


def _pool_embedder(path):
    from cxrserve.families.pxs.pool import load_embedder

    return load_embedder(path)


LOADERS = {
    "load_checkpoint": load_checkpoint,  # trainer resume, mortality/severity/pxs tasks
    "load_model": load_model,  # train --set segmentation=PATH, bench naive
    "export_component": _export,  # store build --checkpoint NAME=PATH
    "real_eval.checkpoint_card": _card,  # store build --data: evaluation
    "real_store._mark_real": _mark_real,  # store build --data: the card says real
    "pxs pool load_embedder": _pool_embedder,  # pool build --model PATH
}


@pytest.mark.parametrize("name", list(LOADERS))
def test_a_crafted_checkpoint_runs_no_code(crafted, name):
    path, marker = crafted
    with pytest.raises(UnsafeCheckpoint, match="posix.system|os.system"):
        LOADERS[name](path)
    assert not marker.exists(), f"{name} ran the checkpoint's shell command"


def test_a_real_checkpoint_still_loads(tmp_path):
    model = small_model()
    path = save_checkpoint(tmp_path / "best.ckpt", model, small_card(), epoch=3,
                           history=[{"epoch": 1, "val_auc": 0.5}], best=0.5,
                           optimizer=torch.optim.AdamW(model.parameters()).state_dict())
    loaded, card = load_model(path)
    assert card.labels == ["other", "frontal_cxr"]
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert load_checkpoint(path)["history"] == [{"epoch": 1, "val_auc": 0.5}]


def test_saving_refuses_what_could_not_be_loaded_back(tmp_path):
    # A numpy value in the state would make the checkpoint unloadable with weights_only=True:
    # the error comes at save (first epoch), not an hour later when the store is built.
    with pytest.raises(TypeError, match="numpy"):
        save_checkpoint(tmp_path / "best.ckpt", small_model(), small_card(), best=np.float64(0.5))
    assert not list(tmp_path.iterdir())


DEMO = sorted((REPO / "build" / "checkpoints").glob("*/best.ckpt"))  # last.ckpt goes once DONE


@pytest.mark.skipif(not DEMO, reason="the demo store's checkpoints are not built (make store)")
@pytest.mark.parametrize("path", DEMO, ids=[f"{p.parent.name}/{p.name}" for p in DEMO])
def test_the_demo_store_checkpoints_load(path):
    payload = load_checkpoint(path)
    ModelCard.from_dict(payload["card"])
    assert payload["state_dict"]
