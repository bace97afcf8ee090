"""PXS (cxr-pxs): pool math, losses, the reference pool, the served model end to end.

Model tests use the model store under test (``$CXRSERVE_STORE`` or ``model_store``),
whose ``cxr-pxs`` is trained on phantoms; phantoms here are rendered in the test with
known opacity extent, so every expected value is exact ground truth.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cxrserve.core.card import ModelCard
from cxrserve.training.metrics import spearman
from cxrserve.synthetic.phantoms import PhantomSpec, render, write_dataset
from cxrserve.families.pxs.pipeline import (PoolError, ReferencePool, change_direction, leave_one_out_scores,
                                            percentiles, pxs_scores)
from cxrserve.families.pxs.pool import build_pool
from cxrserve.families.pxs.task import same_patient_pairs
from cxrserve.families.pxs.training import class_balanced_batches, contrastive_loss, severity, severity_pair_loss

MODEL = "cxr-pxs"


def png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return buf.tobytes()


def card(**overrides) -> ModelCard:
    fields = dict(name="pxs", architecture="siamese_densenet121", task="embedding", preprocessing="pxs",
                  thresholds={"change_pxs_delta": 1.0}, created="2020-01-01T00:00:00+00:00")
    fields.update(overrides)
    return ModelCard(**fields)


# --------------------------------------------------------------------------- pool math
@pytest.mark.parametrize("pool_size", [5, 6])  # odd and even: numpy's median averages the middle two
def test_pxs_is_the_numpy_median_distance_to_the_pool(pool_size):
    rng = np.random.default_rng(pool_size)
    pool, studies = rng.normal(size=(pool_size, 1000)), rng.normal(size=(3, 1000)) * 2
    expected = [np.median(np.linalg.norm(pool - s, axis=1)) for s in studies]
    got = pxs_scores(torch.tensor(studies, dtype=torch.float32), torch.tensor(pool, dtype=torch.float32))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_leave_one_out_scores_leave_each_image_out():
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(7, 16))
    expected = [np.median(np.linalg.norm(np.delete(pool, i, 0) - pool[i], axis=1)) for i in range(7)]
    np.testing.assert_allclose(leave_one_out_scores(torch.tensor(pool, dtype=torch.float32)).numpy(), expected,
                               rtol=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out_scores(torch.zeros(1, 16))


def test_percentile_is_the_share_of_pool_scores_at_or_below():
    reference = torch.tensor([4.0, 1.0, 3.0, 2.0])
    got = percentiles(torch.tensor([0.5, 1.0, 2.5, 4.0, 9.0]), reference)
    assert got.tolist() == [0.0, 25.0, 50.0, 100.0, 100.0]


@pytest.mark.parametrize("now, prior, expected", [
    (5.0, 3.0, "worse"), (3.0, 5.0, "better"), (3.5, 3.0, "stable"), (2.0, 3.0, "stable"), (4.01, 3.0, "worse"),
])
def test_change_direction_uses_the_threshold_both_ways(now, prior, expected):
    assert change_direction(now, prior, threshold=1.0) == expected


# --------------------------------------------------------------------------- losses
def test_contrastive_loss_pulls_same_pairs_together_and_pushes_different_pairs_to_the_margin():
    labels = torch.tensor([0, 0, 1, 1])
    collapsed = torch.zeros(4, 8, requires_grad=True)
    loss = contrastive_loss(collapsed, labels, margin=5.0)
    assert loss.item() == pytest.approx(0.5 * 25.0)  # same pairs free, different pairs pay margin^2
    loss.backward()
    assert torch.isfinite(collapsed.grad).all()  # finite gradient at zero distance
    separated = torch.tensor([[0.0] * 8, [0.0] * 8, [6.0] + [0.0] * 7, [6.0] + [0.0] * 7])
    assert contrastive_loss(separated, labels, margin=5.0).item() == pytest.approx(0.0, abs=1e-5)


def test_severity_pair_loss_is_zero_when_distances_equal_score_differences():
    scores = torch.tensor([0.0, 2.0, 5.5, 14.0])
    direction = torch.nn.functional.normalize(torch.randn(1000), dim=0)
    on_a_line = scores[:, None] * direction[None, :]
    assert severity_pair_loss(on_a_line, scores).item() == pytest.approx(0.0, abs=1e-4)
    assert severity_pair_loss(on_a_line * 2, scores).item() > 1.0


def test_class_balanced_batches_are_half_normal_half_abnormal():
    labels = np.array([0] * 30 + [1] * 6)
    for idx in class_balanced_batches(labels, 8, seed=0, epoch=1):
        assert len(idx) == 8 and (labels[idx] == 1).sum() == 4


# --------------------------------------------------------------------------- pool files
def test_pool_roundtrip_and_refusals(tmp_path):
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(6, 1000)).astype(np.float32)
    pool = ReferencePool.from_embeddings(emb, card=card(), image_hashes=[f"{i:064x}" for i in range(6)],
                                         source="test", backend="eager")
    pool.save(tmp_path)
    loaded = ReferencePool.load(tmp_path)
    np.testing.assert_array_equal(loaded.embeddings, emb)
    assert loaded.size == 6 and loaded.version == pool.version
    loaded.check_model(card())
    with pytest.raises(PoolError, match="another model"):
        loaded.check_model(card(version="9.9.9"))
    with open(tmp_path / "pool.npz", "wb") as fh:  # embeddings edited behind the provenance's back
        np.savez(fh, embeddings=emb * 2, loo_scores=pool.loo_scores)
    with pytest.raises(PoolError, match="does not match"):
        ReferencePool.load(tmp_path)
    with pytest.raises(PoolError, match="cxrserve pool build"):
        ReferencePool.load(tmp_path / "missing")


def test_severity_targets():
    from cxrserve.training.datasets import Record

    r = Record(path=Path("x.png"), source="s", label="covid", patient_id="1", geographic_extent=3.0, opacity=2.0)
    assert (severity(r), severity(r, "extent"), severity(r, "opacity")) == (5.0, 3.0, 2.0)
    with pytest.raises(ValueError, match="unknown target"):
        severity(r, "mrale")


# --------------------------------------------------------------------------- served model
def frontal(seed: int, extent: int, grade: int = 1, anatomy: int | None = None) -> np.ndarray:
    """A 320 px frontal phantom with bilateral opacity of extent band ``extent`` per lung."""
    spec = PhantomSpec(seed=seed, height=320, width=320, label="covid19" if extent else "normal",
                       extent=(extent, extent), opacity=(grade, grade) if extent else (0, 0), style="pa",
                       anatomy_seed=anatomy)
    return render(spec)


@pytest.fixture(scope="module")
def pxs(pipeline):
    return pipeline(MODEL)


@pytest.fixture(scope="module")
def extent_series():
    """Four patients x extent bands 0-4 per lung (geographic extent 0, 2, ..., 8): exact truth.

    Opacity grades 2-3 ("marked disease"), the population the demo recipe trains on;
    faint grade-1 haze is beyond a model trained for two minutes.
    """
    images, extents, patients = [], [], []
    for patient in range(4):
        for band in range(5):
            ph = frontal(seed=910_000 + 10 * patient + band, extent=band, grade=2 + patient % 2,
                         anatomy=910_000 + 10 * patient)
            images.append(ph.image)
            extents.append(ph.geographic_extent)
            patients.append(patient)
    return images, np.array(extents), np.array(patients)


def test_pxs_rises_with_known_opacity_extent(pxs, extent_series):
    """Spearman(PXS, extent) over 20 phantoms of 4 patients.

    Threshold 0.6: with 20 images and no association, Spearman's rho has sd about
    1 / sqrt(19) = 0.23, so 0.6 is 2.6 sd (one-sided p < 0.005) from chance. Within
    each patient (same anatomy, extent 0 -> 8) the most extensive study must score
    above the clear one, and the typical patient's series must be ordered (median
    rho >= 0.7: at most one or two swaps of neighbouring extents).
    """
    images, extents, patients = extent_series
    scores = np.array([pxs.predict_bytes(png(img))["pxs"] for img in images])
    assert spearman(scores, extents) >= 0.6, (scores.round(3).tolist(), extents.tolist())
    per_patient = []
    for patient in np.unique(patients):
        own = patients == patient
        clear, worst = scores[own][extents[own].argmin()], scores[own][extents[own].argmax()]
        assert worst > clear, (patient, scores[own].round(3).tolist())
        per_patient.append(spearman(scores[own], extents[own]))
    assert np.median(per_patient) >= 0.7, np.round(per_patient, 2).tolist()


def test_response_reports_pool_and_percentile(pxs):
    out = pxs.predict_bytes(png(frontal(seed=920_001, extent=3).image))
    assert out["model"] == MODEL
    assert out["pool"] == {"size": pxs.pool.size, "version": pxs.pool.version}
    assert pxs.pool.size >= 16
    assert 0.0 <= out["pxs_percentile"] <= 100.0
    loo = np.sort(pxs.pool.loo_scores)
    assert out["pxs_percentile"] == pytest.approx(100.0 * np.searchsorted(loo, out["pxs"], side="right") / len(loo),
                                                  abs=100.0 / len(loo))
    info = pxs.describe()
    assert info["pool"]["size"] == pxs.pool.size and "images" not in info["pool"]
    assert info["pool"]["model"]["name"] == "pxs" and info["pool"]["source"]
    assert info["change_threshold"] == pxs.parts["pxs"].card.thresholds["change_pxs_delta"]


def test_same_study_as_prior_is_no_change(pxs):
    data = png(frontal(seed=920_002, extent=2).image)
    out = pxs.predict_bytes(data, prior=data)
    assert out["change"]["distance"] == 0.0
    assert out["change"]["direction"] == "stable"
    assert out["prior"]["pxs"] == out["pxs"]


def test_handler_matches_in_process_scoring(unpacked, pxs):
    """The TorchServe handler (with a TorchServe-like context) against an independent numpy PXS."""
    import yaml
    from handlers_loader import handler_class
    from tsutil import HandlerContext

    from cxrserve.core.runtime import load_runtime
    from cxrserve.core.transforms import build_transform

    folder = unpacked(MODEL)
    config = yaml.safe_load((folder / "model-config.yaml").read_text())
    context = HandlerContext(model_dir=str(folder), model_yaml_config=config)
    handler = handler_class(folder)()
    handler.initialize(context)
    study, prior = frontal(seed=920_003, extent=3).image, frontal(seed=920_004, extent=1).image
    requests = [
        {"body": png(study)},
        {"data": b"not an image at all"},
        {"image": png(study), "prior": png(prior)},
        {"image": png(study), "prior": b"\x89PNG\r\n\x1a\n broken"},
    ]
    out = handler.handle(requests, context)
    assert len(out) == 4
    assert [context.status(i) for i in range(4)] == [200, 415, 200, 400]

    # Independent reference: the component's own runtime, numpy distances and median.
    component = folder / "pxs"
    backend = config["handler"]["backend"]
    runtime = load_runtime(component, backend, torch.device("cpu"))
    transform = build_transform(ModelCard.load(component / "metadata.json").preprocessing)
    emb = runtime(torch.stack([transform(study), transform(prior)]))[0]
    pool = np.load(component / "pool.npz")["embeddings"]
    expected = [float(np.median(np.linalg.norm(pool - e, axis=1))) for e in emb]
    assert out[0]["pxs"] == pytest.approx(expected[0], abs=2e-4)
    assert out[2]["pxs"] == out[0]["pxs"]
    assert out[2]["prior"]["pxs"] == pytest.approx(expected[1], abs=2e-4)
    assert out[2]["change"]["distance"] == pytest.approx(float(np.linalg.norm(emb[0] - emb[1])), abs=2e-4)
    assert out[2]["change"]["pxs_difference"] == pytest.approx(expected[0] - expected[1], abs=3e-4)
    in_process = pxs.predict_bytes(png(study), prior=png(prior))
    assert in_process["pxs"] == out[2]["pxs"] and in_process["change"] == out[2]["change"]
    assert handler.describe_handle()["pool"]["size"] == out[0]["pool"]["size"]


def test_pool_build_is_reproducible(unpacked, tmp_path):
    """Same images and weights -> identical embeddings and provenance, except the date."""
    data = write_dataset(tmp_path / "normals", 10, seed=930, label_mix=["normal", "covid19"], height=320, width=320)
    component = unpacked(MODEL) / "pxs"
    first = build_pool(component, data, tmp_path / "a", max_images=4, progress=False)
    second = build_pool(component, data / "labels.csv", tmp_path / "b", max_images=4, progress=False)
    np.testing.assert_array_equal(first.embeddings, second.embeddings)
    a, b = (json.loads((tmp_path / p / "pool.json").read_text()) for p in ("a", "b"))
    assert a.pop("created") and b.pop("created")
    assert a == b
    normals = sum(1 for line in (data / "labels.csv").read_text().splitlines()[1:] if ",normal," in line)
    assert a["size"] == min(4, normals)
    assert len({img["sha256"] for img in a["images"]}) == a["size"]
    assert a["model"] == json.loads((tmp_path / "a" / "pool.json").read_text())["model"]


def test_shipped_pool_matches_the_shipped_weights(unpacked):
    folder = unpacked(MODEL) / "pxs"
    pool = ReferencePool.load(folder)
    pool.check_model(ModelCard.load(folder / "metadata.json"))
    parity = json.loads((folder / "parity.json").read_text())
    assert parity["max_abs_diff"] <= 1e-4


def test_torchscript_and_onnx_embeddings_match_eager(tmp_path):
    """Export parity of the Siamese trunk on phantom inputs, at batch sizes the trace never saw."""
    from cxrserve.models.checkpoint import load_model, save_checkpoint
    from cxrserve.packaging.export import export_component
    from cxrserve.models import build_model
    from cxrserve.core.runtime import OnnxRuntime, TorchRuntime
    from cxrserve.core.transforms import build_transform

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "pxs.ckpt", build_model("siamese_densenet121").eval(), card())
    out = export_component(ckpt, tmp_path / "pxs")
    assert json.loads((out / "parity.json").read_text())["max_abs_diff"] <= 1e-4
    model, _ = load_model(ckpt)
    cpu = torch.device("cpu")
    transform = build_transform("pxs")
    x = torch.stack([transform(frontal(seed=940_000 + k, extent=k).image) for k in range(3)])
    eager = TorchRuntime(model, cpu)(x)[0]
    assert eager.shape == (3, 1000)
    for runtime in (TorchRuntime(torch.jit.load(str(out / "model.pt")), cpu, "torchscript"),
                    OnnxRuntime(out / "model.onnx", cpu)):
        for batch in (1, 3):
            np.testing.assert_allclose(runtime(x[:batch])[0], eager[:batch], atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- TorchServe
@pytest.mark.serve
def test_served_multipart_study_and_prior(served, pxs):
    import requests

    from schemas import validate

    study, prior = png(frontal(seed=950_001, extent=4).image), png(frontal(seed=950_002, extent=0).image)
    url = f"{served.inference}/predictions/{MODEL}"
    response = requests.post(url, files={"image": ("study.png", study), "prior": ("prior.png", prior)},
                             headers=served.headers(), timeout=300)
    assert response.status_code == 200, response.text
    body = response.json()
    validate(body, MODEL)
    expected = pxs.predict_bytes(study, prior=prior)
    assert body["pxs"] == pytest.approx(expected["pxs"], abs=1e-3)
    assert body["prior"]["pxs"] == pytest.approx(expected["prior"]["pxs"], abs=1e-3)
    assert body["change"]["distance"] == pytest.approx(expected["change"]["distance"], abs=1e-3)
    assert body["change"]["direction"] == expected["change"]["direction"]

    single = requests.post(url, data=study, headers={**served.headers(), "Content-Type": "application/octet-stream"},
                           timeout=300)
    assert single.status_code == 200 and "change" not in single.json()
    validate(single.json(), MODEL)

    bad_prior = requests.post(url, files={"image": ("study.png", study), "prior": ("prior.gif", b"GIF89a....")},
                              headers=served.headers(), timeout=300)
    assert bad_prior.status_code == 415, bad_prior.text
    assert bad_prior.json()["error"] == "unsupported_format"

    # The pool's size and provenance through TorchServe's describe API.
    described = requests.get(f"{served.management}/models/{MODEL}?customized=true",
                             headers=served.headers("management"), timeout=60)
    assert described.status_code == 200, described.text
    metadata = described.json()[0]["customizedMetadata"]
    metadata = json.loads(metadata) if isinstance(metadata, str) else metadata
    assert metadata["pool"]["size"] == body["pool"]["size"]
    assert metadata["pool"]["version"] == body["pool"]["version"]
    assert metadata["pool"]["model"]["version"] == metadata["components"]["pxs"]["version"]


# --------------------------------------------------------------------------- phantoms pairs
def test_same_patient_pairs_follow_study_order(tmp_path):
    from cxrserve.training.datasets import read_folder

    root = write_dataset(tmp_path / "pairs", 6, seed=960, studies_per_patient=3, label_mix=["covid19"],
                         height=64, width=64)
    records = read_folder(root)
    pairs = same_patient_pairs(records)
    assert len(pairs) == 2 * 3  # two patients, three pairs each
    for a, b in pairs:
        assert records[a].patient_id == records[b].patient_id and a < b


def test_bench_pool_growth_measures_the_served_pool(unpacked):
    """The family's bench extension (``Served.bench_growth``): PXS cost against pool size."""
    from cxrserve.families.pxs.bench import pool_growth

    growth = pool_growth(unpacked(MODEL), (8, 32), 0.3)
    assert growth["served_pool_size"] > 0
    assert [row["pool_size"] for row in growth["pool"]] == [8, 32]
    assert all(row["ms_per_study"] > 0 for row in growth["pool"])
