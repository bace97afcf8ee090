"""Importing torchxrayvision's published weights: safe unpickling, exact numbers end to end.

The files are written exactly as torchxrayvision published ``densenet121-res224-all``
(``torch.save`` of its DenseNet, classes pickled under ``torchxrayvision.models``; see
``tests/xrv_format.py``) with random weights, so the import is checked against known
numbers without downloading anything.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle

import numpy as np
import pytest
import torch

from cxrserve.models.checkpoint import load_model
from cxrserve.models import build_model
from cxrserve.models.xrv import XRV_PATHOLOGIES, op_norm
from cxrserve.families.severity.pipeline import load_template
from cxrserve.families.severity.xrv_import import UnsafeWeightsFile, import_checkpoint, read_xrv_weights
from xrv_format import random_xrv_densenet, reference_logits, save_xrv_style

LUNG_OPACITY = XRV_PATHOLOGIES.index("Lung Opacity")


@pytest.fixture(scope="module")
def xrv_model():
    return random_xrv_densenet(seed=3)


@pytest.fixture(scope="module")
def probe():
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 1, 224, 224, generator=g) * 2048 - 1024


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy-container", "zip-container"])
def test_published_format_imports_with_identical_outputs(xrv_model, probe, tmp_path, legacy):
    path = save_xrv_style(xrv_model, tmp_path / "xrv.pt", legacy=legacy)
    weights = read_xrv_weights(path)
    assert weights.pickled_class == "torchxrayvision.models.DenseNet"
    assert weights.op_threshs is None  # the published file keeps op_threshs = None
    model, card = load_model(import_checkpoint(path, tmp_path / "imported.ckpt"))
    with torch.no_grad():
        logits, probabilities = model(probe)
    assert torch.equal(logits, reference_logits(xrv_model, probe))
    # xrv sets the published operating points after loading; so does the import
    published = torch.tensor(load_template()["op_threshs"])
    assert torch.allclose(model.op_threshs, published)
    assert torch.allclose(probabilities, op_norm(torch.sigmoid(logits), published))
    assert card.labels == list(XRV_PATHOLOGIES) and card.preprocessing == "xrv" and not card.demo


def test_card_carries_the_papers_coefficients(xrv_model, tmp_path):
    path = save_xrv_style(xrv_model, tmp_path / "xrv.pt")
    _, card = load_model(import_checkpoint(path, tmp_path / "imported.ckpt"))
    maps = card.extra["score_maps"]
    assert maps["geographic_extent"] == {"inputs": ["Lung Opacity"], "weights": [0.8705248],
                                         "intercept": 3.4137437, "range": [0, 8]}
    assert maps["opacity"] == {"inputs": ["Lung Opacity"], "weights": [0.5484423],
                               "intercept": 2.5535977, "range": [0, 6]}
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert card.extra["source"]["sha256"] == digest and card.data_fingerprint == digest[:16]


def test_operating_points_stored_in_the_file_win(tmp_path, probe):
    threshs = torch.linspace(0.05, 0.6, 18)
    threshs[14] = float("nan")  # a slot without a head
    xrv = random_xrv_densenet(seed=5, modern=True, op_threshs=threshs)
    path = save_xrv_style(xrv, tmp_path / "modern.pt", legacy=False)
    weights = read_xrv_weights(path)
    assert weights.pathologies == list(XRV_PATHOLOGIES)
    model, card = load_model(import_checkpoint(path, tmp_path / "modern.ckpt"))
    assert card.extra["source"]["op_threshs_from"] == "file"
    with torch.no_grad():
        logits, probabilities = model(probe)
    p = torch.sigmoid(logits)
    t = threshs.expand_as(p)
    expected = torch.where(p < t, p / (2 * t), 1 - (1 - p) / (2 * (1 - t)))
    expected[:, 14] = 0.5
    assert torch.allclose(probabilities, expected, atol=1e-6)


def test_plain_state_dict_files_import_too(xrv_model, probe, tmp_path):
    path = tmp_path / "state.pt"
    torch.save(xrv_model.state_dict(), path)
    model, _ = load_model(import_checkpoint(path, tmp_path / "state.ckpt"))
    with torch.no_grad():
        assert torch.equal(model(probe)[0], reference_logits(xrv_model, probe))


def test_state_dict_layout_is_torchxrayvisions(xrv_model):
    ours = build_model("xrv_densenet121").state_dict()
    theirs = xrv_model.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


class _Payload:
    """Pickles as a call to os.system: what a malicious weights file would contain."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy-container", "zip-container"])
def test_pickled_code_is_refused_not_run(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": _Payload(marker)}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeWeightsFile, match="posix.system|os.system|nt.system"):
        read_xrv_weights(path)
    assert not marker.exists()


def test_other_pickled_models_are_rejected_with_a_clear_message(tmp_path):
    path = tmp_path / "linear.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(ValueError, match="expected torchxrayvision's DenseNet"):
        read_xrv_weights(path)


def test_truncated_file_fails_cleanly(xrv_model, tmp_path):
    path = save_xrv_style(xrv_model, tmp_path / "xrv.pt")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: 4096])
    with pytest.raises((RuntimeError, pickle.UnpicklingError, EOFError, ValueError)):
        read_xrv_weights(cut)


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
@pytest.mark.serve
def test_import_export_and_served_numbers_agree(xrv_model, tmp_path_factory):
    """One command's work (import -> export with parity -> .mar) served by TorchServe."""
    import base64

    import cv2
    import requests

    from cxrserve.tools import server
    from cxrserve.core.files import unpack_archive
    from cxrserve.synthetic.phantoms import render, sample_spec
    from cxrserve.core.loading import load_pipeline
    from cxrserve.core.transforms import build_transform
    from cxrserve.families.severity.xrv_import import build_severity_archive
    from tsutil import start_torchserve

    root = tmp_path_factory.mktemp("xrv-e2e")
    path = save_xrv_style(xrv_model, root / "densenet121-res224-all.pt")
    mar = build_severity_archive(path, store=root / "store", work=root / "work", with_gate=False)
    parity = json.loads((root / "work" / "components" / "severity" / "parity.json").read_text())
    assert parity["max_abs_diff"] <= 1e-4

    phantom = render(sample_spec(4242, label="covid19", height=300, width=360))
    ok, png = cv2.imencode(".png", phantom.image)
    x = build_transform("xrv")(phantom.image)[None]
    logit = float(reference_logits(xrv_model, x)[0, LUNG_OPACITY])
    expected = {"geographic_extent": float(np.clip(0.8705248 * logit + 3.4137437, 0, 8)),
                "opacity": float(np.clip(0.5484423 * logit + 2.5535977, 0, 6))}

    in_process = load_pipeline(unpack_archive(mar, root / "unpacked"), device="cpu").predict_bytes(png.tobytes())
    workdir = root / "ts"
    try:
        served = start_torchserve(root / "store", workdir)
        response = requests.post(f"{served.inference}/predictions/cxr-severity", data=png.tobytes(),
                                 headers={**served.headers(), "X-CXR-Saliency": "true"}, timeout=300)
    finally:
        server.stop(workdir)
    assert response.status_code == 200, response.text
    body = response.json()
    for out in (in_process, body):
        assert abs(out["lung_opacity_logit"] - logit) <= 1e-4
        for name, value in expected.items():
            assert abs(out[name] - value) <= 1e-4
    picture = cv2.imdecode(np.frombuffer(base64.b64decode(body["saliency_png"]), np.uint8), cv2.IMREAD_COLOR)
    assert picture.shape[:2] == phantom.image.shape[:2]
