"""Real RabbitMQ problems: a backlog nobody consumes and a consumer stalled with a full prefetch window
on the shared broker (each in a temporary vhost of its own, so the sweep of one vhost sees one
problem), and a memory alarm blocking publishers on a PRIVATE node — never the shared broker.

The agent's rabbitmq tool is built as the Job builds it: the broker URL pointed at the problem's
vhost, and the management API (``management_url``) as the same user.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from agent.tools.base import Limits, Tool
from agent.tools.rabbitmq import RabbitMQTool
from tests.scenarios.harness import Sources
from tests.support.services import ManagementClient, RabbitMQ, temporary_vhost, wait_until

LIMITS = Limits(timeout=5, max_rows=50)
STATS_TIMEOUT_S = 30  # the management API's statistics refresh every 5 s


@dataclass
class Broker:
    """The shared broker and an open management client (the rabbitmq group's world)."""

    rabbitmq: RabbitMQ
    mgmt: ManagementClient


@contextlib.asynccontextmanager
async def shared_broker() -> AsyncIterator[Broker]:
    rabbitmq = RabbitMQ.from_env()
    await rabbitmq.check()
    async with rabbitmq.management() as mgmt:
        yield Broker(rabbitmq, mgmt)


def rabbitmq_tool(amqp_url: str, *, management_url: str, username: str, password: str) -> RabbitMQTool:
    """The agent's rabbitmq tool as the Job opens it: AMQP on the vhost, and the management API."""
    return RabbitMQTool(amqp_url, limits=LIMITS, management_url=management_url, username=username,
                        password=password)


def _tools(broker: Broker, vhost: str) -> Any:
    user, password = broker.rabbitmq.management_credentials

    async def tools() -> list[Tool]:
        return [rabbitmq_tool(broker.rabbitmq.vhost_url(vhost), management_url=broker.rabbitmq.management_url,
                              username=user, password=password)]

    return tools


async def _publish(channel: Any, queue: str, count: int) -> None:
    import aio_pika

    for i in range(count):
        await channel.default_exchange.publish(
            aio_pika.Message(body=f'{{"order": {i}}}'.encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=queue)


def _stats(broker: Broker, vhost: str, queue: str, predicate: Any) -> Any:
    """A ``settled`` wait: the management API's statistics show the queue in the induced state."""
    async def seen() -> bool:
        info = await broker.mgmt.get_queue(vhost, queue)
        return info is not None and bool(predicate(info))

    async def settled() -> None:
        await wait_until(seen, timeout=STATS_TIMEOUT_S, what=f"management statistics of {queue}", max_delay=1.0)

    return settled


@contextlib.asynccontextmanager
async def backlog_without_consumer(broker: Broker) -> AsyncIterator[Sources]:
    """The order-emails sender was scaled to zero by mistake: 400 messages wait, nobody consumes."""
    import aio_pika

    async with temporary_vhost(broker.mgmt, hint="scn-order-emails") as vhost:
        connection = await aio_pika.connect(vhost.amqp_url)
        try:
            channel = await connection.channel(publisher_confirms=True)
            await channel.declare_queue("order-emails", durable=True)
            await _publish(channel, "order-emails", 400)
            yield Sources(tools=_tools(broker, vhost.name), facts={"vhost": vhost.name},
                          settled=_stats(broker, vhost.name, "order-emails", lambda q: q.messages_ready == 400))
        finally:
            await connection.close()


@contextlib.asynccontextmanager
async def stalled_consumer(broker: Broker) -> AsyncIterator[Sources]:
    """invoice-render's one consumer took its prefetch of 20 and hangs on them: nothing is acked, 480 wait."""
    import aio_pika

    async with temporary_vhost(broker.mgmt, hint="scn-invoice-render") as vhost:
        producer = await aio_pika.connect(vhost.amqp_url)
        consumer = await aio_pika.connect(vhost.amqp_url, client_properties={"connection_name": "invoice-render"})
        try:
            channel = await producer.channel(publisher_confirms=True)
            await channel.declare_queue("invoice-render", durable=True)
            await _publish(channel, "invoice-render", 500)
            stuck = await consumer.channel()
            await stuck.set_qos(prefetch_count=20)
            queue = await stuck.declare_queue("invoice-render", durable=True)
            held: list[Any] = []
            got_all = asyncio.Event()

            async def hang(message: Any) -> None:  # takes the delivery, never acks it
                held.append(message)
                if len(held) >= 20:
                    got_all.set()

            await queue.consume(hang, consumer_tag="invoice-render-worker-1")
            await asyncio.wait_for(got_all.wait(), timeout=10)
            yield Sources(tools=_tools(broker, vhost.name), facts={"vhost": vhost.name},
                          settled=_stats(broker, vhost.name, "invoice-render",
                                         lambda q: q.messages_unacknowledged == 20 and q.consumers == 1))
        finally:
            await consumer.close()
            await producer.close()


@dataclass
class PrivateBroker:
    """A private node with the management API (the private_rabbitmq group's world): alarms stay on it."""

    node: Any  # tests.support.private_rabbitmq.PrivateNode


@contextlib.asynccontextmanager
async def private_broker() -> AsyncIterator[PrivateBroker]:
    from tests.support.private_rabbitmq import available, private_rabbitmq

    why = available()
    if why is not None:
        raise RuntimeError(f"a private RabbitMQ node cannot be started here: {why}")
    async with private_rabbitmq("agentjobs-scenario", management=True) as node:
        yield PrivateBroker(node)


async def _node_in_memory_alarm(management_url: str) -> bool:
    import base64

    import aiohttp

    auth = {"Authorization": "Basic " + base64.b64encode(b"guest:guest").decode()}
    async with (
        aiohttp.ClientSession(headers=auth, timeout=aiohttp.ClientTimeout(total=5)) as http,
        http.get(f"{management_url}/api/nodes") as resp,
    ):
        nodes = await resp.json() if resp.status == 200 else []
    return any(n.get("mem_alarm") for n in nodes)


@contextlib.asynccontextmanager
async def memory_alarm(broker: PrivateBroker) -> AsyncIterator[Sources]:
    """The node's memory watermark is set below what it uses: a memory alarm, and the checkout events
    publisher is blocked on its next publish (its messages never arrive)."""
    import aio_pika

    node = broker.node
    publisher = await aio_pika.connect(node.amqp_url, client_properties={"connection_name": "checkout-events"})
    try:
        channel = await publisher.channel()
        await channel.declare_queue("checkout-events", durable=True)
        await node.ctl("set_vm_memory_high_watermark", "absolute", "10MB")
        await wait_until(lambda: _node_in_memory_alarm(node.management_url), timeout=STATS_TIMEOUT_S,
                         what="the private node's memory alarm", max_delay=1.0)
        # The publish the broker will not read while the alarm lasts: the connection goes "blocked".
        stuck = asyncio.create_task(channel.default_exchange.publish(
            aio_pika.Message(body=b'{"event": "order_placed"}'), routing_key="checkout-events"))

        async def tools() -> list[Tool]:
            return [rabbitmq_tool(node.amqp_url, management_url=node.management_url, username="guest",
                                  password="guest")]

        try:
            yield Sources(tools=tools, facts={"vhost": "/", "amqp_port": str(node.port)})
        finally:
            await node.ctl("set_vm_memory_high_watermark", "0.4")
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(stuck, timeout=10)
    finally:
        await publisher.close()
