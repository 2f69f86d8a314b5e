"""Log lines are structured, carry bound context, and never carry secrets."""

from __future__ import annotations

import io
import json
import logging

import pytest
import structlog

from schemas import logs
from dispatcher.plumbing.settings import LoggingSettings

TOKEN = "s.KeEMn0VEWkmVILP8vqYYapnO"


@pytest.fixture
def lines():
    stream = io.StringIO()
    logs.configure(LoggingSettings(format="json", level="debug"), stream=stream)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


def test_json_lines_with_bound_context(lines) -> None:
    log = logs.get_logger("dispatcher.test")
    with logs.bound(investigation_id="inv-1", message_id="m-7", attempt=2):
        log.info("job_created", job_name="aj-x-1")
    log.info("outside")

    first, second = lines()
    assert first["event"] == "job_created"
    assert first["investigation_id"] == "inv-1"
    assert first["attempt"] == 2
    assert first["level"] == "info"
    assert "timestamp" in first
    assert "investigation_id" not in second  # context does not leak past the block


@pytest.mark.parametrize(
    "key",
    ["token", "wrap_token", "wrapping_token", "client_token", "password", "secret_id", "Authorization", "api_key", "X-Vault-Token"],
)
def test_values_of_secret_looking_keys_are_dropped(lines, key) -> None:
    logs.get_logger().info("vault_called", **{key: "value-that-must-not-appear"})
    (line,) = lines()
    assert "value-that-must-not-appear" not in json.dumps(line)
    assert line[key] == "***"


def test_tokens_and_url_passwords_inside_text_are_masked(lines) -> None:
    log = logs.get_logger()
    log.warning("unwrap_failed", detail=f"token {TOKEN} was already used", wrapped_accessor="acc-123")
    log.info("connecting", url="amqp://agent:pa55word@rabbit:5672/")
    (warn, info) = lines()
    assert TOKEN not in json.dumps(warn)
    assert warn["wrapped_accessor"] == "acc-123"  # identifiers stay for attribution
    assert info["url"] == "amqp://agent:***@rabbit:5672/"


def test_nested_values_and_exception_tracebacks_are_redacted(lines) -> None:
    log = logs.get_logger()
    log.info("headers", headers={"Authorization": "Bearer abc.def", "Accept": "json"})
    try:
        raise RuntimeError(f"login with {TOKEN} to postgresql://u:pw1@db/x failed")
    except RuntimeError:
        log.exception("login_failed")
    headers, failure = lines()
    assert headers["headers"] == {"Authorization": "***", "Accept": "json"}
    assert TOKEN not in failure["exception"] and "pw1" not in failure["exception"]


def test_stdlib_loggers_go_through_the_same_pipeline(lines) -> None:
    logging.getLogger("aio_pika").warning("reconnecting to amqp://guest:guest@127.0.0.1/ with %s", TOKEN)
    (line,) = lines()
    assert line["logger"] == "aio_pika"
    assert "guest:guest" not in line["event"] and TOKEN not in line["event"]


def test_module_level_loggers_created_before_configure_follow_it() -> None:
    # dispatcher modules create their loggers at import time, before the CLI configures logging
    from dispatcher.intake import incidents as intake
    stream = io.StringIO()
    logs.configure(LoggingSettings(format="json"), stream=stream)
    try:
        intake.log.info("probe", x=1)
        assert json.loads(stream.getvalue().splitlines()[-1])["event"] == "probe"
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
