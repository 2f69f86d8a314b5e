"""What dispatcher tests need around the real broker and the emulated cluster.

``Results`` records everything on ``agentjobs.results`` (and optionally the dead
queue); ``publish`` sends incidents with publisher confirms; ``PodDriver``
plays the node: it starts each pod and ends it the way the test decides.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import aio_pika
import msgspec

from dispatcher.plumbing.settings import Settings
from dispatcher.plumbing.topology import declare, dispatcher_topology
from schemas.routing import INCIDENTS, RESULTS
from schemas import DecodeError, decode
from tests.support.identities import url_for, user
from tests.support.k8s.resources import PODS


async def ready_messages(amqp_url: str, queue: str) -> int:
    """Exactly how many messages are ready in ``queue`` (a passive declare; management stats lag)."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0


async def drain(amqp_url: str, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Take every message off ``queue`` (the test owns the vhost: nothing else consumes it)."""
    out = []
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        while (message := await declared.get(no_ack=True, fail=False, timeout=5)) is not None:
            out.append(message)
    return out


async def declare_topology(amqp_url: str, settings: Settings) -> None:
    """Declare the dispatcher's topology as the dispatcher identity (the one that owns it)."""
    connection = await aio_pika.connect(url_for(amqp_url, "dispatcher"))
    async with connection:
        channel = await connection.channel()
        await declare(channel, dispatcher_topology(settings.amqp))


async def publish(amqp_url: str, bodies: list[bytes], *, routing_key: str = "alertmanager",
                  sender: str = "operator") -> None:
    """Publish with confirms (pipelined), persistent, as ``sender`` (an identity: operator, bridge, …)
    with its broker-validated ``user_id``."""
    connection = await aio_pika.connect(url_for(amqp_url, sender))
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(INCIDENTS)
        await asyncio.gather(*(
            exchange.publish(aio_pika.Message(b, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                              user_id=user(sender)), routing_key,
                             timeout=30)
            for b in bodies
        ))


class Results:
    """Collects messages from an exchange through a private queue."""

    def __init__(self, amqp_url: str, *, exchange: str = RESULTS, binding: str = "#") -> None:
        self.amqp_url = amqp_url
        self.exchange = exchange
        self.binding = binding
        self.messages: list[tuple[str, str | None, Any, dict]] = []  # (routing key, message id, decoded, headers)
        self._changed = asyncio.Event()
        self._connection: aio_pika.abc.AbstractConnection | None = None

    async def __aenter__(self) -> Results:
        self._connection = await aio_pika.connect(self.amqp_url)
        channel = await self._connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(self.exchange, self.binding)
        await queue.consume(self._on_message, no_ack=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        try:
            body: Any = decode(message.body)
        except DecodeError:
            body = message.body
        self.messages.append((message.routing_key or "", message.message_id, body, dict(message.headers or {})))
        self._changed.set()

    def keys(self, prefix: str) -> list[tuple[str, str | None, Any, dict]]:
        return [m for m in self.messages if m[0].startswith(prefix)]

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 30.0) -> Any:
        async with asyncio.timeout(timeout):
            while not (result := predicate()):
                self._changed.clear()
                await self._changed.wait()
        return result


class PodDriver:
    """Starts every new pod and ends it as ``decide(pod) -> exit code | 'oom' | None`` says (None: keep running)."""

    def __init__(self, handle, decide: Callable[[dict], int | str | None] = lambda pod: 0) -> None:
        self.handle = handle
        self.decide = decide
        self.running: list[str] = []
        self._seen: set[str] = set()
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def _on_event(self, ev) -> None:
        if ev.rt is PODS and ev.type == "ADDED":
            self._queue.put_nowait(ev.obj["metadata"]["name"])

    async def _run(self) -> None:
        ns = self.handle.namespace
        while True:
            name = await self._queue.get()
            await asyncio.sleep(0)  # let the controller finish creating it
            if name in self._seen or self.handle.cluster.store.get(PODS, ns, name) is None:
                continue
            self._seen.add(name)
            self.handle.kubelet.start(ns, name)
            self.end(name, self.decide(self.handle.cluster.store.get(PODS, ns, name)))

    def end(self, name: str, how: int | str | None) -> None:
        ns = self.handle.namespace
        if how is None:
            self.running.append(name)
        elif how == "oom":
            self.handle.kubelet.oom(ns, name)
        else:
            self.handle.kubelet.finish(ns, name, int(how))

    def finish_oldest(self, how: int | str = 0) -> str:
        name = self.running.pop(0)
        self.end(name, how)
        return name

    @contextlib.asynccontextmanager
    async def running_(self):
        self.handle.cluster.store.subscribe(self._on_event)
        self._task = asyncio.create_task(self._run())
        try:
            yield self
        finally:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self.handle.cluster.store._listeners.remove(self._on_event)


def lifecycle_ids(results: Results, state: str) -> list[str]:
    return [m[2].investigation_id for m in results.keys(f"lifecycle.{state}") if isinstance(m[2], msgspec.Struct)]
