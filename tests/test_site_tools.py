"""Site tools: the site file, `cxrserve site audit` / `calibrate` on phantoms with the demo store,
the fitting math on synthetic probabilities, and the profile that serving applies."""
from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from cxrserve.core import site_profile as sp
from cxrserve.tools.site.config import SiteConfigError, site_from_dict
from cxrserve.tools.site.fitting import em_priors, fit_temperature, threshold_for
from cxrserve.tools.site.models import outputs
from cxrserve.training.metrics import expected_calibration_error

REPO = Path(__file__).resolve().parents[1]
STORE = Path(os.environ.get("CXRSERVE_STORE", REPO / "model_store"))
PCR_SITE = {"name": "stmary", "labels": {"pcr_pos": "covid19", "pcr_neg": "not:covid19", "unclear": "ignore"},
            "ae_titles": ["STMARY_CR1"]}


def _need_store():
    if not (STORE / "cxr-triage.mar").is_file():
        pytest.skip(f"no demo store at {STORE} (make store)")


def _write_site(path: Path, **extra) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({**PCR_SITE, **extra}))
    return path


@pytest.fixture(scope="module")
def phantom_site(tmp_path_factory):
    """40 phantom films, 2 per patient, relabelled in a hospital's PCR words."""
    from cxrserve.synthetic.phantoms import write_dataset

    root = write_dataset(tmp_path_factory.mktemp("site") / "stmary", 40, seed=7, studies_per_patient=2,
                         height=256, width=256)
    rows = list(csv.DictReader(open(root / "labels.csv")))
    for k, r in enumerate(rows):
        r["label"] = "unclear" if k % 13 == 5 else ("pcr_pos" if r["label"] == "covid19" else "pcr_neg")
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root, sorted({r["patient_id"] for r in rows})


def _cli(*argv) -> int:
    from cxrserve.tools.cli import main

    return main(list(argv))


# --------------------------------------------------------------------------- site file
def test_site_file_parses_and_refuses_what_it_cannot_mean():
    site = site_from_dict({**PCR_SITE, "targets": {"triage.covid19.sensitivity": 0.9}})
    assert site.families == ("triage",)
    neg = site.labels["pcr_neg"]
    assert (neg.family, neg.label, neg.positive) == ("triage", "covid19", False)
    assert site.labels["unclear"].ignore
    for bad, words in [({"labels": {"pcr_pos": "covid"}}, "no model label"),
                       ({"targets": {"triage.covid19.sensitivity": 1.5}}, r"\[0, 1\]"),
                       ({"targets": {"triage.covid19.recall": 0.9}}, "metric"),
                       ({"name": "St Mary"}, "name"),
                       ({"colour": "red"}, "unknown keys")]:
        with pytest.raises(SiteConfigError, match=words):
            site_from_dict({**PCR_SITE, **bad})


def test_unmapped_words_are_refused(phantom_site, tmp_path):
    """A word the site file does not define is an error (exit 2), never a guess."""
    _need_store()
    root, _ = phantom_site
    site = _write_site(tmp_path / "site.yaml", labels={"pcr_pos": "covid19"})
    assert _cli("site", "audit", str(root), "--site-file", str(site), "--out", str(tmp_path / "a"),
                "--store", str(STORE), "--quiet") == 2
    assert not (tmp_path / "a" / "audit.json").exists()


# --------------------------------------------------------------------------- audit
def test_audit_reports_intervals_plots_and_honest_exit_codes(phantom_site, tmp_path):
    _need_store()
    root, patients = phantom_site
    reachable = _write_site(tmp_path / "ok.yaml", targets={"triage.covid19.sensitivity": 0.3})
    out = tmp_path / "ok"
    assert _cli("site", "audit", str(root), "--site-file", str(reachable), "--out", str(out),
                "--store", str(STORE), "--quiet", "--n-boot", "300") == 0
    audit = json.loads((out / "audit.json").read_text())
    covid = audit["families"]["triage"]["labels"]["covid19"]
    assert covid["positives"] > 0 and covid["negatives"] > 0
    assert covid["positives"] + covid["negatives"] == covid["n"] <= 40 - 3  # three 'unclear' films ignored
    for metric in ("sensitivity", "specificity", "ppv", "npv", "auc", "ece"):
        m = covid[metric]
        assert m["low"] <= m["estimate"] <= m["high"], metric
    assert covid["card"]["sensitivity"] is not None  # the archive card's number beside the site's
    assert audit["targets"][0]["met"] is True and audit["all_met"] is True
    assert audit["gate"]["frontal_films"] == 40 and "below_threshold" in audit["gate"]
    conf = audit["families"]["triage"]["confusion"]
    assert set(conf["rows"]) == {"pcr_pos", "pcr_neg"} and conf["columns"][-1] == "refused"
    assert sum(map(sum, conf["matrix"])) == covid["n"] + sum(covid["refused"].values())
    page = (out / "report.html").read_text()
    assert len(re.findall(r'src="data:image/png;base64,', page)) >= 2  # ROC and reliability, embedded
    assert not re.search(r'(src|href)="(https?:)?//', page)  # self-contained
    for text in (page, (out / "audit.json").read_text()):
        assert not any(pid in text for pid in patients)  # no patient identifier anywhere

    impossible = _write_site(tmp_path / "no.yaml", targets={"triage.covid19.sensitivity": 0.3,
                                                            "triage.covid19.ece": 0.0})
    assert _cli("site", "audit", str(root), "--site-file", str(impossible), "--out", str(tmp_path / "no"),
                "--store", str(STORE), "--quiet", "--n-boot", "200") == 3
    audit = json.loads((tmp_path / "no" / "audit.json").read_text())
    assert {t["target"]: t["met"] for t in audit["targets"]} == {"triage.covid19.sensitivity": True,
                                                                 "triage.covid19.ece": False}


# --------------------------------------------------------------------------- calibrate
def test_calibrate_writes_a_bound_profile_from_patient_disjoint_folds(phantom_site, tmp_path):
    _need_store()
    from cxrserve.tools.site.calibrate import cross_validate
    from cxrserve.tools.site.config import load_site
    from cxrserve.tools.site.scoring import score_folder

    root, patients = phantom_site
    site_file = _write_site(tmp_path / "site.yaml", targets={"triage.covid19.sensitivity": 0.9})
    out = tmp_path / "cal"
    assert _cli("site", "calibrate", str(root), "--site-file", str(site_file), "--out", str(out),
                "--store", str(STORE), "--quiet", "--n-boot", "200", "--folds", "4",
                "--unlabelled", str(root / "images")) == 0
    profile = sp.load_profile(out)
    text = (out / "profile.json").read_text()
    assert not any(pid in text for pid in patients)
    assert "data:image/png;base64," in (out / "calibration.html").read_text()
    raw = json.loads(text)
    cv = raw["cv"]["families"]["triage"]
    assert set(cv["steps"]) == {"served", "calibrated", "prior_shift", "operating_points"}
    assert cv["steps"]["prior_shift"]["labels"]["covid19"]["n"] == cv["films"]
    assert "covid19" in profile.families["triage"].thresholds
    assert profile.families["triage"].thresholds["covid19"]["operating_point"].startswith("stmary:")
    assert raw["head_adaptation"]["adopted"] is False
    assert 0 < profile.gate["threshold"] <= 1 and profile.gate["cv_refusal"]["estimate"] <= 0.1
    sp.check_binding(profile, sp.archive_info(STORE / "cxr-triage.mar"))  # bound to the store's archive

    # the folds it scored with: every labelled film held out once, patients never split
    site = load_site(site_file)
    table = score_folder(root, site, STORE, progress=False)
    use = table.answered & table.frontal
    res = cross_validate(table.families["triage"], site, table.groups, use, k=4, n_boot=50)
    held = np.concatenate([te for _, te in res["_folds_idx"]])
    assert sorted(held) == sorted(np.flatnonzero(use & ~np.all(np.isnan(table.families["triage"].truth), 1)))
    for tr, te in res["_folds_idx"]:
        assert not set(table.groups[tr]) & set(table.groups[te])
    # held-out means held out: each fold's threshold differs from the one fitted on every film
    fold_t = [f["thresholds"]["covid19"] for f in res["folds"]]
    assert len(set(np.round(fold_t, 6))) > 1


def _synthetic_family(n_patients=300, films=2, seed=0, target_sep=1.0):
    """Two-class-ish triage output: COVID-19 films get higher P(covid19); PCR-style truth."""
    from cxrserve.tools.site.scoring import FamilyScores

    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_patients), films)
    covid = np.repeat(rng.random(n_patients) < 0.3, films)
    z = np.stack([np.where(covid, target_sep, 0.0) + rng.normal(0, 1, groups.size),
                  rng.normal(0, 1, groups.size), rng.normal(0, 1, groups.size)], 1)
    probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    truth = np.full(probs.shape, np.nan)
    truth[:, 0] = covid
    out = outputs()["triage"]
    fs = FamilyScores(out, Path("unused.mar"), probs, probs.argmax(1)[:, None] == np.arange(3), truth,
                      labels=out.labels)
    return fs, groups


def test_thresholds_meet_a_sensitivity_target_on_held_out_folds():
    from cxrserve.tools.site.calibrate import cross_validate

    fs, groups = _synthetic_family()
    site = site_from_dict({**PCR_SITE, "targets": {"triage.covid19.sensitivity": 0.9}})
    res = cross_validate(fs, site, groups, np.ones(groups.size, bool), k=5, n_boot=300)
    served = res["steps"]["served"]["labels"]["covid19"]["sensitivity"]
    held = res["steps"]["operating_points"]["labels"]["covid19"]["sensitivity"]
    assert served["estimate"] < 0.85  # argmax misses many: the target needs a threshold
    assert held["estimate"] >= 0.85 and held["low"] <= 0.9 <= held["high"] + 0.02
    for tr, te in res["_folds_idx"]:
        assert not set(groups[tr]) & set(groups[te])


def test_threshold_rules():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    s = np.array([.9, .8, .7, .2, .6, .5, .4, .3, .1, .05])
    t = threshold_for(y, s, "sensitivity", 0.75)
    assert t == pytest.approx(0.7) and np.mean(s[y == 1] >= t) >= 0.75
    t = threshold_for(y, s, "specificity", 0.8)
    assert np.mean(s[y == 0] < t) >= 0.8 and np.mean(s[y == 0] < 0.5) < 0.8 + 1e-9


def test_em_prior_shift_recovers_a_known_prior():
    rng = np.random.default_rng(1)
    mu, ref, true = np.array([-2.0, 0.0, 2.0]), np.full(3, 1 / 3), np.array([0.7, 0.2, 0.1])
    c = rng.choice(3, size=5000, p=true)
    lik = np.exp(-0.5 * (rng.normal(mu[c], 1.0)[:, None] - mu) ** 2)
    post = lik * ref / (lik * ref).sum(1, keepdims=True)  # calibrated for the reference priors
    est, _ = em_priors(post, ref)
    assert np.abs(est - true).max() < 0.03
    assert np.abs(post.mean(0) - true).max() > 0.05  # the naive mean is off: EM did the work
    # the shifted posteriors are better calibrated for the new population
    shifted = sp.shift_priors(post, ref, est)
    nll = lambda p: -np.mean(np.log(p[np.arange(c.size), c]))  # noqa: E731
    assert nll(shifted) < nll(post)


def test_temperature_scaling_lowers_ece_of_overconfident_probabilities():
    rng = np.random.default_rng(2)
    z = rng.normal(0, 1.0, (3000, 3))
    true_p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(3, p=p) for p in true_p])
    over = sp.temperature_scale(true_p, 1 / 3.0)  # logits x3: over-confident
    truth = np.eye(3)[y]
    t = fit_temperature(over[:2000], truth[:2000])
    assert 2.4 < t < 3.6
    before = expected_calibration_error(y[2000:], over[2000:])
    after = expected_calibration_error(y[2000:], sp.temperature_scale(over[2000:], t))
    assert after < before / 2
    # one-vs-rest negatives alone (PCR-negative films) still pull T the right way
    neg_only = np.full((2000, 3), np.nan)
    neg_only[:, 0] = (y[:2000] == 0).astype(float)
    assert fit_temperature(over[:2000], neg_only) > 1.5


# --------------------------------------------------------------------------- profile / serving math
def _profile(**family) -> sp.SiteProfile:
    binding = sp.archive_info(STORE / "cxr-triage.mar") if (STORE / "cxr-triage.mar").is_file() else \
        sp.ArchiveBinding("cxr-triage", "0.1.0", "a" * 64)
    fam = {"model": "cxr-triage", "kind": "multiclass", "labels": ["covid19", "normal", "pneumonia"], **family}
    return sp.profile_from_dict({"format": sp.PROFILE_FORMAT, "site": "stmary",
                                 "archives": {"cxr-triage": {"version": binding.version, "sha256": binding.sha256,
                                                             "content_sha256": binding.content_sha256}},
                                 "families": {"triage": fam}})


def test_apply_changes_labels_as_the_profile_says():
    probs = {"covid19": 0.25, "normal": 0.5, "pneumonia": 0.25}
    plain = _profile()
    assert sp.apply(plain, "triage", probs) == (probs, "normal", "argmax")
    op = "stmary:triage.covid19.sensitivity>=0.9"
    lowered = _profile(thresholds={"covid19": {"threshold": 0.2, "operating_point": op}})
    cal, label, name = sp.apply(lowered, "triage", probs)
    assert (label, name) == ("covid19", op) and cal == probs
    raised = _profile(thresholds={"normal": {"threshold": 0.6, "operating_point": "stmary:normal"}})
    assert sp.apply(raised, "triage", probs)[1] in ("covid19", "pneumonia")
    warm = _profile(calibration={"method": "temperature", "T": 2.0})
    cal, label, _ = sp.apply(warm, "triage", probs)
    assert label == "normal" and cal["normal"] < 0.5 and sum(cal.values()) == pytest.approx(1.0)
    shifted = _profile(prior={"reference": {"covid19": 0.2, "normal": 0.4, "pneumonia": 0.4},
                              "site": {"covid19": 0.6, "normal": 0.2, "pneumonia": 0.2}})
    cal, label, _ = sp.apply(shifted, "triage", probs)
    assert label == "covid19" and cal["covid19"] > 0.5
    with pytest.raises(KeyError):
        sp.apply(plain, "mortality", {"died": 0.3})


def test_binary_apply_answers_in_the_family_words():
    b = sp.ArchiveBinding("cxr-mortality", "0.1.0", "b" * 64)
    prof = sp.profile_from_dict({
        "format": sp.PROFILE_FORMAT, "site": "stmary",
        "archives": {"cxr-mortality": {"version": b.version, "content_sha256": b.content_sha256}},
        "families": {"mortality": {"model": "cxr-mortality", "kind": "binary", "labels": ["died"],
                                   "served_thresholds": {"died": 0.5},
                                   "answer_labels": {"positive": "high", "negative": "low"},
                                   "thresholds": {"died": {"threshold": 0.2, "operating_point": "stmary:died"}}}}})
    assert sp.apply(prof, "mortality", {"died": 0.3})[1:] == ("high", "stmary:died")
    assert sp.apply(prof, "mortality", {"died": 0.1})[1] == "low"


def test_a_profile_for_another_archive_is_refused(tmp_path):
    prof = _profile()
    bound = prof.archives["cxr-triage"]
    sp.check_binding(prof, bound)
    for other in (sp.ArchiveBinding("cxr-triage", bound.version, "0" * 64),
                  sp.ArchiveBinding("cxr-triage", "9.9.9", bound.content_sha256)):
        with pytest.raises(sp.ProfileMismatch, match="re-calibrate"):
            sp.check_binding(prof, other)
    sp.check_binding(prof, sp.ArchiveBinding("cxr-pxs", "1", "c" * 64))  # not covered: served as is
    (tmp_path / "profile.json").write_text(json.dumps({"format": "other/0"}))
    with pytest.raises(sp.ProfileError, match="re-calibrate"):
        sp.load_profile(tmp_path)


def test_archive_digest_is_the_same_from_the_mar_and_its_unpacked_folder(tmp_path):
    _need_store()
    from cxrserve.core.files import unpack_archive

    mar = STORE / "cxr-mortality.mar"
    a = sp.archive_info(mar)
    b = sp.archive_info(unpack_archive(mar, tmp_path / "x"))
    assert (a.model, a.version, a.content_sha256) == (b.model, b.version, b.content_sha256)
    assert a.sha256 and b.sha256 is None


# --------------------------------------------------------------------------- real data
@pytest.mark.shared_data
def test_audit_hannover_as_a_new_hospital(shared_data, tmp_path):
    """hannover_covid audited in its own words (covid, died), on a patient subsample."""
    _need_store()
    from cxrserve.tools.site.audit import write_audit
    from cxrserve.tools.site.config import site_from_dict as parse
    from cxrserve.tools.site.scoring import score_folder

    folder = shared_data / "hannover_covid"
    if not (folder / "labels.csv").is_file():
        pytest.skip("no hannover_covid in the shared data")
    site = parse({"name": "hannover", "labels": {"covid": "covid19"},
                  "columns": {"died": {"1": "mortality.risk", "0": "not:mortality.risk"}},
                  "targets": {"triage.covid19.sensitivity": 0.9, "triage.covid19.specificity": 0.8}})

    def sample(records):  # every film of 12 patients, picked by id order (no look at outcomes)
        keep = sorted({r.patient_id for r in records})[:12]
        return [r for r in records if r.patient_id in keep]

    table = score_folder(folder, site, STORE, progress=False, limit_records=sample)
    audit = write_audit(table, site, tmp_path, n_boot=200)
    covid = audit["families"]["triage"]["labels"]["covid19"]
    assert covid["negatives"] == 0 and covid["n"] > 0
    assert covid["sensitivity"]["estimate"] is not None and covid["specificity"]["estimate"] is None
    spec_target = next(t for t in audit["targets"] if t["target"] == "triage.covid19.specificity")
    assert spec_target["met"] is None and not audit["all_met"]  # no negatives: not claimed as met
    assert "mortality" in audit["families"] and audit["data"]["patients"] == 12
    page = (tmp_path / "report.html").read_text()
    ids = {r["patient_id"] for r in csv.DictReader(open(folder / "labels.csv"))}
    assert not any(pid in page for pid in ids if len(pid) >= 6)
