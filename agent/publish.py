"""Publishing the finding: to ``agentjobs.results``, confirmed, as the agent's own RabbitMQ user.

The broker URL arrives without credentials; the dynamic user Vault issued is
inserted here and nowhere else (the URL is never logged). The message carries
AMQP ``user_id`` = that user, which RabbitMQ verifies against the connection:
consumers can attribute every finding to the investigation's own identity.
Anything short of a broker confirm — refused connection, missing permission,
unroutable (mandatory), nack, timeout — is ``PublishFailed``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import aio_pika
import aiormq
import msgspec
from aio_pika.abc import DeliveryMode
from yarl import URL

from schemas import Finding, encode
from schemas.redaction import mask_text
from schemas.routing import RESULTS, finding_key


class PublishFailed(Exception):
    """The finding was not confirmed by the broker (exit 4)."""


def broker_url(url: str, username: str | None, password: str | None) -> str:
    """``url`` with the agent's user inserted (pure; keep the result out of logs)."""
    if username is None:
        return url
    return str(URL(url).with_user(username).with_password(password or ""))


def _safe(exc: BaseException, password: str | None) -> str:
    text = f"{type(exc).__name__}: {str(exc)[:300]}"
    if password:
        text = text.replace(password, "***")
    return mask_text(text)


async def publish_finding(
    finding: Finding,
    *,
    amqp_url: str,
    username: str | None,
    password: str | None,
    timeout: float,
    connection_name: str,
    headers: Mapping[str, Any] | None = None,
) -> str:
    """Publish ``finding`` and wait for the confirm; returns the routing key used."""
    routing_key = finding_key(finding.severity, finding.domain, finding.phase)
    await publish_message(
        finding, routing_key=routing_key, message_id=finding.idempotency_key, amqp_url=amqp_url,
        username=username, password=password, timeout=timeout, connection_name=connection_name,
        headers=headers, timestamp=finding.produced_at,
    )
    return routing_key


async def publish_message(
    body: msgspec.Struct,
    *,
    routing_key: str,
    message_id: str,
    amqp_url: str,
    username: str | None,
    password: str | None,
    timeout: float,
    connection_name: str,
    headers: Mapping[str, Any] | None = None,
    timestamp: datetime | None = None,
) -> None:
    """Publish a wire message to ``agentjobs.results`` as the agent's user; confirmed or ``PublishFailed``."""
    kind = getattr(type(body).__struct_config__, "tag", None)
    message = aio_pika.Message(
        encode(body),
        content_type="application/json",
        delivery_mode=DeliveryMode.PERSISTENT,
        message_id=message_id,
        type=kind if isinstance(kind, str) else None,
        user_id=username,  # verified by the broker: who published is who Vault issued
        headers=dict(headers or {}),
        timestamp=timestamp,
    )
    connection: aio_pika.abc.AbstractConnection | None = None
    try:
        connection = await aio_pika.connect(
            broker_url(amqp_url, username, password), timeout=timeout,
            client_properties={"connection_name": connection_name},
        )
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(RESULTS, ensure=False)  # no configure permission needed
        await exchange.publish(message, routing_key, mandatory=True, timeout=timeout)
    except (aio_pika.exceptions.AMQPError, aiormq.exceptions.AMQPError, ConnectionError, OSError,
            TimeoutError, RuntimeError) as exc:
        raise PublishFailed(_safe(exc, password)) from None
    finally:
        if connection is not None:
            # The outcome is decided; closing is best effort.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), timeout=timeout)
