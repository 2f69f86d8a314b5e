"""The broker edge: robust connections and a publisher that only reports confirmed messages.

Every publish waits for the broker's confirm (with a timeout: under a memory
alarm ``publish()`` would otherwise hang silently). A nack, a return, a
timeout or a lost channel becomes ``TemporaryError`` — the caller's message
stays unacked and is retried; nothing is reported as sent that was not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
import msgspec
from aio_pika.abc import AbstractChannel, AbstractRobustConnection, DeliveryMode
from aio_pika.exceptions import (
    AMQPError,
    ChannelInvalidStateError,
    DeliveryError,
    PublishError,
)

from pamqp.commands import Basic

from schemas import encode
from schemas.errors import TemporaryError

from dispatcher.plumbing.settings import AmqpSettings

_PERSISTENT = int(DeliveryMode.PERSISTENT)
_BROKER_ERRORS = (
    AMQPError,
    aiormq.exceptions.AMQPError,
    ChannelInvalidStateError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
    RuntimeError,  # aio-pika raises it for "connection closed" in a few paths
)


async def connect(amqp: AmqpSettings, *, name: str) -> AbstractRobustConnection:
    """A robust connection that reconnects every ``reconnect_interval`` seconds."""
    try:
        return await aio_pika.connect_robust(
            amqp.url,
            reconnect_interval=amqp.reconnect_interval,
            heartbeat=amqp.heartbeat,
            timeout=amqp.publish_timeout,
            client_properties={"connection_name": name},
        )
    except _BROKER_ERRORS as exc:
        raise TemporaryError(f"cannot connect to RabbitMQ: {exc!r}") from exc


def broker_user(url: str) -> str:
    """The user an AMQP URL connects as (``guest`` when it names none, as the client does)."""
    return unquote(urlsplit(url).username or "") or "guest"


class Publisher:
    """Publishes with confirms on its own channel; raises ``TemporaryError`` unless confirmed.

    Every message carries ``user_id`` = the connection's user: RabbitMQ refuses any other value,
    so consumers know who sent it (``dispatcher/intake/senders.py``).
    """

    def __init__(self, channel: AbstractChannel, *, timeout: float, user_id: str) -> None:
        self._channel = channel
        self._timeout = timeout  # seconds per confirm
        self._user_id = user_id

    @classmethod
    async def open(cls, connection: AbstractRobustConnection, amqp: AmqpSettings) -> Publisher:
        """A publisher on a fresh confirming channel of ``connection``."""
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        return cls(channel, timeout=amqp.publish_timeout, user_id=broker_user(amqp.url))

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
        mandatory: bool = True,
        type_: str | None = None,
    ) -> None:
        """Publish persistently and wait for the confirm; ``mandatory`` makes unroutable an error.

        The frame's properties are built directly (no ``aio_pika.Message`` per publish: this is on
        every dispatch's path) and sent on the channel's current underlying aiormq channel, which
        is what ``Exchange.publish`` does too — so confirms, nacks (``DeliveryError``), returns
        (``PublishError``, the channel has ``on_return_raises``) and a closed channel behave alike.
        """
        properties = Basic.Properties(
            content_type=content_type,
            delivery_mode=_PERSISTENT,
            message_id=message_id,
            headers=dict(headers) if headers else None,
            message_type=type_,
            user_id=self._user_id,
        )
        try:
            if self._channel.is_closed:
                raise ChannelInvalidStateError(f"{self._channel!r} closed")
            underlay = await self._channel.get_underlay_channel()
            await underlay.basic_publish(body, exchange=exchange, routing_key=routing_key, properties=properties,
                                         mandatory=mandatory, timeout=self._timeout)
        except PublishError as exc:  # a DeliveryError too: first
            raise TemporaryError(f"message to {exchange}/{routing_key} was unroutable") from exc
        except DeliveryError as exc:
            raise TemporaryError(f"broker refused the message to {exchange} ({exc!r})") from exc
        except _BROKER_ERRORS as exc:
            raise TemporaryError(f"publish to {exchange} not confirmed: {exc!r}") from exc

    async def publish_message(
        self, exchange: str, routing_key: str, message: msgspec.Struct, *, message_id: str,
        mandatory: bool = False, headers: Mapping[str, Any] | None = None,
    ) -> None:
        """Publish a wire message (JSON, ``type`` = its kind)."""
        kind = getattr(type(message).__struct_config__, "tag", None)
        await self.publish(
            exchange, routing_key, encode(message), message_id=message_id, mandatory=mandatory,
            headers=headers, type_=kind if isinstance(kind, str) else None,
        )
