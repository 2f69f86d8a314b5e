"""Operating the dispatcher: cancel commands, health and metrics, giving up on a message honestly."""

from __future__ import annotations

import aio_pika
import aiohttp
import pytest

from schemas.routing import CONTROL, DEAD
from tests.support.identities import url_for, user
from schemas import CancelInvestigation, DeadLetter, decode_incident, encode, identify
from tests.integration.dispatcher_harness import PodDriver, Results, declare_topology, publish
from tests.integration.k8s_helpers import prepare_cluster, settings_for
from tests.integration.test_dispatcher import _consumed, _until, running_dispatcher
from tests.support.payloads import am_alert, dumps, group

pytestmark = pytest.mark.integration


@pytest.fixture
async def fresh(k8s_emulator, amqp_vhost, rabbitmq_management):
    prepare_cluster(k8s_emulator)
    await rabbitmq_management.delete_vhost(amqp_vhost.name)
    await rabbitmq_management.create_vhost(amqp_vhost.name)
    await rabbitmq_management.set_permissions(amqp_vhost.name, "guest")
    return k8s_emulator, amqp_vhost.amqp_url


async def test_a_cancel_command_stops_the_investigation_and_the_ticket_hears_why(fresh):
    handle, url = fresh
    await declare_topology(url, settings_for(handle.namespace))
    body = dumps(group([am_alert(starts_at="2026-11-26T02:00:00Z", alertname="Cancelme")], group_key="c"))
    job_name = identify(decode_incident(body)).job_name
    async with PodDriver(handle, decide=lambda pod: None).running_(), Results(url) as results, \
            Results(url, exchange=DEAD) as dead, running_dispatcher(handle, url):
        await publish(url, [body])
        await results.wait_for(lambda: results.keys("lifecycle.started"))
        command = CancelInvestigation(job_name=job_name, reason="operator: false alarm", requested_by="alice")
        # a cancel from anyone but an operator, an admin or the dispatcher: refused, the Job runs on
        async with await aio_pika.connect(url) as connection:  # the broker administrator, no user_id
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(CONTROL)
            await exchange.publish(aio_pika.Message(encode(command)), "cancel")
        await dead.wait_for(lambda: dead.messages)
        assert not results.keys("lifecycle.cancelled")
        async with await aio_pika.connect(url_for(url, "operator")) as connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(CONTROL)
            await exchange.publish(aio_pika.Message(encode(command), user_id=user("operator")), "cancel")
            await exchange.publish(aio_pika.Message(b'{"kind": "cancel"}', user_id=user("operator")),
                                   "cancel")  # invalid: no job_name
        await results.wait_for(lambda: results.keys("lifecycle.cancelled"))
        await dead.wait_for(lambda: len(dead.messages) >= 2)
    assert results.keys("finding.")[0][2].conclusion == "inconclusive"
    assert dead.messages[0][3]["x-agentjobs-reason"] == "forbidden_sender"  # the administrator's cancel
    assert dead.messages[1][3]["x-agentjobs-reason"] == "missing_field"  # the invalid command


async def test_health_readiness_and_metrics(fresh):
    handle, url = fresh
    await declare_topology(url, settings_for(handle.namespace))
    body = dumps(group([am_alert(starts_at="2026-11-26T02:00:00Z", alertname="Metered")], group_key="m"))
    async with running_dispatcher(handle, url) as service, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{service._health.bound_port}"
        await publish(url, [body, b"garbage"])
        await _until(lambda: _consumed(service.metrics) >= 2)
        async with http.get(f"{base}/healthz") as r:
            assert r.status == 200
        async with http.get(f"{base}/readyz") as r:
            assert r.status == 200 and (await r.json())["checks"] == {"consuming": True}
        async with http.get(f"{base}/metrics") as r:
            text = await r.text()
    for line in (
        'agentjobs_incidents_consumed_total{outcome="dispatched"} 1.0',
        'agentjobs_incidents_consumed_total{outcome="dead_lettered"} 1.0',
        'agentjobs_dead_lettered_total{reason="invalid_json"} 1.0',
        "agentjobs_dispatch_latency_seconds_count 1.0",
    ):
        assert line in text, text


async def test_not_ready_once_stopping(fresh):
    handle, url = fresh
    await declare_topology(url, settings_for(handle.namespace))
    async with running_dispatcher(handle, url) as service:
        assert service.ready
        for consumer in service._consumers:
            await consumer.stop(drain_timeout=1)
        assert not service.ready


async def test_a_message_that_keeps_failing_is_dead_lettered_with_its_real_cause(fresh):
    # Given an API server that answers 503 to every Job creation, and a delivery limit of 3
    handle, url = fresh
    env = {"AGENTJOBS_AMQP__DELIVERY_LIMIT": "3", "AGENTJOBS_RETRY__BASE": "0.05",
           "AGENTJOBS_RETRY__CAP": "0.1", "AGENTJOBS_RETRY__MAX_ELAPSED": "0.3"}
    await declare_topology(url, settings_for(handle.namespace, **env))
    handle.faults.inject("POST", r"/jobs$", status=503, times=None)
    body = dumps(group([am_alert(starts_at="2026-11-26T02:00:00Z", alertname="Doomed")], group_key="d"))
    async with Results(url, exchange=DEAD) as dead, Results(url, binding="deadletter.#") as records, \
            running_dispatcher(handle, url, **env) as service:
        await publish(url, [body])
        # When retrying in place runs out on each delivery
        await dead.wait_for(lambda: dead.messages, timeout=30)
        await records.wait_for(lambda: records.messages)
    # Then the last allowed delivery dead-letters it with the cause, not just "delivery_limit"
    (_, _, original, headers) = dead.messages[0]
    assert original == body
    assert headers["x-agentjobs-reason"] == "retries_exhausted"
    assert "503" in headers["x-agentjobs-message"]
    record = records.messages[0][2]
    assert isinstance(record, DeadLetter) and record.deliveries == 3
    assert service.metrics.retries._value.get() > 3
