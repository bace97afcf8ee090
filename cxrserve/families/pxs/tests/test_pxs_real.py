"""PXS on the real data in ../shared/data: the evaluation set, its folds and pairs, the pool's images.

These check that the model card's numbers are computed on what the card says: the
severity-scored ieee8023 images, held out by patient, and a pool of normal frontal films
that stage 1 never trained on. Skipped where the shared data is absent.
"""
from __future__ import annotations

import pytest

from cxrserve.training.datasets import patient_groups, patient_kfold
from cxrserve.families.pxs.pool import find_normal_images
from cxrserve.training.common import load_records
from cxrserve.families.pxs.task import same_patient_pairs
from cxrserve.families.pxs.task_pretrain import pretrain_records
from cxrserve.families.pxs.training import scored_records

pytestmark = pytest.mark.shared_data


@pytest.fixture(scope="module")
def ieee(shared_data):
    return load_records(shared_data, sources=["ieee8023_jun2020"])


def test_scored_images_are_the_73_with_their_same_patient_pairs(ieee):
    scored = scored_records(ieee)
    assert len(scored) == 73
    assert all(0 <= r.geographic_extent <= 8 and 0 <= r.opacity <= 6 for r in scored)
    pairs = same_patient_pairs(scored)
    groups = patient_groups(scored)
    assert len(pairs) == 28 and all(groups[a] == groups[b] for a, b in pairs)
    for a, b in pairs:  # prior first: fewer days since symptom onset
        assert float(scored[a].extras["offset"]) <= float(scored[b].extras["offset"])


def test_folds_hold_out_every_scored_image_once_and_never_split_a_patient(ieee):
    scored = scored_records(ieee)
    folds = patient_kfold(scored, 5, seed=0, stratify=False)
    held = sorted(r.relpath for _, test in folds for r in test)
    assert held == sorted(r.relpath for r in scored)
    group = dict(zip((r.relpath for r in scored), patient_groups(scored)))
    for train, test in folds:
        assert not {group[r.relpath] for r in train} & {group[r.relpath] for r in test}


def test_stage_one_never_sees_a_scored_patient(shared_data):
    records = load_records(shared_data, sources=["nih_cxr8_darkcovidnet", "ieee8023_jun2020"])
    chosen = pretrain_records(records)
    groups = dict(zip(map(id, records), patient_groups(records)))
    scored_groups = {groups[id(r)] for r in records if r.geographic_extent is not None}
    assert chosen and not {groups[id(r)] for r in chosen} & scored_groups
    assert {r.triage_label for r in chosen} == {"normal", "covid19", "pneumonia"}
    assert all(r.is_frontal is not False and r.is_adult is not False for r in chosen)


def test_pool_images_are_normal_adult_frontals(shared_data):
    openist = find_normal_images(shared_data / "openist_normal_lungmasks")
    assert len(openist) == 220
    mixed = find_normal_images(shared_data / "ieee8023_jun2020")
    by_path = {r.path: r for r in load_records(shared_data / "ieee8023_jun2020")}
    assert mixed and all(by_path[p].triage_label == "normal" and by_path[p].is_frontal is not False
                         and by_path[p].is_adult is not False for p in mixed)
    sample = find_normal_images(shared_data / "openist_normal_lungmasks", max_images=16, seed=3)
    assert len(sample) == 16 and set(sample) <= set(openist)
    assert sample == find_normal_images(shared_data / "openist_normal_lungmasks", max_images=16, seed=3)
