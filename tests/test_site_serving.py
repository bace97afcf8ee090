"""Serving applies a site's profile: in process, through TorchServe (REST option, header, study),
and after ``cxrserve site install``; unknown sites are 400, profiles for other weights 409."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cxrserve.core import site_profile as sp
from cxrserve.core.errors import MalformedInput
from cxrserve.core.loading import load_pipeline
from cxrserve.core.sites import SiteProfileRefused
from site_fixture import COVID_THRESHOLD, OPERATING_POINT, SITE, STALE, write_sites

SINGLE_MODELS = ("cxr-lungseg", "cxr-triage", "cxr-pxs", "cxr-severity", "cxr-mortality", "cxr-zeroshot")


def _cli(*argv) -> int:
    from cxrserve.tools.cli import main

    return main(list(argv))


@pytest.fixture(scope="module")
def film():
    from cxrserve.synthetic.phantoms import render, sample_spec
    from tsutil import png

    return png(render(sample_spec(3, label="covid19", height=256, width=256)).image)


@pytest.fixture(scope="module")
def sites(model_store, tmp_path_factory):
    return write_sites(tmp_path_factory.mktemp("sites"), model_store)


@pytest.fixture(scope="module")
def triage(model_store, sites):
    return load_pipeline(model_store / "cxr-triage.mar", device="cpu", sites=sites)


def test_binding_is_the_same_from_the_archive_and_the_loaded_model(model_store, pipeline):
    """What install checks (the .mar) and what a worker checks (its components) agree, and the
    triage section of cxr-study is bound like cxr-triage (one profile serves both)."""
    for name in SINGLE_MODELS:
        info = sp.archive_info(model_store / f"{name}.mar")
        loaded = pipeline(name).binding()
        assert (info.model, info.version, info.content_sha256) == (loaded.model, loaded.version, loaded.content_sha256)
    study = pipeline("cxr-study")
    assert study.families["triage"].binding().content_sha256 == pipeline("cxr-triage").binding().content_sha256


def test_no_site_answers_exactly_as_without_sites(triage, pipeline, film):
    plain = pipeline("cxr-triage").predict_bytes(film)
    assert json.dumps(triage.predict_bytes(film), sort_keys=True) == json.dumps(plain, sort_keys=True)
    assert "site" not in plain and "uncalibrated" not in plain


def test_site_calibrates_and_names_its_operating_point(triage, pipeline, film):
    served = pipeline("cxr-triage").predict_bytes(film)
    answer = triage.predict_bytes(film, {"site": SITE})
    assert answer["site"] == SITE and len(answer["site_profile"]) == 16
    assert answer["uncalibrated"] == {"probabilities": served["probabilities"], "label": served["label"]}
    p = np.array([served["probabilities"][c] for c in ("covid19", "normal", "pneumonia")])
    expected = sp.temperature_scale(p, 2.0)
    got = np.array([answer["probabilities"][c] for c in ("covid19", "normal", "pneumonia")])
    assert np.allclose(got, expected, atol=2e-6)
    if expected[0] >= COVID_THRESHOLD:  # the site's low COVID-19 threshold decides
        assert (answer["label"], answer["operating_point"]) == ("covid19", OPERATING_POINT)
    assert answer["input_gate"]["threshold"] == 0.01  # the site's gate threshold
    from schemas import validate

    validate(answer, "cxr-triage")


def test_unknown_site_is_400_and_a_stale_profile_409(triage, film):
    with pytest.raises(MalformedInput, match="unknown site 'nowhere'.*testsite"):
        triage.predict_bytes(film, {"site": "nowhere"})
    with pytest.raises(MalformedInput, match="not a site name"):
        triage.predict_bytes(film, {"site": "../../etc"})
    with pytest.raises(SiteProfileRefused, match="re-calibrate") as err:
        triage.predict_bytes(film, {"site": STALE})
    assert err.value.status == 409
    assert set(triage.describe()["sites"]["refused"]) == {STALE}


def test_default_site_answers_requests_that_name_none(model_store, film, tmp_path):
    folder = write_sites(tmp_path / "sites", model_store, default=SITE)
    p = load_pipeline(model_store / "cxr-mortality.mar", device="cpu", sites=folder)
    answer = p.predict_bytes(film)
    assert answer["site"] == SITE and answer["operating_point"] == "served"
    risk = answer["uncalibrated"]["risk"]
    assert answer["risk"] == pytest.approx(float(sp.platt(risk, 0.5, -1.0)), abs=2e-6)
    assert answer["risk_label"] == ("high" if answer["risk"] >= 0.5 else "low")


def test_study_sections_follow_the_site(model_store, sites, triage, film):
    study = load_pipeline(model_store / "cxr-study.mar", device="cpu", sites=sites)
    answer = study.predict_bytes(film, {"site": SITE, "models": "triage,pxs"})
    assert answer["site"] == SITE
    section = answer["results"]["triage"]
    single = triage.predict_bytes(film, {"site": SITE})
    assert {k: section[k] for k in ("label", "probabilities", "operating_point", "uncalibrated")} == \
           {k: single[k] for k in ("label", "probabilities", "operating_point", "uncalibrated")}
    assert answer["results"]["pxs"]["site"] == SITE and "operating_point" not in answer["results"]["pxs"]
    # a profile refused for the triage weights fails only the sections it calibrates
    stale = study.predict_bytes(film, {"site": STALE, "models": "triage,pxs"})["results"]
    assert stale["triage"]["status"] == 409 and "re-calibrate" in stale["triage"]["message"]
    assert "pxs" in stale["pxs"]


def test_install_checks_the_store_and_serving_reads_it(model_store, film, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    for mar in model_store.glob("*.mar"):
        (store / mar.name).symlink_to(mar)
    made = write_sites(tmp_path / "made", model_store)
    assert _cli("site", "install", str(made / STALE), "--store", str(store)) == 2  # refused: re-calibrate
    assert not (store / "sites" / STALE).exists()
    broken = json.loads((made / SITE / "profile.json").read_text())
    (made / "broken").mkdir()
    (made / "broken" / "profile.json").write_text(json.dumps({**broken, "priority": {"urgent": [{"field": 3}]}}))
    assert _cli("site", "install", str(made / "broken"), "--store", str(store)) == 2  # its rules do not parse
    assert _cli("site", "install", str(made / SITE), "--store", str(store), "--default") == 0
    assert json.loads((store / "sites" / "sites.json").read_text()) == {"default": SITE}
    assert _cli("site", "list", "--store", str(store)) == 0
    answer = load_pipeline(store / "cxr-triage.mar", device="cpu").predict_bytes(film)  # the store's own sites
    assert answer["site"] == SITE
    shutil.rmtree(store / "sites" / SITE)
    with pytest.raises(SiteProfileRefused, match="default site"):  # a default without its profile
        load_pipeline(store / "cxr-triage.mar", device="cpu").predict_bytes(film)


def test_calibrated_profile_installs_and_answers(model_store, tmp_path):
    """A profile fitted by ``cxrserve site calibrate`` (phantoms in a hospital's PCR words) is
    installed and answers with its own threshold."""
    import csv

    import yaml

    from cxrserve.synthetic.phantoms import write_dataset

    root = write_dataset(tmp_path / "stmary", 24, seed=11, studies_per_patient=2, height=224, width=224)
    rows = list(csv.DictReader(open(root / "labels.csv")))
    for r in rows:
        r["label"] = "pcr_pos" if r["label"] == "covid19" else "pcr_neg"
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (tmp_path / "site.yaml").write_text(yaml.safe_dump({
        "name": "stmary", "labels": {"pcr_pos": "covid19", "pcr_neg": "not:covid19"},
        "targets": {"triage.covid19.sensitivity": 0.9}}))
    store = tmp_path / "store"
    store.mkdir()
    for mar in model_store.glob("*.mar"):
        (store / mar.name).symlink_to(mar)
    assert _cli("site", "calibrate", str(root), "--site-file", str(tmp_path / "site.yaml"), "--out",
                str(tmp_path / "cal"), "--store", str(store), "--quiet", "--n-boot", "50", "--folds", "3") == 0
    assert _cli("site", "install", str(tmp_path / "cal"), "--store", str(store)) == 0
    profile = sp.load_profile(store / "sites" / "stmary")
    p = load_pipeline(store / "cxr-triage.mar", device="cpu")
    film = next(p for p in sorted(root.rglob("*")) if p.suffix in (".png", ".dcm"))
    answer = p.predict_bytes(film.read_bytes(), {"site": "stmary"})
    op = profile.families["triage"].thresholds["covid19"]["operating_point"]
    covid = answer["probabilities"]["covid19"]
    threshold = profile.families["triage"].thresholds["covid19"]["threshold"]
    assert (answer["label"] == "covid19") if covid >= threshold else (answer["operating_point"] != op)
    assert answer["site_profile"] and answer["uncalibrated"]["probabilities"]


# --------------------------------------------------------------------------- through TorchServe
def test_torchserve_applies_the_site_named_by_header_or_field(served, film):
    from cxrserve.core.sites import SITES_ENV  # noqa: F401 (the session server gets the test sites through it)

    plain = served.post("cxr-triage", data=film, headers={"Content-Type": "image/png"})
    assert plain.status_code == 200 and "site" not in plain.json()
    by_header = served.post("cxr-triage", data=film, headers={"Content-Type": "image/png", "X-CXR-Site": SITE})
    import requests

    by_field = requests.post(f"{served.inference}/predictions/cxr-triage", headers=served.headers(), timeout=120,
                             files={"image": ("f.png", film, "image/png"), "site": (None, SITE)})
    for r in (by_header, by_field):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["site"] == SITE and body["uncalibrated"]["probabilities"] == plain.json()["probabilities"]
    unknown = served.post("cxr-triage", data=film, headers={"Content-Type": "image/png", "X-CXR-Site": "nowhere"})
    assert unknown.status_code == 400 and "unknown site" in unknown.json()["message"]
    stale = served.post("cxr-triage", data=film, headers={"Content-Type": "image/png", "X-CXR-Site": STALE})
    assert stale.status_code == 409 and "re-calibrate" in stale.json()["message"]
    study = served.post("cxr-study", data=film, headers={"Content-Type": "image/png", "X-CXR-Site": SITE,
                                                         "X-CXR-Models": "triage,mortality"})
    assert study.status_code == 200
    sections = study.json()["results"]
    assert sections["triage"]["probabilities"] == by_header.json()["probabilities"]
    assert sections["mortality"]["site"] == SITE and "uncalibrated" in sections["mortality"]
