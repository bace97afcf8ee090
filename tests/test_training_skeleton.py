"""The shared training skeleton: the deadline is a FitConfig field, runs seed and size one way, records are served in chunks."""
from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
import torch

from cxrserve.core.card import ModelCard
from cxrserve.training.datasets import Record
from cxrserve.training.skeleton import Run, in_chunks, serve_records
from cxrserve.training.trainer import FitConfig, fit


def _tiny_fit(out_dir, **config) -> list[dict]:
    """Three epochs of a linear model on constant data; returns the history fit wrote."""
    import json

    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    card = ModelCard(name="tiny", architecture="none", task="regression", preprocessing="lungseg")
    data = [(torch.ones(4, 2), torch.zeros(4, 1))] * 2

    def step(model, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)

    fit(model, card, lambda epoch: data, step, lambda model: {"val_loss": float(model.bias.abs().sum())},
        FitConfig(out_dir=out_dir, epochs=3, progress=False, patience=10, **config))
    return json.loads((out_dir / "history.json").read_text())


def test_fit_starts_no_epoch_past_its_deadline(tmp_path):
    stopped = _tiny_fit(tmp_path / "past", deadline=time.time() - 1)
    assert [h["epoch"] for h in stopped] == [1]  # the first epoch always runs: it measures an epoch's length
    assert (tmp_path / "past" / "best.ckpt").exists()
    assert len(_tiny_fit(tmp_path / "later", deadline=time.time() + 3600)) == 3


def test_the_deadline_no_longer_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRSERVE_TRAIN_DEADLINE", str(time.time() - 1))
    assert len(_tiny_fit(tmp_path / "run")) == 3


def test_run_seeds_torch_and_sizes_epochs(tmp_path):
    first = Run.start(tmp_path, device="cpu", seed=7, batch_size=4)
    a = torch.rand(3)
    Run.start(tmp_path, device="cpu", seed=7)
    assert torch.equal(a, torch.rand(3))
    assert first.device == torch.device("cpu") and first.best == tmp_path / "best.ckpt"
    assert first.steps(10) == 2 and first.steps(2) == 1  # a pass in whole batches, never zero
    assert Run(tmp_path, torch.device("cpu"), steps_per_epoch=5).steps(1000) == 5
    assert [len(b) for b in first.batches(10, epoch=0)] == [4, 4]
    assert not all(np.array_equal(x, y) for x, y in zip(first.batches(10, 0), first.batches(10, 1)))


def test_in_chunks_keeps_order_and_chunk_size():
    seen = []

    def double(part):
        seen.append(len(part))
        return [2 * v for v in part]

    assert in_chunks(list(range(7)), 3, double) == [0, 2, 4, 6, 8, 10, 12]
    assert seen == [3, 3, 1]
    assert in_chunks([], 3, double) == []


class _Pipeline:
    """Answers like a served pipeline: refuses (an error object) every film whose file name says so."""

    name = "cxr-fake"

    def __init__(self):
        self.parsed, self.batches = [], []

    def parse_options(self, raw):
        self.parsed.append(raw)
        return {"parsed": dict(raw)}

    def predict(self, items):
        self.batches.append(len(items))
        return [ValueError("refused") if item.xray.uint8.mean() > 128 else
                {"mean": float(item.xray.uint8.mean()), "options": item.options} for item in items]


def test_serve_records_answers_each_record_in_order(tmp_path):
    records = []
    for k, value in enumerate([10, 200, 30, 40, 250]):  # bright films are refused by the fake pipeline
        path = tmp_path / f"{k}.png"
        cv2.imwrite(str(path), np.full((32, 32), value, np.uint8))
        records.append(Record(path=path, source="s", label="x", patient_id=str(k)))
    pipeline = _Pipeline()
    answers = serve_records(pipeline, records, {"labels": ["a"]}, chunk=2, progress=False)
    assert [a and a["mean"] for a in answers] == [10.0, None, 30.0, 40.0, None]
    assert pipeline.batches == [2, 2, 1]
    assert pipeline.parsed == [{"labels": ["a"]}]  # parsed once, the same options for every item
    assert answers[0]["options"] == {"parsed": {"labels": ["a"]}}


@pytest.mark.parametrize("settings", [{}, {"epochs": 2, "patience": 1}])
def test_run_fit_passes_the_deadline_and_schedule(tmp_path, monkeypatch, settings):
    import cxrserve.training.skeleton as skeleton

    got = {}
    monkeypatch.setattr(skeleton, "fit", lambda *args: got.update(config=args[5], device=args[6]))
    run = Run(tmp_path, torch.device("cpu"), batch_size=4, deadline=123.0, **settings)
    assert run.fit(None, None, None, None, None, n_train=50, monitor="val_auc") == tmp_path / "best.ckpt"
    config = got["config"]
    assert config.deadline == 123.0 and config.monitor == "val_auc" and config.mode == "max"
    assert config.total_steps == run.epochs * 12 and config.warmup_steps == 12
    assert config.patience == run.patience and config.out_dir == tmp_path
