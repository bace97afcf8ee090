"""HL7 v2.5.1 ORU^R01 and FHIR R4 Bundles of a study result (issue 24): built from the SR's coded
items, validated by hl7apy (strict) and fhir.resources, delivered to hl7apy's MLLP server and a
validating FHIR transaction endpoint (tests/hl7fhir_servers.py), and written by batch."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import pydicom
import pytest

from cxrserve.tools import dicom_results as dr
from cxrserve.tools.dicom_results import codes as dr_codes
from cxrserve.tools.hl7fhir import mllp
from cxrserve.tools.hl7fhir.fhir import FHIRError, build_bundle, post_bundle, validate_bundle
from cxrserve.tools.hl7fhir.hl7 import HL7Error, build_oru, fields_of, make_ack, read_ack, validate
from cxrserve.tools.hl7fhir.results import PRIORITY, study_result
from hl7fhir_servers import FHIRServer, MLLPListener
from study_adapter import StudyModelScorer
from test_dicom_results import phantom_dicom, sr_values

pytestmark = pytest.mark.slow
URGENT = {"level": "urgent", "rules": "site stmary",
          "reasons": [{"code": "CXR0121", "scheme": "99CXRSRV", "meaning": "COVID-19 pattern",
                       "field": "triage.label", "value": "covid19"}]}


@pytest.fixture(scope="module")
def scored(pipeline):
    data = phantom_dicom(21, size=256, SOPInstanceUID="1.2.826.0.1.3680043.8.498.24001",
                         IssuerOfPatientID="HOSP^A", AccessionNumber="ACC-24|1")
    response = StudyModelScorer(pipeline("cxr-study")).score(data)
    assert "results" in response, response
    return pydicom.dcmread(io.BytesIO(data)), response


def obx(message: str) -> list[list[str]]:
    return [seg.split("|") for seg in message.split("\r") if seg.startswith("OBX|")]


def observations(bundle: dict) -> list[dict]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"]


def test_oru_and_bundle_carry_the_srs_numbers_and_codes(scored, tmp_path):
    source, response = scored
    result = study_result(source, response)
    message, bundle = build_oru(result), build_bundle(result)
    validate(message)
    validate_bundle(bundle)
    (sr,) = [o for o in dr.build_results(source, {**response, "results": {k: {x: y for x, y in v.items()
                                                                                if not x.endswith("_png")}
                                                                            for k, v in response["results"].items()}})
             if o.Modality == "SR"]
    sr.save_as(tmp_path / "sr.dcm")
    nums, codes, _ = sr_values(tmp_path / "sr.dcm")
    hl7_nums = {f[3].split("^")[0]: float(f[5]) for f in obx(message) if f[2] == "NM"}
    hl7_codes = {f[3].split("^")[0]: f[5].split("^")[0] for f in obx(message) if f[2] == "CE"}
    fhir_nums = {o["code"]["coding"][0]["code"]: o["valueQuantity"]["value"] for o in observations(bundle)
                 if "valueQuantity" in o}
    fhir_codes = {c["code"]["coding"][0]["code"]: c["valueCodeableConcept"]["coding"][0]["code"]
                  for o in observations(bundle) for c in [o, *o.get("component", [])] if "valueCodeableConcept" in c}
    assert nums and set(hl7_nums) == set(nums) == set(fhir_nums)
    for code, values in nums.items():
        assert hl7_nums[code] == pytest.approx(values[0]) and fhir_nums[code] == pytest.approx(values[0])
    for code, value in codes.items():
        if code in hl7_codes:
            assert hl7_codes[code] == value == fhir_codes[code]
    assert dr_codes.CODES["triage_class"].value in hl7_codes  # the coded class is there
    # units: UCUM, as the SR's
    units = {f[3].split("^")[0]: f[6].split("^")[0] for f in obx(message) if f[2] == "NM"}
    assert units[dr_codes.CODES["pxs"].value] == "{score}" and units[dr_codes.CODES["p_normal"].value] == "1"
    # the patient module and the study, where they belong
    pid, obr = fields_of(message, "PID"), fields_of(message, "OBR")
    assert pid[3] == "PID-424242^^^HOSP\\S\\A" and pid[5].startswith("Doe^Jane")
    assert obr[18] == "ACC-24\\F\\1" and obr[4].startswith("36554-4^") and obr[25] == "P"
    assert any(f[5] == source.StudyInstanceUID for f in obx(message) if f[3].startswith("110180^"))
    assert "RESEARCH USE ONLY" in fields_of(message, "NTE")[3]
    algorithms = [f[5] for f in obx(message) if f[3].startswith("111001^")]
    assert "cxr-input-gate" in algorithms and len(algorithms) == len(result.groups)
    report = bundle["entry"][-1]["resource"]
    assert report["status"] == "preliminary" and report["code"]["coding"][0]["code"] == "36554-4"
    assert report["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{source.StudyInstanceUID}"
    assert len(report["result"]) == len(observations(bundle))
    devices = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Device"]
    assert {d["deviceName"][0]["name"] for d in devices} == set(algorithms)


def test_priority_site_and_operating_point(scored):
    source, response = scored
    without = {k: v for k, v in response.items() if k != "priority"}  # an answer from before priorities
    plain = build_oru(study_result(source, without))
    assert not fields_of(plain, "TQ1")
    assert any(f[5].startswith("CXR0113^Priority not assessed") for f in obx(plain) if f[3].startswith(PRIORITY.value))
    answer = {**response, "priority": URGENT, "site": "stmary", "operating_point": "sens90"}
    result = study_result(source, answer)
    message, bundle = build_oru(result), build_bundle(result)
    validate(message)
    validate_bundle(bundle)
    assert fields_of(message, "TQ1")[9] == "S^Stat^HL70485"
    assert any(f[5].startswith("CXR0111^Urgent") for f in obx(message))
    assert any(f[5].startswith("CXR0121^COVID-19 pattern^99CXRSRV") for f in obx(message))
    notes = [s for s in message.split("\r") if s.startswith("NTE|")]
    assert any("site: stmary; operating point: sens90" in n for n in notes)
    assert any("priority rules: site stmary" in n for n in notes)
    report = bundle["entry"][-1]["resource"]
    ext = {e["url"].rsplit(":", 1)[-1]: e for e in report["extension"]}
    assert ext["site"]["valueString"] == "stmary" and ext["operating-point"]["valueString"] == "sens90"
    assert ext["priority"]["valueCodeableConcept"]["coding"][0]["code"] == "CXR0111"
    assert {"CXR0111", "CXR0121"} <= {c["coding"][0]["code"] for c in report["conclusionCode"]}
    assert "urgent" in report["conclusion"]
    # a site's answer names the site and operating point per section (the calibrated families)
    key = next(k for k, v in response["results"].items() if isinstance(v, dict) and "probabilities" in v)
    served = response["results"][key]
    before = {"probabilities": {c: round(1 / len(served["probabilities"]), 4) for c in served["probabilities"]}}
    sited = {**response, "results": {**response["results"], key: {**served, "site": "stmary", "uncalibrated": before,
                                                                  "operating_point": "stmary:x>=0.9"}}}
    result = study_result(source, sited)
    message, bundle = build_oru(result), build_bundle(result)
    validate(message)
    validate_bundle(bundle)
    assert "NTE|1|L|site: stmary; operating point: stmary:x>=0.9" in message.split("\r")
    report = bundle["entry"][-1]["resource"]
    assert {e["valueString"] for e in report["extension"] if e["url"].endswith("operating-point")} == {"stmary:x>=0.9"}
    # calibrated values and the values before calibration, both, with the SR's Measurement Method codes
    methods = [f[17].split("^")[0] for f in obx(message) if len(f) > 17 and f[17]]
    assert methods.count("CXR0093") == methods.count("CXR0094") == len(before["probabilities"])
    uncal = [o for o in observations(bundle) if o.get("method", {}).get("coding", [{}])[0].get("code") == "CXR0094"]
    assert sorted(o["valueQuantity"]["value"] for o in uncal) == sorted(before["probabilities"].values())


def test_strict_validation_refuses_broken_messages(scored):
    source, response = scored
    message = build_oru(study_result(source, response))
    segments = message.split("\r")
    first_obx = next(i for i, s in enumerate(segments) if s.startswith("OBX|"))
    reordered = "\r".join([segments[0], segments[first_obx], *segments[1:first_obx], *segments[first_obx + 1:]])
    with pytest.raises(HL7Error):
        validate(reordered)  # an OBX before any OBR: not the ORU^R01 structure (hl7apy strict)
    nm = next(s for s in segments if "|NM|" in s)
    with pytest.raises(HL7Error):
        validate(message.replace(nm, re.sub(r"\|NM\|([^|]*)\|([^|]*)\|[^|]*\|", r"|NM|\1|\2|1e-05|", nm)))
    bundle = build_bundle(study_result(source, response))
    for broken in ({"status": "guessed"}, {"issued": "yesterday"}, {"code": None}):
        copy = json.loads(json.dumps(bundle))
        copy["entry"][-1]["resource"].update(broken)
        copy["entry"][-1]["resource"] = {k: v for k, v in copy["entry"][-1]["resource"].items() if v is not None}
        with pytest.raises(FHIRError):
            validate_bundle(copy)


def test_mllp_ack_nak_and_duplicates(scored):
    source, response = scored
    result = study_result(source, response)
    message = build_oru(result)
    listener = MLLPListener(nak=1)
    try:
        with pytest.raises(mllp.Nak) as nak:
            mllp.send(message, "127.0.0.1", listener.port, result.control_id, timeout_s=5)
        assert nak.value.reason.startswith("AE") and "207" in nak.value.reason and "busy" in nak.value.reason
        assert mllp.send(message, "127.0.0.1", listener.port, result.control_id, timeout_s=5) == "AA"
        assert mllp.send(message, "127.0.0.1", listener.port, result.control_id, timeout_s=5) == "AA"
        assert list(listener.accepted) == [result.control_id] and listener.duplicates[result.control_id] == 1
        assert not listener.invalid
    finally:
        listener.stop()
    # a NAK quoting the patient: the reason keeps the code, not the identifier
    ack = make_ack(message, "AR", f"unknown patient {source.PatientID}", ("204", "Unknown key identifier"))
    accepted, reason = read_ack(ack, result.control_id)
    assert not accepted and mllp.scrub(reason, result.subject.identifiers()) == \
        "AR error 204 Unknown key identifier; unknown patient <withheld>"
    with pytest.raises(HL7Error):
        read_ack(ack, "ANOTHER")
    with pytest.raises(mllp.MLLPError):  # nobody listening
        mllp.send(message, "127.0.0.1", listener.port, result.control_id, timeout_s=2)


def test_fhir_transaction_is_idempotent(scored):
    source, response = scored
    bundle = build_bundle(study_result(source, response))
    server = FHIRServer(fail=1)
    try:
        with pytest.raises(ConnectionError, match="503"):
            post_bundle(bundle, server.url, timeout_s=5)
        first = post_bundle(bundle, server.url, timeout_s=5)
        again = post_bundle(bundle, server.url, timeout_s=5)
        assert all(s.startswith("201") for s in first) and all(s.startswith("200") for s in again)
        assert len(server.store["DiagnosticReport"]) == 1 and not server.rejected
        report = server.store["DiagnosticReport"][0]
        assert report["subject"]["reference"] == f"Patient/{server.store['Patient'][0]['id']}"
        assert len(report["result"]) == len(server.store["Observation"])
        broken = json.loads(json.dumps(bundle))
        broken["entry"][0]["resource"]["birthDate"] = "yesterday"
        with pytest.raises(ConnectionError, match="400"):
            post_bundle(broken, server.url, timeout_s=5)
    finally:
        server.stop()


def test_batch_writes_one_message_and_one_bundle_per_input(model_store, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    uids = []
    for i in range(2):
        uid = f"1.2.826.0.1.3680043.8.498.2410{i}"
        (inputs / f"chest{i}.dcm").write_bytes(phantom_dicom(40 + i, size=256, SOPInstanceUID=uid))
        uids.append(uid)
    (inputs / "note.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # an image file: no patient, no message
    hl7_dir, fhir_dir = tmp_path / "hl7", tmp_path / "fhir"
    run = subprocess.run([sys.executable, "-m", "cxrserve", "batch", str(inputs), "--model", "cxr-study",
                          "--out", str(tmp_path / "rows.csv"), "--in-process", str(model_store), "--device", "cpu",
                          "--hl7-out", str(hl7_dir), "--fhir-out", str(fhir_dir), "--no-progress"],
                         capture_output=True, text=True, timeout=600)
    assert "PID-424242" not in run.stdout + run.stderr and "Doe" not in run.stdout + run.stderr
    messages, bundles = sorted(hl7_dir.glob("*.hl7")), sorted(fhir_dir.glob("*.json"))
    assert len(messages) == len(bundles) == 2, run.stdout + run.stderr
    for path in messages:
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        validate(path.read_text())
    for path in bundles:
        validate_bundle(json.loads(path.read_text()))
    rows = (tmp_path / "rows.csv").read_text()
    assert "PID-424242" not in rows
