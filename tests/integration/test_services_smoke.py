"""Smoke tests proving the real-service fixtures before anything builds on them.

If these fail, every integration and end-to-end test would fail for reasons
that have nothing to do with agentjobs; keeping them in one small module makes
"is my machine set up?" a one-command question.
"""

from __future__ import annotations

import asyncio
import socket
import uuid

import aio_pika
import hvac.exceptions
import psycopg
import pytest
from aiormq.abc import ConfirmationFrameType
from pamqp.commands import Basic

from tests.support.services import (
    ManagementClient,
    OpenBaoServer,
    OpenBaoStartError,
    Postgres,
    RabbitMQ,
    Vhost,
    temporary_database,
    temporary_vhost,
)

pytestmark = pytest.mark.integration


# --------------------------------------------------------------------------- #
# RabbitMQ
# --------------------------------------------------------------------------- #


async def test_publish_with_confirms_and_consume_in_fresh_vhost(
    amqp_vhost: Vhost, rabbitmq_management: ManagementClient
) -> None:
    # Given a robust connection to this module's own vhost
    connection = await aio_pika.connect_robust(
        amqp_vhost.amqp_url, reconnect_interval=1, client_properties={"connection_name": "smoke"}
    )
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        queue = await channel.declare_queue(
            "smoke.quorum", durable=True, arguments={"x-queue-type": "quorum"}
        )

        # When a message is published and the broker confirms it
        confirmation: ConfirmationFrameType | None = await channel.default_exchange.publish(
            aio_pika.Message(
                b"hello", message_id="m-1", delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            ),
            routing_key=queue.name,
            timeout=10,
        )
        assert isinstance(confirmation, Basic.Ack)

        # Then it is consumed back from the quorum queue, once, and acked
        async with queue.iterator() as messages:
            message = await asyncio.wait_for(anext(messages), timeout=10)
            async with message.process():
                assert message.body == b"hello"
                assert message.message_id == "m-1"
                assert not message.redelivered

        # And the queue is drained (exact count via a passive declare, not the lagging stats)
        again = await channel.declare_queue(queue.name, passive=True)
        assert again.declaration_result.message_count == 0

    # The queue exists in this vhost, as a quorum queue, and nowhere else.
    info = await rabbitmq_management.get_queue(amqp_vhost.name, "smoke.quorum")
    assert info is not None
    assert info.type == "quorum"
    assert info.durable
    everywhere = await rabbitmq_management.list_queues()
    assert [q.vhost for q in everywhere if q.name == "smoke.quorum"] == [amqp_vhost.name]
    assert await rabbitmq_management.get_queue("/", "smoke.quorum") is None


async def test_vhost_is_isolated_for_amqp_clients(amqp_vhost: Vhost, rabbitmq: RabbitMQ) -> None:
    # Given a queue declared in this module's vhost
    async with await aio_pika.connect(amqp_vhost.amqp_url) as conn:
        channel = await conn.channel()
        await channel.declare_queue("smoke.isolated", durable=True)

    # When a client of the default vhost looks for it, then it is not there
    async with await aio_pika.connect(rabbitmq.amqp_url) as conn:
        channel = await conn.channel()
        with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
            await channel.declare_queue("smoke.isolated", passive=True)


async def test_temporary_vhost_is_gone_after_teardown_and_clients_are_kicked(
    rabbitmq_management: ManagementClient,
) -> None:
    # Given a temporary vhost with a client connected to it
    async with temporary_vhost(rabbitmq_management, hint="teardown") as vhost:
        assert await rabbitmq_management.vhost_exists(vhost.name)
        connection = await aio_pika.connect(vhost.amqp_url)
        closed = asyncio.Event()
        # aio-pika 10.2: a broker-forced close fires close_callbacks, but
        # neither `is_closed` nor `await connection.closed()` reflect it.
        connection.close_callbacks.add(lambda *_: closed.set())

    # When the context (what the amqp_vhost fixture tears down with) has exited,
    # then the vhost is gone and the broker closed its connections
    assert not await rabbitmq_management.vhost_exists(vhost.name)
    assert vhost.name not in await rabbitmq_management.list_vhosts()
    await asyncio.wait_for(closed.wait(), timeout=10)
    await connection.close()


async def test_vhost_url_encodes_names() -> None:
    rabbitmq = RabbitMQ(amqp_url="amqp://guest:guest@127.0.0.1:5672/")
    assert rabbitmq.vhost_url("/") == "amqp://guest:guest@127.0.0.1:5672/%2F"
    assert rabbitmq.vhost_url("a b/c") == "amqp://guest:guest@127.0.0.1:5672/a%20b%2Fc"


# --------------------------------------------------------------------------- #
# OpenBao
# --------------------------------------------------------------------------- #


async def test_openbao_kv_v2_roundtrip_and_token_format(openbao: OpenBaoServer) -> None:
    client = openbao.hvac_client()
    path = f"smoke/{uuid.uuid4().hex}"

    def roundtrip() -> tuple[dict[str, str], str]:
        # Dev mode mounts kv-v2 at secret/.
        client.secrets.kv.v2.create_or_update_secret(path=path, secret={"api_key": "k-123"})
        read = client.secrets.kv.v2.read_secret_version(path=path, raise_on_deleted_version=True)
        token = client.auth.token.create(policies=["default"], ttl="5m")["auth"]["client_token"]
        return read["data"]["data"], token

    data, token = await asyncio.to_thread(roundtrip)

    assert data == {"api_key": "k-123"}
    assert token.startswith("s.")
    assert openbao.hvac_client(token).is_authenticated()


async def test_openbao_stop_revokes_leases_in_backends(postgres: Postgres) -> None:
    # Given a separate OpenBao that issued a PostgreSQL role and an orphan token
    server = await OpenBaoServer().start()
    try:
        client = server.hvac_client()
        db_url = (
            "postgresql://{{username}}:{{password}}@"
            f"{postgres.host}:{postgres.port}/{postgres.dbname}?sslmode=disable"
        )

        def issue() -> tuple[str, str]:
            client.sys.enable_secrets_engine("database", path="database")
            client.secrets.database.configure(
                name="pg",
                plugin_name="postgresql-database-plugin",
                connection_url=db_url,
                username=postgres.user,
                # Trust auth here ignores it; a container's DSN carries a real one.
                password=postgres.password or "unused-trust-auth",
                allowed_roles=["smoke"],
            )
            client.secrets.database.create_role(
                name="smoke",
                db_name="pg",
                creation_statements=[
                    "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' "
                    "VALID UNTIL '{{expiration}}';"
                ],
                default_ttl="1h",
            )
            creds = client.secrets.database.generate_credentials(name="smoke")
            orphan = client.auth.token.create_orphan(policies=["default"], ttl="1h")
            return creds["data"]["username"], orphan["auth"]["client_token"]

        role, orphan_token = await asyncio.to_thread(issue)
        assert await _pg_role_exists(postgres, role)
        assert len(await server.list_leases("database/creds/smoke")) == 1

        # When every lease is revoked (what stop() does first)
        swept = await server.revoke_all_leases()

        # Then the PostgreSQL role is dropped and the orphan token no longer works
        assert swept[-1] == "auth/token"
        assert "database" in swept
        assert not await _pg_role_exists(postgres, role)
        with pytest.raises(hvac.exceptions.Forbidden):
            await asyncio.to_thread(server.hvac_client(orphan_token).auth.token.lookup_self)
    finally:
        await server.stop()
    assert not server.running


async def test_openbao_start_failure_reports_log_tail() -> None:
    # Given the port is already taken
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        server = OpenBaoServer(port=port)

        # When the server is started there, then the error carries bao's own words
        with pytest.raises(OpenBaoStartError, match="address already in use"):
            await server.start(timeout=20)
    assert not server.running


async def _pg_role_exists(postgres: Postgres, role: str) -> bool:
    async with await psycopg.AsyncConnection.connect(postgres.dsn) as conn:
        cur = await conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
        return await cur.fetchone() is not None


# --------------------------------------------------------------------------- #
# PostgreSQL
# --------------------------------------------------------------------------- #


async def test_postgres_answers_queries(postgres: Postgres) -> None:
    async with await psycopg.AsyncConnection.connect(postgres.dsn) as conn:
        cur = await conn.execute("SELECT %s::int + 1, current_user", (41,))
        assert await cur.fetchone() == (42, "postgres")
        assert conn.info.server_version >= 150000


async def test_temporary_database_is_created_and_dropped(postgres: Postgres) -> None:
    async with temporary_database(postgres, hint="smoke") as (name, dsn):
        assert await postgres.database_exists(name)
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            await conn.execute("CREATE TABLE t (id int)")
            await conn.execute("INSERT INTO t VALUES (1), (2)")
            cur = await conn.execute("SELECT count(*), current_database() FROM t")
            assert await cur.fetchone() == (2, name)
        # A session left open must not block the drop (WITH (FORCE)).
        lingering = await psycopg.AsyncConnection.connect(dsn)
    assert not await postgres.database_exists(name)
    await lingering.close()


# --------------------------------------------------------------------------- #
# Docker (skipped where no engine answers)
# --------------------------------------------------------------------------- #


@pytest.mark.docker
def test_docker_engine_answers(docker_engine) -> None:
    assert docker_engine.ping()
