"""Tests for cxrserve.training.datasets: readers, adapters, patient splits, torch wrapper."""
from __future__ import annotations

import csv
import dataclasses
import logging
import re
import shutil
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from cxrserve.training import datasets as D
from cxrserve.training.datasets import Record


# --------------------------------------------------------------------------- helpers
def synthetic_records(n_patients: int = 300, seed: int = 0, sources=("a", "b")) -> list[Record]:
    """Patients with 1-6 images, imbalanced labels, equal ids reused across sources."""
    rng = np.random.default_rng(seed)
    labels = ["covid", "normal", "pneumonia_viral", "other"]
    probs = [0.5, 0.3, 0.15, 0.05]
    out = []
    for p in range(n_patients):
        src = sources[p % len(sources)]
        pid = str(p // len(sources))  # "0" exists in both sources: different people
        lab = labels[rng.choice(len(labels), p=probs)]
        for k in range(int(rng.integers(1, 7))):
            out.append(Record(path=Path(f"/nowhere/{src}/{pid}_{k}.png"), source=src, label=lab,
                              patient_id=pid, filename=f"{pid}_{k}.png"))
    return out


def assert_no_leak(parts: list[list[Record]]) -> None:
    groups = D.patient_groups([r for part in parts for r in part])
    offset = 0
    seen: dict[int, int] = {}
    for i, part in enumerate(parts):
        for g in groups[offset:offset + len(part)]:
            assert seen.setdefault(g, i) == i, "a patient is in two parts"
        offset += len(part)


def write_csv(path: Path, header: list[str], rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=header)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in header})


def write_png(path: Path, value: int = 128, shape=(8, 10), noise_seed: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if noise_seed is None:
        img = np.full(shape, value, np.uint8)
    else:
        img = np.random.default_rng(noise_seed).integers(0, 256, shape, dtype=np.uint8)
    assert cv2.imwrite(str(path), img)


# --------------------------------------------------------------------------- label mapping
@pytest.mark.parametrize("label,expected", [
    ("covid", "covid19"), ("COVID-19", "covid19"), ("normal", "normal"), ("No Finding", "normal"),
    ("pneumonia", "pneumonia"), ("pneumonia_bacterial", "pneumonia"), ("pneumonia_viral", "pneumonia"),
    ("pneumonia_fungal", "pneumonia"), ("pneumonia_unspecified", "pneumonia"),
    ("unspecified pneumonia", "pneumonia"), ("bacterial", "pneumonia"), ("viral", "pneumonia"),
    ("other", None), ("lateral", None), ("non_chest", None), ("Effusion|Infiltration", None), ("", None),
])
def test_triage_label(label, expected):
    assert Record(Path("x.png"), "s", label, "1").triage_label == expected
    assert D.triage_label_for(label) == expected


def test_triage_label_lateral_and_ambiguous():
    assert Record(Path("x"), "s", "covid", "1", is_frontal=False).triage_label is None
    gb = lambda f: Record(Path("x"), "gb", "other_pneumonia_or_ards", "1", extras={"ieee8023_finding": f})
    assert gb("SARS").triage_label == "pneumonia"
    assert gb("Streptococcus").triage_label == "pneumonia"
    assert gb("ARDS").triage_label is None


@pytest.mark.parametrize("finding,label", [
    ("COVID-19", "covid"), ("COVID-19, ARDS", "covid"), ("Pneumonia/Viral/COVID-19", "covid"),
    ("SARS", "pneumonia_viral"), ("Pneumonia/Viral/SARS", "pneumonia_viral"),
    ("Streptococcus", "pneumonia_bacterial"), ("Mycoplasma Bacterial Pneumonia", "pneumonia_bacterial"),
    ("Pneumonia/Bacterial/Klebsiella", "pneumonia_bacterial"), ("E.Coli", "pneumonia_bacterial"),
    ("Pneumocystis", "pneumonia_fungal"), ("Pneumonia/Fungal/Aspergillosis", "pneumonia_fungal"),
    ("Pneumonia", "pneumonia_unspecified"), ("Pneumonia/Aspiration", "pneumonia_unspecified"),
    ("No Finding", "normal"), ("ARDS", "other"), ("Pneumonia/Lipoid", "other"), ("Lipoid", "other"),
    ("Tuberculosis", "other"), ("todo", "other"), ("", "other"),
])
def test_finding_to_label(finding, label):
    assert D.finding_to_label(finding) == label


@pytest.mark.parametrize("raw,view", [("PA", "PA"), ("AP", "AP"), ("AP Supine", "AP"), ("ap semi erect", "AP"),
                                      ("L", "LATERAL"), ("Lateral", "LATERAL"), ("LL", "LATERAL"), ("", ""), ("xyz", "")])
def test_normalize_view(raw, view):
    assert D.normalize_view(raw) == view


@pytest.mark.parametrize("name,pid", [
    ("person123_bacteria_456.jpeg", "person123"), ("person1_virus_6.jpeg", "person1"),
    ("NORMAL2-IM-0123-0001.jpeg", "IM-0123"), ("IM-0115-0001.jpeg", "IM-0115"),
    ("IM-0019-0001 (1).jpeg", "IM-0019"), ("NORMAL2-IM-0995-0001-0001.jpg", "IM-0995"), ("foo.jpeg", ""),
])
def test_kermany_patient(name, pid):
    assert D.kermany_patient(name) == pid


# --------------------------------------------------------------------------- splits (synthetic)
@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("val,test", [(0.2, 0.0), (0.15, 0.15), (0.5, 0.0)])
def test_patient_split_never_leaks(seed, val, test):
    recs = synthetic_records(seed=seed)
    split = D.patient_split(recs, val_fraction=val, test_fraction=test, seed=seed)
    assert set(split) == ({"train", "val", "test"} if test else {"train", "val"})
    parts = list(split.values())
    assert sum(map(len, parts)) == len(recs)
    assert Counter(id(r) for p in parts for r in p) == Counter(id(r) for r in recs)
    assert_no_leak(parts)
    keys = [{r.patient_key for r in p} for p in parts]
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            assert not keys[i] & keys[j]


def test_patient_split_sizes_and_stratification():
    recs = synthetic_records(n_patients=600, seed=3)
    split = D.patient_split(recs, val_fraction=0.2, test_fraction=0.1, seed=0)
    n = len(recs)
    overall = Counter(r.label for r in recs)
    for name, frac in [("train", 0.7), ("val", 0.2), ("test", 0.1)]:
        part = split[name]
        assert abs(len(part) / n - frac) < 0.02, name
        mix = Counter(r.label for r in part)
        for lab, cnt in overall.items():
            assert abs(mix[lab] / len(part) - cnt / n) < 0.03, (name, lab)


def test_unstratified_split_still_grouped():
    recs = synthetic_records(seed=5)
    split = D.patient_split(recs, val_fraction=0.3, seed=2, stratify=False)
    assert_no_leak(list(split.values()))
    assert abs(len(split["val"]) / len(recs) - 0.3) < 0.03
    by_source = D.patient_split(recs, val_fraction=0.3, seed=2, stratify=lambda r: r.source)
    assert_no_leak(list(by_source.values()))


def test_patient_split_deterministic():
    recs = synthetic_records(seed=11)
    a = D.patient_split(recs, val_fraction=0.25, seed=4)
    b = D.patient_split(list(recs), val_fraction=0.25, seed=4)
    c = D.patient_split(recs, val_fraction=0.25, seed=5)
    assert [r.path for r in a["val"]] == [r.path for r in b["val"]]
    assert [r.path for r in a["val"]] != [r.path for r in c["val"]]


def test_same_id_in_two_sources_is_two_patients_but_links_merge():
    r = lambda s, p, links=(): Record(Path(f"/{s}/{p}.png"), s, "covid", p, links=links)
    recs = [r("a", "1"), r("b", "1"), r("a", "2"), r("c", "9", (("a", "2"),))]
    g = D.patient_groups(recs)
    assert g[0] != g[1]
    assert g[2] == g[3]
    # linked patients always land together, whatever the seed
    many = synthetic_records(seed=2)
    linked = many + [Record(Path("/x/dup.png"), "x", "covid", "dup", links=(("a", "0"),))]
    for seed in range(10):
        split = D.patient_split(linked, val_fraction=0.5, seed=seed)
        part_of = {id(rec): name for name, part in split.items() for rec in part}
        names = {part_of[id(rec)] for rec in linked if rec.patient_key in {("a", "0"), ("x", "dup")}}
        assert len(names) == 1


def test_repeated_patient_splits():
    recs = synthetic_records(seed=8)
    splits = list(D.repeated_patient_splits(recs, 5, test_fraction=0.5, seed=0))
    assert len(splits) == 5
    tests = []
    for train, test in splits:
        assert len(train) + len(test) == len(recs)
        assert abs(len(test) / len(recs) - 0.5) < 0.03
        assert_no_leak([train, test])
        tests.append(frozenset(r.path for r in test))
    assert len(set(tests)) == 5
    again = [frozenset(r.path for r in t) for _, t in D.repeated_patient_splits(recs, 5, 0.5, seed=0)]
    assert again == tests


def test_patient_kfold():
    recs = synthetic_records(seed=9)
    folds = D.patient_kfold(recs, 5, seed=1)
    assert len(folds) == 5
    tested = Counter()
    for train, test in folds:
        assert len(train) + len(test) == len(recs)
        assert_no_leak([train, test])
        tested.update(id(r) for r in test)
        assert abs(len(test) / len(recs) - 0.2) < 0.03
    assert set(tested.values()) == {1} and len(tested) == len(recs)
    with pytest.raises(ValueError):
        D.patient_kfold(recs, 1)


def test_split_rejects_bad_fractions():
    with pytest.raises(ValueError):
        D.patient_split(synthetic_records(10), val_fraction=0.6, test_fraction=0.5)
    assert D.patient_split([], val_fraction=0.2) == {"train": [], "val": []}


# --------------------------------------------------------------------------- folder reader
PHANTOM_HEADER = ["filename", "label", "patient_id", "view", "is_frontal", "kind", "style",
                  "geographic_extent_mean", "opacity_mean", "involvement_right", "involvement_left",
                  "survival", "mask", "report", "age"]


def test_read_folder_phantom_layout(tmp_path, caplog):
    root = tmp_path / "phantom"
    write_png(root / "images/a.png")
    write_png(root / "images/b.png")
    write_png(root / "images/c.png")
    write_png(root / "masks/a.png", 255)
    rows = [
        dict(filename="images/a.png", label="covid", patient_id="p1", view="AP Supine", is_frontal="1",
             kind="cxr", style="icu", geographic_extent_mean="4.5", opacity_mean="3", involvement_right="0.5",
             involvement_left="0.25", survival="N", mask="masks/a.png", report="bilateral opacities", age="70"),
        dict(filename="images/b.png", label="lateral", patient_id="p1", view="L", is_frontal="0", survival="1", age="12"),
        dict(filename="images/c.png", label="normal", view="PA", mask="masks/missing.png"),
        dict(filename="images/gone.png", label="normal", patient_id="p9"),
    ]
    write_csv(root / "labels.csv", PHANTOM_HEADER, rows)
    with caplog.at_level(logging.WARNING, logger="cxrserve.training.datasets"):
        recs = D.read_folder(root)
    assert "skipped 1 of 4" in caplog.text and "1 mask files" in caplog.text
    assert len(recs) == 3
    a, b, c = recs
    assert a.source == "phantom" and a.path == (root / "images/a.png").resolve() and a.path.is_absolute()
    assert (a.view, a.is_frontal, a.geographic_extent, a.opacity, a.survival, a.is_adult) == ("AP", True, 4.5, 3.0, 0, True)
    assert a.mask_path == (root / "masks/a.png").resolve() and a.mask_source == "mask"
    assert a.report == "bilateral opacities" and a.extras["style"] == "icu" and a.extras["involvement_left"] == "0.25"
    assert a.triage_label == "covid19" and a.filename == "images/a.png"
    assert (b.view, b.is_frontal, b.survival, b.is_adult, b.triage_label) == ("LATERAL", False, 1, False, None)
    assert c.patient_id == "img:images/c.png" and c.mask_path is None and c.is_frontal is True
    assert c.geographic_extent is None and c.survival is None and c.is_adult is None
    assert D.read_folder(root, source="phantom_v2")[0].source == "phantom_v2"


def test_read_folder_outcome_projection_and_site_columns(tmp_path):
    """A hospital's own column names: ``died`` (1/0), ``projection`` (ap/pa), an optional ``site``."""
    root = tmp_path / "hospital"
    for n in ("a", "b", "c"):
        write_png(root / f"images/{n}.png")
    header = ["filename", "label", "patient_id", "projection", "died", "site"]
    rows = [dict(filename="images/a.png", label="covid", patient_id="p1", projection="ap", died="1", site="icu"),
            dict(filename="images/b.png", label="covid", patient_id="p2", projection="pa", died="0", site=""),
            dict(filename="images/c.png", label="covid", patient_id="p3", projection="", died="", site="")]
    write_csv(root / "labels.csv", header, rows)
    a, b, c = D.read_folder(root)
    assert (a.view, a.is_frontal, a.survival, a.site) == ("AP", True, 0, "icu")
    assert (b.view, b.survival, b.site) == ("PA", 1, "hospital")  # no site column value: the collection
    assert c.survival is None and c.view == ""


def test_read_folder_mask_preference(tmp_path):
    root = tmp_path / "ieee"
    for n in ("x", "y", "z"):
        write_png(root / f"images/{n}.png")
        for m in ("masks_v7labs", "masks_generalblockchain", "masks_lungVAE"):
            write_png(root / f"{m}/{n}.png", 255)
    header = ["filename", "label", "patientid", "view", "is_frontal", "mask_lungVAE", "mask_v7labs",
              "mask_generalblockchain_lungs", "geographic_extent_mean", "opacity_mean", "survival"]
    rows = [
        dict(filename="images/x.png", label="covid", patientid="5", view="PA", is_frontal="1", mask_lungVAE="masks_lungVAE/x.png",
             mask_v7labs="masks_v7labs/x.png", mask_generalblockchain_lungs="masks_generalblockchain/x.png", survival="Y"),
        dict(filename="images/y.png", label="pneumonia_viral", patientid="5", view="PA", is_frontal="1",
             mask_lungVAE="masks_lungVAE/y.png", mask_generalblockchain_lungs="masks_generalblockchain/y.png"),
        dict(filename="images/z.png", label="other", patientid="6", view="AP", is_frontal="1", mask_lungVAE="masks_lungVAE/z.png"),
    ]
    write_csv(root / "labels.csv", header, rows)
    x, y, z = D.read_folder(root)
    assert x.mask_source == "mask_v7labs" and y.mask_source == "mask_generalblockchain_lungs"
    assert z.mask_path is None, "model-predicted lungVAE masks must not be ground truth by default"
    assert x.survival == 1 and x.patient_id == "5"
    vae = D.read_folder(root, mask_column="mask_lungVAE")
    assert all(r.mask_source == "mask_lungVAE" for r in vae)
    gb_first = D.read_folder(root, mask_column=["mask_generalblockchain_lungs", "mask_v7labs"])
    assert [r.mask_source for r in gb_first] == ["mask_generalblockchain_lungs"] * 2 + [""]


def test_read_folder_kermany_key_reparsed(tmp_path):
    root = tmp_path / "kermany_pediatric_subset"
    names = ["images/normal/NORMAL2-IM-0401-0001.jpg", "images/normal/NORMAL2-IM-0415-0001.jpg",
             "images/normal/IM-0019-0001 (1).jpg", "images/pneumonia_viral/person12_virus_44.jpg"]
    for n in names:
        write_png(root / n)
    rows = [dict(filename=n, label="pneumonia" if "person" in n else "normal", kermany_patient_key=k)
            for n, k in zip(names, ["NORMAL2-IM", "NORMAL2-IM", "IM-0019-0001 (1).jpeg", "person12"])]
    write_csv(root / "labels.csv", ["filename", "label", "pneumonia_type", "kermany_patient_key"], rows)
    recs = D.read_folder(root)
    assert [r.patient_id for r in recs] == ["IM-0401", "IM-0415", "IM-0019", "person12"]
    assert all(r.is_adult is False and r.is_frontal for r in recs)
    assert recs[0].extras["kermany_patient_key"] == "NORMAL2-IM"


# --------------------------------------------------------------------------- public-format adapters
def test_covid_chestxray_metadata(tmp_path):
    header = ["patientid", "offset", "sex", "age", "finding", "RT_PCR_positive", "survival", "intubated",
              "went_icu", "view", "modality", "date", "location", "folder", "filename", "doi", "url",
              "license", "clinical_notes", "other_notes"]
    img = tmp_path / "images"
    for n in ("a.jpg", "b.jpg", "c.png", "d.jpg"):
        write_png(img / n)
    rows = [
        dict(patientid="2", age="65", finding="Pneumonia/Viral/COVID-19", survival="Y", view="PA", modality="X-ray",
             folder="images", filename="a.jpg", clinical_notes="fever and cough"),
        dict(patientid="2", finding="Pneumonia/Viral/COVID-19", view="L", modality="X-ray", folder="images", filename="b.jpg"),
        dict(patientid="3", finding="Pneumonia/Bacterial/Streptococcus", survival="N", view="AP Supine",
             modality="X-ray", folder="images", filename="c.png", age="4"),
        dict(patientid="4", finding="Pneumonia/Viral/COVID-19", view="Axial", modality="CT", folder="images", filename="d.jpg"),
        dict(patientid="5", finding="No Finding", view="PA", modality="X-ray", folder="images", filename="missing.jpg"),
    ]
    write_csv(tmp_path / "metadata.csv", header, rows)
    sev = tmp_path / "covid-severity-scores.csv"
    sev.write_text("## scores from 3 raters\nfilename,geographic_extent_mean,opacity_mean\na.jpg,3.5,2.7\n")
    recs = D.covid_chestxray_metadata(tmp_path / "metadata.csv", img, severity_csv=sev)
    assert [r.filename for r in recs] == ["a.jpg", "b.jpg", "c.png"]  # CT and missing rows dropped
    a, b, c = recs
    assert (a.label, a.triage_label, a.report, a.survival, a.is_adult, a.view) == ("covid", "covid19", "fever and cough", 1, True, "PA")
    assert (a.geographic_extent, a.opacity) == (3.5, 2.7) and b.geographic_extent is None
    assert (b.view, b.is_frontal, b.triage_label) == ("LATERAL", False, None)
    assert (c.label, c.triage_label, c.survival, c.view, c.is_adult) == ("pneumonia_bacterial", "pneumonia", 0, "AP", False)
    assert a.patient_id == b.patient_id == "2" and a.extras["finding"] == "Pneumonia/Viral/COVID-19"


def test_nih_data_entry(tmp_path):
    header = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
              "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]
    img = tmp_path / "images_001" / "images"
    names = ["00000001_000.png", "00000001_001.png", "00000002_000.png", "00000003_000.png"]
    for n in names:
        write_png(img / n)
    rows = [
        {"Image Index": names[0], "Finding Labels": "No Finding", "Patient ID": "1", "Patient Age": "58", "View Position": "PA"},
        {"Image Index": names[1], "Finding Labels": "Infiltration|Pneumonia", "Patient ID": "1", "Patient Age": "58", "View Position": "AP"},
        {"Image Index": names[2], "Finding Labels": "Effusion|Infiltration", "Patient ID": "2", "Patient Age": "9", "View Position": "PA"},
        {"Image Index": names[3], "Finding Labels": "No Finding", "Patient ID": "3", "Patient Age": "414", "View Position": "PA"},
        {"Image Index": "00000004_000.png", "Finding Labels": "No Finding", "Patient ID": "4", "Patient Age": "40", "View Position": "PA"},
    ]
    write_csv(tmp_path / "Data_Entry_2017.csv", header, rows)
    recs = D.nih_data_entry(tmp_path / "Data_Entry_2017.csv", tmp_path)  # searched recursively
    assert [r.label for r in recs] == ["normal", "pneumonia", "Effusion|Infiltration", "normal"]
    assert [r.triage_label for r in recs] == ["normal", "pneumonia", None, "normal"]
    assert [r.patient_id for r in recs] == ["1", "1", "2", "3"]
    assert [r.view for r in recs] == ["PA", "AP", "PA", "PA"] and all(r.is_frontal for r in recs)
    assert [r.is_adult for r in recs] == [True, True, False, None]  # 414 is not an age
    assert recs[0].path == (img / names[0]).resolve()


def test_kermany_tree(tmp_path):
    files = ["train/NORMAL/IM-0115-0001.jpeg", "train/NORMAL/NORMAL2-IM-0115-0002.jpeg",
             "train/PNEUMONIA/person1_bacteria_1.jpeg", "train/PNEUMONIA/person1_virus_6.jpeg",
             "test/PNEUMONIA/person100_virus_184.jpeg", "val/NORMAL/NORMAL2-IM-1427-0001.jpeg"]
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_bytes(b"")  # the reader never opens images
    (tmp_path / "train" / "NORMAL" / ".DS_Store").write_bytes(b"")
    recs = D.kermany_tree(tmp_path)
    by = {r.filename: r for r in recs}
    assert len(recs) == 6
    assert by["train/NORMAL/IM-0115-0001.jpeg"].patient_id == by["train/NORMAL/NORMAL2-IM-0115-0002.jpeg"].patient_id == "IM-0115"
    b = by["train/PNEUMONIA/person1_bacteria_1.jpeg"]
    assert (b.label, b.patient_id, b.extras["pneumonia_type"], b.extras["split"], b.is_adult) == ("pneumonia", "person1", "bacteria", "train", False)
    assert by["train/PNEUMONIA/person1_virus_6.jpeg"].extras["pneumonia_type"] == "virus"
    assert by["val/NORMAL/NORMAL2-IM-1427-0001.jpeg"].extras["split"] == "val"
    split = D.patient_split(recs, val_fraction=0.5, seed=0)
    assert_no_leak(list(split.values()))


# --------------------------------------------------------------------------- fingerprint, summary, duplicates
def test_fingerprint(tmp_path):
    root = tmp_path / "src"
    write_png(root / "images/a.png")
    write_png(root / "images/b.png", shape=(20, 20), noise_seed=1)
    write_csv(root / "labels.csv", ["filename", "label"],
              [dict(filename="images/a.png", label="normal"), dict(filename="images/b.png", label="covid")])
    recs = D.read_folder(root)
    fp = D.fingerprint(recs)
    assert re.fullmatch(r"[0-9a-f]{16}", fp)
    assert D.fingerprint(recs[::-1]) == fp
    moved = tmp_path / "elsewhere" / "src"
    shutil.copytree(root, moved)
    assert D.fingerprint(D.read_folder(moved)) == fp
    relabelled = [recs[0], dataclasses.replace(recs[1], label="normal")]
    assert D.fingerprint(relabelled) != fp
    assert D.fingerprint(recs[:1]) != fp


def test_summarize():
    recs = [Record(Path("/a/1.png"), "a", "covid", "1", mask_path=Path("/m.png"), geographic_extent=2.0, opacity=1.0, survival=1),
            Record(Path("/a/2.png"), "a", "covid", "1", survival=0, is_frontal=False),
            Record(Path("/b/1.png"), "b", "normal", "1", is_adult=False)]
    s = D.summarize(recs)
    assert s["images"] == 3 and s["patients"] == 2
    assert s["sources"]["a"]["patients"] == 1 and s["sources"]["a"]["masks"] == 1 and s["sources"]["a"]["severity"] == 1
    assert s["sources"]["a"]["survival"] == {"died": 1, "survived": 1} and s["sources"]["a"]["lateral"] == 1
    assert s["labels"] == {"covid": 2, "normal": 1} and s["triage_labels"] == {"None": 1, "covid19": 1, "normal": 1}


def test_find_and_link_duplicates(tmp_path):
    write_png(tmp_path / "a.png", shape=(64, 64), noise_seed=1)
    write_png(tmp_path / "b.png", shape=(64, 64), noise_seed=2)
    img = cv2.imread(str(tmp_path / "a.png"), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(tmp_path / "a_small.png"), cv2.resize(img, (32, 32), interpolation=cv2.INTER_AREA))
    recs = [Record(tmp_path / "a.png", "s1", "covid", "1"), Record(tmp_path / "b.png", "s1", "covid", "2"),
            Record(tmp_path / "a_small.png", "s2", "covid", "77")]
    pairs = D.find_duplicates(recs)
    assert [(i, j) for i, j, _ in pairs] == [(0, 2)]
    linked = D.link_duplicates(recs, pairs)
    assert linked[0].links == (("s2", "77"),) and linked[2].links == (("s1", "1"),) and linked[1] is recs[1]
    g = D.patient_groups(linked)
    assert g[0] == g[2] != g[1]


# --------------------------------------------------------------------------- torch dataset
def test_record_dataset(tmp_path):
    write_png(tmp_path / "img.png", shape=(6, 9), noise_seed=3)
    write_png(tmp_path / "mask.png", 255, shape=(6, 9))
    recs = [Record(tmp_path / "img.png", "s", "pneumonia_viral", "1", mask_path=tmp_path / "mask.png"),
            Record(tmp_path / "img.png", "s", "other", "2")]
    ds = D.RecordDataset(recs)
    assert len(ds) == 2
    s0 = ds[0]
    assert s0["image"].dtype == np.uint8 and s0["image"].shape == (6, 9) and s0["mask"].max() == 255
    assert s0["target"] == D.CLASS_LABELS.index("pneumonia") and s0["index"] == 0
    assert ds[1]["target"] == -1 and "mask" not in ds[1]
    calls = []

    def augment(s):
        calls.append("augment")
        return {**s, "image": s["image"][:, ::-1]}

    def transform(s):
        calls.append("transform")
        return {**s, "image": s["image"].astype(np.float32) / 255}

    ds2 = D.RecordDataset(recs, augment=augment, transform=transform, target=lambda r: r.patient_id)
    s = ds2[0]
    assert calls == ["augment", "transform"]
    assert s["target"] == "1" and s["image"].dtype == np.float32
    np.testing.assert_allclose(s["image"], s0["image"][:, ::-1] / 255, rtol=1e-6)
    custom = D.RecordDataset(recs, load=lambda r: {"image": np.zeros((2, 2)), "path": str(r.path)})
    assert custom[1]["path"].endswith("img.png")
    import torch

    assert isinstance(ds, torch.utils.data.Dataset)


# --------------------------------------------------------------------------- real data
EXPECTED = {  # from CATALOG.md
    "nih_cxr8_darkcovidnet": {"normal": 404, "pneumonia": 413},
    "openist_normal_lungmasks": {"normal": 220},
    "ieee8023_jun2020": {"covid": 337, "pneumonia_bacterial": 37, "pneumonia_viral": 22, "pneumonia_fungal": 9,
                         "pneumonia_unspecified": 11, "normal": 12, "other": 6},
    "gb_covid_segmentations": {"covid": 54, "other_pneumonia_or_ards": 29, "normal": 1},
    "kermany_pediatric_subset": {"normal": 68, "pneumonia": 82},
    "hannover_covid": {"covid": 243},
}


@pytest.fixture(scope="module")
def shared_records(shared_data):
    return D.read_shared(shared_data)


@pytest.mark.shared_data
def test_read_shared_counts_match_catalog(shared_data, shared_records):
    s = D.summarize(shared_records)
    assert set(s["sources"]) == set(EXPECTED)
    catalog = (shared_data / "CATALOG.md").read_text() if (shared_data / "CATALOG.md").is_file() else ""
    for src, labels in EXPECTED.items():
        assert s["sources"][src]["labels"] == labels, src
        row = next((ln for ln in catalog.splitlines() if ln.startswith(f"| `{src}/`")), None)
        if row is not None:  # total images in the catalog's "labels (images)" cell
            cell = row.split("|")[3]
            assert sum(map(int, re.findall(r"\d+", cell))) == sum(labels.values()), src
    src = s["sources"]
    assert src["openist_normal_lungmasks"]["masks"] == 220
    assert src["ieee8023_jun2020"]["severity"] == 73
    assert src["ieee8023_jun2020"]["lateral"] == 34
    assert src["ieee8023_jun2020"]["survival"] == {"died": 39, "survived": 140}
    assert src["nih_cxr8_darkcovidnet"]["paediatric"] == 80
    assert src["gb_covid_segmentations"]["masks"] == 84
    by = [r for r in shared_records if r.source == "ieee8023_jun2020"]
    assert not any(r.mask_source == "mask_lungVAE" for r in by)
    assert all(r.path.is_file() for r in shared_records)
    assert all(r.mask_path.is_file() for r in shared_records if r.mask_path is not None)
    sev = [r for r in by if r.geographic_extent is not None]
    assert all(0 <= r.geographic_extent <= 8 and 0 <= r.opacity <= 6 for r in sev)
    hannover = src["hannover_covid"]  # a second COVID-19 hospital, with outcomes (CATALOG.md)
    assert hannover["patients"] == 71 and hannover["survival"] == {"died": 48, "survived": 195}
    views = [r.view for r in shared_records if r.source == "hannover_covid"]
    assert views.count("AP") == 194 and views.count("PA") == 49 and hannover["frontal"] == 243
    assert {r.site for r in shared_records} == set(EXPECTED)  # one site per collection here
    kermany = [r for r in shared_records if r.source == "kermany_pediatric_subset"]
    assert not any(r.patient_id in ("NORMAL2-IM",) for r in kermany)


@pytest.mark.shared_data
def test_shared_known_duplicates_are_linked(shared_records):
    g = D.patient_groups(shared_records)
    group_of = {}
    for r, gi in zip(shared_records, g):
        group_of.setdefault(r.patient_key, gi)
    ieee = "ieee8023_jun2020"
    for a, b in [("97", "178"), ("78", "201"), ("137", "202")]:  # same films under two ids
        assert group_of[(ieee, a)] == group_of[(ieee, b)]
    gb = [r for r in shared_records if r.source == "gb_covid_segmentations"]
    assert sum(1 for r in gb if any(k[0] == ieee for k in r.links)) >= 80


@pytest.mark.shared_data
@pytest.mark.parametrize("seed", [0, 1])
def test_shared_split_no_leak(shared_records, seed):
    split = D.patient_split(shared_records, val_fraction=0.2, test_fraction=0.1, seed=seed)
    assert_no_leak(list(split.values()))
    paths = [{r.path for r in p} for p in split.values()]
    assert sum(map(len, paths)) == len(shared_records)
    for name in ("ieee8023_jun2020", "nih_cxr8_darkcovidnet"):
        n = sum(r.source == name for r in shared_records)
        assert abs(sum(r.source == name for r in split["val"]) / n - 0.2) < 0.05
    # pairwise: patient ids never shared between parts within a source
    keys = [{r.patient_key for r in p} for p in split.values()]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
