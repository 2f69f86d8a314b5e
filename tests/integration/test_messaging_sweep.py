"""The messaging sweep against real brokers: the machine's RabbitMQ (no consumer, stalled, too slow) and a
private node for the memory alarm.

The rabbitmq tool asks as a user with the ``monitoring`` tag and empty
permissions on the scratch vhost — what the Vault role issues the agent. Setup
uses the broker's own user. Management statistics are sampled every few seconds,
so each test first waits (``wait_until``) until the broker reports the situation
it set up, then sweeps once and lets ``rules.rank`` / ``rules.conclude`` decide.

The memory alarm is raised only on a private node (``tests/support/private_rabbitmq.py``,
with the management plugin enabled on a port of its own): the shared broker is
never put into an alarm.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aio_pika
import aiohttp
import pytest
import pytest_asyncio
from yarl import URL

from agent.reasoning import Investigation, messaging
from agent.reasoning.base import Assessment
from agent.reasoning.rules import alert_facts, conclude, rank
from agent.tools.base import Limits, Observation
from agent.tools.rabbitmq import RabbitMQTool
from agent.tools.toolbox import Toolbox
from schemas import Conclusion, Phase
from tests.support import private_rabbitmq
from tests.support.fake_tools import incident
from tests.support.services import free_port, unique_name, wait_until

pytestmark = pytest.mark.integration


@dataclass
class Scratch:
    vhost: str
    admin_url: str  # the broker user on ``vhost`` (setup only)
    tool: RabbitMQTool  # as the monitoring user without permissions


@pytest_asyncio.fixture(loop_scope="session")
async def scratch(rabbitmq, rabbitmq_management) -> AsyncIterator[Scratch]:
    """A vhost of the test's own (queues of other tests never compete) and the tool as the agent's user."""
    mgmt = rabbitmq_management
    vhost, user = unique_name("agentjobs-test", "messaging-sweep"), unique_name("agentjobs-test-monitor")
    password = secrets.token_urlsafe(18)
    await mgmt.create_vhost(vhost)
    tool = RabbitMQTool(str(URL(rabbitmq.amqp_url).with_user(None)), username=user, password=password,
                        limits=Limits(timeout=5), management_url=mgmt.base_url)
    try:
        await mgmt.set_permissions(vhost, rabbitmq.user)
        await mgmt.create_user(user, password, tags="monitoring")
        await mgmt.set_permissions(vhost, user, configure="", write="", read="")
        yield Scratch(vhost=vhost, admin_url=rabbitmq.vhost_url(vhost), tool=tool)
    finally:
        await tool.close()
        await mgmt.delete_user(user)
        await mgmt.delete_vhost(vhost)


async def _publish(url: str, queue: str, n: int) -> None:
    """``n`` confirmed messages into a durable ``queue`` (declared here)."""
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(queue, durable=True)
        for i in range(n):
            await channel.default_exchange.publish(aio_pika.Message(f"m{i}".encode()), routing_key=queue, timeout=10)


async def _reported(tool: RabbitMQTool, operation: str, params: dict, done: Callable[[Observation], bool],
                    what: str) -> None:
    """Until the broker's (sampled) statistics show what the test set up."""
    last: list[Observation] = []

    async def probe() -> bool:
        last[:] = [await tool.run(operation, params)]
        return last[0].ok and done(last[0])

    try:
        await wait_until(probe, timeout=40, what=what, first_delay=0.5, max_delay=1.0)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; last: {last[0].excerpt if last else None}") from None


async def _sweep(tool: RabbitMQTool, **labels: str) -> tuple[Assessment, Toolbox]:
    """The messaging sweep over an alert with these labels, ranked and concluded as the rules reasoner does."""
    inc = incident("CheckoutOrdersDelayed", domain="messaging", **labels)  # a name no playbook pattern matches
    toolbox = Toolbox([tool])
    inv = Investigation(incident=inc, tools=toolbox.tools, phase=Phase.READ_ONLY, run_tool=toolbox.run)
    drafts = await messaging.sweep(inv, alert_facts(inc))
    return conclude(rank(drafts), [o for o in inv.observations if not o.ok]), toolbox


def _queue(o: Observation, name: str) -> dict:
    return next((q for q in o.data["queues"] if q["name"] == name), {})


@contextlib.asynccontextmanager
async def _publishing(url: str, queue: str, per_second: float) -> AsyncIterator[None]:
    """A publisher that keeps publishing into ``queue`` while the block runs (the load of the incident)."""
    connection = await aio_pika.connect(url, timeout=10, client_properties={"connection_name": "orders-publisher"})
    channel = await connection.channel(publisher_confirms=True)

    async def publish() -> None:
        while True:
            await channel.default_exchange.publish(aio_pika.Message(b"order"), routing_key=queue, timeout=10)
            await asyncio.sleep(1 / per_second)  # pacing the load, not waiting for anything

    task = asyncio.create_task(publish(), name="orders-publisher")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await connection.close()


async def test_an_alert_naming_no_queue_still_finds_the_backlog_without_consumer(scratch):
    # Given a queue in the vhost holding 150 messages, still published into, and nobody consuming it,
    # next to an empty one
    backlog, calm = unique_name("orders"), unique_name("audit")
    await _publish(scratch.admin_url, backlog, 150)
    await _publish(scratch.admin_url, calm, 0)
    async with _publishing(scratch.admin_url, backlog, per_second=5):
        await _reported(scratch.tool, "queues", {"vhost": scratch.vhost},
                        lambda o: (_queue(o, backlog).get("messages_ready") or 0) > 150
                        and (_queue(o, backlog).get("publish_rate") or 0) > 0, "the growing backlog in the statistics")
        # When the sweep runs for an alert that names the vhost but no queue
        assessment, toolbox = await _sweep(scratch.tool, vhost=scratch.vhost)
    # Then the queue without consumer is found and named, with the broker's evidence
    assert assessment.conclusion is Conclusion.CONCLUSIVE, assessment.summary
    best = assessment.hypotheses[0]
    assert best.cause == "no_consumer"
    assert best.statement.startswith(f'queue "{backlog}" in vhost "{scratch.vhost}" has ')
    assert best.statement.endswith(" ready messages and no consumer")
    assert any(e.source == "rabbitmq" and e.ok and "has no consumer" in e.excerpt for e in best.evidence_for)
    assert any("publishers still publish" in e.excerpt for e in best.evidence_for)
    # and the broker itself was asked about alarms and held publishers, which it argued down
    assert {"rabbitmq.overview", "rabbitmq.connections", "rabbitmq.queues"} <= set(toolbox.calls)
    alarm = next(h for h in assessment.hypotheses if h.cause == "broker_memory_alarm")
    assert not alarm.evidence_for and alarm.evidence_against


async def test_a_consumer_whose_full_prefetch_window_is_never_acknowledged_is_stalled(scratch):
    # Given a consumer with prefetch 5 that never acknowledges, and 20 messages for it
    queue = unique_name("payments")
    await _publish(scratch.admin_url, queue, 20)
    consumer = await aio_pika.connect(scratch.admin_url, timeout=10,
                                      client_properties={"connection_name": "payments-worker"})
    try:
        channel = await consumer.channel()
        await channel.set_qos(prefetch_count=5)
        held: list[aio_pika.abc.AbstractIncomingMessage] = []
        five = asyncio.Event()

        async def never_ack(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            held.append(message)
            if len(held) >= 5:
                five.set()

        await (await channel.get_queue(queue, ensure=False)).consume(never_ack)
        await asyncio.wait_for(five.wait(), timeout=10)
        # ... until the broker reports the full window and no deliveries or acks since
        await _reported(scratch.tool, "queue", {"vhost": scratch.vhost, "queue": queue},
                        lambda o: o.data["messages_unacknowledged"] == 5 and o.data["messages_ready"] == 15
                        and o.data["prefetch_total"] == 5 and (o.data["deliver_rate"] or 0) == 0
                        and (o.data["ack_rate"] or 0) == 0, "a full window and no deliveries in the statistics")
        # When the sweep runs for the alert naming the queue
        assessment, _ = await _sweep(scratch.tool, vhost=scratch.vhost, queue=queue)
    finally:
        await consumer.close()
    # Then the stalled consumer is the conclusion, with its full window as evidence
    assert assessment.conclusion is Conclusion.CONCLUSIVE, assessment.summary
    best = assessment.hypotheses[0]
    assert best.cause == "stalled_consumer"
    assert queue in best.statement and "5 unacknowledged message(s) fill their prefetch window (5)" in best.statement
    assert any("every consumer's prefetch window is full: 5 unacked = prefetch 5" in e.excerpt
               for e in best.evidence_for)
    # and "no consumer" and "too slow" were argued down by the same observation
    others = {h.cause: h for h in assessment.hypotheses}
    assert others["no_consumer"].evidence_against and not others["no_consumer"].evidence_for
    assert any("stuck, not slow" in e.excerpt for e in others["consumers_too_slow"].evidence_against)


async def test_consumers_that_ack_slower_than_publishers_publish_are_too_slow(scratch):
    # Given 200 waiting messages, a publisher adding 20 a second and one consumer handling 5 a second
    queue = unique_name("invoices")
    await _publish(scratch.admin_url, queue, 200)
    consumer = await aio_pika.connect(scratch.admin_url, timeout=10,
                                      client_properties={"connection_name": "invoices-worker"})
    try:
        channel = await consumer.channel()
        await channel.set_qos(prefetch_count=1)  # aio-pika runs callbacks concurrently: one at a time here

        async def slow_work(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with message.process():
                await asyncio.sleep(0.2)  # the consumer's work: 5 messages a second

        await (await channel.get_queue(queue, ensure=False)).consume(slow_work)
        async with _publishing(scratch.admin_url, queue, per_second=20):
            await _reported(scratch.tool, "queue", {"vhost": scratch.vhost, "queue": queue},
                            lambda o: (o.data["ack_rate"] or 0) > 0 and (o.data["ready_rate"] or 0) > 0
                            and o.data["messages_ready"] >= 100 and o.data["consumer_details"],
                            "acks flowing while the backlog grows")
            # When the sweep runs for the alert naming the queue
            assessment, _ = await _sweep(scratch.tool, vhost=scratch.vhost, queue=queue)
    finally:
        await consumer.close()
    # Then the consumers are too slow — not stalled (acks flow), not missing
    assert assessment.conclusion is Conclusion.CONCLUSIVE, assessment.summary
    best = assessment.hypotheses[0]
    assert best.cause == "consumers_too_slow" and queue in best.statement
    assert any("deliveries flow" in e.excerpt for e in best.evidence_for)
    assert any("ready grows" in e.excerpt for e in best.evidence_for)
    stalled = next(h for h in assessment.hypotheses if h.cause == "stalled_consumer")
    assert any("deliveries and acks flow" in e.excerpt for e in stalled.evidence_against)


# --- a memory alarm, on a private node ----------------------------------------------------------


@contextlib.asynccontextmanager
async def _node_with_management() -> AsyncIterator[tuple[private_rabbitmq.PrivateNode, str]]:
    """A private node with the management plugin on a free port (never the shared broker's 15672)."""
    async with private_rabbitmq.private_rabbitmq("agentjobs-alarm") as node:
        port = free_port()
        # No listener default in the plugin's .app: set before enabling, it is the one the plugin starts.
        await node.ctl("eval", f'application:set_env(rabbitmq_management, tcp_config, '
                               f'[{{port, {port}}}, {{ip, "127.0.0.1"}}]).')
        proc = await asyncio.create_subprocess_exec(
            str(private_rabbitmq.SBIN / "rabbitmq-plugins"), "-n", node.name, "enable", "--online",
            "rabbitmq_management", env=node.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
        assert proc.returncode == 0, out.decode()[-2000:]
        yield node, f"http://127.0.0.1:{port}"


async def _management_up(base: str) -> None:
    async def answers() -> bool:
        try:
            async with aiohttp.ClientSession() as http, http.get(f"{base}/api/overview") as resp:
                return resp.status == 401  # it answers (and wants credentials)
        except aiohttp.ClientError:
            return False

    await wait_until(answers, timeout=60, what="the private node's management API")


async def _admin(base: str, method: str, path: str, body: dict) -> None:
    headers = {"Authorization": "Basic " + base64.b64encode(b"guest:guest").decode()}
    async with aiohttp.ClientSession(headers=headers) as http, http.request(method, base + path, json=body) as resp:
        assert resp.status in (201, 204), await resp.text()


@pytest.mark.skipif(private_rabbitmq.available() is not None,
                    reason=f"private RabbitMQ node: {private_rabbitmq.available()}")
async def test_a_memory_alarm_that_blocks_publishers_is_the_conclusion():
    async with _node_with_management() as (node, base):
        await _management_up(base)
        user, password = unique_name("agentjobs-test-monitor"), secrets.token_urlsafe(18)
        await _admin(base, "PUT", f"/api/users/{user}", {"password": password, "tags": "monitoring"})
        await _admin(base, "PUT", f"/api/permissions/%2F/{user}", {"configure": "", "write": "", "read": ""})
        tool = RabbitMQTool(f"amqp://127.0.0.1:{node.port}/", username=user, password=password,
                            limits=Limits(timeout=5), management_url=base)
        publisher = await aio_pika.connect(node.amqp_url, timeout=10,
                                           client_properties={"connection_name": "orders-publisher"})
        try:
            channel = await publisher.channel(publisher_confirms=False)
            queue = await channel.declare_queue("orders", durable=True)
            # Given the node's memory watermark far below what it uses: a memory alarm
            await node.ctl("set_vm_memory_high_watermark", "0.0000001")
            try:
                # ... and a publisher that publishes into it: the broker blocks its connection
                await channel.default_exchange.publish(aio_pika.Message(b"order"), routing_key=queue.name)
                await _reported(tool, "overview", {}, lambda o: bool(o.data["alarms"]), "the memory alarm")
                await _reported(tool, "connections", {}, lambda o: o.data["held"] >= 1, "the blocked publisher")
                # When the sweep runs for an alert about the orders queue
                assessment, _ = await _sweep(tool, vhost="/", queue="orders")
            finally:
                await node.ctl("set_vm_memory_high_watermark", "0.4")  # restored (the node goes away anyway)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(publisher.close(), timeout=5)
            await tool.close()
    # Then the memory alarm is the conclusion, with the blocked publisher as evidence beside it
    assert assessment.conclusion is Conclusion.CONCLUSIVE, assessment.summary
    best = assessment.hypotheses[0]
    assert best.cause == "broker_memory_alarm" and node.name in best.statement
    assert any("reports a memory alarm" in e.excerpt for e in best.evidence_for)
    assert any("blocked or blocking, as an alarm does" in e.excerpt for e in best.evidence_for)
    held = next(h for h in assessment.hypotheses if h.cause == "publishers_blocked")
    assert any("the alarm blocks them" in e.excerpt for e in held.evidence_against)
