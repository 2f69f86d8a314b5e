"""The console script: `agentjobs --help`, `schemas export --check`, `config check`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dispatcher.cli.main import app
from schemas import export


def _agentjobs() -> list[str]:
    script = Path(sys.executable).with_name("agentjobs")
    return [str(script)] if script.exists() else [shutil.which("agentjobs") or "agentjobs"]


def test_installed_console_script_lists_schemas_and_config() -> None:
    out = subprocess.run([*_agentjobs(), "--help"], capture_output=True, text=True, check=True).stdout
    assert "schemas" in out and "config" in out


def test_committed_json_schemas_are_up_to_date() -> None:
    result = CliRunner().invoke(app, ["schemas", "export", "--check"])
    assert result.exit_code == 0, result.output


def test_export_check_fails_on_a_stale_or_missing_file_and_export_repairs_it(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["schemas", "export", "--dir", str(tmp_path)]).exit_code == 0
    assert runner.invoke(app, ["schemas", "export", "--check", "--dir", str(tmp_path)]).exit_code == 0

    (tmp_path / "finding.schema.json").write_text("{}")
    (tmp_path / "old.schema.json").write_text("{}")
    (tmp_path / "incident.schema.json").unlink()
    stale = runner.invoke(app, ["schemas", "export", "--check", "--dir", str(tmp_path)])

    assert stale.exit_code == 1
    for name in ("finding.schema.json: out of date", "incident.schema.json: missing", "old.schema.json: no longer produced"):
        assert name in stale.output
    assert runner.invoke(app, ["schemas", "export", "--dir", str(tmp_path)]).exit_code == 0
    assert export.stale(tmp_path) == []


def test_every_wire_kind_has_a_schema_file() -> None:
    names = {p.name for p in export.SCHEMA_DIR.glob("*.schema.json")}
    for kind in ("incident", "lifecycle", "finding", "feedback", "phase_changed", "dead_letter"):
        assert f"{kind}.schema.json" in names
    incident = json.loads((export.SCHEMA_DIR / "incident.schema.json").read_text())
    assert incident["$schema"].startswith("https://json-schema.org/")


def test_config_check_prints_effective_settings_with_secrets_masked(tmp_path: Path) -> None:
    path = tmp_path / "agentjobs.toml"
    path.write_text('[amqp]\nurl = "amqp://ops:topsecret@rabbit/"\nprefetch = 64\n')
    result = CliRunner().invoke(
        app, ["config", "check", str(path)], env={"AGENTJOBS_VAULT__TOKEN": "s.0123456789abcdefXYZ"}
    )
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["amqp"]["prefetch"] == 64
    assert shown["amqp"]["url"] == "amqp://ops:***@rabbit/"
    assert shown["vault"]["token"] == "***"
    assert "topsecret" not in result.output and "0123456789abcdef" not in result.output


def test_config_check_reports_file_key_and_type_with_exit_code_2(tmp_path: Path) -> None:
    path = tmp_path / "agentjobs.toml"
    path.write_text('[amqp]\nprefetch = "lots"\n')
    result = CliRunner().invoke(app, ["config", "check", str(path)])
    assert result.exit_code == 2
    assert f"error: {path}: amqp.prefetch: expected int, got str" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", [["vault", "bootstrap", "--addr", "https://127.0.0.1:1", "--token", "x"],
                                     ["dispatcher"]])
def test_an_unreadable_vault_ca_is_a_clear_error_with_exit_code_2(command: list[str], tmp_path: Path) -> None:
    env = {"AGENTJOBS_VAULT__CA_CERT": str(tmp_path / "missing-ca.pem"),
           "AGENTJOBS_RUNTIME__STATE_DIR": str(tmp_path / "state"), "AGENTJOBS_METRICS__PORT": "0"}
    result = CliRunner().invoke(app, command, env=env)
    assert result.exit_code == 2, result.output
    assert "vault.ca_cert: cannot read" in result.output
    assert "Traceback" not in result.output
