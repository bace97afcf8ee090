"""Adding a family is one folder: a throwaway family in a temporary package is built, served,
benchmarked, and shown by every tool.

Nothing in the repository is touched: the family's package lives in a temporary folder,
joins the registry with :func:`cxrserve.families.register`, and the store builder, the
archive packer, the in-process server and the benchmark find it there; so do the DICOM
SR writer, ``cxrserve batch``'s CSV, ``cxrserve predict`` and the viewer, from the
family's own ``presentation.py``.
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
        from tinyfam import preprocessing  # noqa: F401  registers the pipeline its card names

        FAMILY = Family(
            name="tiny", package=__name__, rank=999, presentation="tinyfam.presentation:PRESENTATION",
            served=(Served(name="cxr-tiny", pipeline="tinyfam.pipeline:TinyPipeline", components=("tiny",),
                           headline=("score",), title="Tiny"),),
            tasks={"tiny": "tinyfam.task"},
        )
    ''',
    "pipeline.py": '''
        import base64

        import cv2

        from cxrserve.core.options import Option, parse_bool
        from cxrserve.core.item import Item
        from cxrserve.core.pipeline import Pipeline


        class TinyPipeline(Pipeline):
            name = "cxr-tiny"
            components = ("tiny",)
            OPTIONS = {"glow": Option(parse_bool, False, "the image in false colour (PNG)", picture=True)}

            def _predict(self, items: list[Item]) -> list[dict]:
                part = self.parts["tiny"]
                outputs = self.run("tiny", [part.transform()(it.xray.uint8) for it in items])
                results = []
                for item, (score,) in zip(items, outputs):
                    out = self.base_response(item)
                    out["score"] = round(float(score[0]), 6)
                    if item.options["glow"]:
                        glow = cv2.applyColorMap(item.xray.uint8, cv2.COLORMAP_JET)
                        out["glow_png"] = base64.b64encode(cv2.imencode(".png", glow)[1].tobytes()).decode()
                    results.append(out)
                return results
    ''',
    "preprocessing.py": '''
        from cxrserve.core.preprocessing import Preprocessing, register_preprocessing


        def _tiny():
            from cxrserve.core.transforms import Compose, Resize, ScaleIntensity, ToTensor

            return Compose([Resize(64), ScaleIntensity(1 / 255), ToTensor()])


        TINY = register_preprocessing(Preprocessing("tiny", 1, 64, 1, _tiny, (0.0, 1.0), "squash to 64, x/255, grey"))
    ''',
    "presentation.py": '''
        from cxrserve.core.family import NO_UNITS, CardLine, Num, Picture, Presentation, Report, private

        CODES = {"tiny_score": private("CXR9991", "Tiny brightness score"), "family_tiny": private("CXR9990", "Tiny")}
        PRESENTATION = Presentation(
            codes=CODES,
            reports={"cxr-tiny": Report(CODES["family_tiny"], (Num("score", CODES["tiny_score"], NO_UNITS),))},
            pictures={"cxr-tiny": (Picture("glow", "glow_png", "Tiny glow map", kind="sc-tiny", series_number=9990),)},
            cards={"cxr-tiny": (CardLine("headline", "tiny score {score:.3}"),)},
        )
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
            cache, transform = ImageCache(), build_transform("tiny")
            scored = [r for r in records if r.geographic_extent is not None][:64]
            x = np.array([float(transform(cache.image(r)).mean()) for r in scored])
            y = np.array([r.geographic_extent for r in scored])
            slope, intercept = np.polyfit(x, y, 1)
            model = architecture.MeanBrightness()
            with torch.no_grad():
                model.linear.weight.fill_(float(slope))
                model.linear.bias.fill_(float(intercept))
            card = ModelCard(name="tiny", architecture="tiny_mean_brightness", task="regression",
                             preprocessing="tiny", demo=demo, version=version)
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
    from cxrserve.core.preprocessing import PREPROCESSING
    from cxrserve.models import MODELS

    families.unregister("tiny")
    MODELS.pop("tiny_mean_brightness", None)
    PREPROCESSING.pop("tiny", None)
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
    from cxrserve.core.loading import load_pipeline
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


# --------------------------------------------------------------------------- shown by every tool
class TinyServer:
    """Answers ``POST /predictions/cxr-tiny`` with the tiny pipeline (options from ``X-CXR-*``),
    as TorchServe would; any other model is TorchServe's 404."""

    def __init__(self, pipeline):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path.rstrip("/") == "/predictions/cxr-tiny":
                    options = {k[len("X-CXR-"):].lower(): v for k, v in self.headers.items()
                               if k.upper().startswith("X-CXR-")}
                    status, answer = 200, pipeline.predict_bytes(body, options)
                else:
                    status, answer = 404, {"code": 404, "type": "ModelNotFoundException", "message": "not found"}
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_new_family_shows_in_the_sr_the_csv_the_client_and_the_viewer(model_store, tiny_family, tmp_path,
                                                                         capsys):
    """The tiny family's number and picture reach every tool from its own ``presentation.py``."""
    import argparse
    import csv
    import io
    import threading

    import cv2
    import highdicom as hd
    import pydicom
    import torch

    from cxrserve.core.files import unpack_archive
    from cxrserve.core.loading import load_pipeline
    from cxrserve.families.study.pipeline import StudyPipeline
    from cxrserve.packaging.store import StoreBuilder
    from cxrserve.synthetic.dicomwrite import to_dicom
    from cxrserve.synthetic.phantoms import render, sample_spec
    from cxrserve.tools import dicom_results
    from cxrserve.tools.client import cli as predict_cli
    from cxrserve.tools.dicom_results import response as dr_response
    from cxrserve.tools.batch.rows import headline_columns
    from cxrserve.tools.batch.run import run_batch
    from cxrserve.tools.batch.scorers import InProcessScorer

    repo_build = Path(__file__).resolve().parents[1] / "build"
    work, store = _work(tmp_path, repo_build), tmp_path / "store"
    (mar,) = StoreBuilder(store, work, progress=False).build(["cxr-tiny"])
    folder = unpack_archive(mar, tmp_path / "unpacked")
    tiny = load_pipeline(folder, device="cpu")
    image = render(sample_spec(3, label="pneumonia", min_extent=3)).image
    png = tmp_path / "in" / "study.png"
    png.parent.mkdir()
    png.write_bytes(cv2.imencode(".png", image)[1].tobytes())
    dicom = to_dicom(image, modality="CR", view_position="PA", patient_id="TINY-1")
    expected = tiny.predict_bytes(dicom, {"glow": True})

    # the composed study answers for it (the archive ships only its component: the others fail alone)
    study = StudyPipeline(folder, device=torch.device("cpu"), config=dict(tiny.config))  # its handler settings
    answer = study.predict_bytes(dicom, {"pictures": "true"})
    section = answer["results"]["tiny"]
    assert section["score"] == expected["score"] and section["glow_png"] == expected["glow_png"]

    # SR: its own measurement group and number, read back with highdicom; its picture as an SC
    objects = dicom_results.build_results(pydicom.dcmread(io.BytesIO(dicom)), answer)
    paths = dict(zip((dicom_results.kind_of(o) for o in objects),
                     dicom_results.write_results(objects, tmp_path / "dicom")))
    assert set(paths) == {"sr", "sc-tiny"}
    sr = hd.sr.srread(paths["sr"])
    groups = {g.finding_type.value: g for g in sr.content.get_image_measurement_groups()}
    (number,) = groups["CXR9990"].get_measurements()
    assert number.name.value == "CXR9991" and number.value == pytest.approx(expected["score"])
    sc = pydicom.dcmread(paths["sc-tiny"])
    assert sc.SeriesNumber == 9990 and "Tiny glow map" in sc.SeriesDescription
    assert np.array_equal(sc.pixel_array, dr_response.decode_png(expected["glow_png"])[..., :3])

    # batch CSV: its status and headline column
    out = tmp_path / "study.csv"
    summary = run_batch([png], out, in_process=InProcessScorer(study, {}), progress=False,
                        columns=headline_columns("cxr-study"))
    assert summary.ok == 1
    (row,) = csv.DictReader(out.open())
    assert row["tiny_status"] == "200"
    assert float(row["tiny_score"]) == tiny.predict_bytes(png.read_bytes())["score"]

    # the client: `cxrserve predict --glow` asks for its picture and saves it
    server = TinyServer(tiny)
    try:
        parser = argparse.ArgumentParser()
        predict_cli.register_cli(parser.add_subparsers())
        args = parser.parse_args(["predict", str(png), "--model", "cxr-tiny", "--glow", "--url", server.url,
                                  "--out", str(tmp_path / "predicted")])
        assert args.func(args) == 0
        printed = capsys.readouterr().out
        assert "study.png: cxr-tiny" in printed and "score: " in printed and "saved glow" in printed
        saved = json.loads((tmp_path / "predicted" / "summary.json").read_text())[0]["result"]
        assert saved["score"] == tiny.predict_bytes(png.read_bytes())["score"]
        assert cv2.imread(str(tmp_path / "predicted" / saved["glow_file"])).shape[:2] == image.shape[:2]

        # the viewer (Chromium): its card with the declared headline and picture
        chromium = Path("/usr/bin/chromium")
        if not chromium.exists():
            pytest.skip("Chromium from the OS packages is not installed (`make browser`): SR, CSV, client checked")
        sync_api = pytest.importorskip("playwright.sync_api")
        from cxrserve.tools.ui.config import UIConfig
        from cxrserve.tools.ui.server import make_server

        viewer = make_server(UIConfig(port=0, inference=server.url, management="http://127.0.0.1:9"))
        threading.Thread(target=viewer.serve_forever, daemon=True).start()
        try:
            with sync_api.sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=str(chromium), headless=True,
                                                     args=["--headless", "--no-sandbox", "--disable-gpu"])
                page = browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda err: errors.append(str(err)))
                page.goto(viewer.secret_url)
                page.wait_for_selector("#card-cxr-tiny[data-state='idle']")
                page.set_input_files("#image-file", str(png))
                page.click("#analyse")
                page.wait_for_selector("body[data-analysed='true']", timeout=120_000)
                assert page.get_attribute("#card-cxr-tiny", "data-state") == "done"
                score = tiny.predict_bytes(png.read_bytes())["score"]
                assert f"tiny score {score:.3f}" in page.inner_text("#card-cxr-tiny .headline")
                assert page.eval_on_selector("#card-cxr-tiny img[data-picture='glow']",
                                             "img => img.complete && img.naturalWidth > 0")
                assert errors == []
                browser.close()
        finally:
            viewer.shutdown()
            viewer.server_close()
    finally:
        server.close()
