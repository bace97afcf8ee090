"""The default store's demo lung and triage models, measured on phantoms they never saw."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cxrserve.training.datasets import read_folder
from cxrserve.synthetic.phantoms import write_dataset
from cxrserve.families.triage import task_lungseg as lungseg_task
from cxrserve.families.triage import task_triage as triage_task


@pytest.fixture(scope="module")
def fresh_phantoms(tmp_path_factory):
    """New seeds, same distribution as the demo recipe (marked disease)."""
    root = write_dataset(tmp_path_factory.mktemp("fresh") / "ph", 60, seed=424242, height=320, width=320,
                         min_extent=2)
    return read_folder(root)


def test_lung_dice_on_fresh_phantoms(pipeline, fresh_phantoms):
    report = lungseg_task.evaluate(pipeline("cxr-lungseg"), fresh_phantoms)
    assert report["n"] == 60
    assert report["dice"] > 0.90, report


def test_triage_beats_chance_clearly_on_fresh_phantoms(pipeline, fresh_phantoms):
    report = triage_task.evaluate(pipeline("cxr-triage"), fresh_phantoms)
    # Three balanced classes: chance is 0.33. The demo trains for ~100 steps (~1 min on
    # 2 cores) and reaches ~0.75 on its own validation phantoms; 0.6 leaves room for
    # sampling noise on 60 images while still failing a model that learned nothing.
    assert report["accuracy"] > 0.6, report
    assert report["crop_rate"] > 0.9  # the chain really uses the lung crop
    assert set(report["per_class"]) == {"covid19", "normal", "pneumonia"}


def test_eval_command_writes_metrics_json(unpacked, fresh_phantoms, tmp_path):
    folder = fresh_phantoms[0].path.parents[1]
    out = tmp_path / "metrics.json"
    result = subprocess.run(
        [sys.executable, "-m", "cxrserve", "eval", "triage", "--model", str(unpacked("cxr-triage")),
         "--data", str(folder), "--split", "val", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads(out.read_text())
    assert metrics["split"] == "val" and 0 < metrics["n"] < 60
    assert "confusion_matrix" in metrics and "by_source" in metrics


def test_archive_serves_without_this_repository(unpacked, tmp_path):
    """The .mar carries its own cxrserve: a fresh interpreter uses that copy, not ours."""
    import cv2

    from cxrserve.synthetic.phantoms import render, sample_spec

    folder = unpacked("cxr-triage")
    study = tmp_path / "study.png"
    cv2.imwrite(str(study), render(sample_spec(1)).image)
    code = (
        "import sys, json; sys.path.insert(0, {folder!r});"
        "import cxrserve; assert cxrserve.__file__.startswith({folder!r}), cxrserve.__file__;"
        "from cxrserve.core.loading import load_pipeline;"
        "out = load_pipeline({folder!r}, device='cpu').predict_bytes(open({study!r}, 'rb').read());"
        "print(json.dumps(out['probabilities']))"
    ).format(folder=str(folder), study=str(study))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert set(json.loads(result.stdout.strip().splitlines()[-1])) == {"covid19", "normal", "pneumonia"}
