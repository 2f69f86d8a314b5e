"""The publisher reports only what the broker confirmed: real RabbitMQ, its own frame properties."""

from __future__ import annotations

import aio_pika
import pytest

from dispatcher.plumbing.amqp import Publisher
from dispatcher.plumbing.settings import AmqpSettings
from schemas.errors import TemporaryError

pytestmark = pytest.mark.integration


@pytest.fixture
async def broker(amqp_vhost):
    connection = await aio_pika.connect_robust(amqp_vhost.amqp_url)
    channel = await connection.channel()
    exchange = await channel.declare_exchange("pub.test", aio_pika.ExchangeType.TOPIC)
    queue = await channel.declare_queue("pub.test.q", durable=True, arguments={"x-queue-type": "quorum"})
    await queue.bind(exchange, "routed.#")
    publisher = await Publisher.open(connection, AmqpSettings(url=amqp_vhost.amqp_url, publish_timeout=5))
    try:
        yield publisher, queue
    finally:
        await connection.close()


async def test_a_confirmed_message_carries_its_properties_and_the_validated_sender(broker):
    publisher, queue = broker
    await publisher.publish("pub.test", "routed.one", b'{"a": 1}', message_id="m-1",
                            headers={"x-agentjobs-reason": "because"}, type_="lifecycle")
    message = await queue.get(timeout=5)
    assert message.body == b'{"a": 1}' and message.message_id == "m-1" and message.type == "lifecycle"
    assert message.content_type == "application/json" and message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.headers["x-agentjobs-reason"] in ("because", b"because")
    assert message.user_id == "guest"
    await message.ack()


async def test_unroutable_and_missing_exchanges_are_temporary_errors_never_silence(broker):
    publisher, _queue = broker
    with pytest.raises(TemporaryError, match="unroutable"):
        await publisher.publish("pub.test", "nowhere", b"{}", mandatory=True)
    await publisher.publish("pub.test", "nowhere", b"{}", mandatory=False)  # dropped by choice: fine
    with pytest.raises(TemporaryError):
        await publisher.publish("pub.missing", "x", b"{}")
    with pytest.raises(TemporaryError):  # the channel the broker closed stays an error, not a hang
        await publisher.publish("pub.test", "routed.two", b"{}")
