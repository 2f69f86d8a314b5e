"""The metrics the alerting rules and the dashboard read move when the thing they describe happens.

Real RabbitMQ, a real OpenBao bootstrapped by ``vault bootstrap``, the Kubernetes API emulator
behind the real client; each component runs as its own broker identity. Values are read off
each component's own registry (``registry.get_sample_value``), the one its ``/metrics`` serves.
"""

from __future__ import annotations

from typing import Any

import aio_pika
import aiohttp
import msgspec
import pytest
from prometheus_client import CollectorRegistry

from dispatcher.bridge.webhook import BridgeService
from dispatcher.credentials.tokens import Expected, Kind, Revocation, VaultCredentials
from dispatcher.intake.consumer import Consumer
from dispatcher.intake.deadletters import Delivery
from dispatcher.intake.incidents import Outcome
from dispatcher.intake.service import TICKETS_QUEUE
from dispatcher.plumbing.amqp import connect
from dispatcher.plumbing.metrics import Metrics, consumer_up
from dispatcher.plumbing.settings import AmqpSettings, BridgeSettings, Settings, load_settings
from dispatcher.trust.service import TrustService
from schemas import Phase
from schemas import vault_paths as vault_layout
from schemas.errors import TemporaryError
from schemas.routing import CONTROL, COSTS, DEAD, DEAD_LOG, INCIDENTS
from tests.integration.dispatcher_harness import PodDriver, Results, declare_topology, publish
from tests.integration.k8s_helpers import prepare_cluster, settings_for
from tests.integration.test_dispatcher import _until, running_dispatcher
from tests.integration.vault_helpers import bootstrapped_vault
from tests.support import payloads
from tests.support.identities import grant_all, user
from tests.support.payloads import am_alert, dumps, group
from tests.support.services import free_port, wait_until

pytestmark = pytest.mark.integration
SCOPE = "local/observability-test"  # where this test's minted tokens say their Jobs live


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


@pytest.fixture
async def env(k8s_emulator, amqp_vhost, rabbitmq_management):
    """An emptied vhost with every identity's grants and the topology, the cluster's ServiceAccounts."""
    prepare_cluster(k8s_emulator)
    await rabbitmq_management.delete_vhost(amqp_vhost.name)
    await rabbitmq_management.create_vhost(amqp_vhost.name)
    await rabbitmq_management.set_permissions(amqp_vhost.name, "guest")
    await declare_topology(amqp_vhost.amqp_url, settings_for(k8s_emulator.namespace))
    return k8s_emulator, amqp_vhost


async def _connection_named(mgmt, vhost: str, name: str) -> str:
    """The broker-side name of the one running connection whose client called itself ``name``."""
    found: list[dict[str, Any]] = []

    async def probe() -> bool:
        found[:] = [c for c in await mgmt.list_connections(vhost)
                    if (c.get("client_properties") or {}).get("connection_name") == name
                    and c.get("state", "running") == "running"]
        return len(found) == 1

    await wait_until(probe, timeout=15, what=f"connection {name} in the management API")
    return found[0]["name"]


# --------------------------------------------------------------------------- agentjobs_consumer_up


async def test_consumer_up_is_1_only_while_the_subscription_stands(env, rabbitmq_management) -> None:
    _, vhost = env
    registry = CollectorRegistry()
    up = consumer_up(registry)

    async def handler(_delivery: Delivery) -> Outcome:
        return Outcome.ACK

    # Given a consumer of the control queue, as the dispatcher identity, not started yet
    consumer = Consumer(CONTROL, handler, prefetch=1, name="control", up=up)
    assert value(registry, "agentjobs_consumer_up", queue=CONTROL) == 0
    connection = await connect(AmqpSettings(url=vhost.url("dispatcher"), reconnect_interval=0.5),
                               name="observability-consumer")
    try:
        # When it starts, it is up
        await consumer.start(connection)
        assert value(registry, "agentjobs_consumer_up", queue=CONTROL) == 1
        # When the broker drops the connection and refuses it back for a while, it is down
        broker_name = await _connection_named(rabbitmq_management, vhost.name, "observability-consumer")
        await rabbitmq_management.delete_permissions(vhost.name, user("dispatcher"))
        try:
            await rabbitmq_management.close_connection(broker_name, reason="test: broker went away")
            await _until(lambda: value(registry, "agentjobs_consumer_up", queue=CONTROL) == 0, timeout=15)
        finally:
            await grant_all(rabbitmq_management, vhost.name)
        # And once the robust connection restored the channel and its subscription, up again
        await _until(lambda: value(registry, "agentjobs_consumer_up", queue=CONTROL) == 1, timeout=30)
        # Then stopping takes it down for good
        await consumer.stop(drain_timeout=5)
        assert value(registry, "agentjobs_consumer_up", queue=CONTROL) == 0
    finally:
        await connection.close()


async def test_the_dispatcher_and_trust_report_each_consumer(env) -> None:
    handle, vhost = env
    trust = TrustService(load_settings(None, {"AGENTJOBS_AMQP__URL": vhost.url("trust")}), health_port=0)
    assert value(trust.metrics.registry, "agentjobs_consumer_up", queue="agentjobs.feedback") == 0  # replay first
    await trust.start()
    try:
        for queue in ("agentjobs.feedback", "agentjobs.trust-results"):
            assert value(trust.metrics.registry, "agentjobs_consumer_up", queue=queue) == 1
        async with running_dispatcher(handle, vhost.url("dispatcher")) as d:
            for queue in (INCIDENTS, CONTROL, DEAD_LOG, COSTS):
                assert value(d.metrics.registry, "agentjobs_consumer_up", queue=queue) == 1, queue
        for queue in (INCIDENTS, CONTROL, DEAD_LOG, COSTS):
            assert value(d.metrics.registry, "agentjobs_consumer_up", queue=queue) == 0, queue
    finally:
        await trust.stop()
    assert value(trust.metrics.registry, "agentjobs_consumer_up", queue="agentjobs.feedback") == 0


# --------------------------------------------------------------------------- queue depths


async def test_queue_depths_are_sampled_and_a_missing_queue_harms_nothing(env) -> None:
    handle, vhost = env
    async with running_dispatcher(handle, vhost.url("dispatcher")) as d:
        registry = d.metrics.registry
        # Given three dead letters waiting for an operator and no tickets connector
        connection = await aio_pika.connect(vhost.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            for n in range(3):
                await channel.default_exchange.publish(aio_pika.Message(f"dead {n}".encode()), DEAD, timeout=10)
            # When the dispatcher samples the queues
            found = await d.queue_depths.sample()
            # Then the depths and consumers are exact, and the absent tickets queue has no series
            assert value(registry, "agentjobs_queue_messages", queue=DEAD) == 3
            assert value(registry, "agentjobs_queue_consumers", queue=DEAD) == 0
            assert value(registry, "agentjobs_queue_consumers", queue=INCIDENTS) == 1
            assert value(registry, "agentjobs_queue_messages", queue=INCIDENTS) == 0
            assert found[TICKETS_QUEUE] is None
            assert value(registry, "agentjobs_queue_messages", queue=TICKETS_QUEUE) is None

            # When the tickets connector's queue appears, it is sampled too; when it goes, its series go
            tickets = await channel.declare_queue(TICKETS_QUEUE, durable=True)
            await channel.default_exchange.publish(aio_pika.Message(b"result"), TICKETS_QUEUE, timeout=10)
            await d.queue_depths.sample()
            assert value(registry, "agentjobs_queue_messages", queue=TICKETS_QUEUE) == 1
            assert value(registry, "agentjobs_queue_consumers", queue=TICKETS_QUEUE) == 0
            await tickets.delete(if_unused=False, if_empty=False)
            before = d.queue_depths.samples
            await d.queue_depths.sample()
            assert d.queue_depths.samples == before + 1
            assert value(registry, "agentjobs_queue_messages", queue=TICKETS_QUEUE) is None
        # And the dispatcher went on working throughout
        assert d.ready and not d.crashed.is_set()
        assert value(registry, "agentjobs_queue_messages", queue=DEAD) == 3


# --------------------------------------------------------------------------- last consumed, active by phase


async def test_an_incident_sets_last_consumed_and_its_job_counts_in_its_phase_until_it_ends(env) -> None:
    handle, vhost = env
    body = dumps(group([am_alert(starts_at="2026-11-26T02:00:00Z", alertname="PhaseGauge")],
                       group_key="observability-phase"))
    driver = PodDriver(handle, decide=lambda pod: None)  # the agent runs until the test ends it
    async with driver.running_(), Results(vhost.amqp_url) as results, \
            running_dispatcher(handle, vhost.url("dispatcher")) as d:
        registry = d.metrics.registry
        assert value(registry, "agentjobs_incidents_last_consumed_timestamp_seconds") == 0
        assert value(registry, "agentjobs_investigations_active_by_phase", phase="shadow") == 0
        # When an incident is dispatched and its Job runs
        await publish(vhost.amqp_url, [body])
        await results.wait_for(lambda: results.keys("lifecycle.started"))
        # Then the delivery's settling is stamped (once acked: the Job may start before that), and the
        # Job counts in its phase (shadow: no trust yet)
        await _until(lambda: (value(registry, "agentjobs_incidents_last_consumed_timestamp_seconds") or 0)
                     > 1_700_000_000)
        await _until(lambda: value(registry, "agentjobs_investigations_active_by_phase", phase="shadow") == 1)
        assert value(registry, "agentjobs_investigations_active_by_phase", phase="autonomous") == 0
        # And when it ends, it no longer does
        driver.finish_oldest(0)
        await results.wait_for(lambda: results.keys("lifecycle.succeeded"))
        await _until(lambda: value(registry, "agentjobs_investigations_active_by_phase", phase="shadow") == 0)


# --------------------------------------------------------------------------- credentials


async def _mint(creds: VaultCredentials, name: str) -> str:
    wrapped = await creds.mint(phase=Phase.SHADOW, investigation_id=name.ljust(40, "0"), incident_key=name,
                               job_name=f"aj-{name}", ttl=900)
    return wrapped.accessor


async def test_mints_revocations_and_failed_revocations_are_counted(postgres, rabbitmq, amqp_vhost) -> None:
    async with bootstrapped_vault(postgres, rabbitmq, amqp_vhost.name) as vault:
        settings = load_settings(None, vault.env).vault
        metrics = Metrics()
        r = metrics.registry
        creds = VaultCredentials(settings, scope=SCOPE, metrics=metrics)
        try:
            # Given a token minted for an investigation
            accessor = await _mint(creds, "counted")
            assert value(r, "agentjobs_credentials_minted_total", phase="shadow") == 1
            assert value(r, "agentjobs_credentials_minted_total", phase="autonomous") == 0
            expected = Expected(scope=SCOPE, investigation_id="counted".ljust(40, "0"), kind=Kind.MINTED)
            # When it is revoked, and revoked again (its Job's ending reported twice)
            assert await creds.revoke(accessor, expected=expected) is Revocation.REVOKED
            assert await creds.revoke(accessor, expected=expected) is Revocation.GONE
            # Then both are counted by outcome, and nothing failed
            assert value(r, "agentjobs_credentials_revoked_total", outcome="revoked") == 1
            assert value(r, "agentjobs_credentials_revoked_total", outcome="gone") == 1
            assert value(r, "agentjobs_credential_revocation_failures_total", reason="vault_error") == 0
            # And a token that is not ours is refused, not counted as revoked
            other = vault.root().auth.token.create(policies=["default"], ttl="1h")["auth"]["accessor"]
            assert await creds.revoke(other) is Revocation.REFUSED
            assert value(r, "agentjobs_credentials_revoked_total", outcome="revoked") == 1
            assert value(r, "agentjobs_token_revocations_refused_total", reason="not_an_agent_token") == 1

            # When the dispatcher's policy lost revoke-accessor, the revocation fails: permission_denied
            root = vault.root()
            policy = root.sys.read_policy(vault_layout.DISPATCHER_POLICY)["data"]["rules"]
            narrowed = policy.replace('path "auth/token/revoke-accessor"', 'path "auth/token/not-revoke-accessor"')
            assert narrowed != policy
            root.sys.create_or_update_policy("agentjobs-dispatcher-no-revoke", narrowed)
            token = root.auth.token.create(policies=["agentjobs-dispatcher-no-revoke"], ttl="1h")["auth"]
            denied = VaultCredentials(settings, token=token["client_token"], scope=SCOPE, metrics=metrics)
            held = await _mint(creds, "denied")
            try:
                with pytest.raises(TemporaryError):
                    await denied.revoke(held, expected=Expected(scope=SCOPE, kind=Kind.MINTED))
            finally:
                await denied.close()
            assert value(r, "agentjobs_credential_revocation_failures_total", reason="permission_denied") == 1
            assert vault.token_alive(held)
        finally:
            await creds.close()
        # When Vault cannot be reached at all, the attempt is counted as a Vault error
        away = VaultCredentials(msgspec.structs.replace(settings, addr=f"http://127.0.0.1:{free_port()}"),
                                token="unused", scope=SCOPE, metrics=metrics)
        try:
            with pytest.raises(TemporaryError):
                await away.revoke(held)
        finally:
            await away.close()
        assert value(r, "agentjobs_credential_revocation_failures_total", reason="vault_error") == 1
        assert value(r, "agentjobs_credentials_revoked_total", outcome="revoked") == 1


# --------------------------------------------------------------------------- the bridge


def _bridge_settings(vhost) -> Settings:
    return Settings(amqp=AmqpSettings(url=vhost.url("bridge"), reconnect_interval=1.0, publish_timeout=3.0),
                    bridge=BridgeSettings(port=0))


async def test_the_bridge_counts_forwarded_and_unavailable_and_says_when_the_broker_is_gone(
        env, rabbitmq_management) -> None:
    _, vhost = env
    bridge = BridgeService(_bridge_settings(vhost))
    r = bridge.metrics.registry
    port = await bridge.start()
    url = f"http://127.0.0.1:{port}/alerts"
    body = payloads.dumps(payloads.webhook())
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            # Given a connected bridge, a notification is forwarded and counted
            assert value(r, "agentjobs_bridge_broker_connected") == 1
            async with http.post(url, data=body) as resp:
                assert resp.status == 200, await resp.text()
            assert value(r, "agentjobs_bridge_forwarded_total") == 1
            assert value(r, "agentjobs_bridge_unavailable_total", reason="broker_down") == 0
            # When the broker drops it and refuses it back for a while
            name = await _connection_named(rabbitmq_management, vhost.name, BridgeService.name)
            await rabbitmq_management.delete_permissions(vhost.name, user("bridge"))
            try:
                await rabbitmq_management.close_connection(name, reason="test: broker went away")
                await _until(lambda: value(r, "agentjobs_bridge_broker_connected") == 0, timeout=15)
                # Then a notification meanwhile is a 503, counted by reason, and not forwarded
                async with http.post(url, data=body) as resp:
                    assert resp.status == 503
                assert value(r, "agentjobs_bridge_unavailable_total", reason="broker_down") == 1
                assert value(r, "agentjobs_bridge_forwarded_total") == 1
            finally:
                await grant_all(rabbitmq_management, vhost.name)
            # And once reconnected, the gauge says so at the next scrape
            await _until(lambda: value(r, "agentjobs_bridge_broker_connected") == 1, timeout=30)
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                text = await resp.text()
            assert "agentjobs_bridge_broker_connected 1.0" in text
    finally:
        await bridge.stop()
