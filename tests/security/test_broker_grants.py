"""The broker itself refuses what a component identity may not do (issue 17, the first layer).

Each component connects with its own user and exactly the rights
``dispatcher/plumbing/identities.py`` grants it (applied to this module's vhost by
``temporary_vhost``); what it may not publish, declare or delete is refused by RabbitMQ with
ACCESS_REFUSED — before any consumer of ours sees it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aio_pika
import aiormq
import pytest
import pytest_asyncio

from dispatcher.plumbing.settings import AmqpSettings
from dispatcher.plumbing.topology import declare, dispatcher_topology
from tests.support.identities import user

pytestmark = [pytest.mark.security, pytest.mark.integration]

Step = Callable[[aio_pika.abc.AbstractChannel], Awaitable[object]]


async def _as(vhost, component: str, step: Step) -> str:
    """'ok', or 'refused' when the broker answers ACCESS_REFUSED."""
    connection = await aio_pika.connect(vhost.url(component), timeout=10)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await step(channel)
        return "ok"
    except (aiormq.exceptions.ChannelAccessRefused, asyncio.CancelledError) as exc:
        # aio-pika surfaces the channel's closing as CancelledError to an awaiting caller
        if "ACCESS_REFUSED" not in str(exc):
            raise
        return "refused"
    finally:
        await connection.close()


def _publish(exchange: str, key: str, component: str) -> Step:
    async def step(channel: aio_pika.abc.AbstractChannel) -> None:
        target = await channel.get_exchange(exchange, ensure=False) if exchange else channel.default_exchange
        await target.publish(aio_pika.Message(b"{}", user_id=user(component)), key, timeout=10)
    return step


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def topology(amqp_vhost):
    connection = await aio_pika.connect(amqp_vhost.url("dispatcher"))
    async with connection:
        await declare(await connection.channel(), dispatcher_topology(AmqpSettings()))
    return amqp_vhost


@pytest.mark.parametrize(("component", "exchange", "key", "expected"), [
    ("bridge", "agentjobs.incidents", "alertmanager.checkout", "ok"),
    ("bridge", "agentjobs.incidents", "cli", "refused"),  # the bridge speaks for Alertmanager only
    ("bridge", "agentjobs.phases", "phase.redteam", "refused"),
    ("bridge", "agentjobs.feedback", "pin.redteam", "refused"),
    ("bridge", "agentjobs.results", "finding.high.db", "refused"),
    ("dispatcher", "agentjobs.results", "lifecycle.dispatched", "ok"),
    ("dispatcher", "agentjobs.phases", "phase.redteam", "refused"),
    ("dispatcher", "agentjobs.feedback", "feedback.accepted.db", "refused"),
    ("trust", "agentjobs.phases", "phase.redteam", "ok"),
    ("trust", "", "agentjobs.feedback-log", "ok"),
    ("trust", "agentjobs.feedback", "feedback.accepted.db", "refused"),
    ("trust", "agentjobs.incidents", "cli", "refused"),
    ("operator", "agentjobs.incidents", "cli", "ok"),
    ("operator", "agentjobs.feedback", "feedback.accepted.db", "ok"),
    ("operator", "agentjobs.feedback", "pin.redteam", "refused"),  # pins: admins only
    ("operator", "agentjobs.phases", "phase.redteam", "refused"),
    ("admin", "agentjobs.feedback", "pin.redteam", "ok"),
    ("admin", "agentjobs.phases", "phase.redteam", "refused"),  # nobody but trust changes a phase
])
async def test_who_may_publish_what(topology, component, exchange, key, expected) -> None:
    assert await _as(topology, component, _publish(exchange, key, component)) == expected


async def test_only_the_owners_of_the_topology_may_declare_or_delete_it(topology) -> None:
    everything = dispatcher_topology(AmqpSettings())
    assert await _as(topology, "dispatcher", lambda ch: declare(ch, everything)) == "ok"
    assert await _as(topology, "trust", lambda ch: declare(ch, everything)) == "ok"
    for component in ("bridge", "operator", "admin"):
        assert await _as(topology, component, lambda ch: declare(ch, everything)) == "refused"
        assert await _as(topology, component, lambda ch: ch.queue_delete("agentjobs.incidents")) == "refused"


async def test_operators_can_watch_and_read_the_logs(topology) -> None:
    async def watch(channel: aio_pika.abc.AbstractChannel) -> None:
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        for exchange in ("agentjobs.results", "agentjobs.phases", "agentjobs.dead", "agentjobs.feedback"):
            await queue.bind(exchange, "#")
        await channel.declare_queue("agentjobs.incidents", passive=True)  # status: depths
        await channel.set_qos(prefetch_count=10)
        log = await channel.declare_queue("agentjobs.feedback-log", passive=True)

        async def ignore(_message: aio_pika.abc.AbstractIncomingMessage) -> None:
            return None

        await log.consume(ignore, arguments={"x-stream-offset": "first"})

    for component in ("operator", "admin"):
        assert await _as(topology, component, watch) == "ok"
    assert await _as(topology, "bridge", watch) == "refused"


async def test_a_user_id_naming_another_identity_is_refused_by_the_broker(topology) -> None:
    """RabbitMQ validates user_id against the connection's user: nobody can sign as trust."""
    connection = await aio_pika.connect(topology.url("admin"))
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange("agentjobs.feedback", ensure=False)
        with pytest.raises((aiormq.exceptions.ChannelPreconditionFailed, asyncio.CancelledError),
                           match="PRECONDITION_FAILED"):
            await exchange.publish(aio_pika.Message(b"{}", user_id=user("trust")), "pin.redteam", timeout=10)
    finally:
        await connection.close()
