"""Adding a family is one folder: a throwaway family in a temporary package is built, served, benchmarked.

Nothing in the repository is touched: the family's package lives in a temporary folder,
joins the registry with :func:`cxrserve.families.register`, and the store builder, the
archive packer, the in-process server and the benchmark find it there.
"""
from __future__ import annotations

import json
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from cxrserve import families

PACKAGE = {
    "__init__.py": '''
        """A throwaway family: image brightness as a "score" (proves the one-folder recipe)."""
        from cxrserve.core.family import Family, Served

        FAMILY = Family(
            name="tiny", package=__name__, rank=999,
            served=(Served(name="cxr-tiny", pipeline="tinyfam.pipeline:TinyPipeline", components=("tiny",),
                           headline=("score",), title="Tiny"),),
            tasks={"tiny": "tinyfam.task"},
        )
    ''',
    "pipeline.py": '''
        from cxrserve.core.pipeline import Item, Pipeline


        class TinyPipeline(Pipeline):
            name = "cxr-tiny"
            components = ("tiny",)

            def _predict(self, items: list[Item]) -> list[dict]:
                part = self.parts["tiny"]
                outputs = self.run("tiny", [part.transform()(it.xray.uint8) for it in items])
                results = []
                for item, (score,) in zip(items, outputs):
                    out = self.base_response(item)
                    out["score"] = round(float(score[0]), 6)
                    results.append(out)
                return results
    ''',
    "architecture.py": '''
        import torch

        from cxrserve.models import register_model


        class MeanBrightness(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.linear = torch.nn.Linear(1, 1)

            def forward(self, x):
                return self.linear(x.mean(dim=(1, 2, 3))[:, None])


        @register_model("tiny_mean_brightness")
        def tiny_mean_brightness():
            return MeanBrightness()
    ''',
    "task.py": '''
        from pathlib import Path

        import numpy as np
        import torch

        from cxrserve.core.card import ModelCard
        from cxrserve.core.transforms import build_transform
        from cxrserve.models.checkpoint import save_checkpoint
        from cxrserve.training.common import ImageCache
        from tinyfam import architecture


        def train(records, out_dir, *, demo=False, version="0.1.0", **_):
            """Least squares of geographic extent on mean brightness: a model in milliseconds."""
            cache, transform = ImageCache(), build_transform("lungseg")
            scored = [r for r in records if r.geographic_extent is not None][:64]
            x = np.array([float(transform(cache.image(r)).mean()) for r in scored])
            y = np.array([r.geographic_extent for r in scored])
            slope, intercept = np.polyfit(x, y, 1)
            model = architecture.MeanBrightness()
            with torch.no_grad():
                model.linear.weight.fill_(float(slope))
                model.linear.bias.fill_(float(intercept))
            card = ModelCard(name="tiny", architecture="tiny_mean_brightness", task="regression",
                             preprocessing="lungseg", demo=demo, version=version)
            return save_checkpoint(Path(out_dir) / "best.ckpt", model, card)
    ''',
    "recipes.yaml": '''
        demo:
          tiny: {task: tiny, data: [train]}
    ''',
    "cxr-tiny.model-config.yaml": '''
        minWorkers: 1
        maxWorkers: 1
        batchSize: 2
        maxBatchDelay: 10
        deviceType: cpu
        handler: {backend: onnx, max_batch: 4}
    ''',
}


@pytest.fixture()
def tiny_family(tmp_path, monkeypatch):
    root = tmp_path / "src"
    package = root / "tinyfam"
    package.mkdir(parents=True)
    for name, text in PACKAGE.items():
        (package / name).write_text(textwrap.dedent(text).lstrip())
    monkeypatch.syspath_prepend(str(root))
    import tinyfam

    families.register(tinyfam.FAMILY)
    yield tinyfam.FAMILY
    from cxrserve.models import MODELS

    families.unregister("tiny")
    MODELS.pop("tiny_mean_brightness", None)
    for mod in [m for m in sys.modules if m == "tinyfam" or m.startswith("tinyfam.")]:
        del sys.modules[mod]


def _work(tmp_path: Path, repo_build: Path) -> Path:
    """A private work folder sharing the default store's phantoms and input gate (no retraining)."""
    work = tmp_path / "work"
    for sub in ("phantoms", "checkpoints/gate", "components/gate"):
        (work / sub).parent.mkdir(parents=True, exist_ok=True)
        (work / sub).symlink_to(repo_build / sub)
    return work


def test_a_new_family_builds_serves_and_benchmarks(model_store, tiny_family, tmp_path):
    from cxrserve.core.files import unpack_archive
    from cxrserve.core.pipeline import load_pipeline
    from cxrserve.packaging.store import StoreBuilder
    from cxrserve.synthetic.phantoms import render, sample_spec
    from cxrserve.tools.bench.cli import quick
    from cxrserve.tools.bench.suite import BenchOptions, run_suite
    import cv2

    def png_bytes(img: np.ndarray) -> bytes:
        return cv2.imencode(".png", img)[1].tobytes()

    repo_build = Path(__file__).resolve().parents[1] / "build"
    work, store = _work(tmp_path, repo_build), tmp_path / "store"
    assert "cxr-tiny" in families.served() and "tiny" in families.tasks()

    # built: trained from its recipe block, exported with parity, archived with only what serves
    (mar,) = StoreBuilder(store, work, progress=False).build(["cxr-tiny"])
    with zipfile.ZipFile(mar) as zf:
        names = zf.namelist()
    assert "tinyfam/pipeline.py" in names and "tinyfam/architecture.py" not in names
    assert "tinyfam/task.py" not in names and not [n for n in names if n.startswith("cxrserve/families/triage")]
    assert {"tiny/model.onnx", "gate/metadata.json", "pipeline.json"} <= set(names)

    # served in process from the unpacked archive alone
    folder = unpack_archive(mar, tmp_path / "unpacked")
    pipeline = load_pipeline(folder, device="cpu")
    clear, marked = (render(sample_spec(s, label=label, min_extent=0 if label == "normal" else 3))
                     for s, label in ((1, "normal"), (2, "pneumonia")))
    answers = [pipeline.predict_bytes(png_bytes(p.image)) for p in (clear, marked)]
    assert all(a["model"] == "cxr-tiny" and isinstance(a["score"], float) for a in answers)
    assert json.loads((folder / "pipeline.json").read_text())["pipeline_class"] == "tinyfam.pipeline:TinyPipeline"

    # benchmarked: naive loop, in process and ceiling, outputs equal
    opts = quick(BenchOptions(store=store, work=work, out=tmp_path / "bench", models=("cxr-tiny",),
                              skip=("decode", "torchserve", "growth"), progress=False))
    results = run_suite(opts)
    rows = results["models"]["cxr-tiny"]["rows"]
    assert {r["path"] for r in rows} >= {"naive", "in-process"}
    assert all(r["throughput"] > 0 for r in rows)
    assert all(r["max_abs_diff"] is not None and r["max_abs_diff"] < 1e-3 for r in rows if r["path"] == "in-process")


def test_a_failed_store_hook_leaves_no_component_that_looks_complete(model_store, tiny_family, tmp_path, monkeypatch):
    """An export whose post_export hook fails is exported again by the next build (resume)."""
    import tinyfam.task

    from cxrserve.packaging.store import StoreBuilder

    repo_build = Path(__file__).resolve().parents[1] / "build"
    work, store = _work(tmp_path, repo_build), tmp_path / "store"

    def failing_hook(folder, builder, settings=None):
        raise RuntimeError("hook failed")

    monkeypatch.setattr(tinyfam.task, "post_export", failing_hook, raising=False)
    with pytest.raises(RuntimeError, match="hook failed"):
        StoreBuilder(store, work, progress=False).build(["cxr-tiny"])
    assert not (work / "components" / "tiny" / "metadata.json").exists()
    monkeypatch.delattr(tinyfam.task, "post_export")
    (mar,) = StoreBuilder(store, work, progress=False).build(["cxr-tiny"])
    assert (work / "components" / "tiny" / "metadata.json").exists() and mar.exists()
