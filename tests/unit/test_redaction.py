"""Secrets are masked by what they are, counters and identifiers are shown as they are.

One rule (schemas/redaction.py) for log lines, `agentjobs config check` and
`agentjobs tail` (readable and --json); each is checked through its real entry point.
"""

from __future__ import annotations

import io
import json
import logging
import typing
from pathlib import Path

import msgspec
import pytest
import structlog
from click.testing import CliRunner
from hypothesis import example, given
from hypothesis import strategies as st

from agent.config import AgentEnv
from schemas import logs
from dispatcher.cli.main import app
from dispatcher.cli.ops import render, render_json
from schemas.redaction import MASK, is_secret_key, mask_text, redact
from dispatcher.plumbing.settings import LoggingSettings, Settings
from schemas import Cost, CredentialsIssued, Evidence, Finding, Phase, decode, encode, utcnow

VAULT_TOKEN = "s.KeEMn0VEWkmVILP8vqYYapnO"
JWT = ("eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6eCJ9"
       ".c2lnbmF0dXJlLXRoYXQtbXVzdC1ub3QtYXBwZWFy")
PEM_BODY = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7"

# (secret, the text it appears in) — every credential shape mask_text knows, in context.
SECRETS_IN_TEXT = [
    (VAULT_TOKEN, f"unwrap of {VAULT_TOKEN} failed"),
    ("hvs.CAESIJ2x7Ld9q3ZrPwq1FvKmN0tS", "token hvs.CAESIJ2x7Ld9q3ZrPwq1FvKmN0tS expired"),
    ("hvb.AAAAAQJ8Zx1b2c3d4e5f6g7h8i9j", "batch hvb.AAAAAQJ8Zx1b2c3d4e5f6g7h8i9j"),
    ("hvr.Xk2mP9qL4nR7sT1vW3yZ5bD8", "recovery hvr.Xk2mP9qL4nR7sT1vW3yZ5bD8"),
    ("b.AAAAAQL6rB9ck1Q2w3e4r5t6y7u8", "old batch b.AAAAAQL6rB9ck1Q2w3e4r5t6y7u8."),
    ("root-0123456789abcdef0123456789abcdef", "dev root root-0123456789abcdef0123456789abcdef"),
    (JWT, f"login jwt={JWT}"),
    (JWT, f"TokenReview of {JWT} denied"),
    ("pw1-amqp", "connect amqp://agent:pw1-amqp@rabbit:5672/prod refused"),
    ("pg-url-pw", "postgresql://agent:pg-url-pw@db:5432/shop?sslmode=require"),
    ("pg-query-pw", "postgresql://db/shop?user=agent&password=pg-query-pw&sslmode=disable"),
    ("libpq-pw", "host=db port=5432 password=libpq-pw user=agent dbname=shop"),
    ("quoted libpq pw", "host=db password='quoted libpq pw' user=agent"),
    ("PgEnvPw9", "PGPASSWORD=PgEnvPw9 psql -h db"),
    ("bearer-cred-42", "Authorization: Bearer bearer-cred-42"),
    ("dXNlcjpodW50ZXIy", "Authorization: Basic dXNlcjpodW50ZXIy"),
    ("opaque-bearer-9", "webhook sent Bearer opaque-bearer-9 to the bridge"),
    ("hvs-header-value", "X-Vault-Token: hvs-header-value"),
    ("session=abc123", "Cookie: session=abc123; theme=dark"),
    ("sqlpass", "ALTER ROLE agent WITH LOGIN PASSWORD 'sqlpass'"),
    ("sk-live-0123456789abcdefghijkl", "llm rejected key sk-live-0123456789abcdefghijkl"),
    ("ct-in-a-repr", "vault said {'client_token': 'ct-in-a-repr', 'accessor': 'acc-1'}"),
    ("json-pw", 'body {"username": "u", "password": "json-pw"}'),
    ("sid-in-kv", "approle secret_id=sid-in-kv rejected"),
    (PEM_BODY, f"-----BEGIN PRIVATE KEY-----\n{PEM_BODY}\n-----END PRIVATE KEY-----"),
    (PEM_BODY, f"cut short: -----BEGIN RSA PRIVATE KEY-----\n{PEM_BODY}"),
]

# Keys that hold secrets: settings fields, Vault request/response fields, HTTP headers.
SECRET_KEYS = [
    "token", "client_token", "wrapping_token", "wrap_token", "wrapped_token", "vault_token",
    "root_token", "bearer_token", "X-Vault-Token", "VAULT_TOKEN", "clientToken", "password",
    "passwd", "basic_password", "PGPASSWORD", "secret", "client_secret", "secret_id", "api_key",
    "apikey", "apiKey", "X-Api-Key", "authorization", "Authorization", "Proxy-Authorization",
    "cookie", "Set-Cookie", "private_key", "dsn", "admin_dsn", "postgres_dsn", "jwt",
    "token_reviewer_jwt", "credentials",
]
# Keys that merely mention a secret word: counters, durations, audiences, accessors, roles, paths.
NOT_SECRET_KEYS = [
    "llm_prompt_tokens", "llm_completion_tokens", "prompt_tokens", "completion_tokens", "tokens",
    "max_tokens", "max_completion_tokens", "token_audience", "token_expiration", "token_ttl",
    "token_role", "token_accessor", "wrapped_accessor", "accessor", "wrap_ttl", "X-Vault-Wrap-TTL",
    "token_file", "sa_token_file", "wrapped_token_file", "kubernetes_reviewer_jwt_file",
    "secret_name", "auth_mode", "credential_domain", "routing_key", "incident_key",
    "idempotency_key", "group_key", "original_routing_key",
]


@pytest.fixture
def lines():
    """Log lines as the project's real logging configuration renders them (JSON)."""
    stream = io.StringIO()
    logs.configure(LoggingSettings(format="json", level="debug"), stream=stream)
    yield lambda: stream.getvalue()
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


# --- the rule ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_secret_keys_are_secret(key: str) -> None:
    assert is_secret_key(key)
    assert redact({key: "value-that-must-not-appear"}) == {key: MASK}


@pytest.mark.parametrize("key", NOT_SECRET_KEYS)
def test_keys_that_only_mention_a_secret_word_are_shown(key: str) -> None:
    assert not is_secret_key(key)
    assert redact({key: 0}) == {key: 0}
    assert redact({key: "vault"}) == {key: "vault"}


@pytest.mark.parametrize(("secret", "text"), SECRETS_IN_TEXT)
def test_every_credential_shape_is_masked_inside_text(secret: str, text: str) -> None:
    masked = mask_text(text)
    assert secret not in masked
    assert MASK in masked


@pytest.mark.parametrize(
    "text",
    [
        "llm_prompt_tokens=0 llm_completion_tokens=12 max_tokens=40000",
        "token_audience=vault token_expiration=600 token_ttl=60 wrap_ttl=60",
        "token_accessor=acc-123 wrapped_accessor=acc-456 token_file=/var/run/token",
        "routing_key=finding.critical.database secret_name=aj-abc-input",
        "Basic functionality works; bearer tokens are checked; Bearer realm=\"agentjobs\"",
        "the database.connections_are_exhausted at b.c",
        "http://prometheus.monitoring:9090/api/v1/query?query=up",
    ],
)
def test_text_without_credentials_is_left_alone(text: str) -> None:
    assert mask_text(text) == text


def test_a_secret_key_shows_only_absence_and_booleans() -> None:
    # A numeric password is still a password; empty tells "not set"; a bool carries no credential.
    assert redact({"password": 123456}) == {"password": MASK}
    assert redact({"api_key": 0.5}) == {"api_key": MASK}
    assert redact({"token": b"s.raw"}) == {"token": MASK}
    assert redact({"token": {"id": "x"}, "cookie": ["a=b"]}) == {"token": MASK, "cookie": MASK}
    assert redact({"token": "", "password": None, "secret": True}) == {
        "token": "", "password": None, "secret": True}


@given(key=st.sampled_from(SECRET_KEYS),
       value=st.one_of(st.text(min_size=1), st.integers(), st.floats(allow_nan=False)))
def test_any_value_under_a_secret_key_is_masked(key: str, value: object) -> None:
    assert redact({"outer": [{key: value}]}) == {"outer": [{key: MASK}]}


@given(key=st.sampled_from(NOT_SECRET_KEYS),
       value=st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.none()))
def test_numbers_and_booleans_are_never_secrets_by_themselves(key: str, value: object) -> None:
    assert redact({"cost": {key: value}}) == {"cost": {key: value}}


@given(prefix=st.sampled_from(["s.", "hvs.", "hvb.", "hvr.", "b."]),
       body=st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-",
                    min_size=16, max_size=120),
       before=st.text(max_size=40), after=st.text(max_size=40))
def test_vault_tokens_are_masked_wherever_they_appear(prefix: str, body: str, before: str, after: str) -> None:
    token = prefix + body
    assert token not in mask_text(f"{before} {token} {after}")


@given(user=st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True),
       password=st.from_regex(r"[A-Za-z0-9!$*+-]{6,30}", fullmatch=True),
       scheme=st.sampled_from(["amqp", "postgresql", "http", "https", "redis"]))
@example(user="guest", password="guest", scheme="amqp")
def test_url_passwords_are_masked_and_the_rest_of_the_url_kept(user: str, password: str, scheme: str) -> None:
    masked = mask_text(f"{scheme}://{user}:{password}@host:1234/path")
    assert masked == f"{scheme}://{user}:{MASK}@host:1234/path"


@given(st.text())
def test_masking_twice_changes_nothing_more(text: str) -> None:
    once = mask_text(text)
    assert mask_text(once) == once


# --- every secret-bearing field of the settings, the agent's env and the wire ------------------


def _plain_str_fields(struct: type, prefix: str = "") -> list[str]:
    """Dotted paths of every plain ``str`` field of a settings section tree."""
    out: list[str] = []
    for name, hint in typing.get_type_hints(struct).items():
        if hint is str:
            out.append(prefix + name)
        elif isinstance(hint, type) and issubclass(hint, msgspec.Struct):
            out.extend(_plain_str_fields(hint, f"{prefix}{name}."))
    return out


# The settings that hold a credential, or a DSN (which may embed one): masked whole.
SECRET_SETTINGS = {"vault.token", "postgres.dsn", "postgres.admin_dsn", "bridge.bearer_token",
                   "bridge.basic_password", "llm.api_key", "tickets.redmine.api_key", "tickets.webhook.secret"}


def test_config_check_hides_exactly_the_secret_settings_and_shows_every_other_value() -> None:
    # Given every plain text setting set to a value naming it, through AGENTJOBS_* variables
    paths = _plain_str_fields(Settings)
    assert SECRET_SETTINGS <= set(paths)  # the list above names real fields
    env = {"AGENTJOBS_" + p.upper().replace(".", "__"): f"value-of-{p}" for p in paths}
    # When the operator runs `agentjobs config check`
    result = CliRunner().invoke(app, ["config", "check"], env=env)
    # Then the secret ones are masked and every other one is printed as given
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    for path in paths:
        *sections, name = path.split(".")
        where = shown
        for section in sections:
            where = where[section]
        if path in SECRET_SETTINGS:
            assert where[name] == MASK, path
            assert f"value-of-{path}\"" not in result.output
        else:
            assert where[name] == f"value-of-{path}", path


def test_config_check_masks_credentials_and_shows_token_audience_and_expiration(tmp_path: Path) -> None:
    path = tmp_path / "agentjobs.toml"
    path.write_text('[k8s]\ntoken_audience = "vault-prod"\ntoken_expiration = 3600\n'
                    '[llm]\nmax_tokens = 12000\n')
    env = {
        "AGENTJOBS_AMQP__URL": "amqp://agent:amqp-pw-1@rabbit:5672/prod",
        "AGENTJOBS_AMQP__MANAGEMENT_URL": "http://admin:mgmt-pw-2@rabbit:15672/",
        "AGENTJOBS_VAULT__TOKEN": "hvs.CAESIJ2x7Ld9q3ZrPwq1FvKmN0tS",
        "AGENTJOBS_BRIDGE__BEARER_TOKEN": "bridge-bearer-3",
        "AGENTJOBS_BRIDGE__BASIC_PASSWORD": "1234",  # numeric-looking: still a password
        "AGENTJOBS_LLM__API_KEY": "sk-live-0123456789abcdefghijkl",
        "AGENTJOBS_POSTGRES__DSN": "host=db dbname=shop",
        "AGENTJOBS_POSTGRES__ADMIN_DSN": "postgresql://postgres:admin-pw-4@db/shop",
        "AGENTJOBS_VAULT__TOKEN_FILE": "/run/secrets/vault-token",
    }
    result = CliRunner().invoke(app, ["config", "check", str(path)], env=env)
    assert result.exit_code == 0, result.output
    for secret in ("amqp-pw-1", "mgmt-pw-2", "CAESIJ2x7Ld9", "bridge-bearer-3", '"1234"',
                   "sk-live-", "admin-pw-4", "dbname=shop"):
        assert secret not in result.output
    shown = json.loads(result.output)
    assert shown["amqp"]["url"] == "amqp://agent:***@rabbit:5672/prod"
    assert shown["amqp"]["management_url"] == "http://admin:***@rabbit:15672/"
    assert shown["k8s"]["token_audience"] == "vault-prod"
    assert shown["k8s"]["token_expiration"] == 3600
    assert shown["llm"]["max_tokens"] == 12000
    assert shown["vault"]["token_file"] == "/run/secrets/vault-token"
    assert shown["vault"]["wrap_ttl"] == 60
    assert shown["bridge"]["basic_username"] == ""


def test_the_agents_env_shows_paths_and_limits_and_hides_the_dsn(tmp_path: Path) -> None:
    env = AgentEnv(investigation_id="i", job_name="j", phase=Phase.SHADOW, class_name="default",
                   input_dir=tmp_path, vault_addr="http://vault:8200", auth_mode="kubernetes",
                   sa_token_file=tmp_path / "token", amqp_url="amqp://rabbit/",
                   postgres_dsn="postgresql://agent:dsn-pw@db/shop")
    shown = redact(env)
    assert shown["postgres_dsn"] == MASK
    assert shown["sa_token_file"] == tmp_path / "token"
    assert shown["amqp_url"] == "amqp://rabbit/"


def test_vault_and_http_bodies_hide_tokens_and_passwords_but_keep_accessors_and_ttls() -> None:
    shown = redact({
        "auth": {"client_token": "ct-1", "accessor": "acc-1", "lease_duration": 3600, "renewable": True},
        "wrap_info": {"token": "wt-2", "accessor": "acc-2", "ttl": 60, "wrapped_accessor": "acc-3"},
        "data": {"username": "v-agent-x", "password": "db-pw-3", "data": {"api_key": "llm-key-4"}},
        "login": {"role": "agentjobs-agent-shadow", "jwt": "sa-jwt-5"},
        "config": {"token_reviewer_jwt": "rev-6", "kubernetes_host": "https://k8s"},
        "headers": {"X-Vault-Token": "vt-7", "X-Vault-Wrap-TTL": "60s", "Authorization": "Bearer b-8",
                    "Cookie": "c=9", "Accept": "application/json"},
    })
    text = json.dumps(shown)
    for secret in ("ct-1", "wt-2", "db-pw-3", "llm-key-4", "sa-jwt-5", "rev-6", "vt-7", "b-8", "c=9"):
        assert secret not in text
    assert shown["auth"] == {"client_token": MASK, "accessor": "acc-1", "lease_duration": 3600,
                             "renewable": True}
    assert shown["wrap_info"] == {"token": MASK, "accessor": "acc-2", "ttl": 60, "wrapped_accessor": "acc-3"}
    assert shown["data"]["username"] == "v-agent-x"
    assert shown["headers"]["X-Vault-Wrap-TTL"] == "60s"


def test_wire_identifiers_and_counters_are_not_secrets() -> None:
    issued = CredentialsIssued(investigation_id="i", job_name="aj-x-1", token_accessor="acc-9", at=utcnow())
    assert redact(issued)["token_accessor"] == "acc-9"


# --- log lines -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("secret", "text"), SECRETS_IN_TEXT)
def test_no_credential_shape_reaches_a_log_line(lines, secret: str, text: str) -> None:
    log = logs.get_logger("dispatcher.test")
    log.warning(text)  # as the event itself
    log.warning("vault_failed", detail=text, nested={"errors": [text]})  # as values
    try:
        raise RuntimeError(text)
    except RuntimeError:
        log.exception("login_failed")  # inside a formatted traceback
    logging.getLogger("aio_pika").warning("stdlib: %s", text)  # through a stdlib logger
    out = lines()
    assert len(out.splitlines()) == 4
    assert secret not in out and json.dumps(secret)[1:-1] not in out


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_no_value_under_a_secret_key_reaches_a_log_line(lines, key: str) -> None:
    logs.get_logger().info("called", **{key: "value-that-must-not-appear"}, body={key: 987654})
    (line,) = [json.loads(x) for x in lines().splitlines()]
    assert line[key] == MASK and line["body"] == {key: MASK}


def test_log_lines_show_token_counters_audiences_and_accessors_as_they_are(lines) -> None:
    logs.get_logger().info("llm_step_completed", tokens=1234, llm_prompt_tokens=0, llm_completion_tokens=17,
                           max_tokens=40000, token_audience="vault", token_expiration=600, token_ttl=60,
                           token_accessor="acc-1", wrapped_accessor="acc-2", token_file="/run/token")
    (line,) = [json.loads(x) for x in lines().splitlines()]
    assert (line["tokens"], line["llm_prompt_tokens"], line["llm_completion_tokens"]) == (1234, 0, 17)
    assert line["max_tokens"] == 40000
    assert (line["token_audience"], line["token_expiration"], line["token_ttl"]) == ("vault", 600, 60)
    assert (line["token_accessor"], line["wrapped_accessor"]) == ("acc-1", "acc-2")
    assert line["token_file"] == "/run/token"


# --- agentjobs tail ------------------------------------------------------------------------------


def _finding_record(summary: str, excerpt: str) -> dict:
    finding = Finding(investigation_id="inv-1", incident_key="k", idempotency_key="inv-1:finding",
                      summary=summary, probable_cause="c", confidence=0.9, phase=Phase.SHADOW,
                      domain="database", evidence=(Evidence(source="postgres", excerpt=excerpt),),
                      cost=Cost(llm_prompt_tokens=0, llm_completion_tokens=0, tool_calls=3))
    return msgspec.to_builtins(decode(encode(finding)))  # as tail decodes it off the broker


def test_tail_json_shows_token_counters_as_the_message_has_them_and_masks_secrets() -> None:
    record = _finding_record(f"connections exhausted; agent used {VAULT_TOKEN}",
                             "dsn postgresql://agent:pg-pw-1@db/shop")
    line = render_json("finding.warning.database", record, {"x-agentjobs-token": "hdr-secret"})
    shown = json.loads(line)
    assert shown["cost"]["llm_prompt_tokens"] == 0
    assert shown["cost"]["llm_completion_tokens"] == 0
    assert shown["cost"]["tool_calls"] == 3
    assert shown["routing_key"] == "finding.warning.database"
    assert shown["headers"]["x-agentjobs-token"] == MASK
    for secret in (VAULT_TOKEN, "pg-pw-1", "hdr-secret"):
        assert secret not in line


@pytest.mark.parametrize(("secret", "text"), SECRETS_IN_TEXT)
def test_tail_readable_lines_carry_no_credential(secret: str, text: str) -> None:
    # render cuts long fields: masking comes first, so no cut-off piece of a secret shows either
    finding = render("findings", "finding.warning.database", _finding_record(text, ""), {})
    dead = render("dead", "alertmanager", {}, {"x-agentjobs-reason": "invalid_payload",
                                                "x-agentjobs-message": text})
    other = render("all", "custom.kind", {"kind": "custom", "detail": text}, {})
    for shown in (finding, dead, other):
        assert secret[:10] not in shown


def test_tail_readable_fallback_hides_secret_fields_and_keeps_counters() -> None:
    shown = render("all", "custom.kind", {"kind": "custom", "client_token": "ct-1", "prompt_tokens": 0}, {})
    assert "ct-1" not in shown
    assert '"prompt_tokens": 0' in shown
