"""What `agentjobs up` decides about the broker and PostgreSQL before it starts anything (pure parts)."""

from __future__ import annotations

from dispatcher.cli.preflight import (
    LOCAL_POSTGRES,
    NO_POSTGRES,
    NO_RABBITMQ,
    amqp_port,
    may_enable_locally,
    serves_our_broker,
    with_local_postgres,
)
from dispatcher.plumbing.settings import Settings

LISTENERS = """Interface: [::], port: 15672, protocol: http, purpose: HTTP API
Interface: [::], port: 25672, protocol: clustering, purpose: inter-node and CLI tool communication
Interface: [::], port: 5672, protocol: amqp, purpose: AMQP 0-9-1 and AMQP 1.0
"""


def test_a_management_api_serves_our_broker_only_if_it_lists_our_amqp_port() -> None:
    overview = {"listeners": [{"protocol": "amqp", "port": 5672}, {"protocol": "http", "port": 15672}]}

    assert serves_our_broker(overview, 5672)
    assert not serves_our_broker(overview, 33839)  # a second node on this machine
    assert not serves_our_broker({}, 5672)


def test_the_plugin_is_enabled_only_on_the_local_default_node_that_listens_on_our_port() -> None:
    assert may_enable_locally("amqp://guest:guest@127.0.0.1:5672/", LISTENERS)
    assert may_enable_locally("amqp://guest:guest@localhost/", LISTENERS)  # default port
    assert not may_enable_locally("amqp://guest:guest@127.0.0.1:33839/", LISTENERS)
    assert not may_enable_locally("amqp://guest:guest@rabbit.prod:5672/", LISTENERS)


def test_amqp_port_defaults_by_scheme() -> None:
    assert amqp_port("amqp://h/") == 5672
    assert amqp_port("amqps://h/") == 5671
    assert amqp_port("amqp://u:p@h:1234/v") == 1234


def test_local_postgres_gives_vault_the_admin_dsn_and_agents_a_target_without_credentials() -> None:
    settings = with_local_postgres(Settings())

    assert settings.postgres.admin_dsn == LOCAL_POSTGRES
    assert settings.postgres.dsn == "postgresql://127.0.0.1:5432/postgres"


def test_the_down_messages_are_one_line_that_names_the_fix() -> None:
    rabbit = NO_RABBITMQ.format(url="amqp://guest:***@127.0.0.1:1/", error="ConnectionRefused")
    postgres = NO_POSTGRES.format(dsn="postgresql://postgres@127.0.0.1:1/postgres", error="refused")

    assert "\n" not in rabbit and "rabbitmq-server -detached" in rabbit
    assert "\n" not in postgres and "pg_ctlcluster" in postgres
