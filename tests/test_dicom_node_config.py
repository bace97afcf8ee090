"""The node's YAML: the committed example parses; mistakes are clear errors, not a silent default."""
from __future__ import annotations

from pathlib import Path

import pytest

from cxrserve.tools.cli import main
from cxrserve.tools.node.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def test_committed_example_parses():
    cfg = load_config(REPO / "deploy" / "node" / "node.yaml")
    assert cfg.host == "127.0.0.1"  # loopback unless the operator opens it
    assert cfg.allowed_calling_aes and cfg.destinations[0].kind == "cstore"
    assert cfg.spool == (REPO / ".node" / "spool").resolve()
    assert cfg.scorer.model == "cxr-study" and cfg.scorer.options == {"pictures": True}


@pytest.mark.parametrize("text, message", [
    ("allowed_calling_aes: []\ndestinations: [{kind: cstore, host: h, port: 1, ae_title: P}]\n", "allowed_calling_aes"),
    ("allowed_calling_aes: [A]\n", "destinations"),
    ("allowed_calling_aes: [A]\ndestinations: [{kind: ftp}]\n", "cstore, stowrs, mllp or fhir"),
    ("allowed_calling_aes: [A]\ndestinations: [{kind: fhir}]\n", "fhir needs url"),
    ("allowed_calling_aes: [A]\ndestinations: [{kind: mllp, port: 2575, processing_id: X}]\n", "processing_id"),
    ("allowed_calling_aes: [A]\ndestinations: [{kind: stowrs}]\n", "needs url"),
    ("allowed_calling_aes: [THIS_AE_TITLE_IS_TOO_LONG]\ndestinations: [{kind: stowrs, url: u}]\n", "1-16"),
    ("allowed_calling_aes: [A]\ndestinations: [{kind: stowrs, url: u}]\nprot: 1\n", "unknown keys"),
    ("allowed_calling_aes: [A]\ndestinations: [{kind: stowrs, url: u}]\nsites: {B: stmary}\n", "never send"),
    ("allowed_calling_aes: [A]\ndestinations: [{kind: stowrs, url: u}]\nsites: {A: St Mary}\n", "site names"),
    ("allowed_calling_aes: [A]\ndestinations: [{kind: stowrs, url: u}]\nretry: {tries: 3}\n", "retry"),
    ("allowed_calling_aes: [A]\ndestinations: [{kind: stowrs, url: u}]\nassociations: {per_peer: 0}\n", "per_peer"),
    ("allowed_calling_aes: [A]\ndestinations: [{kind: stowrs, url: u}]\nassociations: {peers: 2}\n",
     "associations"),
])
def test_bad_configs_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "node.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_cli_reports_a_bad_config(tmp_path, capsys):
    path = tmp_path / "node.yaml"
    path.write_text("allowed_calling_aes: [A]\n")
    assert main(["node", "--config", str(path)]) == 2
    assert "destinations" in capsys.readouterr().out


def test_status_and_requeue_for_an_operator(tmp_path, capsys):
    """``node status`` says a stopped node is unhealthy (exit 1, for a monitoring check) and lists
    failed instances with their reasons; ``node requeue`` puts a failed one back in the queue."""
    import json

    from cxrserve.tools.node.state import State

    path = tmp_path / "node.yaml"
    path.write_text("allowed_calling_aes: [A]\ndestinations: [{kind: stowrs, url: u}]\nspool: spool\n")
    (tmp_path / "spool" / "incoming").mkdir(parents=True)
    state = State(tmp_path / "spool" / "state.sqlite")
    state.add("ab" * 8)
    state.set_status("ab" * 8, "failed", reason="scoring unavailable: 503")
    state.close()
    (tmp_path / "spool" / "incoming" / f"{'ab' * 8}.dcm").write_bytes(b"kept image")
    assert main(["node", "status", "--config", str(path)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["healthy"] and "not running" in report["problem"]
    assert report["failed"] == [{"instance": f"sha256:{'ab' * 8}", "reason": "scoring unavailable: 503"}]
    assert main(["node", "requeue", "--config", str(path)]) == 2  # names nothing: refused
    capsys.readouterr()
    assert main(["node", "requeue", "--config", str(path), "--all"]) == 0
    assert "requeued for scoring" in capsys.readouterr().out
    state = State(tmp_path / "spool" / "state.sqlite")
    assert state.get("ab" * 8).status == "spooled"
    state.close()
    assert main(["node", "requeue", f"sha256:{'cd' * 8}", "--config", str(path)]) == 1  # not failed: said so
