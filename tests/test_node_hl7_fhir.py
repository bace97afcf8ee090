"""The DICOM node's HL7 and FHIR destinations (issue 24): a chest DICOM comes back as SR/SEG/SC
in the PACS (Orthanc), as an ORU^R01 acknowledged by hl7apy's MLLP server and as a FHIR
transaction accepted by a validating endpoint, all with the same findings, codes and priority;
a node SIGKILLed mid-burst loses and duplicates none of them."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from cxrserve.tools.hl7fhir.results import study_result
from cxrserve.tools.node.config import load_config
from cxrserve.tools.node.receive import sop_hash
from cxrserve.tools.node.service import Node
from dicomtools import DICOMWEB_PLUGIN, Orthanc, echoscu, free_port, have, storescu, wait_for
from hl7fhir_servers import FHIRServer, MLLPListener
from study_adapter import StudyModelScorer
from test_dicom_node import ALL_KINDS, audit, results_in
from test_dicom_results import phantom_dicom, sr_values

pytestmark = [pytest.mark.slow]
MODALITY = "MODALITY1"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def tools():
    missing = have("Orthanc", "storescu", "echoscu")
    if missing or not DICOMWEB_PLUGIN.exists():
        pytest.skip(f"DICOM tools missing ({', '.join(missing) or 'orthanc-dicomweb'}): run make dicomtools")


@pytest.fixture(scope="module")
def scorer(pipeline):
    return StudyModelScorer(pipeline("cxr-study"))


def config(folder: Path, port: int, orthanc: Orthanc, listener: MLLPListener, fhir: FHIRServer, *,
           scorer: str = "", retry: str = "{attempts: 20, initial_s: 0.2, max_s: 1}") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "node.yaml").write_text(f"""
ae_title: CXRSERVE
port: {port}
allowed_calling_aes: [{MODALITY}]
spool: spool
poll_s: 0.1
retry: {retry}
destinations:
  - {{name: pacs, kind: cstore, host: 127.0.0.1, port: {orthanc.dicom_port}, ae_title: ORTHANC}}
  - {{name: ris, kind: mllp, host: 127.0.0.1, port: {listener.port}, receiving_application: RIS, timeout_s: 5}}
  - {{name: ehr, kind: fhir, url: '{fhir.url}', timeout_s: 5}}
""" + scorer)
    return folder / "node.yaml"


def sr_priority(path: Path) -> str:
    """The SR's worklist priority value (CXR0110's coded value), wherever it sits in the tree."""
    def walk(items):
        for item in items:
            name = item.get("ConceptNameCodeSequence")
            if name and name[0].CodeValue == "CXR0110":
                return item.ConceptCodeSequence[0].CodeValue
            found = walk(item.get("ContentSequence", []))
            if found:
                return found
        return None

    return walk(pydicom.dcmread(path).ContentSequence)


def obx(message: str) -> list[list[str]]:
    return [s.split("|") for s in message.split("\r") if s.startswith("OBX|")]


def test_chest_dicom_reaches_pacs_ris_and_fhir_with_the_same_findings(tmp_path, scorer):
    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", {"cxrnode": ("CXRSERVE", port)})
    listener, fhir = MLLPListener(nak=1), FHIRServer(fail=1)  # one NAK and one 503 first: retried
    node = Node(load_config(config(tmp_path / "node", port, orthanc, listener, fhir)), scorer)
    node.start()
    try:
        uid = "1.2.826.0.1.3680043.8.498.24201"
        data = phantom_dicom(24, size=256, StudyInstanceUID="1.2.826.0.1.3680043.8.498.24200", SOPInstanceUID=uid)
        (tmp_path / "chest.dcm").write_bytes(data)
        assert storescu(port, [tmp_path / "chest.dcm"], calling=MODALITY).returncode == 0
        key = f"sha256:{sop_hash(uid)}"
        line = wait_for(lambda: next((r for r in audit(node) if r.get("instance") == key), None), 240, "audit line")
        assert line["outcome"] == "done", line
        assert line["deliveries"] == {"pacs": "delivered", "ris": "delivered", "ehr": "delivered"}
        # the same answer, three ways
        found = results_in(orthanc, "1.2.826.0.1.3680043.8.498.24200")
        assert set(found) == ALL_KINDS and all(len(v) == 1 for v in found.values())  # SR, SEG, the SCs
        (sr,) = found["sr"]
        (tmp_path / "sr.dcm").write_bytes(orthanc.file(sr["id"]))
        nums, codes, _ = sr_values(tmp_path / "sr.dcm")
        (message,) = listener.accepted.values()
        assert listener.received.count(next(iter(listener.accepted))) == 2  # the NAKed try, then the accepted one
        hl7_nums = {f[3].split("^")[0]: float(f[5]) for f in obx(message) if f[2] == "NM"}
        observations = fhir.store["Observation"]
        fhir_nums = {o["code"]["coding"][0]["code"]: o["valueQuantity"]["value"] for o in observations
                     if "valueQuantity" in o}
        assert set(nums) == set(hl7_nums) == set(fhir_nums)
        for code, values in nums.items():
            assert hl7_nums[code] == pytest.approx(values[0]) == fhir_nums[code]
        hl7_codes = {f[3].split("^")[0]: f[5].split("^")[0] for f in obx(message) if f[2] == "CE"}
        assert all(hl7_codes[c] == v for c, v in codes.items() if c in hl7_codes)
        # the priority: the answer's level, in the ORU and in the FHIR report
        level = study_result(pydicom.dcmread(io.BytesIO(data)), scorer.score(data)).priority.code.value
        assert sr_priority(tmp_path / "sr.dcm") == level  # the SR's, too
        assert any(f[5].startswith(level + "^") for f in obx(message) if f[3].startswith("CXR0110^"))
        (report,) = fhir.store["DiagnosticReport"]
        assert report["status"] == "preliminary" and level in {c["coding"][0]["code"] for c in report["conclusionCode"]}
        assert fhir.transactions == 1 and not fhir.rejected and not listener.invalid
        # identifiers: in the messages, never in the audit log or the state file's reasons
        assert "PID-424242" in message and fhir.store["Patient"][0]["identifier"][0]["value"] == "PID-424242"
        logged = node.cfg.audit_path.read_text()
        for identifier in ("PID-424242", "Doe", uid, "1.2.826.0.1.3680043.8.498.24200", "ACC424242"):
            assert identifier not in logged
        assert not (node.results / sop_hash(uid)).exists()  # messages deleted with the objects once delivered
    finally:
        node.stop()
        listener.stop()
        fhir.stop()
        orthanc.stop()


def test_sigkill_mid_burst_delivers_every_message_exactly_once(tmp_path, scorer):
    """12 instances; the node process is SIGKILLed mid-burst, restarted, and the modality resends
    them all: the MLLP listener accepts 12 control IDs once each (a resend after the kill is a
    recognised duplicate), the FHIR server holds 12 reports, the PACS one SR per study."""
    answer = scorer.score(phantom_dicom(5, size=256))
    strip = lambda d: {k: strip(v) if isinstance(v, dict) else v for k, v in d.items() if not k.endswith("_png")}  # noqa: E731
    (tmp_path / "answer.json").write_text(json.dumps(strip(answer)))  # no pictures: SR only, quick
    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", {"cxrnode": ("CXRSERVE", port)})
    listener, fhir = MLLPListener(), FHIRServer()
    path = config(tmp_path / "burst", port, orthanc, listener, fhir,
                  scorer="scorer: {kind: factory, factory: 'hl7fhir_servers:canned'}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
           "CXR_CANNED_RESPONSE": str(tmp_path / "answer.json"), "CXR_CANNED_SLEEP_S": "0.4"}
    files, sources = [], []
    for i in range(12):
        study = f"1.2.826.0.1.3680043.8.498.243{i:02d}"
        data = phantom_dicom(300 + i, size=128, StudyInstanceUID=study, SOPInstanceUID=f"{study}.1")
        files.append(tmp_path / f"b{i:02d}.dcm")
        files[-1].write_bytes(data)
        sources.append(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True))
    expected = {study_result(s, strip(answer)).control_id for s in sources}
    assert len(expected) == 12
    log = open(tmp_path / "node.log", "wb")

    def start():
        proc = subprocess.Popen([sys.executable, "-m", "cxrserve", "node", "--config", str(path)], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: echoscu(port, calling=MODALITY).returncode == 0 or proc.poll() is not None, 120,
                 "the node to answer C-ECHO")
        assert proc.poll() is None, (tmp_path / "node.log").read_text()[-3000:]
        return proc

    audit_path = tmp_path / "burst" / "spool" / "audit.log"
    done = lambda: [r for r in audit(audit_path) if r.get("event") == "instance"]  # noqa: E731
    proc = start()
    try:
        sender = subprocess.Popen(["storescu", "-aet", MODALITY, "-aec", "CXRSERVE", "127.0.0.1", str(port),
                                   *map(str, files)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: len(listener.accepted) >= 3, 120, "3 messages acknowledged before the kill")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        sender.wait(60)
        killed_at = len(listener.accepted)
        assert killed_at < 12, "the burst finished before the kill: nothing was tested"
        proc = start()
        assert storescu(port, files, calling=MODALITY).returncode == 0
        wait_for(lambda: len({r["instance"] for r in done()}) >= 12, 180, "all 12 instances finished")
        time.sleep(2)  # anything sent twice would arrive now
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    try:
        assert all(r["outcome"] == "done" for r in done()), done()
        assert set(listener.accepted) == expected  # none lost, none accepted twice (accepted is keyed by MSH-10)
        assert sum(listener.duplicates.values()) <= 1  # at most the one in flight at the kill, recognised
        assert not listener.invalid and not fhir.rejected
        reports = fhir.store["DiagnosticReport"]
        assert len(reports) == 12 and len({r["identifier"][0]["value"] for r in reports}) == 12
        per_report = {len(r["result"]) for r in reports}
        assert len(per_report) == 1 and len(fhir.store["Observation"]) == 12 * per_report.pop()
        assert len(fhir.store["Patient"]) == 1  # the phantoms' one patient, created once
        for s in sources:
            found = results_in(orthanc, str(s.StudyInstanceUID))
            assert set(found) == {"sr"} and len(found["sr"]) == 1
    finally:
        listener.stop()
        fhir.stop()
        orthanc.stop()
