"""Reading a RabbitMQ stream as a log: from the first offset, then live, each entry once.

A stream keeps every message; a consumer with ``x-stream-offset: first`` gets
them all in order and then whatever is appended. ``StreamFollower`` hands each
entry to a callback exactly once per process — a reconnect re-consumes from
the first offset (that is what the robust channel replays), so entries at or
below the last applied offset are skipped.

"Caught up" is exact, not a quiet-period guess: the follower appends a marker
(an empty message of type ``agentjobs.marker`` with a fresh id) and is caught up
when that marker comes back — everything before it has been applied. Streams
report no message count over AMQP 0.9.1, so this is the one exact way. Readers
skip markers; they are a few bytes each.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from schemas.errors import TemporaryError

from schemas.logs import get_logger

log = get_logger("agentjobs.streamlog")
MARKER_TYPE = "agentjobs.marker"
PREFETCH = 2000  # stream consumers must set one; credit for the replay
ACK_EVERY = 500  # stream acks only return credit: one cumulative ack per this many entries


class StreamFollower:
    """Applies every entry of ``stream`` in order with ``on_entry(message)`` (synchronous, must not raise)."""

    def __init__(self, stream: str, on_entry: Callable[[AbstractIncomingMessage], None], *, name: str) -> None:
        self.stream = stream
        self.on_entry = on_entry
        self.name = name
        self.offset = -1  # last applied offset
        self.last_id = ""  # message id of the entry at ``offset``
        self.applied = 0
        self._channel: AbstractChannel | None = None
        self._markers: dict[str, asyncio.Event] = {}
        self._moved = asyncio.Event()  # set each time an entry or marker moves offset or applied
        self._unacked = 0

    def resume_after(self, offset: int) -> None:
        """Start after ``offset`` (everything up to it is already applied, e.g. from a snapshot)."""
        self.offset = offset

    async def start(self, connection: AbstractRobustConnection) -> None:
        self._channel = await connection.channel()
        await self._channel.set_qos(prefetch_count=PREFETCH)
        queue = await self._channel.get_queue(self.stream, ensure=True)
        start: int | str = self.offset + 1 if self.offset >= 0 else "first"
        await queue.consume(self._on_message, arguments={"x-stream-offset": start})

    async def catch_up(self, connection: AbstractRobustConnection, *, timeout: float,
                       read_only: bool = False) -> None:
        """Return once every entry appended before this call has been applied.

        ``timeout`` bounds a stall, not the whole replay: a long log keeps going as long as
        entries keep arriving. ``read_only``: for readers that may not write to the stream
        (operators): catch up to the last offset the stream holds now instead of a marker.
        """
        if read_only:
            return await self._catch_up_to_last(connection, timeout=timeout)
        marker = uuid.uuid4().hex
        seen = self._markers[marker] = asyncio.Event()
        try:
            channel = await connection.channel(publisher_confirms=True)
            try:
                await channel.default_exchange.publish(
                    aio_pika.Message(b"", type=MARKER_TYPE, message_id=marker), self.stream, timeout=timeout)
            finally:
                await channel.close()
            progress = -1
            while not seen.is_set():
                if self.applied == progress:
                    raise TimeoutError
                progress = self.applied
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await seen.wait()
        except TimeoutError as exc:
            raise TemporaryError(f"{self.stream}: no progress for {timeout:g} s while catching up") from exc
        finally:
            self._markers.pop(marker, None)
        log.debug("stream_caught_up", stream=self.stream, entries=self.applied, offset=self.offset)

    async def _catch_up_to_last(self, connection: AbstractRobustConnection, *, timeout: float) -> None:
        end = await last_offset(connection, self.stream)
        progress = -1
        while end is not None and self.offset < end:
            if self.applied == progress:
                raise TemporaryError(f"{self.stream}: no progress for {timeout:g} s while catching up")
            progress = self.applied
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    while self.applied == progress and self.offset < end:
                        self._moved.clear()
                        await self._moved.wait()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        offset = (message.headers or {}).get("x-stream-offset")
        fresh = True
        if isinstance(offset, int):
            if offset <= self.offset:
                fresh = False  # re-delivered after a reconnect: applied already
            else:
                self.offset = offset
                self.last_id = message.message_id or ""
        marker = message.type == MARKER_TYPE
        if fresh and not marker:
            self.applied += 1
            self.on_entry(message)
        self._unacked += 1
        if self._unacked >= ACK_EVERY or marker:
            self._unacked = 0
            await message.ack(multiple=True)  # stream "acks" only return credit
        # Caught up only once the marker's ack is sent: a follower stopped right after
        # catch_up() must not have an ack in flight on a closing channel.
        if fresh and marker and (seen := self._markers.get(message.message_id or "")) is not None:
            seen.set()
        if fresh:
            self._moved.set()

    async def stop(self) -> None:
        if self._channel is not None:
            try:
                await asyncio.wait_for(self._channel.close(), timeout=5)
            except Exception as exc:  # the broker may be gone; the connection closes anyway
                log.debug("stream_channel_close_failed", stream=self.stream, error=repr(exc))


async def entry_id_at(connection: AbstractRobustConnection, stream: str, offset: int, *,
                      timeout: float = 10.0) -> str | None:
    """The message id of the entry at ``offset`` of ``stream`` (None: not there any more, or never)."""
    channel = await connection.channel()
    found: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()

    async def first(message: AbstractIncomingMessage) -> None:  # never acked: the channel closes after one
        at = (message.headers or {}).get("x-stream-offset")
        if not found.done():
            found.set_result((message.message_id or "") if at == offset else None)

    try:
        await channel.set_qos(prefetch_count=1)
        queue = await channel.get_queue(stream, ensure=True)
        await queue.consume(first, arguments={"x-stream-offset": offset})
        try:
            async with asyncio.timeout(timeout):
                return await found
        except TimeoutError:
            return None
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(channel.close(), timeout=5)


async def last_offset(connection: AbstractRobustConnection, stream: str, *, quiet: float = 0.5) -> int | None:
    """The highest offset ``stream`` holds now (None: empty), read without writing to it.

    A consumer at ``last`` gets the stream's last chunk in one burst: its highest offset is
    the end once nothing more arrives for ``quiet`` s (an empty stream delivers nothing).
    """
    channel = await connection.channel()
    highest: list[int] = []
    arrived = asyncio.Event()

    async def on_message(message: AbstractIncomingMessage) -> None:
        at = (message.headers or {}).get("x-stream-offset")
        if isinstance(at, int):
            highest.append(at)
            arrived.set()
        await message.ack(multiple=True)

    try:
        await channel.set_qos(prefetch_count=PREFETCH)
        queue = await channel.get_queue(stream, ensure=True)
        await queue.consume(on_message, arguments={"x-stream-offset": "last"})
        while True:
            arrived.clear()
            try:
                async with asyncio.timeout(quiet):  # a chunk comes at once; empty: nothing
                    await arrived.wait()
            except TimeoutError:
                return max(highest) if highest else None
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(channel.close(), timeout=5)
