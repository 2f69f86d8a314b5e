"""Debian's real ``prometheus-alertmanager`` sending its webhook to the bridge.

The hand-made requests in ``tests/integration/test_bridge.py`` pin the wire
format; here the sender is Alertmanager itself (grouping, ``http_config``
bearer auth, its retry on 5xx and its giving up on a 4xx), and the proof is
what lands in the real ``agentjobs.incidents`` queue of a fresh vhost.

Skipped when no Alertmanager binary is installed (``.ci/run`` installs the
Debian package ``prometheus-alertmanager``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import pytest_asyncio

from dispatcher.bridge.webhook import BridgeService
from dispatcher.plumbing.settings import AmqpSettings, BridgeSettings, Settings
from dispatcher.plumbing.topology import declare, dispatcher_topology
from schemas.routing import INCIDENTS
from schemas import decode_incident
from schemas.incident import IncidentEvent
from tests.support.alertmanager import ALERTMANAGER, MISSING, Alertmanager, running_alertmanager
from tests.support.identities import grant_all, user
from tests.support.services import ManagementClient, Vhost, wait_until

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        ALERTMANAGER is None,
        reason=MISSING,
    ),
]

TOKEN = "am-bridge-token"
RECEIVER = "agentjobs"


# --------------------------------------------------------------------------- helpers


def _settings(vhost: Vhost) -> Settings:
    """The bridge as its own broker user (publish alertmanager.* to the incidents exchange only)."""
    return Settings(
        amqp=AmqpSettings(url=vhost.url("bridge"), reconnect_interval=1.0, publish_timeout=3.0),
        bridge=BridgeSettings(port=0, bearer_token=TOKEN),
    )


def _alerts(alertname: str) -> list[dict[str, Any]]:
    """Two alerts of one group (same alertname, different instances)."""
    return [
        {
            "labels": {"alertname": alertname, "instance": f"db-{i}:9187", "severity": "critical",
                       "service": "payments-db"},
            "annotations": {"summary": f"{alertname} on db-{i}"},
            "generatorURL": f"http://prometheus.example/graph?g0.expr=up%7Binstance%3D%22db-{i}%22%7D",
        }
        for i in (1, 2)
    ]


async def _count(amqp_url: str) -> int:
    """Exact number of ready messages in the intake queue (a passive declare)."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(INCIDENTS, passive=True)
        return declared.declaration_result.message_count or 0


async def _wait_count(amqp_url: str, expected: int, *, timeout: float, am: Alertmanager) -> None:
    async def probe() -> bool:
        return await _count(amqp_url) >= expected

    try:
        await wait_until(probe, timeout=timeout, what=f"{expected} message(s) in {INCIDENTS}")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; alertmanager log:\n{am.log_tail()}") from None


async def _drain(amqp_url: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    connection = await aio_pika.connect(amqp_url)
    out = []
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(INCIDENTS, passive=True)
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            out.append(message)
    return out


def _check_incident(body: bytes, alertname: str) -> IncidentEvent:
    event = decode_incident(body)
    assert isinstance(event, IncidentEvent)
    # Alertmanager's groupKey for the root route grouped by alertname
    assert event.group_key == f'{{}}:{{alertname="{alertname}"}}', event.group_key
    assert event.receiver == RECEIVER
    assert event.status.value == "firing"
    assert event.group_labels == {"alertname": alertname}
    assert sorted(a.labels["instance"] for a in event.alerts) == ["db-1:9187", "db-2:9187"]
    assert all(a.fingerprint for a in event.alerts)
    assert event.common_labels["service"] == "payments-db"
    assert event.severity.value == "critical"
    return event


# --------------------------------------------------------------------------- fixtures


def _alertmanager(tmp_path: Path, bridge_port: int) -> contextlib.AbstractAsyncContextManager[Alertmanager]:
    return running_alertmanager(tmp_path, bridge_port, token=TOKEN, receiver=RECEIVER)


@pytest_asyncio.fixture(loop_scope="session")
async def bridge(amqp_vhost: Vhost) -> AsyncIterator[BridgeService]:
    # The dispatcher's identity declares the topology, as in production: the bridge's may not.
    connection = await aio_pika.connect(amqp_vhost.url("dispatcher"))
    async with connection:
        await declare(await connection.channel(), dispatcher_topology(AmqpSettings()))
    service = BridgeService(_settings(amqp_vhost), host="127.0.0.1")
    await service.start()
    try:
        assert not await _drain(amqp_vhost.amqp_url)  # fresh vhost: the queue starts empty
        yield service
    finally:
        await _drain(amqp_vhost.amqp_url)
        await service.stop()


# --------------------------------------------------------------------------- tests


async def test_alertmanager_group_arrives_once_as_an_incident(bridge, amqp_vhost, tmp_path) -> None:
    # Given real Alertmanager routing to the bridge with bearer auth
    async with _alertmanager(tmp_path, bridge.bound_port) as am:
        # When two alerts of one group are posted to its API v2
        await am.post_alerts(_alerts("PostgresDown"))

        # Then after group_wait exactly one notification is in the intake queue
        await _wait_count(amqp_vhost.amqp_url, 1, timeout=15, am=am)
        assert await am.metric("alertmanager_notifications_total") == 1
        assert await am.metric("alertmanager_notifications_failed_total") == 0
        assert await am.metric("alertmanager_notification_requests_failed_total") == 0
        assert await _count(amqp_vhost.amqp_url) == 1

    messages = await _drain(amqp_vhost.amqp_url)
    assert len(messages) == 1
    message = messages[0]
    assert message.routing_key == f"alertmanager.{RECEIVER}"
    event = _check_incident(message.body, "PostgresDown")
    assert message.message_id == event.event_id
    assert json.loads(message.body)["version"] == "4"  # the original Alertmanager bytes


async def test_alertmanager_retries_after_503_and_lands_exactly_one_incident(
    bridge, amqp_vhost, tmp_path, rabbitmq_management: ManagementClient
) -> None:
    # Given the bridge has lost its broker connection and cannot get it back (its permissions revoked)
    found: list[str] = []

    async def bridge_connection() -> bool:
        found[:] = [c["name"] for c in await rabbitmq_management.list_connections(amqp_vhost.name)
                    if (c.get("client_properties") or {}).get("connection_name") == BridgeService.name
                    and c.get("state", "running") == "running"]
        return len(found) == 1

    await wait_until(bridge_connection, timeout=15, what="the bridge's connection in the management API")
    await rabbitmq_management.delete_permissions(amqp_vhost.name, user("bridge"))
    restored = False
    try:
        await rabbitmq_management.close_connection(found[0], reason="test: broker went away")

        async def not_ready() -> bool:
            return not bridge.ready

        await wait_until(not_ready, timeout=15, what="bridge not ready")

        async with _alertmanager(tmp_path, bridge.bound_port) as am:
            # When Alertmanager notifies, the bridge answers 503 (at least one failed request)
            await am.post_alerts(_alerts("ReplicationLag"))

            async def failed_with_503() -> bool:
                return ("unexpected status code 503" in am.log_tail(200)
                        and await am.metric("alertmanager_notification_requests_failed_total") >= 1)

            await wait_until(failed_with_503, timeout=15, what="Alertmanager's webhook request failing with 503")
            assert "broker_unavailable" in am.log_tail(200)
            assert await _count(amqp_vhost.amqp_url) == 0  # nothing got through meanwhile

            # And the broker comes back
            await grant_all(rabbitmq_management, amqp_vhost.name)
            restored = True

            # Then Alertmanager's retry succeeds: exactly one incident in the queue
            await _wait_count(amqp_vhost.amqp_url, 1, timeout=20, am=am)

            async def notified() -> bool:
                total = await am.metric("alertmanager_notifications_total")
                failed = await am.metric("alertmanager_notifications_failed_total")
                return total - failed >= 1

            await wait_until(notified, timeout=10, what="Alertmanager counting the notification as sent")
            assert await _count(amqp_vhost.amqp_url) == 1
    finally:
        if not restored:
            await grant_all(rabbitmq_management, amqp_vhost.name)

    messages = await _drain(amqp_vhost.amqp_url)
    assert len(messages) == 1
    _check_incident(messages[0].body, "ReplicationLag")


async def test_alertmanager_gives_up_on_a_401_after_one_attempt_and_the_bridge_counts_it(
    bridge, amqp_vhost, tmp_path
) -> None:
    # Given Alertmanager configured with the wrong bearer token
    async with running_alertmanager(tmp_path, bridge.bound_port, token="not-the-bridge-token",
                                    receiver=RECEIVER) as am:
        # When it notifies
        await am.post_alerts(_alerts("DiskFull"))

        async def gave_up() -> bool:
            return ("notify retry canceled due to unrecoverable error after 1 attempts" in am.log_tail(200)
                    and await am.metric("alertmanager_notifications_failed_total") >= 1)

        await wait_until(gave_up, timeout=15, what="Alertmanager giving up on the 401")

        # Then it made at most one request per notification (no retry; a 503 gets several), nothing
        # was published, and the bridge counted every refusal it answered. Read in this order, the
        # counters only grow between reads: Alertmanager counts a notification before its request,
        # the bridge counts a refusal before answering it.
        failed_requests = await am.metric("alertmanager_notification_requests_failed_total")
        notifications = await am.metric("alertmanager_notifications_total")
        refused = bridge.metrics.registry.get_sample_value(
            "agentjobs_bridge_refused_total", {"reason": "unauthorized"}) or 0
        assert "unexpected status code 401" in am.log_tail(200)
    assert 1 <= failed_requests <= notifications
    assert refused >= failed_requests
    assert await _count(amqp_vhost.amqp_url) == 0
