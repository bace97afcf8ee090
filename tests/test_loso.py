"""Leave-one-site-out (issue 22): folds hold each site out of training, the summary has intervals,
and N-film calibration never scores a film (nor a patient) it was fitted on. Phantoms only; the
real-data check skips without ../shared/data."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cxrserve.families.triage import loso as fam_loso
from cxrserve.tools.loso import curve as curve_mod
from cxrserve.tools.loso.summary import write_summary

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SITES = ("site_a", "site_b", "site_c")


@pytest.fixture(scope="module")
def phantom_sites(tmp_path_factory):
    from cxrserve.synthetic.phantoms import write_dataset
    from cxrserve.training.common import load_records

    root = tmp_path_factory.mktemp("loso")
    for k, site in enumerate(SITES):
        write_dataset(root / site, 24, seed=11 + k, studies_per_patient=2, height=128, width=128)
    return load_records(root)


def _truth_findings(records):
    from cxrserve.families.triage.lungs import analyse_lungs
    from cxrserve.training.common import ImageCache

    cache = ImageCache()
    out = {}
    for r in records:
        mask = cache.mask(r).astype(np.float32)
        out[r.path] = analyse_lungs(mask, (mask.shape[1], mask.shape[0]))
    return out


def _fake_train(seen: dict):
    """Stands in for the classifier's training: records what it was given, saves untrained weights."""
    from cxrserve.core.card import ModelCard
    from cxrserve.models import build_model
    from cxrserve.models.checkpoint import save_checkpoint
    from cxrserve.training.datasets import CLASS_LABELS

    def train(records, segmentation, out_dir, **kwargs):
        seen[Path(out_dir).parent.name] = list(records)
        card = ModelCard(name="triage_classifier", architecture="resnet34_cam", task="classification",
                         preprocessing="triage_crop", labels=list(CLASS_LABELS),
                         arch_kwargs={"num_classes": 3, "in_channels": 3, "dropout": 0.0})
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        return save_checkpoint(Path(out_dir) / "best.ckpt", build_model(card.architecture, **card.arch_kwargs), card)

    return train


def test_folds_hold_each_site_out(phantom_sites):
    assert fam_loso.held_out_sites(phantom_sites) == list(SITES)
    for site in SITES:
        train, held = fam_loso.fold(phantom_sites, site)
        assert held and all(fam_loso.site_of(r) == site for r in held)
        assert train and not any(fam_loso.site_of(r) == site for r in train)
        assert not {r.patient_key for r in train} & {r.patient_key for r in held}


def test_linked_collections_leave_together(phantom_sites):
    """A film filed under another collection but linked to a held-out patient is not trained on."""
    import dataclasses

    held_patient = next(r for r in phantom_sites if r.site == "site_a").patient_key
    twin = dataclasses.replace(next(r for r in phantom_sites if r.site == "site_b"), links=(held_patient,))
    records = [*phantom_sites, twin]
    train, _ = fam_loso.fold(records, "site_a")
    assert twin not in train


def test_run_folds_and_summary(phantom_sites, tmp_path):
    from cxrserve.tools.loso.run import fold_modules

    assert fold_modules()[fam_loso.TASK] is fam_loso
    findings = _truth_findings(phantom_sites)
    seen: dict = {}
    for site in SITES:
        info = fam_loso.run_fold(phantom_sites, site, tmp_path, segmentation="unused", findings=findings,
                                 budget=1.0, settings={}, device="cpu", train=_fake_train(seen))
        assert site not in info["train"]["by_site"] and info["held_out"]["films"] == 24
        assert not any(fam_loso.site_of(r) == site for r in seen[site])
        z = np.load(tmp_path / site / "scores.npz")
        assert z["probs"].shape == (24, 3) and np.allclose(z["probs"].sum(1), 1, atol=1e-4)
    summary = write_summary(tmp_path, ns=(4, 8), draws=5, n_boot=50)
    assert set(summary["sites"]) == set(SITES)
    for s in summary["sites"].values():
        ece = s["served"]["positive_ece"]
        assert ece["low"] is not None and ece["low"] <= ece["estimate"] <= ece["high"]
        assert s["curve"]["4"]["draws"] == 5 and s["curve"]["4"]["after"]["ece"]["low"] is not None
    assert (tmp_path / "loso.md").read_text().startswith("| held-out site")
    assert (tmp_path / "loso_calibration.png").stat().st_size < 200_000
    assert "patient" not in json.dumps(summary["sites"]["site_a"]["fold"]["train"])


def test_calibration_never_scores_its_fitting_films(monkeypatch):
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(30), rng.integers(1, 5, 30))
    n = groups.size
    truth = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), truth] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    calls = []
    real = curve_mod.one_draw

    def spy(meta, p, t, fit, held):
        calls.append((fit.copy(), held.copy()))
        return real(meta, p, t, fit, held)

    monkeypatch.setattr(curve_mod, "one_draw", spy)
    out = curve_mod.curve(fam_loso.META, probs, truth, groups, ns=(10, 20), draws=8)
    assert len(calls) == 16 and out["10"]["draws"] == 8
    for fit, held in calls:
        assert fit.size in (10, 20)
        assert not set(fit) & set(held)
        assert not set(groups[fit]) & set(groups[held])  # nor a patient of the fitting films


def test_only_positives_has_no_specificity():
    groups = np.arange(40) // 2
    truth = np.zeros(40, dtype=int)  # every film COVID-19
    probs = np.tile([0.5, 0.3, 0.2], (40, 1))
    out = curve_mod.curve(fam_loso.META, probs, truth, groups, ns=(10,), draws=3)
    assert out["10"]["after"]["specificity"]["median"] is None
    assert out["10"]["after"]["sensitivity"]["median"] is not None


@pytest.mark.skipif(not SHARED.is_dir(), reason="no ../shared/data")
def test_real_sites_are_folds():
    from cxrserve.training.common import load_records

    records = load_records(SHARED)
    sites = fam_loso.held_out_sites(records)
    assert {"hannover_covid", "ieee8023_jun2020", "nih_cxr8_darkcovidnet", "openist_normal_lungmasks"} <= set(sites)
    assert "gb_covid_segmentations" not in sites and "kermany_pediatric_subset" in fam_loso.skipped_sites(records)
    train, held = fam_loso.fold(records, "ieee8023_jun2020")
    assert not any(r.source == "gb_covid_segmentations" for r in train)
    assert not any(r.source == "gb_covid_segmentations" for r in held)  # copies of ieee8023 films: not scored twice


def test_real_card_carries_loso_tables(tmp_path):
    from cxrserve.packaging.real_card import loso_section

    assert loso_section(tmp_path) == ""
    (tmp_path / "loso").mkdir()
    (tmp_path / "loso" / "loso.md").write_text("| held-out site | x |\n")
    assert "Leave-one-site-out" in loso_section(tmp_path) and "| held-out site | x |" in loso_section(tmp_path)


def test_negatives_only_site_keeps_a_served_call_that_meets_the_floor():
    """Openist-like: every film normal and served as such; calibration must not lower specificity."""
    groups = np.arange(60)
    truth = np.ones(60, dtype=int)  # normal
    probs = np.tile([0.02, 0.9, 0.08], (60, 1)) + np.linspace(0, 0.01, 60)[:, None] * [1, -1, 0]
    out = curve_mod.curve(fam_loso.META, probs, truth, groups, ns=(10,), draws=5)
    assert out["10"]["after"]["specificity"]["median"] == 1.0
