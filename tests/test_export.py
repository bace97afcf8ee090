"""Export: TorchScript and ONNX agree with eager; CAM equals autograd Grad-CAM; archives."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch

from cxrserve.core.card import ModelCard
from cxrserve.models.checkpoint import load_model, save_checkpoint
from cxrserve.core.files import unpack_archive
from cxrserve.packaging.export import ParityError, example_input, export_component
from cxrserve.families.triage.lungs import DEFAULT_THRESHOLDS
from cxrserve.models import build_model
from cxrserve.core.runtime import OnnxRuntime, TorchRuntime


@pytest.fixture(scope="module")
def classifier_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    card = ModelCard(name="triage_classifier", architecture="resnet34_cam", task="classification",
                     preprocessing="triage_crop", labels=["covid19", "normal", "pneumonia"],
                     arch_kwargs={"num_classes": 3})
    path = tmp_path_factory.mktemp("ckpt") / "cls.ckpt"
    return save_checkpoint(path, build_model("resnet34_cam", num_classes=3).eval(), card)


@pytest.fixture(scope="module")
def unet_ckpt(tmp_path_factory):
    torch.manual_seed(1)
    card = ModelCard(name="lungseg", architecture="unet_resnet34", task="segmentation", preprocessing="lungseg",
                     labels=["background", "lung"], thresholds=dict(DEFAULT_THRESHOLDS))
    path = tmp_path_factory.mktemp("ckpt") / "seg.ckpt"
    return save_checkpoint(path, build_model("unet_resnet34").eval(), card)


@pytest.fixture(scope="module")
def exported(classifier_ckpt, unet_ckpt, module_tmp):
    """Each model exported once (both formats) for the tests below."""
    root = module_tmp("exported")
    return {
        "classifier_ckpt": (classifier_ckpt, export_component(classifier_ckpt, root / "classifier")),
        "unet_ckpt": (unet_ckpt, export_component(unet_ckpt, root / "unet")),
    }


@pytest.mark.parametrize("which", ["classifier_ckpt", "unet_ckpt"])
def test_torchscript_and_onnx_match_eager_on_any_batch(exported, which):
    ckpt, out = exported[which]
    report = json.loads((out / "parity.json").read_text())
    assert report["max_abs_diff"] <= 1e-4
    card = ModelCard.load(out / "metadata.json")
    model, _ = load_model(ckpt)
    eager = TorchRuntime(model, torch.device("cpu"))
    onnx = OnnxRuntime(out / "model.onnx", torch.device("cpu"))
    script = TorchRuntime(torch.jit.load(str(out / "model.pt")), torch.device("cpu"), "torchscript")
    for batch in (1, 5):  # the trace saw batch 2: the batch axis must be dynamic
        x = example_input(card, batch=batch, seed=batch)
        reference = eager(x)
        for runtime in (onnx, script):
            for ref, got in zip(reference, runtime(x)):
                assert got.shape == ref.shape
                # the export's parity rule: 1e-4, on the output's scale where it exceeds 1
                assert np.abs(got - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))


def test_card_travels_inside_the_torchscript_program(exported):
    _, out = exported["classifier_ckpt"]
    extra = {"metadata.json": ""}
    torch.jit.load(str(out / "model.pt"), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["labels"] == ["covid19", "normal", "pneumonia"]


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    card = ModelCard(name="gate", architecture="resnet18_cam", task="gate", preprocessing="gate",
                     labels=["other", "frontal_cxr"], arch_kwargs={"num_classes": 2, "in_channels": 1})
    path = tmp_path_factory.mktemp("ckpt") / "small.ckpt"
    return save_checkpoint(path, build_model("resnet18_cam", num_classes=2, in_channels=1).eval(), card)


def test_only_requested_formats_are_written(small_ckpt, tmp_path):
    out = export_component(small_ckpt, tmp_path / "ts", formats=("torchscript",))
    assert (out / "model.pt").exists() and not (out / "model.onnx").exists()
    assert set(json.loads((out / "parity.json").read_text())) == {"atol", "torchscript", "max_abs_diff"}


def test_parity_failure_is_loud(small_ckpt, tmp_path, monkeypatch):
    import cxrserve.packaging.export as export

    real = export.parity

    def broken(*args, **kwargs):
        report = real(*args, **kwargs)
        report["onnx"] = [1.0]
        return report

    monkeypatch.setattr(export, "parity", broken)
    with pytest.raises(ParityError, match="differ from eager"):
        export_component(small_ckpt, tmp_path / "bad", formats=("onnx",))


def test_served_cam_is_exactly_grad_cam(classifier_ckpt):
    """The CAM output equals Grad-CAM computed with autograd on the last conv block."""
    model, _ = load_model(classifier_ckpt)
    x = torch.rand(2, 3, 224, 224)
    probs, cams = model(x)
    fmap = model.features(x).detach().requires_grad_(True)
    logits = model.fc(fmap.mean(dim=(2, 3)))
    for cls in range(3):
        grad, = torch.autograd.grad(logits[:, cls].sum(), fmap, retain_graph=True)
        weights = grad.mean(dim=(2, 3), keepdim=True)  # Grad-CAM channel weights
        grad_cam = torch.relu((weights * fmap).sum(dim=1))
        served = torch.relu(cams[:, cls]) / (fmap.shape[2] * fmap.shape[3])
        assert torch.allclose(served, grad_cam, atol=1e-6)


def test_unpack_refuses_zip_slip(tmp_path):
    evil = tmp_path / "evil.mar"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../outside.txt", "x")
    with pytest.raises(ValueError, match="escapes"):
        unpack_archive(evil, tmp_path / "dest")
    assert not (tmp_path / "outside.txt").exists()
