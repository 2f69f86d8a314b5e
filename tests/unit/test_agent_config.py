"""The agent's environment contract: what jobspec puts in, what the agent reads back."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError, load, remap
from dispatcher.jobs import jobspec
from dispatcher.plumbing.settings import load_settings
from schemas import Phase, decode_incident, identify
from tests.support.payloads import SAMPLE_WEBHOOK, dumps

BASE = {
    "AGENTJOBS_INVESTIGATION_ID": "a" * 40,
    "AGENTJOBS_JOB_NAME": "aj-x-aaaaaaaaaaaaaaaa",
    "AGENTJOBS_PHASE": "read-only",
    "AGENTJOBS_CLASS": "database",
    "AGENTJOBS_INPUT_DIR": "/var/run/agentjobs/input",
    "AGENTJOBS_VAULT__ADDR": "http://vault:8200",
    "AGENTJOBS_VAULT__AUTH_MODE": "per-investigation",
    "AGENTJOBS_AMQP__URL": "amqp://rabbit:5672/",
    "AGENTJOBS_POSTGRES__DSN": "postgresql://db:5432/app",
}


def test_parses_the_jobs_environment() -> None:
    env = load(BASE)

    assert env.investigation_id == "a" * 40
    assert env.phase is Phase.READ_ONLY
    assert env.class_name == "database"
    assert env.input_dir == Path("/var/run/agentjobs/input")
    assert env.wrapped_token_file == Path("/var/run/agentjobs/input/wrapped-token")
    assert env.incident_file.name == "incident.json"
    assert env.auth_mode == "per-investigation"
    assert env.sa_token_file is None
    assert env.amqp_url == "amqp://rabbit:5672/"
    assert env.postgres_dsn == "postgresql://db:5432/app"


def test_mount_root_re_roots_absolute_paths(tmp_path: Path) -> None:
    env = load(BASE | {"AGENTJOBS_MOUNT_ROOT": str(tmp_path), "AGENTJOBS_VAULT__AUTH_MODE": "kubernetes",
                       "AGENTJOBS_SA_TOKEN_FILE": "/var/run/secrets/agentjobs/serviceaccount/token"})

    assert env.input_dir == tmp_path / "var/run/agentjobs/input"
    assert env.sa_token_file == tmp_path / "var/run/secrets/agentjobs/serviceaccount/token"


def test_remap_leaves_relative_paths_and_no_root_alone(tmp_path: Path) -> None:
    assert remap("/a/b", None) == Path("/a/b")
    assert remap("rel/x", tmp_path) == Path("rel/x")
    assert remap("/", tmp_path) == tmp_path


@pytest.mark.parametrize(
    ("change", "names"),
    [
        ({"AGENTJOBS_PHASE": ""}, "AGENTJOBS_PHASE"),
        ({"AGENTJOBS_PHASE": "yolo"}, "AGENTJOBS_PHASE"),
        ({"AGENTJOBS_INVESTIGATION_ID": ""}, "AGENTJOBS_INVESTIGATION_ID"),
        ({"AGENTJOBS_VAULT__ADDR": ""}, "AGENTJOBS_VAULT__ADDR"),
        ({"AGENTJOBS_VAULT__AUTH_MODE": "static"}, "AGENTJOBS_VAULT__AUTH_MODE"),
        ({"AGENTJOBS_VAULT__AUTH_MODE": "kubernetes"}, "AGENTJOBS_SA_TOKEN_FILE"),
        ({"AGENTJOBS_AMQP__URL": ""}, "AGENTJOBS_AMQP__URL"),
        ({"AGENTJOBS_AMQP__PUBLISH_TIMEOUT": "-1"}, "AGENTJOBS_AMQP__PUBLISH_TIMEOUT"),
    ],
)
def test_a_bad_environment_names_the_variable(change: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        load(BASE | change)


def test_auth_mode_none_needs_no_vault() -> None:
    env = load(BASE | {"AGENTJOBS_VAULT__AUTH_MODE": "none", "AGENTJOBS_VAULT__ADDR": "",
                       "AGENTJOBS_POSTGRES__DSN": ""})

    assert env.auth_mode == "none"
    assert env.postgres_dsn == ""  # not configured: the finding will say so


@pytest.mark.parametrize(
    ("url", "stripped"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/", "amqp://127.0.0.1:5672/"),
        ("amqp://u%40x:p%2Fw@rabbit/%2Fprod", "amqp://rabbit/%2Fprod"),
        ("amqp://rabbit:5672/", "amqp://rabbit:5672/"),
        ("postgresql://admin:s3cret@db:5432/app?sslmode=require&password=x", "postgresql://db:5432/app?sslmode=require"),
        ("host=db port=5432 user=admin password='a b' dbname=app", "host=db port=5432 dbname=app"),
        ("", ""),
    ],
)
def test_without_credentials_strips_user_and_password(url: str, stripped: str) -> None:
    assert jobspec.without_credentials(url) == stripped


def test_jobs_get_broker_and_database_addresses_without_credentials() -> None:
    settings = load_settings(None, {"AGENTJOBS_AMQP__URL": "amqp://guest:guest@rabbit:5672/prod",
                                    "AGENTJOBS_POSTGRES__DSN": "postgresql://agent:pw@db:5432/app"})
    event = decode_incident(dumps(SAMPLE_WEBHOOK))
    plan = jobspec.JobPlan(identity=identify(event), event=event, class_name="default", phase=Phase.SHADOW)
    (container,) = jobspec.build_job(plan, settings)["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}

    assert env["AGENTJOBS_AMQP__URL"] == "amqp://rabbit:5672/prod"
    assert env["AGENTJOBS_POSTGRES__DSN"] == "postgresql://db:5432/app"
    # ... and what the Job gets is exactly what the agent can parse
    parsed = load({k: v for k, v in env.items() if v is not None})
    assert parsed.amqp_url == "amqp://rabbit:5672/prod"
    assert parsed.investigation_id == plan.identity.investigation_id


def test_vault_is_verified_with_the_ca_the_dispatcher_handed_over_else_the_system_store(tmp_path: Path) -> None:
    env = load(BASE | {"AGENTJOBS_INPUT_DIR": str(tmp_path)})
    assert env.vault_verify is True
    (tmp_path / jobspec.VAULT_CA_FILE).write_text("-----BEGIN CERTIFICATE-----\n")
    assert env.vault_verify == str(tmp_path / jobspec.VAULT_CA_FILE)
