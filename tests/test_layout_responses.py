"""The layout change kept every answer: the pre-layout code and today's give the same responses.

The last commit before the family layout (``PRE_LAYOUT``) is taken from git history,
its own store builder packs archives from the *same* exported components
(``build/components``), and its own pipeline code scores the same phantoms in a
subprocess; today's archives must answer identically, field by field.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import io
from pathlib import Path

import pytest

from cxrserve import families

REPO = Path(__file__).resolve().parents[1]
PRE_LAYOUT = "ff91df0"  # "Tests build their PHI-carrying DICOMs with dicomwrite.to_dicom ..."

OLD_SCORE = r'''
import json, sys, tempfile
from pathlib import Path
from cxrserve.store import StoreBuilder
from cxrserve.export import unpack_archive
from cxrserve.pipeline import load_pipeline
store, work, images = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
names = sys.argv[4].split(",")
builder = StoreBuilder(store, work, progress=False)
out = {}
for name in names:
    mar = builder.archive(name)
    folder = unpack_archive(mar, tempfile.mkdtemp(dir=store))  # removed with the test's tmp_path
    pipe = load_pipeline(folder, device="cpu")
    options = json.loads(sys.argv[5]).get(name, {})
    out[name] = [pipe.predict_bytes(Path(p).read_bytes(), options) for p in images]
print(json.dumps(out))
'''


def _old_tree(tmp: Path) -> Path:
    try:
        data = subprocess.run(["git", "archive", PRE_LAYOUT], cwd=REPO, capture_output=True, check=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError):
        pytest.skip(f"git history without {PRE_LAYOUT} (a shallow clone or an export)")
    root = tmp / "pre-layout"
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(root, filter="data")
    return root


@pytest.mark.slow
def test_responses_equal_the_pre_layout_code(model_store, pipeline, tmp_path):
    import cv2

    from cxrserve.synthetic.phantoms import render, sample_spec

    old = _old_tree(tmp_path)
    images = []
    for seed, label in ((5, "pneumonia"), (6, "normal"), (7, "covid19")):
        path = tmp_path / f"phantom{seed}.png"
        cv2.imwrite(str(path), render(sample_spec(seed, label=label)).image)
        images.append(str(path))
    names = sorted(n for n, (_, s) in families.served().items() if not s.compose)  # the pre-layout six
    options = {name: {s.picture_option: True} for name, (_, s) in families.served().items() if s.picture_option}
    # the old builder packs from today's exported components: symlink them into a private work folder
    work = tmp_path / "work"
    for sub in ("checkpoints", "components"):
        (work / sub).mkdir(parents=True)
        for entry in (REPO / "build" / sub).iterdir():
            (work / sub / entry.name).symlink_to(entry)
    (work / "phantoms").symlink_to(REPO / "build" / "phantoms")
    run = subprocess.run([sys.executable, "-c", OLD_SCORE, str(tmp_path / "old-store"), str(work),
                          json.dumps(images), ",".join(names), json.dumps(options)],
                         cwd=old, env={"PYTHONPATH": str(old), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    before = json.loads(run.stdout.strip().splitlines()[-1])
    for name in names:
        now = [pipeline(name).predict_bytes(Path(p).read_bytes(), options.get(name, {})) for p in images]
        assert now == before[name], f"{name}: responses differ from the pre-layout code"
