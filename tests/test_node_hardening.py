"""The DICOM node tried as an attacker and as a faulty hospital network would (issue 25).

Each test reproduces one way the node used to ack and drop, fetch another patient's prior,
leak a value or lock out a modality, against the node in process with dcmtk (or pynetdicom
where the exact DIMSE status matters) as the sender and Orthanc as the PACS.
"""
from __future__ import annotations

import copy
import io
import json
import os
import shutil
import socket
import stat
import threading
import time
from pathlib import Path

import pydicom
import pytest

from cxrserve.tools.node.config import load_config
from cxrserve.tools.node.dimse import PriorSkipped, find_prior, query_safe_id, same_patient
from cxrserve.tools.node.receive import CANNOT_UNDERSTAND, DUPLICATE_INSTANCE, OUT_OF_RESOURCES, SUCCESS, sop_hash
from cxrserve.tools.node.service import Node
from dicomtools import DICOMWEB_PLUGIN, Orthanc, echoscu, free_port, have, storescu, wait_for
from test_dicom_results import phantom_dicom

pytestmark = [pytest.mark.slow]
MODALITY = "MODALITY1"
NOT_FRONTAL = {"error": "not_frontal_cxr", "status": 422, "message": "lateral view"}


@pytest.fixture(scope="module", autouse=True)
def tools():
    missing = have("Orthanc", "storescu", "echoscu")
    if missing or not DICOMWEB_PLUGIN.exists():
        pytest.skip(f"DICOM tools missing ({', '.join(missing) or 'orthanc-dicomweb'}): run make dicomtools")


class Canned:
    """A scorer answering one fixed response (or raising), counting its calls."""

    def __init__(self, response=NOT_FRONTAL, hook=None):
        self.response, self.hook, self.calls = response, hook, 0

    def score(self, image: bytes, prior: bytes | None = None) -> dict:
        self.calls += 1
        if self.hook is not None:
            self.hook(self.calls)
        return self.response


def make_node(folder: Path, scorer, *, extra: str = "", dest_port: int | None = None, start: bool = True) -> Node:
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (folder / "node.yaml").write_text(f"""
ae_title: CXRSERVE
port: {port}
allowed_calling_aes: [{MODALITY}]
spool: spool
poll_s: 0.1
retry: {{attempts: 2, initial_s: 0.1, max_s: 0.2}}
destinations:
  - {{name: pacs, kind: cstore, host: 127.0.0.1, port: {dest_port or free_port()}, ae_title: ORTHANC, timeout_s: 3}}
{extra}
""")
    node = Node(load_config(folder / "node.yaml"), scorer)
    if start:
        node.start()
    return node


def c_store(port: int, data: bytes, *, calling: str = MODALITY, called: str = "CXRSERVE") -> int | None:
    """Send one instance with pynetdicom; the C-STORE status (None: association refused)."""
    from pynetdicom import AE

    ds = pydicom.dcmread(io.BytesIO(data))
    ae = AE(ae_title=calling)
    ae.add_requested_context(ds.SOPClassUID, [str(ds.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(ds)
        return getattr(status, "Status", None)
    finally:
        assoc.release()


def c_echo(port: int) -> int | None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=MODALITY)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRSERVE")
    if not assoc.is_established:
        return None
    try:
        return getattr(assoc.send_c_echo(), "Status", None)
    finally:
        assoc.release()


def audit(node: Node) -> list[dict]:
    path = node.cfg.audit_path
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def final(node: Node, uid: str, timeout: float = 60) -> dict:
    key = f"sha256:{sop_hash(uid)}"
    return wait_for(lambda: next((r for r in audit(node) if r.get("instance") == key and r.get("event") == "instance"),
                                 None), timeout, "the instance's audit line")


def dicom(seed: int, uid: str, **tags) -> bytes:
    return phantom_dicom(seed, size=128, SOPInstanceUID=uid, **tags)


# --------------------------------------------------------------------------- 2: never ack and drop
def test_unwritable_results_folder_refuses_new_instances_and_says_so(tmp_path):
    node = make_node(tmp_path / "n", Canned())
    try:
        shutil.rmtree(node.results)
        node.results.write_bytes(b"not a folder")  # root passes every access() check: a real failure
        uid = "1.2.826.0.1.3680043.8.498.90002"
        assert c_store(node.cfg.port, dicom(2, uid)) == OUT_OF_RESOURCES  # never acked: the sender keeps it
        assert node.state.get(sop_hash(uid)) is None
        assert c_echo(node.cfg.port) == 0x0110  # C-ECHO reports the problem (processing failure)
        health = wait_for(lambda: (h := json.loads((node.cfg.spool / "health.json").read_text()))
                          and not h["healthy"] and h, 10, "health.json to say unhealthy")  # rewritten each second
        assert "cannot be written" in health["problem"] and node.worker_alive
        node.results.unlink()
        node.results.mkdir(mode=0o700)
        assert c_store(node.cfg.port, dicom(2, uid)) == SUCCESS
        assert final(node, uid)["outcome"] == "not_processed"
    finally:
        node.stop()


def test_write_failure_while_writing_results_is_retried_then_failed_with_its_reason(tmp_path, study_response):
    """write_results raising OSError (disk full, I/O error) used to kill the only worker thread."""
    calls = []

    def break_results(n):
        calls.append(n)
        if node.results.is_dir():
            shutil.rmtree(node.results)
            node.results.write_bytes(b"")

    node = make_node(tmp_path / "n", Canned(study_response["response"], hook=break_results))
    try:
        uid = "1.2.826.0.1.3680043.8.498.90011"
        assert c_store(node.cfg.port, study_response["dicom"](uid)) == SUCCESS
        line = final(node, uid)
        assert line["outcome"] == "failed"
        assert line["reason"] == "processing: NotADirectoryError (Not a directory)", line["reason"]
        assert len(calls) == 2  # retried once (attempts: 2), then given up
        assert node.worker_alive and node.worker_starts == 1
        assert (node.incoming / f"{sop_hash(uid)}.dcm").exists()  # kept for requeue
        # the operator fixes the disk and requeues: the instance finishes
        node.results.unlink()
        node.results.mkdir(mode=0o700)
        node._scorer.hook = None
        from cxrserve.tools.node.operate import requeue

        assert requeue(node.cfg, None) == [(sop_hash(uid), "requeued for scoring")]
        node.wake.set()
        wait_for(lambda: node.state.get(sop_hash(uid)).status in ("scored", "done")
                 and node.state.get(sop_hash(uid)).status, 60, "the requeued instance to be scored")
    finally:
        node.stop()


def test_a_dead_worker_is_restarted_and_nothing_is_acked_while_none_runs(tmp_path):
    class Die(BaseException):
        """Not an Exception: escapes every handler, as a bug in a C extension's wrapper would."""

    def die(n):
        if n == 1:
            raise Die()

    node = make_node(tmp_path / "n", Canned(hook=die), start=False)
    assert node.scp.on_echo(None) != SUCCESS and node.can_keep() == "no worker is running"
    node.start()
    try:
        uid = "1.2.826.0.1.3680043.8.498.90021"
        assert c_store(node.cfg.port, dicom(3, uid)) == SUCCESS
        wait_for(lambda: any(r.get("event") == "worker_restarted" for r in audit(node)), 30, "a worker restart")
        line = final(node, uid)  # the restarted worker finishes the instance that killed the first one
        assert line["outcome"] == "not_processed" and node.worker_starts == 2
    finally:
        node.stop()


def test_scorer_outage_is_retried_for_hours_by_default(tmp_path):
    cfg_text = "ae_title: A\nallowed_calling_aes: [B]\ndestinations: [{name: p, kind: cstore, ae_title: C}]\n"
    (tmp_path / "n.yaml").write_text(cfg_text)
    retry = load_config(tmp_path / "n.yaml").retry
    assert retry.give_up_after_s >= 4 * 3600 and retry.attempts is None
    t0 = 1_000_000.0
    assert not retry.exhausted(10_000, t0, t0 + 3 * 3600)  # a 3-hour outage: still retrying
    assert retry.exhausted(1, t0, t0 + retry.give_up_after_s)
    assert retry.delay(100) == retry.max_s


def test_oversized_data_set_and_full_disk_are_refused_before_spooling(tmp_path):
    node = make_node(tmp_path / "n", Canned(), extra="max_dataset_bytes: 100000\n")
    try:
        big = phantom_dicom(4, size=512, SOPInstanceUID="1.2.826.0.1.3680043.8.498.90031")  # 256 KiB of pixels
        assert c_store(node.cfg.port, big) == OUT_OF_RESOURCES
        assert list(node.incoming.iterdir()) == []
        assert any(r.get("event") == "store_refused" and "max_dataset_bytes" in r["reason"] for r in audit(node))
        node.cfg.min_free_bytes = 1 << 60  # no disk has that much free
        assert c_store(node.cfg.port, dicom(5, "1.2.826.0.1.3680043.8.498.90032")) == OUT_OF_RESOURCES
        assert list(node.incoming.iterdir()) == []
    finally:
        node.stop()


def test_deflate_bomb_to_the_node_is_refused_without_inflating_it(tmp_path):
    from test_decode_bombs import deflate_bomb

    bomb = deflate_bomb(300 * 2**20)
    assert len(bomb) < 2 * 2**20
    node = make_node(tmp_path / "n", Canned())
    try:
        from pynetdicom import AE

        ds = pydicom.dcmread(io.BytesIO(bomb), stop_before_pixels=True)
        ae = AE(ae_title=MODALITY)
        ae.add_requested_context(ds.SOPClassUID, ["1.2.840.10008.1.2.1.99"])
        from pynetdicom import _config

        assoc = ae.associate("127.0.0.1", node.cfg.port, ae_title="CXRSERVE")
        assert assoc.is_established
        try:
            sent = bomb_file = tmp_path / "bomb.dcm"
            bomb_file.write_bytes(bomb)
            _config.STORE_SEND_CHUNKED_DATASET = True  # send the encoded bytes as they are
            try:
                status = assoc.send_c_store(sent)
            finally:
                _config.STORE_SEND_CHUNKED_DATASET = False
        finally:
            assoc.release()
        assert status.Status == OUT_OF_RESOURCES
        assert list(node.incoming.iterdir()) == []
    finally:
        node.stop()


# --------------------------------------------------------------------------- 15: one instance per UID
def test_a_different_instance_reusing_a_uid_is_refused_and_a_resend_is_not(tmp_path):
    node = make_node(tmp_path / "n", Canned())
    try:
        uid = "1.2.826.0.1.3680043.8.498.90041"
        first = dicom(6, uid, StudyInstanceUID="1.2.826.0.1.3680043.8.498.90040")
        assert c_store(node.cfg.port, first) == SUCCESS
        final(node, uid)
        other = dicom(7, uid, StudyInstanceUID="1.2.826.0.1.3680043.8.498.90049")
        assert c_store(node.cfg.port, other) == DUPLICATE_INSTANCE
        assert any(r.get("event") == "store_refused" and "already used" in r["reason"] for r in audit(node))
        assert c_store(node.cfg.port, first) == SUCCESS  # the same instance again: acked, one result set
        no_uid = pydicom.dcmread(io.BytesIO(dicom(8, "1.2.826.0.1.3680043.8.498.90042")))
        no_uid.SOPInstanceUID = ""
        buf = io.BytesIO()
        no_uid.save_as(buf)
        from pynetdicom import AE

        ae = AE(ae_title=MODALITY)
        ae.add_requested_context(no_uid.SOPClassUID, [str(no_uid.file_meta.TransferSyntaxUID)])
        assoc = ae.associate("127.0.0.1", node.cfg.port, ae_title="CXRSERVE")
        try:
            status = assoc.send_c_store(no_uid)
        finally:
            assoc.release()
        # pynetdicom's own decoder aborts a C-STORE whose command has no UID: never acked either way
        assert getattr(status, "Status", None) in (None, CANNOT_UNDERSTAND)
    finally:
        node.stop()


# --------------------------------------------------------------------------- 5: association hygiene
def test_idle_connections_from_one_host_cannot_lock_out_a_modality(tmp_path):
    node = make_node(tmp_path / "n", Canned())
    idle = []
    try:
        for _ in range(12):  # more than the 8 association slots, from another loopback address
            s = socket.socket()
            s.bind(("127.0.0.2", 0))
            try:
                s.connect(("127.0.0.1", node.cfg.port))
            except OSError:
                s.close()
                continue
            idle.append(s)
        time.sleep(0.5)
        t0 = time.perf_counter()
        assert echoscu(node.cfg.port, calling=MODALITY).returncode == 0
        assert time.perf_counter() - t0 < 5
        assert any(r.get("event") == "connection_refused" and r.get("peer") == "127.0.0.2" for r in audit(node))
    finally:
        for s in idle:
            s.close()
        node.stop()


def test_refusals_are_audited_with_their_reason_once_a_period(tmp_path):
    node = make_node(tmp_path / "n", Canned())
    try:
        wrong_called = echoscu(node.cfg.port, calling=MODALITY, called="NOT-CXRSERVE")
        assert wrong_called.returncode != 0
        lines = [r for r in audit(node) if r.get("event") == "association_refused"]
        assert lines[-1]["reason"] == "called AE title is not this node's ae_title"
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title="INTRUDER")
        ae.add_requested_context(Verification)
        for _ in range(40):
            assoc = ae.associate("127.0.0.1", node.cfg.port, ae_title="CXRSERVE")
            assert not assoc.is_established
        intruder = [r for r in audit(node) if r.get("calling_ae") == "INTRUDER"]
        assert len(intruder) == 1 and intruder[0]["reason"] == "calling AE title not in allowed_calling_aes"
    finally:
        node.stop()


# --------------------------------------------------------------------------- 3: no wrong-patient prior
@pytest.mark.parametrize("patient_id", ["*", "PID?", "A\\B", "", "  "])
def test_wildcard_or_multi_valued_patient_ids_are_never_queried(patient_id):
    import warnings

    source = pydicom.Dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source.PatientID = patient_id
    source.StudyDate, source.StudyTime, source.StudyInstanceUID = "20200101", "", "1.2.3"
    from cxrserve.tools.node.config import QueryRetrieve

    with pytest.raises(PriorSkipped):  # raised before any association: the port below is closed
        find_prior(source, QueryRetrieve(host="127.0.0.1", port=free_port(), ae_title="PACS", timeout_s=1), "CXR")


def test_same_patient_checks_issuer_birth_date_and_sex():
    a = pydicom.Dataset()
    a.PatientID, a.IssuerOfPatientID, a.PatientBirthDate, a.PatientSex = "P1", "HOSP-A", "19500102", "F"
    b = pydicom.Dataset()
    b.PatientID, b.IssuerOfPatientID, b.PatientBirthDate, b.PatientSex = "P1", "HOSP-A", "19500102", "F"
    assert same_patient(a, b) is None
    b.PatientSex = ""
    assert same_patient(a, b) is None  # absent on one side: not a contradiction
    for keyword, value in (("IssuerOfPatientID", "HOSP-B"), ("PatientBirthDate", "19600101"), ("PatientSex", "M"),
                           ("PatientID", "P2")):
        c = copy.deepcopy(a)
        setattr(c, keyword, value)
        assert same_patient(a, c) == keyword
    assert query_safe_id("PID-1", "PatientID") == "PID-1"


def test_a_prior_of_another_patient_is_never_used(tmp_path):
    """Orthanc holds a study under the same PatientID but another birth date (another issuer's
    patient): the node skips the prior, says why in the audit line, and still scores the film."""
    orthanc = Orthanc(tmp_path / "orthanc", {"cxrnode": ("CXRSERVE", free_port())})  # may query and get
    node = make_node(tmp_path / "n", Canned(), start=False,
                     extra=f"query_retrieve: {{host: 127.0.0.1, port: {orthanc.dicom_port}, ae_title: ORTHANC}}\n")
    try:
        orthanc.upload(phantom_dicom(9, size=128, PatientID="PID-SHARED", PatientBirthDate="19400101",
                                     StudyDate="20190101", StudyInstanceUID="1.2.826.0.1.3680043.8.498.90051",
                                     SOPInstanceUID="1.2.826.0.1.3680043.8.498.90053"))
        node.start()
        uid = "1.2.826.0.1.3680043.8.498.90063"
        current = phantom_dicom(10, size=128, PatientID="PID-SHARED", PatientBirthDate="19800101",
                                StudyDate="20200101", StudyInstanceUID="1.2.826.0.1.3680043.8.498.90061",
                                SOPInstanceUID=uid)
        assert c_store(node.cfg.port, current) == SUCCESS
        line = final(node, uid)
        assert line["timings"]["prior"].startswith("skipped: candidate priors belong to another patient")
        assert "PatientBirthDate" in line["timings"]["prior"] and "1940" not in json.dumps(line)
        wild = "1.2.826.0.1.3680043.8.498.90073"
        assert c_store(node.cfg.port, phantom_dicom(11, size=128, PatientID="*", StudyDate="20200101",
                                                    StudyInstanceUID="1.2.826.0.1.3680043.8.498.90071",
                                                    SOPInstanceUID=wild)) == SUCCESS
        line = final(node, wild)
        assert "wildcard" in line["timings"]["prior"] and node._scorer.calls == 2
    finally:
        node.stop()
        orthanc.stop()


# --------------------------------------------------------------------------- 6/7: files and retention
def test_spool_is_private_and_results_go_once_delivered(tmp_path, study_response):
    import tempfile

    # pytest's own tmp folders are 0700: the node's folder sits where any local user could look
    open_parent = Path(tempfile.mkdtemp(prefix="cxrserve-node-test-"))
    open_parent.chmod(0o755)
    orthanc = Orthanc(tmp_path / "orthanc", {})
    node = make_node(open_parent / "n", Canned(study_response["response"]), dest_port=orthanc.dicom_port)
    (open_parent / "n").chmod(0o755)
    try:
        uid = "1.2.826.0.1.3680043.8.498.90081"
        assert c_store(node.cfg.port, study_response["dicom"](uid)) == SUCCESS
        line = final(node, uid, timeout=120)
        assert line["outcome"] == "done"
        spool = node.cfg.spool
        for folder in (spool, node.incoming, node.results):
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
        for path in spool.rglob("*"):
            if path.is_file():
                assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
        assert list(node.results.iterdir()) == []  # delivered: no copy of the patient's results left
        assert list(node.incoming.iterdir()) == []  # keep_spooled_images: false
        if os.geteuid() == 0 and shutil.which("runuser"):  # another local user reads nothing there
            import subprocess

            for target in (node.cfg.spool / "state.sqlite", node.cfg.audit_path, node.incoming):
                other = subprocess.run(["runuser", "-u", "nobody", "--", "cat" if target.is_file() else "ls",
                                        str(target)], capture_output=True, text=True)
                assert other.returncode != 0 and "Permission denied" in other.stderr, target
    finally:
        node.stop()
        orthanc.stop()
        shutil.rmtree(open_parent, ignore_errors=True)


def test_failed_instances_files_are_deleted_after_retention(tmp_path):
    node = make_node(tmp_path / "n", Canned(hook=lambda n: (_ for _ in ()).throw(ValueError("boom"))),
                     extra="retention_days: 0\n")
    try:
        uid = "1.2.826.0.1.3680043.8.498.90091"
        assert c_store(node.cfg.port, dicom(12, uid)) == SUCCESS
        assert final(node, uid)["outcome"] == "failed"
        assert (node.incoming / f"{sop_hash(uid)}.dcm").exists()
        node.expire()
        assert not (node.incoming / f"{sop_hash(uid)}.dcm").exists()
        assert any(r.get("event") == "expired" for r in audit(node))
    finally:
        node.stop()


# --------------------------------------------------------------------------- 4: non-conformant fields
def test_bad_birth_date_and_sex_still_give_results_and_never_reach_a_log(tmp_path, study_response, caplog):
    orthanc = Orthanc(tmp_path / "orthanc", {})
    node = make_node(tmp_path / "n", Canned(study_response["response"]), dest_port=orthanc.dicom_port)
    try:
        uid = "1.2.826.0.1.3680043.8.498.90101"
        data = study_response["dicom"](uid, PatientBirthDate="1950/01/02", PatientSex="female")
        (tmp_path / "bad.dcm").write_bytes(data)
        with caplog.at_level("DEBUG"):  # dcmtk sends: only the node's own logging is captured
            sent = storescu(node.cfg.port, [tmp_path / "bad.dcm"], calling=MODALITY)
            assert sent.returncode == 0, sent.stderr
            line = final(node, uid, timeout=120)
        assert line["outcome"] == "done", line
        (sr,) = [i for i in orthanc.instances() if i.get("Modality") == "SR"]
        assert sr["PatientBirthDate"] == "19500102" and sr["PatientSex"] == "F"
        text = caplog.text + node.cfg.audit_path.read_text()
        assert "1950/01/02" not in text and "female" not in text
    finally:
        node.stop()
        orthanc.stop()


# --------------------------------------------------------------------------- 16: STOW timeout
def test_stow_honours_the_destinations_timeout():
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from cxrserve.tools.node.config import Destination
    from cxrserve.tools.node.dimse import DeliveryError, stowrs

    class Slow(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            time.sleep(6)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ds = pydicom.dcmread(io.BytesIO(dicom(13, "1.2.826.0.1.3680043.8.498.90111")))
        t0 = time.perf_counter()
        with pytest.raises(DeliveryError):
            stowrs([ds], Destination(name="w", kind="stowrs", url=f"http://127.0.0.1:{server.server_port}",
                                     timeout_s=1))
        assert time.perf_counter() - t0 < 4
    finally:
        server.shutdown()


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def study_response(pipeline):
    """One real cxr-study response and a maker of DICOMs with the same pixels (so the SEG fits)."""
    from study_adapter import StudyModelScorer

    base = phantom_dicom(21, size=256, SOPInstanceUID="1.2.826.0.1.3680043.8.498.90000")
    response = StudyModelScorer(pipeline("cxr-study")).score(base)
    assert "results" in response, response

    def make(uid: str, **tags) -> bytes:
        import warnings

        ds = pydicom.dcmread(io.BytesIO(base))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
            ds.StudyInstanceUID = uid + ".1"
            ds.SeriesInstanceUID = uid + ".2"
            for k, v in tags.items():
                setattr(ds, k, v)
        buf = io.BytesIO()
        ds.save_as(buf)
        return buf.getvalue()

    return {"response": response, "dicom": make}


def test_node_files_never_world_readable_even_with_a_loose_umask(tmp_path):
    old = os.umask(0o022)
    try:
        node = make_node(tmp_path / "n", Canned(), start=False)
        node.state.close()
        for path in (node.cfg.spool / "state.sqlite", node.cfg.audit_path):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    finally:
        os.umask(old)


# --------------------------------------------------------------------------- 17: every decodable syntax
def _syntax_files(folder: Path) -> dict[str, Path]:
    """One small CR per transfer syntax the decoder reads: pydicom/Pillow/pyjpegls/openjpeg through
    :func:`to_dicom`, dcmtk's own encoders for JPEG extended (12-bit) and process 14."""
    import subprocess

    import numpy as np
    from pydicom.uid import JPEGLSNearLossless

    from cxrserve.synthetic.dicomwrite import TRANSFER_SYNTAXES, to_dicom
    from cxrserve.synthetic.phantoms import render, sample_spec

    img = render(sample_spec(5, kind="frontal", height=128, width=128)).image
    out: dict[str, Path] = {}
    for i, (name, uid) in enumerate(TRANSFER_SYNTAXES.items()):
        path = folder / f"{name}.dcm"
        path.write_bytes(to_dicom(img, modality="CR", view_position="PA", transfer_syntax=name,
                                  tags={"SOPInstanceUID": f"1.2.826.0.1.3680043.8.498.9120{i}"}))
        out[uid] = path
    base12 = folder / "base12.dcm"
    base12.write_bytes(to_dicom(img.astype(np.uint16) * 16, bits_stored=12, modality="CR", view_position="PA",
                                tags={"SOPInstanceUID": "1.2.826.0.1.3680043.8.498.91300"}))
    for flag, uid, uid_tail in (("+ee", "1.2.840.10008.1.2.4.51", "1"), ("+el", "1.2.840.10008.1.2.4.57", "2")):
        path = folder / f"dcmcjpeg{flag}.dcm"
        subprocess.run(["dcmcjpeg", flag, str(base12), str(path)], check=True, capture_output=True)
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.9131{uid_tail}"
        ds.save_as(path)
        out[uid] = path
    ds = pydicom.dcmread(base12)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.91320"
    ds.compress(JPEGLSNearLossless, jls_error=2)  # pyjpegls: the near-lossless CR of the finding
    path = folder / "jpegls_near.dcm"
    ds.save_as(path)
    out[str(JPEGLSNearLossless)] = path
    return out


def test_every_transfer_syntax_the_decoder_reads_is_taken_from_dcmtk(tmp_path):
    """dcmtk's storescu proposes each file's own transfer syntax; the node must accept it (it used to
    refuse JPEG-LS near-lossless, JPEG extended and process 14 at negotiation)."""
    import subprocess

    from cxrserve.core.bounded import DECODABLE_TRANSFER_SYNTAXES
    from cxrserve.core.imageio import decode

    files = _syntax_files(tmp_path)
    node = make_node(tmp_path / "n", Canned())
    try:
        # dcmtk 3.6.7 has no HTJ2K (2023): those three are only negotiated (below), not sent by dcmtk
        dcmtk_sent = [uid for uid in DECODABLE_TRANSFER_SYNTAXES if uid in files]
        assert set(DECODABLE_TRANSFER_SYNTAXES) - set(dcmtk_sent) <= {
            "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"}
        for uid in dcmtk_sent:
            decode(files[uid].read_bytes())  # the scorer's decoder reads it ...
            sop = str(pydicom.dcmread(files[uid], stop_before_pixels=True).SOPClassUID)
            profile = tmp_path / f"{uid}.cfg"  # a modality that proposes exactly the file's syntax
            profile.write_text(f"[[TransferSyntaxes]]\n[Own]\nTransferSyntax1 = {uid}\n"
                               f"[[PresentationContexts]]\n[Ctx]\nPresentationContext1 = {sop}\\Own\n"
                               "[[Profiles]]\n[Exact]\nPresentationContexts = Ctx\n")
            sent = subprocess.run(["storescu", "--config-file", str(profile), "Exact", "-aet", MODALITY,
                                   "-aec", "CXRSERVE", "127.0.0.1", str(node.cfg.port), str(files[uid])],
                                  capture_output=True, text=True, timeout=60)
            assert sent.returncode == 0, f"{uid}: {sent.stderr}"  # ... so the node takes it
            key = sop_hash(str(pydicom.dcmread(files[uid], stop_before_pixels=True).SOPInstanceUID))
            assert node.state.get(key) is not None, uid
        from pynetdicom import AE

        ae = AE(ae_title=MODALITY)
        for uid in DECODABLE_TRANSFER_SYNTAXES:
            ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", [uid])
        assoc = ae.associate("127.0.0.1", node.cfg.port, ae_title="CXRSERVE")
        try:
            accepted = {cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
        finally:
            assoc.release()
        assert accepted == set(DECODABLE_TRANSFER_SYNTAXES)
    finally:
        node.stop()
