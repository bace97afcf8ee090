"""cxr-study: every family on one decode, each section exactly that family's own endpoint body."""
from __future__ import annotations

import csv
import json
import shutil

import cv2
import numpy as np
import pytest

from cxrserve.core.errors import CXRInputError
from cxrserve.synthetic.phantoms import render, sample_spec
from cxrserve.families.study.pipeline import StudyPipeline, family_classes
from schemas import validate

FAMILIES = list(family_classes())


def png(seed: int, kind: str = "frontal", size: int = 256) -> bytes:
    return cv2.imencode(".png", render(sample_spec(seed, kind=kind, height=size, width=size)).image)[1].tobytes()


@pytest.fixture(scope="module")
def study(pipeline):
    return pipeline("cxr-study")


@pytest.fixture(scope="module")
def images():
    return {"a": png(7101), "b": png(7102), "prior": png(7103)}


def single_scores(pipeline, key: str, files: list[dict], options: dict) -> list:
    """What ``cxr-<key>``'s own endpoint answers for a batch of requests (dicts or error bodies)."""
    single = pipeline(f"cxr-{key}")
    items = []
    for f in files:
        try:
            items.append(single.make_item(f, options))
        except CXRInputError as err:
            items.append(err)
    return [r.to_dict() if isinstance(r, CXRInputError) else r for r in single.predict(items)]


def test_registry_composes_the_study():
    assert FAMILIES == ["lungseg", "triage", "pxs", "severity", "mortality", "zeroshot"]
    assert "study" not in FAMILIES


def test_sections_equal_the_single_endpoints(study, pipeline, images):
    files = [{"image": images["a"], "prior": images["prior"]}, {"image": images["b"]}]
    out = study.predict(study.make_items([(f, {}) for f in files]))
    timings = study.timer.reset()
    for result in out:
        validate(result, "cxr-study")
        assert list(result["results"]) == FAMILIES
        assert result["model"] == "cxr-study" and result["input"]["width"] == 256
        assert not any(k.endswith("_png") for s in result["results"].values() for k in s)  # no pictures unasked
    for key in FAMILIES:
        # The study leaves pictures off; lungseg's own default (mask=true) is not a picture asked for.
        expected = single_scores(pipeline, key, files, {"mask": False} if key == "lungseg" else {})
        for result, want in zip(out, expected):
            assert result["results"][key] == want, key
    assert "change" in out[0]["results"]["pxs"] and "change" not in out[1]["results"]["pxs"]
    # one lung U-Net pass per batch (lungseg's), reused by triage; one gate pass
    assert "lungseg_model_lungseg" in timings and "triage_model_lungseg" not in timings
    assert "model_gate" in timings and not any(k.endswith("model_gate") and k != "model_gate" for k in timings)


def test_components_are_loaded_once(study):
    assert study.families["lungseg"].parts["lungseg"] is study.families["triage"].parts["lungseg"]
    gates = {id(f.gate) for f in study.families.values()}
    assert gates == {id(study.gate)}
    from pathlib import Path

    loaded = [Path(key[0]).name for key in study._shared_components if isinstance(key, tuple)]
    assert sorted(loaded) == sorted(["gate", "lungseg", "triage_classifier", "pxs", "severity", "mortality",
                                     "zeroshot"])  # each once, whatever the families' backends
    info = study.describe()
    assert set(info["families"]) == set(FAMILIES) and all(f["available"] for f in info["families"].values())
    for name in ("lungseg", "triage_classifier", "pxs", "severity", "mortality", "zeroshot"):
        assert info["components"][name]["version"]  # each component's card, once
    assert info["input_gate"]["card"]["name"] == "gate"


def test_pictures_only_when_asked(study, pipeline, images):
    wanted = {"lungseg": {"mask_png", "overlay_png"}, "triage": {"heatmap_png"}, "severity": {"saliency_png"},
              "mortality": {"overlay_png"}}

    def pictures(options):
        result = study.predict_bytes(images["a"], options)
        return {k: {f for f in s if f.endswith("_png")} for k, s in result["results"].items()
                if any(f.endswith("_png") for f in s)}, result

    got, result = pictures({"pictures": "true"})
    assert got == wanted
    for key, options in (("triage", {"heatmap": True}), ("lungseg", {"mask": True, "overlay": True}),
                         ("severity", {"saliency": True}), ("mortality", {"overlay": True})):
        assert result["results"][key] == single_scores(pipeline, key, [{"image": images["a"]}], options)[0], key
    assert pictures({"triage.heatmap": "true"})[0] == {"triage": {"heatmap_png"}}
    assert pictures({"overlay": "true"})[0] == {"lungseg": {"overlay_png"}, "mortality": {"overlay_png"}}
    assert pictures({"pictures": "true", "lungseg.mask": "false", "severity.saliency": "false"})[0] == {
        "lungseg": {"overlay_png"}, "triage": {"heatmap_png"}, "mortality": {"overlay_png"}}


def test_models_option_selects_families(study, images):
    result = study.predict_bytes(images["a"], {"models": "severity,cxr-triage"})
    assert list(result["results"]) == ["triage", "severity"]  # registry order, cxr- prefix accepted
    assert set(result["timings_ms"]) == {"decode", "gate", "triage", "severity"}
    with pytest.raises(CXRInputError) as err:
        study.make_item({"image": images["a"]}, {"models": "triage,radiologist"})
    assert err.value.status == 400 and "radiologist" in err.value.message


def test_a_failing_family_answers_in_its_section(study, pipeline, images):
    labels = "x" * 300  # zero-shot: label longer than 200 characters -> that endpoint's 400
    result = study.predict_bytes(images["a"], {"labels": labels})
    section = result["results"]["zeroshot"]
    assert section["status"] == 400 and section["error"] == "malformed_input" and "labels" in section["message"]
    assert section == single_scores(pipeline, "zeroshot", [{"image": images["a"]}], {"labels": labels})[0]
    for key in FAMILIES[:-1]:
        assert "error" not in result["results"][key], key
    validate(result, "cxr-study")


def test_a_family_that_cannot_load_is_unavailable_not_fatal(unpacked, study, images, tmp_path):
    folder = unpacked("cxr-study")
    broken = tmp_path / "study"
    broken.mkdir()
    for entry in folder.iterdir():
        if entry.name != "pxs":
            (broken / entry.name).symlink_to(entry)
    shutil.copytree(folder / "pxs", broken / "pxs", ignore=shutil.ignore_patterns("pool.*"))  # no reference pool
    bad = StudyPipeline(broken, config=study.config, shared=dict(study._shared_components))
    assert set(bad.unavailable) == {"pxs"} and "pool" in bad.unavailable["pxs"]
    assert str(broken) not in bad.unavailable["pxs"]
    result = bad.predict_bytes(images["a"], {"models": "pxs,severity"})
    assert result["results"]["pxs"]["status"] == 503 and result["results"]["pxs"]["error"] == "model_unavailable"
    assert result["results"]["severity"] == study.predict_bytes(images["a"], {"models": "severity"})["results"]["severity"]
    validate(result, "cxr-study")
    assert bad.describe()["families"]["pxs"]["available"] is False


def test_decode_and_gate_failures_fail_the_whole_request(study, images):
    strict = StudyPipeline(study.model_dir, config={**study.config, "gate_enforce": "true"},
                           shared=dict(study._shared_components))
    garbage = np.random.default_rng(0).bytes(3000)
    items = strict.make_items([({"image": images["a"]}, {}), ({"image": garbage}, {}),
                               ({"image": png(7104, kind="knee")}, {}),
                               ({"image": images["b"], "prior": png(7105, kind="knee")}, {}),
                               ({"image": images["b"], "prior": garbage}, {})])
    out = strict.predict(items)
    assert isinstance(out[0], dict) and "error" not in out[0]["results"]["triage"]
    assert isinstance(out[1], CXRInputError) and out[1].status == 415
    assert isinstance(out[2], CXRInputError) and out[2].status == 422 and out[2].code == "not_frontal_cxr"
    # A bad prior only fails the family that reads it, with the status its endpoint gives.
    for result, status in ((out[3], 422), (out[4], 415)):
        assert result["results"]["pxs"]["status"] == status
        assert all("error" not in s for k, s in result["results"].items() if k != "pxs")


def test_handler_batch_keeps_each_request_status(unpacked, study, images):
    from handlers_loader import handler_class
    from tsutil import HandlerContext

    folder = unpacked("cxr-study")
    context = HandlerContext(str(folder), headers=[{}, {"X-CXR-Models": "triage"}, {}])
    handler = handler_class(folder)()
    handler.pipeline = study  # the handler's own load is what the served test covers
    handler.context, handler.initialized = context, True
    out = handler.handle([{"body": images["a"]}, {"body": images["b"]}, {"body": b"not an image at all"}], context)
    assert [context.status(i) for i in range(3)] == [200, 200, 415]
    from cxrserve.core.servemetrics import batch_metrics

    outputs = {dict(r.dims).get("Output") for r in batch_metrics(out[:1], {}, study.score_maps) if r.name == "CXRScore"}
    assert {"triage.probabilities.covid19", "severity.opacity", "mortality.risk"} <= outputs
    assert list(out[0]["results"]) == FAMILIES and list(out[1]["results"]) == ["triage"]
    # KServe v2 (TorchServe's kservev2 envelope): one study's named inputs, options included
    import base64

    v2 = [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(images["a"]).decode()]},
          {"name": "models", "datatype": "BYTES", "shape": [1], "data": ["severity"]}]
    context = HandlerContext(str(folder))
    handler.context = context
    (answer,) = handler.handle(v2, context)
    assert context.status(0) == 200 and list(answer["results"]) == ["severity"]
    assert answer["results"]["severity"] == out[0]["results"]["severity"]


def test_batch_writes_every_familys_headline_columns(study, images, tmp_path):
    from cxrserve.tools.batch.rows import headline_columns
    from cxrserve.tools.batch.run import run_batch
    from cxrserve.tools.batch.scorers import InProcessScorer

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(images["a"])
    (folder / "b.png").write_bytes(images["b"])
    (folder / "c.png").write_bytes(b"not an image")
    out = tmp_path / "study.csv"
    summary = run_batch(sorted(folder.iterdir()), out, in_process=InProcessScorer(study, {}), progress=False,
                        columns=headline_columns("cxr-study"))
    assert summary.ok == 2 and summary.errors == 1
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 3
    for column in ("triage_label", "triage_probabilities_covid19", "pxs_pxs", "severity_geographic_extent",
                   "severity_opacity", "mortality_risk", "zeroshot_probabilities_Pneumonia", "lungseg_status"):
        assert column in rows[0] and column in headline_columns("cxr-study")
    for row in rows:
        if row["status"] != "200":
            assert row["status"] == "415" and row["triage_label"] == ""
            continue
        full = json.loads(row["result"])["results"]
        assert row["triage_label"] == full["triage"]["label"]
        assert float(row["severity_opacity"]) == full["severity"]["opacity"]
        assert float(row["zeroshot_probabilities_Pneumonia"]) == full["zeroshot"]["probabilities"]["Pneumonia"]


@pytest.mark.shared_data
@pytest.mark.slow
def test_sections_equal_the_single_endpoints_on_real_dicoms(study, pipeline, shared_data):
    root = shared_data / "dicom_samples"
    dicoms = sorted(root.glob("chest/*.dcm"))[:2] + sorted(root.glob("non_chest/*.dcm"))[:1]
    if not dicoms:
        pytest.skip("no DICOMs in ../shared/data/dicom_samples")
    files = [{"image": p.read_bytes()} for p in dicoms]
    out = study.predict(study.make_items([(f, {}) for f in files]))
    for key in FAMILIES:
        expected = single_scores(pipeline, key, files, {"mask": False} if key == "lungseg" else {})
        for result, want in zip(out, expected):
            if isinstance(result, CXRInputError):  # the study refuses exactly what every endpoint refuses
                assert want == result.to_dict()
            else:
                assert result["results"][key] == want, (key, result["input"])


@pytest.mark.serve
@pytest.mark.slow
def test_served_study_over_rest(model_store, study, images, tmp_path):
    """One TorchServe worker serving only cxr-study: the REST body is the in-process one."""
    from cxrserve.tools import server
    from tsutil import start_torchserve

    store = tmp_path / "store"
    store.mkdir()
    (store / "cxr-study.mar").symlink_to((model_store / "cxr-study.mar").resolve())
    served = start_torchserve(store, tmp_path / "ts")
    try:
        assert served.models == ["cxr-study"]
        r = served.post("cxr-study", images["a"], headers={"X-CXR-Triage.Heatmap": "true"})
        assert r.status_code == 200, r.text
        body = r.json()
        validate(body, "cxr-study")
        local = study.predict_bytes(images["a"], {"triage.heatmap": "true"})
        for key in FAMILIES:
            assert body["results"][key] == local["results"][key], key
        assert served.post("cxr-study", b"definitely not an image").status_code == 415
    finally:
        server.stop(tmp_path / "ts")


def test_predict_cli_output_for_a_study(study, images, tmp_path):
    """``cxrserve predict`` (default model cxr-study): one block per family, section pictures saved."""
    from cxrserve.tools.client.cli import _saved_files, format_human, save_pngs

    result = study.predict_bytes(images["a"], {"pictures": "true", "labels": "x" * 300})
    saved = save_pngs(result, tmp_path, "000_a")
    files = dict(_saved_files(saved))
    assert set(files) == {"lungseg.mask_file", "lungseg.overlay_file", "triage.heatmap_file",
                          "severity.saliency_file", "mortality.overlay_file"}
    assert all((tmp_path / name).read_bytes()[:4] == b"\x89PNG" for name in files.values())
    text = format_human("a.png", saved)
    assert text.startswith("a.png: cxr-study")
    assert "  triage:\n    label: " in text and "    geographic_extent: " in text
    assert "  zeroshot: error 400 malformed_input" in text


def test_store_builds_the_study_from_the_family_components(tmp_path):
    """No second export: the study ships the union of the families' components, each in the
    formats its family already needs, and each family's handler settings."""
    from cxrserve import families as registry
    from cxrserve.packaging.store import StoreBuilder

    builder = StoreBuilder(tmp_path / "store", tmp_path / "work", progress=False)
    families = {n: s for n, s in builder.archives.items() if not s.compose}
    assert set(builder.archive_components("cxr-study")) == {c for n in families for c in builder.archive_components(n)}
    alone = StoreBuilder(tmp_path / "store", tmp_path / "work", progress=False)
    alone.archives = families
    for component in builder.archive_components("cxr-study"):
        assert builder.formats(component) == alone.formats(component), component
    configs = {n: builder.model_config(n) for n in families}
    study_config = StudyPipeline.archive_config(builder.model_config("cxr-study"), configs)
    assert study_config["handler"]["families"] == {n.removeprefix("cxr-"): c["handler"] for n, c in configs.items()}
    # the archive carries every composed family's serving code, and no training or tools code
    from cxrserve.packaging.export import archive_files

    files = archive_files(builder.archives["cxr-study"].pipeline, registry.composed_pipelines("cxr-study"))
    assert all(f"cxrserve/families/{f}/pipeline.py" in files for f in ("triage", "pxs", "severity", "mortality", "zeroshot"))
    assert not [f for f in files if "/tools/" in f or "/training/" in f or "/task" in f]


def test_describe_is_json(study):
    info = json.loads(json.dumps(study.describe()))
    assert info["model"] == "cxr-study" and info["families"]["severity"]["backend"] == "torchscript"


@pytest.mark.serve
@pytest.mark.shared_data
def test_one_curl_of_a_real_dicom_equals_the_six_endpoints(served, shared_data):
    """The issue's check, over TorchServe REST: cxr-study vs each single-model endpoint."""
    if "cxr-study" not in served.models:
        pytest.skip("the store under test has no cxr-study.mar")
    dicom = sorted((shared_data / "dicom_samples").glob("chest/*.dcm"))
    if not dicom:
        pytest.skip("no chest DICOMs in ../shared/data/dicom_samples")
    data = dicom[0].read_bytes()
    headers = {"Content-Type": "application/dicom"}
    r = served.post("cxr-study", data, headers=headers, timeout=300)
    assert r.status_code == 200, r.text
    study = r.json()
    validate(study, "cxr-study")
    for key in FAMILIES:
        if f"cxr-{key}" not in served.models:
            continue
        extra = {"X-CXR-Mask": "false"} if key == "lungseg" else {}
        single = served.post(f"cxr-{key}", data, headers={**headers, **extra}, timeout=300)
        assert single.status_code == 200, (key, single.text)
        assert study["results"][key] == single.json(), key


def test_bench_row_against_the_six_call_loop(model_store, tmp_path):
    """``cxrserve bench``'s study row: naive six-call loop, single pipelines and the study on the
    same inputs, the same outputs, and the one headline line the issue asks for."""
    import re

    from cxrserve.families.study.bench import suite_section

    section = suite_section(model_store, model_store.parent / "build", cache=tmp_path / "cache", size=256, n=2,
                            seconds=0.5, torchserve=False, clients=(4,), progress=lambda *_: None)
    cases = [r["case"] for r in section["rows"]]
    assert cases[0] == "naive six-call loop" and any(c.startswith("cxr-study in process") for c in cases)
    assert all(r.get("max_abs_diff_vs_naive") is None or r["max_abs_diff_vs_naive"] < 1e-3 for r in section["rows"])
    assert re.fullmatch(r"study: [\d.]+ studies/s vs naive [\d.]+ studies/s \([\d.]+x\)", section["headline"])


def test_model_free_input_checks_apply_to_the_study(study):
    """A colour picture is the same 422 for the study as for every endpoint (before any model)."""
    rng = np.random.default_rng(3)
    colour = cv2.imencode(".png", rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))[1].tobytes()
    with pytest.raises(CXRInputError) as err:
        study.predict_bytes(colour)
    assert err.value.status == 422 and err.value.code == "colour_image"
