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
    ("allowed_calling_aes: [A]\ndestinations: [{kind: ftp}]\n", "cstore or stowrs"),
    ("allowed_calling_aes: [A]\ndestinations: [{kind: stowrs}]\n", "needs url"),
    ("allowed_calling_aes: [THIS_AE_TITLE_IS_TOO_LONG]\ndestinations: [{kind: stowrs, url: u}]\n", "1-16"),
    ("allowed_calling_aes: [A]\ndestinations: [{kind: stowrs, url: u}]\nprot: 1\n", "unknown keys"),
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
