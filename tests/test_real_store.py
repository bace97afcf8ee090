"""``cxrserve store build --data``: data folder -> trained, evaluated, judged, archived real store.

A tiny phantom folder stands in for the real data and a tiny recipe trains each
component for a step or two, so the whole chain (dependency order, resume, budget,
``real`` cards, archives, served evaluation on the held-out split, acceptance bars,
generated card fragment) runs in CI in a few minutes. Starved like that, no component
can meet its acceptance bars (six validation films cannot show an AUC above chance), so
the build must end failed, naming the bars, with nothing shipped as ``real``.
"""
from __future__ import annotations

import json
import re

import pytest
import yaml

from cxrserve import families

TINY = {
    "lungseg": {"epochs": 1, "steps_per_epoch": 1, "batch_size": 2, "val_fraction": 0.25},
    "triage": {"epochs": 1, "steps_per_epoch": 1, "batch_size": 2, "val_fraction": 0.25, "augment": False},
    # enough steps that the gate (enforced: trained on "real" data) lets the frontal phantoms through
    "gate": {"epochs": 4, "steps_per_epoch": 6, "batch_size": 8, "lr": 0.005, "val_fraction": 0.25, "augment": False},
    "pxs_pretrain": {"epochs": 1, "steps_per_epoch": 1, "batch_size": 4, "val_fraction": 0.25, "augment": False},
    "pxs": {"epochs": 1, "steps_per_epoch": 1, "batch_size": 4, "val_fraction": 0.25, "augment": False},
    "severity": {"epochs": 1, "steps_per_epoch": 1, "batch_size": 4, "val_fraction": 0.25, "augment": False,
                 "n_splits": 5},
    "mortality": {"pretrain_epochs": 0, "epochs": 1, "steps_per_epoch": 1, "batch_size": 4, "val_fraction": 0.25,
                  "test_fraction": 0.0, "augment": False, "n_boot": 50},
    # the real recipe's narrow CLIP: the task's default ViT-B/32 alone writes ~6 GB here (checkpoints, the
    # zero-shot and study archives), which filled a CI disk
    "zeroshot": {"arch": "vit-demo", "epochs": 1, "steps_per_epoch": 1, "batch_size": 8, "val_fraction": 0.25,
                 "augment": False},
    "store": {"version": "0.0.1-real",
              "components": {"gate": {"negatives": {"n": 10, "seed": 5, "size": 128, "kinds": ["lateral", "hand"]}}}},
}


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(module_tmp):
    """The starved build: (root, AcceptanceFailed or None if it claimed success, fragment)."""
    from cxrserve.synthetic.phantoms import write_dataset
    from cxrserve.packaging.real_store import AcceptanceFailed, build_real_store

    root = module_tmp("real")
    data = write_dataset(root / "data" / "phantom_src", 24, seed=777, height=160, width=160, progress=False)
    _unscore_half(data / "labels.csv")
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    try:
        build_real_store(root / "store", root / "work", [data], recipe=recipe, budget=3600, device="cpu",
                         progress=False)
        failed = None
    except AcceptanceFailed as err:
        failed = err
    return root, failed, root / "work" / "MODEL_CARD_real.md"


def _unscore_half(labels_csv):
    """Like the real data, only some films carry severity scores: the real recipes pre-train
    severity and PXS stage 1 on the unscored patients and keep the scored ones for the maps,
    Table 1 and PXS stage 2."""
    import csv

    with open(labels_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    for k, row in enumerate(rows):
        if k % 2:
            row["geographic_extent_mean"] = row["opacity_mean"] = ""  # the per-lung facts stay (severity's targets)
    with open(labels_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_components_train_in_dependency_order_and_say_real(built):
    from cxrserve.core.loading import load_pipeline

    root, _, _ = built
    staged = root / "work" / "staging"  # every archive is built there; only accepted ones reach the store
    assert sorted(p.name for p in staged.glob("*.mar")) == sorted(f"{name}.mar" for name in families.served())
    work = root / "work" / "checkpoints"
    assert all((work / c / "DONE").exists() for c in ("lungseg", "triage_classifier", "gate"))
    assert not list(work.rglob("last.ckpt"))  # resume files go once a component is done (GBs otherwise)
    # triage was cut on the crops of the lungseg trained first
    assert (work / "lungseg" / "DONE").stat().st_mtime <= (work / "triage_classifier" / "DONE").stat().st_mtime
    pipe = load_pipeline(staged / "cxr-triage.mar", device="cpu")
    assert "real" in pipe.version and not pipe.demo
    assert pipe.gate is None  # the starved gate missed its bars: no archive carries it, nothing is refused
    import cv2
    from cxrserve.synthetic.phantoms import render, sample_spec

    img = cv2.imencode(".png", render(sample_spec(3, height=200, width=200)).image)[1].tobytes()
    item = pipe.make_item({"image": img}, {})
    response = pipe.base_response(item)
    assert "real" in response["model_version"]
    assert any(w.startswith("REAL-DATA MODEL (real") for w in response["warnings"])
    assert not any("DEMO MODEL" in w for w in response["warnings"])


def test_evaluation_json_and_generated_card_fragment(built, capsys):
    root, _, fragment = built
    with capsys.disabled():
        print("\n" + fragment.read_text())
    for name, component in (("cxr-lungseg", "lungseg"), ("cxr-triage", "triage_classifier")):
        result = json.loads((root / "work" / "eval" / f"{name}.json").read_text())
        assert result["component"] == component and "real" in result["version"]
        assert ".training_split(" in result["validation_method"]
        assert result["validation_n"] > 0
    lung = json.loads((root / "work" / "eval" / "cxr-lungseg.json").read_text())
    text = fragment.read_text()
    assert "| lung Dice, all sources |" in text and ">= 0.95" in text
    assert f"{lung['validation']['dice']:.3f}" in text  # the number comes from the JSON
    triage = json.loads((root / "work" / "eval" / "cxr-triage.json").read_text())
    f1 = triage["validation"]["macro_f1"]  # None when the (one-step) gate refused every film
    assert (f"| triage macro-F1 | {f1:.3f}" if f1 is not None else "| triage macro-F1 | not measured") in text
    assert ">= 0.8" in text and triage["validation"]["n"] + triage["validation"]["rejected"] > 0
    assert "| COVID-19 sensitivity |" in text


def test_every_declared_target_is_measured_by_the_build(built):
    """Each family's real_store target keys name numbers its evaluation JSON really has
    (a renamed metric would otherwise turn its row into 'not measured' unnoticed)."""
    from cxrserve.packaging.real_card import _flatten, targets

    root, _, _ = built
    declared = targets()
    assert {a for a, *_ in declared} >= {"cxr-lungseg", "cxr-triage", "cxr-pxs", "cxr-severity", "cxr-mortality",
                                         "cxr-zeroshot"}
    for archive, what, _, _, pattern in declared:
        flat = _flatten(json.loads((root / "work" / "eval" / f"{archive}.json").read_text()))
        assert any(re.search(pattern, key) for key in flat), (archive, what, pattern)
    pxs = json.loads((root / "work" / "eval" / "cxr-pxs.json").read_text())
    # PXS is scored through the served archive on stage 2's held-out scored films only
    assert ".training_split(" in pxs["validation_method"] and pxs["validation"]["n_images"] == pxs["split"]["val"]


def test_a_second_build_is_resumed_not_retrained(built, tmp_path):
    from cxrserve.packaging.real_store import RealStoreBuilder

    root, _, _ = built
    done = root / "work" / "checkpoints" / "triage_classifier" / "DONE"
    before = done.stat().st_mtime
    builder = RealStoreBuilder(root / "store", root / "work", data=[root / "data" / "phantom_src"],
                               recipe=root / "tiny.yaml", device="cpu", progress=False)
    builder.build(["cxr-triage"])
    assert done.stat().st_mtime == before


def test_a_starved_build_fails_naming_each_bar_it_missed(built):
    from cxrserve.packaging.acceptance import judge

    root, failed, fragment = built
    assert failed is not None, "a build of one training step per component claimed to meet every acceptance bar"
    named = {line.split(" ", 1)[0] for line in failed.failures}
    # six validation films cannot show an AUC above chance (rank test), whatever the weights
    assert {"triage_auc", "mortality_auc", "zeroshot_auc", "lung_dice"} <= named
    assert all(f"  - {line}" in str(failed) for line in failed.failures)
    # the failures are exactly what the verdicts of the evaluation JSON say, the gate's included
    expected = set()
    for path in sorted((root / "work" / "eval").glob("*.json")):
        result = json.loads(path.read_text())
        verdict = judge(result)
        assert verdict.to_dict()["passed"] == result["verdict"]["passed"] is False
        expected |= {line for line in verdict.failures}
    assert expected == set(failed.failures)
    gate = json.loads((root / "work" / "eval" / "gate.json").read_text())
    assert gate["verdict"]["passed"] is False and gate["non_frontal"]["n"] > 0 and gate["phantom_kinds"]["n"] == 100
    text = fragment.read_text()
    assert "## Acceptance: minimum bars on the validation split" in text
    for check in (c for v in failed.decisions.values() for c in v["reasons"]):
        assert check.split(" ", 1)[0] in text
    assert "Input gate: **not shipped**" in text


def test_nothing_that_missed_a_bar_is_shipped_as_real(built):
    root, failed, _ = built
    store = root / "store"
    for name, decision in failed.decisions.items():
        assert decision["shipped"] is None and decision["reasons"], name  # nothing passed every bar here
        assert not (store / f"{name}.mar").exists(), name
    assert set(failed.decisions) == set(families.served())
    assert failed.archives == [] and json.loads((store / "acceptance.json").read_text()) == {}


def test_what_passes_is_shipped_with_the_gate_at_the_threshold_it_set(built, tmp_path):
    """The shipping mechanism with the tiny build's own components: its lung segmentation and gate
    (as --checkpoint files) under bounds set low enough for them, which is what lets them pass here.
    The default bars are the starved build's above; this checks what happens to a component that
    passes: it ships, real, with the gate enforced at the threshold written into its card, and a
    later build whose component misses keeps it."""
    from cxrserve.core.loading import load_pipeline
    from cxrserve.packaging.real_store import AcceptanceFailed, build_real_store

    root, _, _ = built
    work = root / "work" / "checkpoints"
    given = {"lungseg": str(work / "lungseg" / "best.ckpt"), "gate": str(work / "gate" / "best.ckpt")}
    before = (work / "gate" / "best.ckpt").stat().st_mtime_ns
    lenient = {**TINY, "store": {**TINY["store"], "acceptance": {"bars": {
        "lung_dice": {"bound": 0.0}, "gate_refuses_non_frontal": {"bound": -1.0},
        "gate_refuses_phantom_kinds": {"bound": -1.0}}}}}
    (tmp_path / "lenient.yaml").write_text(yaml.safe_dump(lenient))
    store = tmp_path / "store"
    archives, fragment = build_real_store(store, tmp_path / "work", [root / "data" / "phantom_src"],
                                          recipe=tmp_path / "lenient.yaml", only=["cxr-lungseg"], device="cpu",
                                          checkpoints=given, progress=False)
    assert archives == [store / "cxr-lungseg.mar"]
    assert list(json.loads((store / "acceptance.json").read_text())) == ["cxr-lungseg"]
    gate = json.loads((tmp_path / "work" / "eval" / "gate.json").read_text())
    pipe = load_pipeline(store / "cxr-lungseg.mar", device="cpu")
    assert "real" in pipe.version and pipe.gate is not None and pipe.gate_enforced
    assert pipe.gate_threshold == pytest.approx(gate["threshold"])
    assert gate["frontal"]["refused_rate"] <= 0.02  # the cap is the default's, the threshold was set for it
    assert pipe.gate.card.extra["acceptance"]["threshold"] == pytest.approx(gate["threshold"])
    assert (work / "gate" / "best.ckpt").stat().st_mtime_ns == before  # the given file is the user's
    assert f"accept threshold {gate['threshold']:.4f}" in fragment.read_text()

    # the same lung segmentation under the default bars misses: the store keeps the accepted archive
    shipped = (store / "cxr-lungseg.mar").stat().st_mtime_ns
    (tmp_path / "strict.yaml").write_text(yaml.safe_dump(TINY))
    with pytest.raises(AcceptanceFailed, match="lung_dice") as failed:
        build_real_store(store, tmp_path / "work", [root / "data" / "phantom_src"], recipe=tmp_path / "strict.yaml",
                         only=["cxr-lungseg"], device="cpu", checkpoints=given, progress=False)
    assert failed.value.decisions["cxr-lungseg"]["shipped"] == "previous"
    assert (store / "cxr-lungseg.mar").stat().st_mtime_ns == shipped
    assert "previous accepted version" in failed.value.fragment.read_text()


def test_cli_store_build_ends_3_naming_the_failed_bars(built, monkeypatch, capsys):
    from cxrserve.packaging import real_store
    from cxrserve.tools.cli import build_parser

    _, failed, _ = built

    def starved(*args, **kwargs):
        raise failed

    monkeypatch.setattr(real_store, "build_real_store", starved)
    args = build_parser().parse_args(["store", "build", "--recipe", "training/real.yaml", "--data", "DIR"])
    assert args.func(args) == 3
    err = capsys.readouterr().err
    assert "acceptance bar(s) failed" in err and all(line in err for line in failed.failures)


def test_cli_store_build_takes_data_and_budget():
    from cxrserve.tools.cli import build_parser

    args = build_parser().parse_args(["store", "build", "--recipe", "training/real.yaml", "--data", "DIR",
                                      "--budget", "60"])
    assert args.data == ["DIR"] and args.budget == 60.0 and args.func.__name__ == "cmd_store"
    assert args.func.__module__ == "cxrserve.packaging.real_store"
