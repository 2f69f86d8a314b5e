"""The declared topology and the exported RabbitMQ definitions agree, and declaring is idempotent."""

from __future__ import annotations

import aio_pika
import pytest

from dispatcher.plumbing.settings import Settings
from dispatcher.plumbing.topology import DEFINITIONS_FILE, declare, definitions, dispatcher_topology, render_definitions

pytestmark = pytest.mark.integration


def test_exported_definitions_are_current() -> None:
    expected = render_definitions(dispatcher_topology(Settings().amqp))
    assert DEFINITIONS_FILE.read_text() == expected, (
        "k8s/rabbitmq/definitions.json is stale: regenerate with "
        "python -c 'from dispatcher.plumbing.topology import *; from dispatcher.plumbing.settings import Settings; "
        "DEFINITIONS_FILE.write_text(render_definitions(dispatcher_topology(Settings().amqp)))'"
    )


async def test_declaring_twice_is_a_no_op_and_matches_the_definitions(amqp_vhost, rabbitmq_management) -> None:
    topology = dispatcher_topology(Settings().amqp)
    connection = await aio_pika.connect_robust(amqp_vhost.amqp_url)
    async with connection:
        for _ in range(2):
            channel = await connection.channel()
            await declare(channel, topology)
            await channel.close()
    wanted = definitions(topology, vhost=amqp_vhost.name)
    queues = {q.name: q for q in await rabbitmq_management.list_queues(amqp_vhost.name)}
    for q in wanted["queues"]:
        assert q["name"] in queues
        assert queues[q["name"]].arguments == q["arguments"]
