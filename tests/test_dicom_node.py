"""The DICOM node against real DICOM software: Orthanc (PACS, DICOMweb), dcmtk (modality),
dicom3tools (validator). Scoring is the store's cxr-study model in process (study_adapter.StudyModelScorer).

Installed by ``make dicomtools``; skipped when Orthanc, dcmtk or dciodvfy are missing.
"""
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

from cxrserve.tools import dicom_results as dr
from cxrserve.tools.dicom_results import codes as dr_codes
from cxrserve.tools.dicom_results import response as dr_response
from cxrserve.tools.node.config import load_config
from cxrserve.tools.node.receive import sop_hash
from cxrserve.tools.node.service import Node
from dicomtools import DICOMWEB_PLUGIN, Orthanc, dciodvfy, echoscu, free_port, have, storescu, wait_for
from study_adapter import StudyModelScorer
from test_dicom_results import RSNA, phantom_dicom, sr_values

pytestmark = [pytest.mark.slow]
MODALITY = "MODALITY1"
REPO = Path(__file__).resolve().parents[1]
ALL_KINDS = {"sr", "seg", "sc-triage", "sc-severity", "sc-mortality"}


@pytest.fixture(scope="module", autouse=True)
def tools():
    missing = have("Orthanc", "storescu", "echoscu", "dciodvfy")
    if missing or not DICOMWEB_PLUGIN.exists():
        pytest.skip(f"DICOM tools missing ({', '.join(missing) or 'orthanc-dicomweb'}): run make dicomtools")


class Recording:
    """The study scorer, keeping each response by the hashed SOP UID of its input."""

    def __init__(self, scorer):
        self.scorer, self.responses = scorer, {}

    def score(self, image: bytes, prior: bytes | None = None, **site) -> dict:
        response = self.scorer.score(image, prior, **site)
        uid = pydicom.dcmread(io.BytesIO(image), stop_before_pixels=True).SOPInstanceUID
        self.responses[sop_hash(uid)] = {"response": response, "prior": prior is not None}
        return response


@pytest.fixture(scope="module")
def node_port():
    return free_port()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, node_port):
    o = Orthanc(tmp_path_factory.mktemp("orthanc"), {"cxrnode": ("CXRSERVE", node_port)})
    yield o
    o.stop()


def write_config(folder: Path, node_port: int, orthanc: Orthanc, *, destinations: str, scorer: str = "",
                 qr: bool = True, retry: str = "{attempts: 6, initial_s: 0.5, max_s: 4}") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = f"""
ae_title: CXRSERVE
host: 127.0.0.1
port: {node_port}
allowed_calling_aes: [{MODALITY}, ORTHANC]
spool: spool
retry: {retry}
destinations:
{destinations}
""" + (f"query_retrieve: {{host: 127.0.0.1, port: {orthanc.dicom_port}, ae_title: ORTHANC}}\n" if qr else "") + scorer
    path = folder / "node.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def recording(pipeline):
    return Recording(StudyModelScorer(pipeline("cxr-study")))


@pytest.fixture(scope="module")
def node(tmp_path_factory, node_port, orthanc, recording):
    cfg = load_config(write_config(tmp_path_factory.mktemp("node"), node_port, orthanc, destinations=(
        f"  - {{name: pacs, kind: cstore, host: 127.0.0.1, port: {orthanc.dicom_port}, ae_title: ORTHANC}}")))
    n = Node(cfg, recording)
    n.start()
    yield n
    n.stop()


def audit(node_or_path) -> list[dict]:
    path = node_or_path.cfg.audit_path if isinstance(node_or_path, Node) else node_or_path
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def final_line(node, uid: str, timeout: float = 240) -> dict:
    key = f"sha256:{sop_hash(uid)}"
    return wait_for(lambda: next((r for r in audit(node) if r.get("instance") == key), None), timeout,
                    "the instance's audit line")


def results_in(orthanc: Orthanc, study_uid: str) -> dict[str, dict]:
    """Result objects (made by cxrserve) in a study, by kind."""
    out = {}
    for inst in orthanc.instances():
        if inst.get("StudyInstanceUID") == study_uid and inst.get("Manufacturer") == "cxrserve":
            out.setdefault(dr.kind_of(_series(inst)), []).append(inst)
    return out


def _series(inst: dict):
    ds = pydicom.Dataset()
    ds.SeriesNumber = int(inst.get("SeriesNumber", 0) or 0)
    return ds


def send(tmp_path: Path, name: str, data: bytes, **kw) -> subprocess.CompletedProcess:
    path = tmp_path / name
    path.write_bytes(data)
    return storescu(kw.pop("port"), [path], calling=kw.pop("calling", MODALITY))


# --------------------------------------------------------------------------- tests
def test_echo_and_unknown_calling_ae_refused(node, node_port):
    assert echoscu(node_port, calling=MODALITY).returncode == 0
    refused = echoscu(node_port, calling="INTRUDER")
    assert refused.returncode != 0 and "Calling AE Title Not Recognized" in refused.stderr
    assert any(r.get("event") == "association_refused" and r.get("calling_ae") == "INTRUDER" for r in audit(node))


def test_chest_dicom_comes_back_as_sr_seg_and_heatmaps(node, node_port, orthanc, recording, tmp_path):
    from conftest import shared_data_root

    real = shared_data_root() / "dicom_samples" / RSNA
    data = real.read_bytes() if real.exists() else phantom_dicom(21, SOPInstanceUID="1.2.826.0.1.3680043.8.498.7101")
    source = pydicom.dcmread(io.BytesIO(data))
    sent = send(tmp_path, "chest.dcm", data, port=node_port)
    assert sent.returncode == 0, sent.stderr
    line = final_line(node, source.SOPInstanceUID)
    assert line["outcome"] == "done" and line["deliveries"] == {"pacs": "delivered"}
    logged = json.dumps(audit(node))
    for identifier in (source.SOPInstanceUID, source.PatientID, str(source.PatientName), source.StudyInstanceUID):
        assert str(identifier) not in logged
    found = results_in(orthanc, source.StudyInstanceUID)
    assert set(found) == ALL_KINDS and all(len(v) == 1 for v in found.values())
    response = recording.responses[sop_hash(source.SOPInstanceUID)]["response"]
    for kind, (inst,) in found.items():
        path = tmp_path / f"{kind}.dcm"
        path.write_bytes(orthanc.file(inst["id"]))
        errors, _ = dciodvfy(path)
        assert errors == [], f"{kind}: {errors}"
    nums, codes, _ = sr_values(tmp_path / "sr.dcm")
    r = response["results"]
    assert nums[dr_codes.CODES["p_normal"].value][0] == pytest.approx(r["triage"]["probabilities"]["normal"])
    assert nums[dr_codes.CODES["pxs"].value][0] == pytest.approx(r["pxs"]["pxs"])
    assert nums[dr_codes.CODES["geographic_extent"].value][0] == pytest.approx(r["severity"]["geographic_extent"])
    assert nums[dr_codes.CODES["mortality_risk"].value][0] == pytest.approx(r["mortality"]["risk"])
    import highdicom as hd
    import numpy as np

    seg = hd.seg.segread(tmp_path / "seg.dcm")
    mask = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1])[0, ..., 0]
    assert np.array_equal(mask.astype(bool), dr_response.mask_from_png(r["lungseg"]["mask_png"]))
    # a resend of the same instance is acknowledged and makes no second result set
    assert send(tmp_path, "again.dcm", data, port=node_port).returncode == 0
    time.sleep(2)
    assert [r.get("instance") for r in audit(node)].count(f"sha256:{sop_hash(source.SOPInstanceUID)}") == 1
    assert all(len(v) == 1 for v in results_in(orthanc, source.StudyInstanceUID).values())


def test_prior_in_orthanc_gives_the_change(node, node_port, orthanc, recording, tmp_path):
    patient = {"PatientID": "PID-PRIOR-1"}
    prior = phantom_dicom(31, StudyDate="20190105", StudyInstanceUID="1.2.826.0.1.3680043.8.498.7201",
                          SeriesInstanceUID="1.2.826.0.1.3680043.8.498.7202",
                          SOPInstanceUID="1.2.826.0.1.3680043.8.498.7203", **patient)
    orthanc.upload(prior)
    current = phantom_dicom(32, StudyDate="20200401", StudyInstanceUID="1.2.826.0.1.3680043.8.498.7301",
                            SeriesInstanceUID="1.2.826.0.1.3680043.8.498.7302",
                            SOPInstanceUID="1.2.826.0.1.3680043.8.498.7303", **patient)
    assert send(tmp_path, "current.dcm", current, port=node_port).returncode == 0
    line = final_line(node, "1.2.826.0.1.3680043.8.498.7303")
    assert line["outcome"] == "done" and line["timings"]["prior"] == "found"
    got = recording.responses[sop_hash("1.2.826.0.1.3680043.8.498.7303")]
    assert got["prior"] and "change" in got["response"]["results"]["pxs"]
    (sr,) = results_in(orthanc, "1.2.826.0.1.3680043.8.498.7301")["sr"]
    (tmp_path / "sr.dcm").write_bytes(orthanc.file(sr["id"]))
    nums, codes, _ = sr_values(tmp_path / "sr.dcm")
    pxs = got["response"]["results"]["pxs"]
    assert nums[dr_codes.CODES["prior_pxs"].value][0] == pytest.approx(pxs["prior"]["pxs"])
    assert nums[dr_codes.CODES["pxs_difference"].value][0] == pytest.approx(pxs["change"]["pxs_difference"])
    assert codes[dr_codes.CODES["pxs_change"].value] == dr_codes.CODES[f"change_{pxs['change']['direction']}"].value
    # the prior's study got nothing from this
    assert results_in(orthanc, "1.2.826.0.1.3680043.8.498.7201") == {}


def test_lateral_and_ct_get_no_results(node, node_port, orthanc, tmp_path):
    lateral = phantom_dicom(41, kind="lateral", StudyInstanceUID="1.2.826.0.1.3680043.8.498.7401",
                            SOPInstanceUID="1.2.826.0.1.3680043.8.498.7403")
    assert send(tmp_path, "lateral.dcm", lateral, port=node_port).returncode == 0  # accepted, spooled
    line = final_line(node, "1.2.826.0.1.3680043.8.498.7403")
    assert line["outcome"] == "not_processed" and "lateral" in line["reason"]
    ct = pydicom.dcmread(io.BytesIO(phantom_dicom(42, StudyInstanceUID="1.2.826.0.1.3680043.8.498.7501",
                                                  SOPInstanceUID="1.2.826.0.1.3680043.8.498.7503")))
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    ct.Modality = "CT"
    ct.save_as(tmp_path / "ct.dcm")
    refused = storescu(node_port, [tmp_path / "ct.dcm"], calling=MODALITY)
    assert refused.returncode != 0  # no presentation context for CT: the node never takes it
    time.sleep(2)
    assert results_in(orthanc, "1.2.826.0.1.3680043.8.498.7401") == {}
    assert results_in(orthanc, "1.2.826.0.1.3680043.8.498.7501") == {}
    assert node.state.get(sop_hash("1.2.826.0.1.3680043.8.498.7503")) is None


def test_calling_ae_title_picks_the_site(tmp_path, orthanc, model_store):
    """A modality whose AE title a site profile lists gets that site's calibrated answer, in the SR
    too; another modality's studies are answered as served."""
    from cxrserve.core.loading import load_pipeline
    from site_fixture import OPERATING_POINT, SITE, write_sites

    sites = write_sites(tmp_path / "sites", model_store)
    scorer = Recording(StudyModelScorer(load_pipeline(model_store / "cxr-study.mar", device="cpu", sites=sites)))
    port = free_port()
    path = write_config(tmp_path / "site", port, orthanc, qr=False, destinations=(
        f"  - {{name: pacs, kind: cstore, host: 127.0.0.1, port: {orthanc.dicom_port}, ae_title: ORTHANC}}"))
    text = path.read_text().replace(f"allowed_calling_aes: [{MODALITY}, ORTHANC]",
                                    f"allowed_calling_aes: [{MODALITY}, ORTHANC, TESTSITE]")
    path.write_text(text + f"sites_dir: {sites}\n")
    n = Node(load_config(path), scorer)
    assert n.site_of("TESTSITE") == SITE and n.site_of(MODALITY) == ""
    n.start()
    try:
        uids = {}
        for calling, seed in (("TESTSITE", 61), (MODALITY, 62)):
            study = f"1.2.826.0.1.3680043.8.498.{7700 + seed}"
            uids[calling] = (study, f"{study}.1")
            data = phantom_dicom(seed, StudyInstanceUID=study, SOPInstanceUID=f"{study}.1")
            assert send(tmp_path, f"{calling}.dcm", data, port=port, calling=calling).returncode == 0
        for calling, (study, sop) in uids.items():
            assert final_line(n, sop)["outcome"] == "done"
            response = scorer.responses[sop_hash(sop)]["response"]
            assert response.get("site") == (SITE if calling == "TESTSITE" else None)
        study, sop = uids["TESTSITE"]
        assert scorer.responses[sop_hash(sop)]["response"]["results"]["triage"]["operating_point"] in \
            (OPERATING_POINT, "argmax")
        (sr,) = results_in(orthanc, study)["sr"]
        sr_path = tmp_path / "site-sr.dcm"
        sr_path.write_bytes(orthanc.file(sr["id"]))
        texts = {str(e.value) for e in pydicom.dcmread(sr_path).iterall() if e.keyword == "TextValue"}
        assert f"site: {SITE}" in texts  # TID 4019 algorithm parameter of the calibrated sections
        assert dciodvfy(sr_path)[0] == []
    finally:
        n.stop()


def test_candidate_store_runs_in_shadow_at_the_node(tmp_path, orthanc, model_store, monkeypatch):
    """A candidate store set for the node (``$CXRSERVE_SHADOW_STORE``) scores every study beside the
    active model; its answers are recorded for ``cxrserve monitor compare`` and never delivered."""
    from cxrserve.tools.monitor.shadow import compare

    candidate = tmp_path / "candidate"
    candidate.mkdir()
    (candidate / "cxr-study.mar").symlink_to(model_store / "cxr-study.mar")
    monkeypatch.setenv("CXRSERVE_SHADOW_STORE", str(candidate))
    monkeypatch.setenv("CXRSERVE_MONITOR_DIR", str(tmp_path / "monitor"))
    port = free_port()
    path = write_config(tmp_path / "shadow", port, orthanc, qr=False, destinations=(
        f"  - {{name: pacs, kind: cstore, host: 127.0.0.1, port: {orthanc.dicom_port}, ae_title: ORTHANC}}"),
        scorer=f"scorer: {{kind: in_process, archive: {model_store / 'cxr-study.mar'}, device: cpu}}\n")
    n = Node(load_config(path))
    n.start()
    try:
        study = "1.2.826.0.1.3680043.8.498.7801"
        data = phantom_dicom(71, StudyInstanceUID=study, SOPInstanceUID=f"{study}.1")
        assert send(tmp_path, "shadow.dcm", data, port=port).returncode == 0
        assert final_line(n, f"{study}.1")["outcome"] == "done"
        assert len(results_in(orthanc, study)["sr"]) == 1  # the active answer only
        report = wait_for(lambda: compare(tmp_path / "monitor", "default", "cxr-study") or None, 60,
                          "the shadow's record")
        (version,) = report
        assert report[version]["studies"] == 1 and report[version]["both_answered"] == 1
        assert report[version]["agreement"] == 1.0  # the same weights as candidate: the same label
    finally:
        n.stop()


def test_stowrs_to_orthanc_dicomweb(tmp_path, orthanc, recording):
    port = free_port()
    cfg = load_config(write_config(tmp_path / "stow", port, orthanc, qr=False, destinations=(
        f"  - {{name: web, kind: stowrs, url: '{orthanc.dicomweb}'}}")))
    n = Node(cfg, recording)
    n.start()
    try:
        data = phantom_dicom(51, StudyInstanceUID="1.2.826.0.1.3680043.8.498.7601",
                             SOPInstanceUID="1.2.826.0.1.3680043.8.498.7603")
        assert send(tmp_path, "stow.dcm", data, port=port).returncode == 0
        line = final_line(n, "1.2.826.0.1.3680043.8.498.7603")
        assert line["outcome"] == "done" and line["deliveries"] == {"web": "delivered"}
        assert set(results_in(orthanc, "1.2.826.0.1.3680043.8.498.7601")) == ALL_KINDS
    finally:
        n.stop()


def test_sigkill_mid_burst_delivers_one_result_set_per_instance(tmp_path, orthanc, unpacked):
    """20 instances; the node process is SIGKILLed while scoring them, restarted, and the
    modality resends what it has (all 20): every instance ends with exactly one result set."""
    families = ("lungseg",)  # SR + SEG per instance: the cheapest full result set (about 1 s)
    port = free_port()
    config = write_config(tmp_path / "burst", port, orthanc, qr=False, destinations=(
        f"  - {{name: pacs, kind: cstore, host: 127.0.0.1, port: {orthanc.dicom_port}, ae_title: ORTHANC}}"),
        scorer="scorer: {kind: factory, factory: 'study_adapter:make'}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
           "CXR_ADAPTER_FAMILIES": ",".join(families),
           "CXR_ADAPTER_UNPACKED": json.dumps({f"cxr-{f}": str(unpacked(f"cxr-{f}")) for f in families})}
    files, studies = [], []
    for i in range(20):
        study = f"1.2.826.0.1.3680043.8.498.78{i:02d}1"
        studies.append(study)
        path = tmp_path / f"burst{i:02d}.dcm"
        path.write_bytes(phantom_dicom(600 + i, size=256, StudyInstanceUID=study, SOPInstanceUID=f"{study}.3"))
        files.append(path)
    log = open(tmp_path / "node.log", "wb")

    def start():
        proc = subprocess.Popen([sys.executable, "-m", "cxrserve", "node", "--config", str(config)], env=env,
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
        wait_for(lambda: len(done()) >= 3, 240, "3 instances finished before the kill")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        sender.wait(60)
        killed_at = len(done())
        assert killed_at < 20, "the burst finished before the kill: nothing was tested"
        proc = start()
        resent = storescu(port, files, calling=MODALITY)
        assert resent.returncode == 0, resent.stderr
        wait_for(lambda: len({r["instance"] for r in done()}) >= 20, 400, "all 20 instances finished")
        time.sleep(3)  # anything sent twice would arrive now
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    assert proc.returncode == 0  # SIGTERM: clean stop
    lines = done()
    assert sorted(r["instance"] for r in lines) == sorted(f"sha256:{sop_hash(s + '.3')}" for s in studies)
    assert all(r["outcome"] == "done" for r in lines)
    for study in studies:
        found = results_in(orthanc, study)
        assert set(found) == {"sr", "seg"} and all(len(v) == 1 for v in found.values()), study


def test_pacs_down_is_retried_with_backoff_until_it_is_up(tmp_path, recording):
    port, pacs_port = free_port(), free_port()
    folder = tmp_path / "retry"
    folder.mkdir()
    (folder / "node.yaml").write_text(f"""
ae_title: CXRSERVE
port: {port}
allowed_calling_aes: [{MODALITY}]
spool: spool
retry: {{attempts: 50, initial_s: 0.3, max_s: 1}}
destinations:
  - {{name: pacs, kind: cstore, host: 127.0.0.1, port: {pacs_port}, ae_title: ORTHANC, timeout_s: 2}}
""")
    n = Node(load_config(folder / "node.yaml"), recording)
    n.start()
    late = None
    try:
        uid = "1.2.826.0.1.3680043.8.498.7703"
        data = phantom_dicom(77, size=256, StudyInstanceUID="1.2.826.0.1.3680043.8.498.7701", SOPInstanceUID=uid)
        assert send(tmp_path, "retry.dcm", data, port=port).returncode == 0
        key = sop_hash(uid)
        wait_for(lambda: (n.state.pending_deliveries(key) or [("", 0)])[0][1] >= 2, 120,
                 "two failed delivery attempts")
        assert n.state.get(key).status == "scored"
        late = Orthanc(tmp_path / "late-orthanc", {"cxrnode": ("CXRSERVE", port)}, dicom_port=pacs_port)
        line = final_line(n, uid, timeout=60)
        assert line["outcome"] == "done" and line["deliveries"] == {"pacs": "delivered"}
        assert set(results_in(late, "1.2.826.0.1.3680043.8.498.7701")) == ALL_KINDS
    finally:
        n.stop()
        if late is not None:
            late.stop()


def test_scorer_outage_fails_the_instance_and_a_resend_finishes_it(tmp_path, orthanc, recording):
    """The REST scorer with no TorchServe behind it: retried with back-off, then 'failed' (audit
    line, image kept); the modality's resend once scoring is back gives the full result set."""
    port = free_port()
    cfg = load_config(write_config(tmp_path / "outage", port, orthanc, qr=False, destinations=(
        f"  - {{name: pacs, kind: cstore, host: 127.0.0.1, port: {orthanc.dicom_port}, ae_title: ORTHANC}}"),
        scorer=f"scorer: {{kind: rest, url: 'http://127.0.0.1:{free_port()}', token: t, client_retries: 0, "
               f"timeout_s: 2}}\n", retry="{attempts: 2, initial_s: 0.2, max_s: 0.5}"))
    n = Node(cfg)
    n.start()
    try:
        uid = "1.2.826.0.1.3680043.8.498.7903"
        data = phantom_dicom(79, size=256, StudyInstanceUID="1.2.826.0.1.3680043.8.498.7901", SOPInstanceUID=uid)
        assert send(tmp_path, "outage.dcm", data, port=port).returncode == 0
        line = final_line(n, uid, timeout=60)
        assert line["outcome"] == "failed" and "scoring unavailable" in line["reason"]
        assert (n.incoming / f"{sop_hash(uid)}.dcm").exists()  # kept for the operator / the resend
        n._scorer = recording  # TorchServe is back
        assert send(tmp_path, "outage.dcm", data, port=port).returncode == 0
        wait_for(lambda: [r.get("outcome") for r in audit(n) if r.get("instance") == f"sha256:{sop_hash(uid)}"]
                 == ["failed", "done"], 120, "the resend to finish")
        assert set(results_in(orthanc, "1.2.826.0.1.3680043.8.498.7901")) == ALL_KINDS
    finally:
        n.stop()
