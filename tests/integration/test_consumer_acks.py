"""Batched acks: what a turn of the loop settled goes out together, and nothing in hand is acked.

Real RabbitMQ: the broker's own count of unacknowledged messages is the judge.
"""

from __future__ import annotations

import asyncio
import random

import aio_pika
import pytest

from dispatcher.intake.consumer import Consumer, acks_to_send
from dispatcher.intake.deadletters import Delivery
from dispatcher.intake.incidents import Outcome

pytestmark = pytest.mark.integration
QUEUE = "acks.test"


def test_one_multiple_ack_reaches_only_below_the_lowest_tag_still_in_hand() -> None:
    assert acks_to_send([1, 2, 3], {1, 2, 3}) == (3, [])
    assert acks_to_send([1, 2, 5, 6], {1, 2, 4, 5, 6}) == (2, [5, 6])  # 4 is still being handled
    assert acks_to_send([5, 6], {4, 5, 6}) == (None, [5, 6])
    assert acks_to_send([7], {7}) == (None, [7])
    assert acks_to_send([], {3}) == (None, [])


async def test_out_of_order_handlers_with_requeues_end_with_every_message_acked_once(amqp_vhost) -> None:
    connection = await aio_pika.connect_robust(amqp_vhost.amqp_url)
    async with connection:
        setup = await connection.channel(publisher_confirms=True)
        await setup.declare_queue(QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
        n = 400
        for i in range(n):
            await setup.default_exchange.publish(aio_pika.Message(str(i).encode(), message_id=str(i)), QUEUE)
        handled: list[str] = []
        requeued: set[str] = set()
        rng = random.Random(7)
        held = asyncio.Event()
        all_but_held, everything = asyncio.Event(), asyncio.Event()

        async def handle(delivery: Delivery) -> Outcome:
            key = delivery.message_id
            if key == "3":  # one message stays in hand a long while: nothing above it may ride a multiple ack
                await held.wait()
            await asyncio.sleep(rng.random() * 0.01)  # work of uneven length: handlers finish out of order
            if int(key) % 37 == 0 and key not in requeued:
                requeued.add(key)
                return Outcome.REQUEUE
            handled.append(key)
            if len(handled) == n - 1:
                all_but_held.set()
            if len(handled) == n:
                everything.set()
            return Outcome.ACK

        consumer = Consumer(QUEUE, handle, prefetch=50, name="acks", batch_acks=True)
        await consumer.start(connection)
        async with asyncio.timeout(60):
            await all_but_held.wait()
        held.set()
        async with asyncio.timeout(30):
            await everything.wait()
        await consumer.stop(drain_timeout=5)
        # Then every message was handled once (the requeued ones once more), and none is left
        assert sorted(handled, key=int) == [str(i) for i in range(n)]
        assert len(requeued) == len([i for i in range(n) if i % 37 == 0])
        check = await connection.channel()
        queue = await check.declare_queue(QUEUE, passive=True)
        assert queue.declaration_result.message_count == 0  # acked ones are gone, unacked come back
        # a fresh consumer gets nothing: no ack went missing (an unacked one returns on close)
        leftover = await queue.get(no_ack=True, fail=False, timeout=2)
        assert leftover is None
