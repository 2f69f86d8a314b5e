"""The aio-pika edge of every consumer: the one place a message is acked or handed back.

A handler turns a ``Delivery`` into an ``Outcome``; ``Consumer`` settles the
message accordingly, and nowhere else in the code base is a message acked.
A handler that crashes (a bug) is logged and its message handed back after a
short pause — the consumer keeps running; the broker's delivery limit stops a
message that crashes every time, and the dead-letter recorder explains it.
``stop`` cancels the subscription and waits for in-flight handlers (drain).

With ``batch_acks`` (for handlers whose ACK means "done and durable"), the acks settled in one
turn of the event loop go out together: one ``basic.ack multiple=True`` for the run of delivery
tags below the lowest one still being handled (``acks_to_send``, pure), the others one by one —
never an ack for a message still in hand. A crash before the flush only redelivers messages whose
work is done, which every handler already tolerates.

``agentjobs_consumer_up{queue}`` (the ``up`` gauge a component passes in) is 1 while the
subscription stands on an open channel: 0 before ``start``, while the channel is down (the
robust connection restores it and the subscription), and after ``stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from prometheus_client import Gauge

from dispatcher.intake.deadletters import Delivery
from dispatcher.intake.incidents import Outcome
from schemas.logs import bound, get_logger

log = get_logger("agentjobs.consumer")

Handler = Callable[[Delivery], Awaitable[Outcome]]
CRASH_PAUSE = 1.0  # seconds before handing back a message whose handler crashed


def acks_to_send(ready: list[int], in_hand: set[int]) -> tuple[int | None, list[int]]:
    """``(highest tag for one multiple=True ack, tags to ack one by one)`` (pure).

    ``ready``: tags handled with ACK and not yet acked; ``in_hand``: every tag delivered on the
    channel and not yet settled (``ready`` included). A multiple ack covers every unsettled tag at
    or below it, so it may only reach below the lowest tag still being handled.
    """
    ready = sorted(ready)
    waiting = in_hand.difference(ready)
    low = min(waiting) if waiting else None
    covered = [t for t in ready if low is None or t < low]
    if len(covered) < 2:
        return None, ready
    return covered[-1], [t for t in ready if t > covered[-1]]


def to_delivery(message: AbstractIncomingMessage) -> Delivery:
    """Broker message → broker-agnostic delivery."""
    headers = dict(message.headers or {})
    count = headers.get("x-delivery-count", 0)
    return Delivery(
        message.body,
        routing_key=message.routing_key or "",
        exchange=message.exchange or "",
        message_id=message.message_id or "",
        content_type=message.content_type or "",
        headers=headers,
        delivery_count=count if isinstance(count, int) else 0,
        user_id=message.user_id or "",
    )


class Consumer:
    """Consumes one queue with a handler; settles every message exactly here."""

    def __init__(self, queue_name: str, handler: Handler, *, prefetch: int, name: str,
                 up: Gauge | None = None, batch_acks: bool = False) -> None:
        self.queue_name = queue_name
        self.handler = handler
        self.prefetch = prefetch
        self.name = name
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self.consuming = False
        self.batch_acks = batch_acks
        # per underlying channel (delivery tags are per channel): tags delivered and not settled,
        # and the handled ones waiting for the next flush
        self._in_hand: dict[int, set[int]] = {}
        self._ready: dict[int, list[AbstractIncomingMessage]] = {}
        self._flushing: asyncio.Task[None] | None = None
        # 0 from the start: a process stuck before consuming (replaying, say) shows as not consuming.
        self._up = up.labels(queue=queue_name) if up is not None else None
        self._set_up(False)

    def _set_up(self, value: bool) -> None:
        if self._up is not None:
            self._up.set(1 if value else 0)

    async def start(self, connection: AbstractRobustConnection) -> None:
        self._channel = await connection.channel()
        await self._channel.set_qos(prefetch_count=self.prefetch)
        self._queue = await self._channel.get_queue(self.queue_name, ensure=True)
        self._tag = await self._queue.consume(self._on_message)
        self.consuming = True
        self._channel.close_callbacks.add(self._on_channel_closed)
        if isinstance(self._channel, AbstractRobustChannel):  # restored with its subscription
            self._channel.reopen_callbacks.add(self._on_channel_reopened)
        self._set_up(True)
        log.info("consumer_started", queue=self.queue_name, prefetch=self.prefetch)

    def _on_channel_closed(self, _channel: object, _exc: BaseException | None = None) -> None:
        self._set_up(False)

    def _on_channel_reopened(self, _channel: object) -> None:
        self._set_up(self.consuming)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._inflight.add(task)
        if self.batch_acks and message.delivery_tag is not None:
            self._in_hand.setdefault(id(message.channel), set()).add(message.delivery_tag)
        try:
            delivery = to_delivery(message)
            with bound(queue=self.queue_name, message_id=delivery.message_id, attempt=delivery.delivery_count + 1):
                try:
                    outcome = await self.handler(delivery)
                except asyncio.CancelledError:
                    raise  # shutdown: unacked, the broker redelivers it
                except Exception:
                    log.exception("handler_crashed")
                    await asyncio.sleep(CRASH_PAUSE)
                    outcome = Outcome.REQUEUE
                await self._settle(message, outcome)
        finally:
            if task is not None:
                self._inflight.discard(task)

    async def _settle(self, message: AbstractIncomingMessage, outcome: Outcome) -> None:
        """The one ack site (with its batched flush below)."""
        tag = message.delivery_tag
        batched = self.batch_acks and tag is not None
        try:
            if outcome is Outcome.ACK and batched:
                self._ready.setdefault(id(message.channel), []).append(message)
                if self._flushing is None:
                    self._flushing = asyncio.create_task(self._flush(), name=f"{self.name}-acks")
                return
            if batched:
                self._in_hand.get(id(message.channel), set()).discard(tag)
            if outcome is Outcome.ACK:
                await message.ack()
            else:
                await message.nack(requeue=True)
        except Exception as exc:  # channel gone: the broker redelivers; handlers are idempotent
            log.warning("settle_failed", outcome=outcome.value, error=repr(exc))

    async def _flush(self) -> None:
        """Send the acks settled during this turn of the loop (``acks_to_send``)."""
        await asyncio.sleep(0)  # let the other handlers finishing now join
        ready, self._ready, self._flushing = self._ready, {}, None
        for channel, messages in ready.items():
            in_hand = self._in_hand.get(channel, set())
            by_tag = {m.delivery_tag: m for m in messages}
            highest, singles = acks_to_send(list(by_tag), in_hand)
            try:
                if highest is not None:
                    await by_tag[highest].ack(multiple=True)
                for tag in singles:
                    await by_tag[tag].ack()
            except Exception as exc:  # channel gone: the broker redelivers; handlers are idempotent
                log.warning("settle_failed", outcome=Outcome.ACK.value, error=repr(exc), acks=len(by_tag))
            in_hand.difference_update(by_tag)
            if not in_hand:
                self._in_hand.pop(channel, None)

    async def stop(self, *, drain_timeout: float = 30.0) -> None:
        """Stop taking new messages, then wait for in-flight ones (unacked ones are redelivered)."""
        self.consuming = False
        self._set_up(False)
        if self._queue is not None and self._tag is not None:
            with contextlib.suppress(Exception):  # bounded: the broker may be unreachable
                await asyncio.wait_for(self._queue.cancel(self._tag), timeout=5)
        if self._inflight:
            log.info("draining", queue=self.queue_name, in_flight=len(self._inflight))
            _, pending = await asyncio.wait(set(self._inflight), timeout=drain_timeout)
            for task in pending:
                task.cancel()
        if self._flushing is not None:  # the last handled ones' acks, before the channel closes
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._flushing), timeout=5)
        if self._channel is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._channel.close(), timeout=5)
