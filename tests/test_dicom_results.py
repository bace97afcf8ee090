"""DICOM result objects (SR TID 1500, lung SEG, heatmap SCs) from real cxr-study responses.

The response comes from the store's cxr-study model in process (tests/study_adapter.py);
the objects are checked by dicom3tools' ``dciodvfy`` and read back with highdicom.
"""
from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest

from cxrserve import families
from cxrserve.families.zeroshot.presentation import finding_code
from cxrserve.core.family import PRIVATE_SCHEME
from cxrserve.tools import dicom_results as dr
from cxrserve.tools.dicom_results import codes as dr_codes
from cxrserve.tools.dicom_results import response as dr_response
from cxrserve.synthetic.dicomwrite import to_dicom
from cxrserve.synthetic.phantoms import render, sample_spec
from dicomtools import dciodvfy, have
from study_adapter import FAMILIES, StudyModelScorer

pytestmark = pytest.mark.slow
RSNA = "chest/RSNA_pneumonia_c64d5667-a776-4f95-9e21-bfabafb07740.dcm"


@pytest.fixture(scope="session")
def study_scorer(pipeline):
    return StudyModelScorer(pipeline("cxr-study"))


def phantom_dicom(seed: int, *, kind: str = "frontal", size: int = 384, **tags) -> bytes:
    img = render(sample_spec(seed, kind=kind, height=size, width=size)).image
    return to_dicom(img, modality="CR", view_position="LATERAL" if kind == "lateral" else "PA",
                    patient_name="Doe^Jane", patient_id="PID-424242", tags=tags or None)


@pytest.fixture(scope="module")
def chest_dicom() -> bytes:
    """A real chest DICOM from ../shared when present (JPEG baseline CR AP), else a phantom."""
    from conftest import shared_data_root

    path = shared_data_root() / "dicom_samples" / RSNA
    return path.read_bytes() if path.exists() else phantom_dicom(11)


@pytest.fixture(scope="module")
def made(study_scorer, chest_dicom, tmp_path_factory):
    response = study_scorer.score(chest_dicom)
    assert "results" in response, response
    source = pydicom.dcmread(io.BytesIO(chest_dicom))
    objects = dr.build_results(source, response)
    paths = dr.write_results(objects, tmp_path_factory.mktemp("results"))
    return source, response, objects, {p.stem: p for p in paths}


def sr_values(path) -> tuple[dict, dict, list]:
    """(numeric by concept code, coded value by concept code, TID 4019 ids) read with highdicom."""
    import highdicom as hd

    sr = hd.sr.srread(path)
    nums, codes, algorithms = {}, {}, []
    for group in sr.content.get_image_measurement_groups():
        items = {}
        for item in group[0].ContentSequence:  # TID 1501 rows: TID 4019 is inline
            name = item.ConceptNameCodeSequence[0].CodeValue
            items.setdefault(name, []).append(getattr(item, "TextValue", None))
        algorithms.append((items["111001"][0], items["111003"][0], items.get("111002", [])))
        for m in group.get_measurements():
            nums[m.name.value] = (m.value, m.unit.value)
        for q in group.get_qualitative_evaluations():
            codes[q.name.value] = q.value.value
    return nums, codes, algorithms


def test_every_object_passes_dciodvfy(made):
    missing = have("dciodvfy")
    if missing:
        pytest.skip("dicom3tools not installed (make dicomtools)")
    _, _, objects, paths = made
    assert set(paths) == {"sr", "seg", "sc-triage", "sc-severity", "sc-mortality"}
    for kind, path in paths.items():
        errors, _warnings = dciodvfy(path)
        assert errors == [], f"{kind}: {errors}"


def test_objects_are_in_the_source_study(made):
    source, _, objects, _ = made
    for ds in objects:
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.PatientID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert ds.SOPInstanceUID != source.SOPInstanceUID
    assert len({ds.SeriesInstanceUID for ds in objects}) == len(objects)


def test_sr_numbers_equal_the_response(made):
    _, response, _, paths = made
    r = response["results"]
    nums, codes, algorithms = sr_values(paths["sr"])
    c = dr_codes.CODES
    assert nums[c["p_covid19"].value] == (pytest.approx(r["triage"]["probabilities"]["covid19"]), "1")
    assert nums[c["p_normal"].value][0] == pytest.approx(r["triage"]["probabilities"]["normal"])
    assert nums[c["p_pneumonia"].value][0] == pytest.approx(r["triage"]["probabilities"]["pneumonia"])
    assert codes[c["triage_class"].value] == c[f"class_{r['triage']['label']}"].value
    assert nums[c["pxs"].value][0] == pytest.approx(r["pxs"]["pxs"])
    assert nums[c["pxs_percentile"].value] == (pytest.approx(r["pxs"]["pxs_percentile"]), "%")
    assert c["pxs_difference"].value not in nums  # no prior: no change
    assert nums[c["geographic_extent"].value][0] == pytest.approx(r["severity"]["geographic_extent"])
    assert nums[c["opacity"].value][0] == pytest.approx(r["severity"]["opacity"])
    assert nums[c["mortality_risk"].value][0] == pytest.approx(r["mortality"]["risk"])
    assert codes[c["mortality_label"].value] == c[f"mortality_{r['mortality']['risk_label']}"].value
    for label, p in r["zeroshot"]["probabilities"].items():
        assert nums[finding_code(label).value][0] == pytest.approx(p)
    assert nums[c["gate_score"].value][0] == pytest.approx(response["input_gate"]["score"])
    assert codes[c["gate_verdict"].value] == dr_codes.gate_code(response["input_gate"]["verdict"]).value
    # TID 4019 per family: name and version of each section's model
    named = {name: version for name, version, _ in algorithms}
    for family in FAMILIES:
        assert named[r[family]["model"]] == r[family]["model_version"]
    # demo weights are flagged; the SR says research use only
    assert codes[c["demo_weights"].value] == c["yes"].value
    assert codes[c["research_use"].value] == c["yes"].value
    ds = pydicom.dcmread(paths["sr"])
    texts = [it.TextValue for it in ds.ContentSequence[-1].ContentSequence if it.ValueType == "TEXT"]
    assert texts[0] == dr_codes.RESEARCH_NOTICE
    # the worklist priority: a CODE item of the same container, and the rules it came from
    (level,) = [it for it in ds.ContentSequence[-1].ContentSequence if it.ValueType == "CODE"]
    assert level.ConceptNameCodeSequence[0].CodeValue == c["priority"].value
    assert level.ConceptCodeSequence[0].CodeValue == dr_codes.PRIORITY_LEVELS[response["priority"]["level"]].value
    assert texts[1:] == [response["priority"]["rules"]]
    assert "RESEARCH USE ONLY" in ds.SeriesDescription
    assert ds.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == PRIVATE_SCHEME


def test_seg_mask_equals_the_served_mask(made):
    import highdicom as hd

    source, response, _, paths = made
    seg = hd.seg.segread(paths["seg"])
    # the frame highdicom finds for the source instance: the SEG references that image
    mask = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1])[0, ..., 0]
    served = dr_response.mask_from_png(response["results"]["lungseg"]["mask_png"])
    assert mask.shape == served.shape == (int(source.Rows), int(source.Columns))
    assert np.array_equal(mask.astype(bool), served)
    assert served.any()
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "39607008"  # SCT Lung
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_heatmaps_are_labelled_secondary_captures(made):
    source, response, _, paths = made
    captures = {kind: (name, p) for kind, (name, p) in families.result_pictures().items() if p.segment is None}
    assert set(captures) == {"sc-triage", "sc-severity", "sc-mortality"}
    for kind, (name, picture) in captures.items():
        ds = pydicom.dcmread(paths[kind])
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert ds.SeriesNumber == picture.series_number
        assert picture.label in ds.SeriesDescription and picture.label in ds.ImageComments
        assert "RESEARCH USE ONLY" in ds.ImageComments
        served = dr_response.decode_png(response["results"][name.removeprefix("cxr-")][picture.field])[..., :3]
        assert np.array_equal(ds.pixel_array, served)
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_uids_are_stable_for_a_rerun_and_change_with_the_model_version(made):
    source, response, objects, _ = made
    again = dr.build_results(source, response)
    assert [d.SOPInstanceUID for d in again] == [d.SOPInstanceUID for d in objects]
    assert [d.SeriesInstanceUID for d in again] == [d.SeriesInstanceUID for d in objects]
    other = dr.build_results(source, {**response, "model_version": response["model_version"] + "-retrained"})
    assert not {d.SOPInstanceUID for d in other} & {d.SOPInstanceUID for d in objects}


def test_rejected_inputs_make_no_objects(study_scorer):
    lateral = phantom_dicom(12, kind="lateral")
    response = study_scorer.score(lateral)
    assert response["status"] == 422
    with pytest.raises(dr.NotProcessed, match="lateral"):
        dr.build_results(pydicom.dcmread(io.BytesIO(lateral)), response)


class StudyClient:
    """A CXRClient stand-in that answers ``cxr-study`` with the in-process study scorer."""

    def __init__(self, scorer):
        self.scorer = scorer

    def predict(self, model, data, options=None):
        from cxrserve.tools.client import InputRejected

        assert model == "cxr-study" and options.get("pictures") == "true"
        response = self.scorer.score(data)
        if "error" in response:
            raise InputRejected(response["message"], status=response["status"], code=response["error"])
        return response


def test_batch_dicom_out_writes_objects_for_each_processed_dicom(study_scorer, tmp_path):
    from cxrserve.tools.batch.inputs import expand_inputs
    from cxrserve.tools.batch.run import run_batch
    from cxrserve.tools.batch.scorers import RemoteScorer

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "frontal.dcm").write_bytes(phantom_dicom(13, size=256, SOPInstanceUID="1.2.826.0.1.3680043.8.498.9001"))
    (tmp_path / "in" / "lateral.dcm").write_bytes(phantom_dicom(14, kind="lateral", size=256,
                                                                SOPInstanceUID="1.2.826.0.1.3680043.8.498.9002"))
    scorer = RemoteScorer(StudyClient(study_scorer), "cxr-study", {"pictures": "true"}, dicom_out=tmp_path / "dicom")
    summary = run_batch(expand_inputs([tmp_path / "in"]), tmp_path / "rows.jsonl", scorer=scorer, progress=False)
    assert summary.ok == 1 and summary.errors == 1
    (folder,) = list((tmp_path / "dicom").iterdir())  # the lateral gets no objects
    from cxrserve.tools.node.receive import sop_hash

    assert folder.name == sop_hash("1.2.826.0.1.3680043.8.498.9001")
    assert {p.stem for p in folder.glob("*.dcm")} == {"sr", "seg", "sc-triage", "sc-severity", "sc-mortality"}
    sr = pydicom.dcmread(folder / "sr.dcm")
    assert sr.StudyInstanceUID == pydicom.dcmread(tmp_path / "in" / "frontal.dcm").StudyInstanceUID


def test_a_failed_family_is_left_out_and_the_others_still_reported(made, tmp_path):
    source, response, _, _ = made
    broken = {**response, "results": {**response["results"], "mortality": {
        "error": "model_failed", "status": 500, "message": "worker died"}}}
    objects = dr.build_results(source, broken)
    assert {dr.kind_of(d) for d in objects} == {"sr", "seg", "sc-triage", "sc-severity"}
    (path,) = [p for p in dr.write_results(objects, tmp_path) if p.stem == "sr"]
    nums, _, algorithms = sr_values(path)
    assert dr_codes.CODES["mortality_risk"].value not in nums
    assert dr_codes.CODES["pxs"].value in nums
    assert "cxr-mortality" not in {name for name, _, _ in algorithms}
