"""Input gate: accuracy on held-out phantoms, and how every pipeline uses it.

The store's gate was trained on phantom set seed 700000; these phantoms come from other
seeds (new anatomy, pose, exposure), so the numbers are held-out. Pipelines are loaded
in process from the store's archives (the very code TorchServe runs).
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from cxrserve.core.errors import NotFrontalCXR
from cxrserve.models.gate import GATE_LABELS
from cxrserve.synthetic.phantoms import render, sample_spec
from cxrserve.core.pipeline import gate_verdict
from cxrserve.families.gate.task import gate_report

KINDS = ("frontal", "lateral", "hand", "knee", "pelvis", "natural")


def png(img: np.ndarray) -> bytes:
    return cv2.imencode(".png", img)[1].tobytes()


@pytest.fixture(scope="module")
def held_out():
    """6 images of each kind from unseen seeds, plus the frontal ones inverted."""
    images = []
    for k, kind in enumerate(KINDS):
        for i in range(6):
            img = render(sample_spec(9_100_000 + 100 * k + i, kind=kind, height=320, width=320)).image
            images.append((kind, img))
    return images


@pytest.fixture(scope="module")
def triage(pipeline):
    return pipeline("cxr-triage")


@pytest.fixture(scope="module")
def configured(unpacked):
    """``configured(name, **handler_overrides)``: the archive's handler config plus overrides."""
    import json

    from cxrserve.core.loading import load_pipeline

    def get(name: str, **overrides):
        folder = unpacked(name)
        handler = json.loads((folder / "pipeline.json").read_text()).get("handler", {})
        return load_pipeline(folder, device="cpu", config={**handler, **overrides})

    return get


def gate_scores(pipe, images: list[np.ndarray]) -> np.ndarray:
    transform = pipe.gate.transform()
    outs = pipe.gate.runtime.run_chunked([transform(img) for img in images], 16)
    return np.stack([o[0] for o in outs])


def test_every_archive_ships_the_gate(model_store, unpacked):
    for mar in sorted(model_store.glob("*.mar")):
        folder = unpacked(mar.stem)
        assert (folder / "gate" / "metadata.json").exists(), f"{mar.name} has no input gate"


def test_gate_held_out_accuracy_on_phantoms(triage, held_out, capsys):
    truth = ["frontal_cxr" if kind == "frontal" else "other" for kind, _ in held_out]
    images = [img for _, img in held_out]
    frontal = [img for kind, img in held_out if kind == "frontal"]
    truth += ["inverted_cxr"] * len(frontal)
    images += [255 - img for img in frontal]
    probs = gate_scores(triage, images)
    report = gate_report(truth, probs, triage.gate_threshold)
    with capsys.disabled():
        print(f"\ninput gate on {report['n']} held-out phantoms: accept/reject accuracy {report['accept_accuracy']:.3f}, "
              f"frontal accepted {report['frontal_accepted']:.3f}, non-frontal rejected {report['non_frontal_rejected']:.3f}")
    assert report["accept_accuracy"] >= 0.9
    assert report["frontal_accepted"] >= 0.8
    assert report["non_frontal_rejected"] >= 0.9
    inverted = [gate_verdict(GATE_LABELS, p, triage.gate_threshold) for p in probs[-len(frontal):]]
    assert inverted.count("inverted_cxr") >= len(frontal) - 1, inverted


def test_every_response_carries_the_gate_verdict(pipeline, held_out):
    img = next(img for kind, img in held_out if kind == "frontal")
    for name in ("cxr-lungseg", "cxr-triage"):
        out = pipeline(name).predict_bytes(png(img))
        gate = out["input_gate"]
        assert set(gate) == {"verdict", "score", "threshold", "enforced"}
        assert gate["verdict"] == "frontal_cxr" and gate["score"] >= gate["threshold"]


def test_demo_gate_reports_but_does_not_reject(triage, held_out):
    assert triage.gate.card.demo and not triage.gate_enforced
    hand = next(img for kind, img in held_out if kind == "hand")
    out = triage.predict_bytes(png(hand))
    assert out["input_gate"]["verdict"] == "other" and out["input_gate"]["enforced"] is False
    assert any(w.startswith("input gate (demo, not enforced)") for w in out["warnings"])


def test_enforced_gate_rejects_with_422_and_spares_neighbours(configured, held_out):
    pipe = configured("cxr-triage", gate_enforce=True)
    by_kind = {kind: img for kind, img in reversed(held_out)}
    items = [pipe.make_item({"image": png(by_kind[k])}, {}) for k in ("frontal", "knee", "natural", "frontal")]
    items.insert(2, pipe.make_item({"image": png(255 - by_kind["frontal"])}, {}))
    results = pipe.predict(items)
    assert isinstance(results[0], dict) and isinstance(results[-1], dict)
    for idx, verdict in ((1, "other"), (2, "inverted_cxr"), (3, "other")):
        err = results[idx]
        assert isinstance(err, NotFrontalCXR) and err.status == 422, err
        assert err.detail["input_gate"]["verdict"] == verdict
    assert "inverted" in results[2].message


def test_threshold_comes_from_handler_config(configured, held_out):
    frontal = png(next(img for kind, img in held_out if kind == "frontal"))
    strict = configured("cxr-lungseg", gate_enforce=True, gate_threshold=1.01)
    with pytest.raises(NotFrontalCXR):
        strict.predict_bytes(frontal)
    lenient = configured("cxr-lungseg", gate_enforce=True, gate_threshold=0.0)
    hand = png(next(img for kind, img in held_out if kind == "hand"))
    assert lenient.predict_bytes(hand)["input_gate"]["threshold"] == 0.0


def test_gate_report_counts():
    probs = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.3, 0.1, 0.6], [0.6, 0.1, 0.3]])
    truth = ["frontal_cxr", "inverted_cxr", "other", "other"]
    report = gate_report(truth, probs, 0.5)
    assert report["accept_accuracy"] == pytest.approx(0.75)
    assert report["frontal_accepted"] == 1.0 and report["non_frontal_rejected"] == pytest.approx(2 / 3)
    assert report["labels"] == list(GATE_LABELS)


def test_real_fake_monochrome1_looks_inverted_to_the_gate(shared_data, triage):
    """The catalogue's tag/pixel-mismatch DICOM decodes as a negative of its twin.

    ``SIIM_Fake_MONOCHROME1.dcm`` holds the pixels of the SIIM file beside it under a
    MONOCHROME1 tag: the gate must find it more inverted and less frontal than the twin.
    (The demo gate has never seen a real film, so only the comparison is asserted.)
    """
    chest = shared_data / "dicom_samples" / "chest"
    twin = next(chest.glob("SIIM_1.*.dcm")).read_bytes()
    fake = (chest / "SIIM_Fake_MONOCHROME1.dcm").read_bytes()
    labels = list(triage.gate.card.labels)
    transform = triage.gate.transform()
    from cxrserve.core.imageio import decode

    # decoded as the pipeline decodes (at its model resolution), so the served score is comparable
    p_twin, p_fake = (triage.gate.runtime.run_chunked([transform(decode(d, target=triage.decode_target).uint8)], 2)[0][0]
                      for d in (twin, fake))
    inv, front = labels.index("inverted_cxr"), labels.index("frontal_cxr")
    assert p_fake[inv] > p_twin[inv] and p_fake[front] < p_twin[front]
    assert triage.predict_bytes(fake)["input_gate"]["score"] == pytest.approx(float(p_fake[front]), abs=1e-4)
