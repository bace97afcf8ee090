"""init=torchvision / init=PATH (cxrserve.models.pretrained): local weight files only, never the network.

Each test writes a *random* state dict under torchvision's own file name into a
temporary ``TORCH_HOME`` and checks that its values (not torchvision's real weights,
which are not here) end up in the model and that the card records the file's sha256.
"""
from __future__ import annotations

import hashlib
import socket

import pytest
import torch
import torchvision

from cxrserve.core.card import ModelCard
from cxrserve.models import build_model
from cxrserve.models.pretrained import (PretrainedWeightsMissing, apply_init, hub_checkpoints, initialize,
                                 torchvision_file)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """A fresh TORCH_HOME, and any attempt to reach the network fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


def _random_torchvision_file(backbone: str, old_densenet_keys: bool = False) -> tuple[dict, str]:
    torch.manual_seed(0)
    net = getattr(torchvision.models, backbone)(weights=None)
    state = {k: (torch.randn_like(v) if v.is_floating_point() else v) for k, v in net.state_dict().items()}
    saved = state
    if old_densenet_keys:  # torchvision's published DenseNet file uses "norm.1"-style names
        saved = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v for k, v in state.items()}
    name, _ = torchvision_file(backbone)
    path = hub_checkpoints() / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(saved, path)
    return state, hashlib.sha256(path.read_bytes()).hexdigest()


def _card(arch: str, **arch_kwargs) -> ModelCard:
    return ModelCard(name="t", architecture=arch, task="classification", preprocessing="triage_crop",
                     arch_kwargs=arch_kwargs)


def test_file_names_come_from_torchvision_enums():
    assert torchvision_file("resnet34")[0] == "resnet34-b627a593.pth"
    assert torchvision_file("resnet18")[0] == "resnet18-f37072fd.pth"
    assert torchvision_file("densenet121")[0] == "densenet121-a639ec97.pth"
    assert torchvision_file("vit_b_32")[0] == "vit_b_32-d86f8d99.pth"


def test_unet_encoder_loads_resnet34_with_a_one_channel_stem():
    state, digest = _random_torchvision_file("resnet34")
    card = _card("unet_resnet34", in_channels=1)
    model = build_model(card.architecture, **card.arch_kwargs)
    apply_init(model, card, "torchvision")
    assert torch.equal(model.layer3[2].conv2.weight, state["layer3.2.conv2.weight"])
    assert torch.equal(model.stem[1].running_var, state["bn1.running_var"])
    assert torch.allclose(model.stem[0].weight, state["conv1.weight"].sum(dim=1, keepdim=True))
    rec = card.extra["init"]
    assert rec["source"] == "torchvision" and rec["file"] == "resnet34-b627a593.pth" and rec["sha256"] == digest
    assert rec["sha256_matches_file_name"] is False  # random weights, not torchvision's real file
    assert any("RGB filters summed" in a for a in rec["adapted"])
    assert rec["unexpected"]["keys"] == ["fc.bias", "fc.weight"]  # no classifier in a U-Net
    assert "decoder.0.conv1.0.weight" in rec["missing"]["keys"] or rec["missing"]["count"] > 0


@pytest.mark.parametrize("arch,backbone", [("resnet18_cam", "resnet18"), ("resnet34_cam", "resnet34")])
def test_cam_resnets_load_torchvision_and_keep_their_own_head(arch, backbone):
    state, digest = _random_torchvision_file(backbone)
    card = _card(arch, num_classes=3, in_channels=3)
    model = build_model(card.architecture, **card.arch_kwargs)
    head_before = model.fc.weight.clone()
    apply_init(model, card, "torchvision")
    assert torch.equal(model.features[0].weight, state["conv1.weight"])
    assert torch.equal(model.features[7][1].bn2.bias, state["layer4.1.bn2.bias"])
    assert torch.equal(model.fc.weight, head_before)  # 1000-way ImageNet head not forced onto 3 classes
    assert card.extra["init"]["sha256"] == digest and card.extra["init"]["skipped"]


def test_densenets_load_torchvision_file_with_its_old_key_names():
    state, digest = _random_torchvision_file("densenet121", old_densenet_keys=True)
    siamese = build_model("siamese_densenet121")
    rec = initialize(siamese, "siamese_densenet121", "torchvision")
    key = "features.denseblock3.denselayer5.norm1.weight"
    assert torch.equal(siamese.trunk.state_dict()[key], state[key])
    assert torch.equal(siamese.trunk.classifier.weight, state["classifier.weight"])  # 1000-d embedding kept
    assert rec["sha256"] == digest and rec["unexpected"]["count"] == 0
    xrv = build_model("xrv_densenet121")  # one grey channel, 18 outputs
    rec = initialize(xrv, "xrv_densenet121", "torchvision")
    assert torch.equal(xrv.state_dict()["features.denseblock4.denselayer16.conv2.weight"],
                       state["features.denseblock4.denselayer16.conv2.weight"])
    assert torch.allclose(xrv.features.conv0.weight, state["features.conv0.weight"].sum(1, keepdim=True))
    assert any(s.startswith("classifier.weight") for s in rec["skipped"])


def test_missing_file_is_a_clear_error_naming_file_and_place():
    model = build_model("resnet34_cam")
    with pytest.raises(PretrainedWeightsMissing) as err:
        initialize(model, "resnet34_cam", "torchvision")
    message = str(err.value)
    assert "resnet34-b627a593.pth" in message and str(hub_checkpoints()) in message
    assert "https://download.pytorch.org/models/resnet34-b627a593.pth" in message and "never downloads" in message


def test_architectures_without_torchvision_weights_say_so():
    with pytest.raises(ValueError, match="no pretrained weights for 'gate_cnn'"):
        initialize(build_model("gate_cnn"), "gate_cnn", "torchvision")


def test_init_path_takes_a_checkpoint_and_reports_keys(tmp_path):
    donor = build_model("resnet18_cam", num_classes=2)
    torch.nn.init.normal_(donor.features[4][0].conv1.weight)
    ckpt = tmp_path / "donor.ckpt"
    torch.save({"card": {"name": "x"}, "state_dict": {"module." + k: v for k, v in donor.state_dict().items()},
                "epoch": 3}, ckpt)
    model = build_model("resnet18_cam", num_classes=2)
    rec = initialize(model, "resnet18_cam", ckpt)
    assert torch.equal(model.features[4][0].conv1.weight, donor.features[4][0].conv1.weight)
    assert rec["source"] == "file" and rec["layout"] == "model" and rec["missing"]["count"] == 0
    assert rec["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()


def test_init_path_in_torchvision_layout_and_strict_shapes(tmp_path):
    net = torchvision.models.resnet18(weights=None)
    plain = tmp_path / "hospital_resnet18.pth"
    torch.save(net.state_dict(), plain)
    model = build_model("resnet18_cam", num_classes=2)
    rec = initialize(model, "resnet18_cam", plain)
    assert rec["layout"] == "torchvision"
    assert torch.equal(model.features[5][0].conv1.weight, net.layer2[0].conv1.weight)
    wrong = tmp_path / "wrong.pth"  # same names, other shapes: refused, not silently skipped
    torch.save({"fc.weight": torch.zeros(5, 512), "fc.bias": torch.zeros(5)}, wrong)
    with pytest.raises(ValueError, match="shapes differ"):
        initialize(build_model("resnet18_cam", num_classes=2), "resnet18_cam", wrong)
    unrelated = tmp_path / "unrelated.pth"
    torch.save({"encoder.w": torch.zeros(3)}, unrelated)
    with pytest.raises(ValueError, match="no parameter"):
        initialize(build_model("resnet18_cam"), "resnet18_cam", unrelated)


def test_training_task_records_init_in_the_checkpoint_card(tmp_path):
    """``cxrserve train lungseg --set init=torchvision`` end to end on a few phantoms (one step)."""
    from cxrserve.models.checkpoint import load_checkpoint
    from cxrserve.synthetic.phantoms import write_dataset
    from cxrserve.families import get_task
    from cxrserve.training.common import load_records

    state, digest = _random_torchvision_file("resnet34")
    root = write_dataset(tmp_path / "ph", 8, seed=4242, height=128, width=128, progress=False)
    records = load_records(root)
    best = get_task("lungseg").train(records, out_dir=tmp_path / "run", epochs=1, steps_per_epoch=1,
                                     batch_size=2, device="cpu", demo=True, init="torchvision", progress=False)
    payload = load_checkpoint(best)
    assert payload["card"]["extra"]["init"]["sha256"] == digest
    assert payload["card"]["extra"]["init"]["file"] == "resnet34-b627a593.pth"
