"""Named preprocessing pipelines: their contracts, and no train/serve skew."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrserve import families
from cxrserve.core.transforms import CenterCrop, PadToSquare, SeedThreeChannel, TrimBorder, build_augment, build_transform

#: every registered pipeline: the core's and each family's (read through the registry)
PREPROCESSING = families.preprocessings()


@pytest.fixture(scope="module")
def film() -> np.ndarray:
    from cxrserve.synthetic.phantoms import render, sample_spec

    return render(sample_spec(3, label="pneumonia", height=300, width=260)).image


@pytest.mark.parametrize("name", sorted(PREPROCESSING))
def test_each_pipeline_honours_its_declared_contract(film, name):
    info = PREPROCESSING[name]
    out = build_transform(name)(film)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert tuple(out.shape) == (info.channels, info.input_size, info.input_size)
    lo, hi = info.value_range
    assert lo - 1e-4 <= float(out.min()) and float(out.max()) <= hi + 1e-4
    assert torch.equal(out, build_transform(name)(film.copy())), "pipelines must be deterministic"


def test_seed_three_channels(film):
    out = SeedThreeChannel()(film)
    assert out.shape == film.shape + (3,)
    assert set(np.unique(out[..., 0])) <= {0, 255}  # Otsu binary
    assert set(np.unique(out[..., 2])) <= {0, 255}  # adaptive threshold, inverse binary
    assert out[..., 1].std() > film.std() * 0.8  # CLAHE keeps (and stretches) grey detail
    # Otsu splits the lungs (dark) from the mediastinum (bright)
    assert out[..., 0].mean() > 0


def test_xrv_scaling_matches_torchxrayvision():
    img = np.array([[0, 255], [128, 64]], dtype=np.uint8)
    out = build_transform("xrv")(np.kron(img, np.ones((112, 112), np.uint8)))
    assert float(out.min()) == pytest.approx(-1024) and float(out.max()) == pytest.approx(1024)


def test_pxs_trims_borders_and_crops_320():
    img = np.zeros((400, 500), np.uint8)
    img[50:350, 100:400] = np.linspace(10, 250, 300, dtype=np.uint8)[None, :]
    trimmed = TrimBorder(2)(img)
    assert trimmed.shape == (300, 300)
    assert CenterCrop(320)(np.zeros((336, 400))).shape == (320, 320)
    out = build_transform("pxs")(img)
    assert out.shape == (3, 320, 320) and torch.equal(out[0], out[2])


def test_chexzero_pads_black_keeping_aspect():
    tall = np.full((320, 160), 200, np.uint8)
    padded = PadToSquare(320)(tall)
    assert padded.shape == (320, 320) and padded[:, :80].max() == 0 and padded[:, 80:240].min() == 200


def test_augment_is_reproducible_and_keeps_mask_aligned(film):
    mask = (film > np.median(film)).astype(np.uint8)
    a_img, a_mask = build_augment(seed=5)(film, mask)
    b_img, b_mask = build_augment(seed=5)(film, mask)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask)
    assert not np.array_equal(a_img, film)
    # The same geometry moves image and mask: bright pixels stay mostly under the mask.
    assert a_img[a_mask > 0].mean() > a_img[a_mask == 0].mean()


def test_training_eval_inputs_equal_handler_inputs(tmp_path, pipeline, monkeypatch):
    """The tensors training evaluates on are the tensors the served handler computes."""
    import handlers_loader
    from cxrserve.training.datasets import read_folder
    from cxrserve.synthetic.phantoms import write_dataset
    from cxrserve.training.common import ImageCache
    from cxrserve.families.triage.pipeline import classifier_input, find_lungs

    root = write_dataset(tmp_path / "ph", 4, seed=77, height=288, width=256, dicom_every=2)
    records = read_folder(root)
    triage = pipeline("cxr-triage")
    seen: list[torch.Tensor] = []
    runtime = triage.parts["triage_classifier"].runtime
    original = runtime.run_chunked

    def record_inputs(inputs, max_batch=16):
        seen.extend(inputs)
        return original(inputs, max_batch)

    monkeypatch.setattr(runtime, "run_chunked", record_inputs)
    handler, context = handlers_loader.handler_for(triage)
    files = [r.path.read_bytes() for r in records] + [
        (root / row).read_bytes() for row in ("dicom/000000.dcm", "dicom/000002.dcm")]
    out = handler.handle([{"body": data} for data in files], context)
    assert all("label" in o for o in out)

    # Training side: cached decode -> same segmentation runtime -> same crop -> same transform.
    cache = ImageCache(max_side=None)
    seg = triage.parts["lungseg"]
    images = [cache.image(r) for r in records]
    from cxrserve.core.imageio import read_file

    images += [read_file(root / row).uint8 for row in ("dicom/000000.dcm", "dicom/000002.dcm")]
    findings = find_lungs(images, seg.runtime, seg.card.preprocessing, seg.card.thresholds)
    expected = [classifier_input(img, f, "triage_crop") for img, f in zip(images, findings)]
    assert len(seen) == len(expected)
    for got, want in zip(seen, expected):
        assert torch.equal(got, want)
