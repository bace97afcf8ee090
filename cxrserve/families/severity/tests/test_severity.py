"""Severity building blocks: score maps, saliency geometry and blur, targets, Table 1, export."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from cxrserve.core.card import ModelCard
from cxrserve.models.checkpoint import save_checkpoint
from cxrserve.training.datasets import Record
from cxrserve.packaging.export import example_input, export_component
from cxrserve.models import build_model
from cxrserve.models.xrv import XRV_PATHOLOGIES, op_norm
from cxrserve.families.severity.pipeline import ScoreMap, blur_saliency, center_square_box, input_gradients, score_maps
from cxrserve.families.severity.task import fit_linear, table1, xrv_targets
from cxrserve.core.transforms import CenterCropSquare
from cxrserve.families.severity.pipeline import load_template

LABELS = list(XRV_PATHOLOGIES)
LO = LABELS.index("Lung Opacity")


def paper_maps() -> dict:
    return load_template()["extra"]["score_maps"]


@pytest.mark.parametrize("logit, extent, opacity", [
    (0.0, 3.4137437, 2.5535977),
    (1.0, 0.8705248 + 3.4137437, 0.5484423 + 2.5535977),
    (-10.0, 0.0, 0.0),  # clamped at the bottom of both ranges
    (10.0, 8.0, 6.0),  # and at the top
])
def test_published_maps_give_the_papers_scores(logit, extent, opacity):
    logits = np.zeros(18)
    logits[LO] = logit
    maps = {name: ScoreMap(spec, LABELS) for name, spec in paper_maps().items()}
    assert maps["geographic_extent"](logits) == pytest.approx(extent)
    assert maps["opacity"](logits) == pytest.approx(opacity)


def test_a_card_without_maps_is_refused_with_the_fix():
    card = ModelCard(name="severity", architecture="xrv_densenet121", task="regression", preprocessing="xrv",
                     labels=LABELS)
    with pytest.raises(ValueError, match="import-xrv"):
        score_maps(card)


def test_a_map_reading_a_missing_head_is_refused():
    labels = [name if name != "Lung Opacity" else "" for name in LABELS]
    with pytest.raises(ValueError, match="lacks"):
        ScoreMap(paper_maps()["opacity"], labels)


@pytest.mark.parametrize("h, w", [(300, 400), (400, 300), (256, 256), (301, 200)])
def test_saliency_box_is_the_square_the_model_saw(h, w):
    img = np.random.default_rng(0).integers(0, 255, (h, w), dtype=np.uint8)
    x0, y0, x1, y1 = center_square_box(h, w)
    assert np.array_equal(img[y0:y1, x0:x1], CenterCropSquare()(img))


def test_blur_matches_the_authors_gaussian():
    """skimage.filters.gaussian(g**2, sigma=5, truncate=3.5) is scipy's filter in 'nearest' mode."""
    grad = np.random.default_rng(1).normal(size=(224, 224)).astype(np.float32)
    ours = blur_saliency(grad, sigma=5.0, truncate=3.5)
    reference = gaussian_filter(grad.astype(np.float64) ** 2, sigma=5.0, truncate=3.5, mode="nearest")
    assert np.abs(ours - reference).max() <= 1e-3 * reference.max()


def test_op_norm_puts_operating_points_at_one_half():
    t = torch.tensor([0.1, 0.5, 0.9, float("nan")])
    p = torch.tensor([[0.1, 0.5, 0.9, 0.3], [0.0, 1.0, 0.45, 0.9]])
    out = op_norm(p, t)
    assert torch.allclose(out[0, :3], torch.full((3,), 0.5))
    assert torch.allclose(out[1], torch.tensor([0.0, 1.0, 0.25, 0.5]))


def _record(**kw) -> Record:
    base = dict(path=__file__, source="x", label="normal", patient_id="p")
    base.update(kw)
    return Record(**base)


@pytest.mark.parametrize("record, expected", [
    # phantom, pneumonia graded consolidation in one lung
    (_record(label="pneumonia", extras={"opacity_right": "2", "opacity_left": "0", "involvement_right": "0.4"}),
     {"Lung Opacity": 1, "Consolidation": 1, "Infiltration": 0, "Pneumonia": 1, "Effusion": None}),
    # phantom, covid ground glass
    (_record(label="covid19", extras={"opacity_right": "1", "opacity_left": "1", "involvement_right": "0.3"}),
     {"Lung Opacity": 1, "Consolidation": 0, "Infiltration": 1, "Pneumonia": 1}),
    # phantom, normal
    (_record(label="normal", extras={"opacity_right": "0", "opacity_left": "0", "involvement_right": "0"}),
     {"Lung Opacity": 0, "Consolidation": 0, "Pneumonia": 0}),
    # NIH: listed findings, opacity through CheXpert's hierarchy
    (_record(label="pneumonia", extras={"nih_finding_labels": "Pneumonia|Effusion"}),
     {"Pneumonia": 1, "Effusion": 1, "Atelectasis": 0, "Lung Opacity": 1, "Lung Lesion": None, "Fracture": None}),
    # NIH: Google's adjudication overrides the hierarchy
    (_record(label="pneumonia", extras={"nih_finding_labels": "Pneumonia", "google2019_airspace_opacity": "NO"}),
     {"Pneumonia": 1, "Lung Opacity": 0}),
    (_record(label="normal", extras={"nih_finding_labels": "No Finding"}),
     {"Pneumonia": 0, "Cardiomegaly": 0, "Lung Opacity": 0, "Fracture": None}),
    (_record(label="normal", extras={"nih_finding_labels": "Cardiomegaly"}), {"Cardiomegaly": 1, "Lung Opacity": None}),
    # other collections
    (_record(label="covid"), {"Pneumonia": 1, "Lung Opacity": 1, "Effusion": None}),
    (_record(label="normal"), {"Pneumonia": 0, "Lung Opacity": 0, "Fracture": 0}),
    (_record(label="other"), {"Pneumonia": None, "Lung Opacity": None}),
])
def test_targets_in_torchxrayvisions_label_space(record, expected):
    t = xrv_targets(record)
    assert t.shape == (18,)
    for name, value in expected.items():
        got = t[LABELS.index(name)]
        assert (np.isnan(got) if value is None else got == value), name


def test_least_squares_recovers_a_line():
    x = np.linspace(-3, 3, 20)
    w, b = fit_linear(x, 0.87 * x + 3.41)
    assert w[0] == pytest.approx(0.87) and b == pytest.approx(3.41)


def test_table1_separates_signal_from_noise():
    """Synthetic scores: a logit carrying the extent beats the mean; noise features do not."""
    rng = np.random.default_rng(0)
    n = 60
    records = [_record(patient_id=f"p{i // 2}", geographic_extent=float(e), opacity=float(e) * 0.7)
               for i, e in enumerate(rng.uniform(0, 8, n))]
    extent = np.array([r.geographic_extent for r in records])
    logits = rng.normal(size=(n, 18))
    logits[:, LO] = (extent - 3.4) / 0.87 + rng.normal(0, 0.3, n)
    features = rng.normal(size=(n, 64))
    report = table1(logits, features, LABELS, records, n_splits=10)
    ge = report["scores"]["geographic_extent"]
    assert ge["lung_opacity"]["pearson"]["mean"] > 0.95
    assert ge["lung_opacity"]["mae"]["mean"] < 0.5 * ge["no_data"]["mae"]["mean"]
    assert ge["no_data"]["pearson"]["mean"] == 0.0
    assert ge["features"]["pearson"]["mean"] < 0.5  # 64 noise features predict nothing
    assert report["n_patients"] == 30 and report["n_parameters"]["four_outputs"] == 5


@pytest.fixture(scope="module")
def exported_severity(tmp_path_factory):
    torch.manual_seed(0)
    card = ModelCard(name="severity", architecture="xrv_densenet121", task="regression", preprocessing="xrv",
                     labels=LABELS, arch_kwargs={"op_threshs": True}, extra={"score_maps": paper_maps()})
    model = build_model("xrv_densenet121", op_threshs=True).eval()
    model.op_threshs.copy_(torch.tensor(load_template()["op_threshs"]))
    root = tmp_path_factory.mktemp("severity")
    ckpt = save_checkpoint(root / "sev.ckpt", model, card)
    return model, export_component(ckpt, root / "component", formats=("torchscript",))


def test_torchscript_export_matches_eager_and_differentiates_alike(exported_severity):
    model, folder = exported_severity
    assert json.loads((folder / "parity.json").read_text())["max_abs_diff"] <= 1e-4
    script = torch.jit.load(str(folder / "model.pt"))
    x = example_input(ModelCard.load(folder / "metadata.json"), batch=3, seed=5)
    score = ScoreMap(paper_maps()["geographic_extent"], LABELS)
    eager_grad, script_grad = input_gradients(model, x, score), input_gradients(script, x, score)
    assert np.abs(eager_grad - script_grad).max() <= 1e-4 * np.abs(eager_grad).max()
    # items in a batch get their own gradients
    single = input_gradients(script, x[1:2], score)
    assert np.abs(single[0] - script_grad[1]).max() <= 1e-4 * np.abs(single).max()
