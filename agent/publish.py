"""Publishing the finding: to ``agentjobs.results``, confirmed, as the agent's own RabbitMQ user.

The broker URL arrives without credentials; the dynamic user Vault issued is
inserted here and nowhere else (the URL is never logged). The message carries
AMQP ``user_id`` = that user, which RabbitMQ verifies against the connection:
consumers can attribute every finding to the investigation's own identity.
Anything short of a broker confirm — refused connection, missing permission,
unroutable (mandatory), nack, timeout — is ``PublishFailed``.

After the finding, ``publish_action_records`` sends one ``ActionRecord`` per gated action
(``action.<outcome>.<domain>``) over one connection, each confirmed. They are not
mandatory: no queue of the product's topology binds ``action.#`` — they are copies for
whoever listens (``agentjobs tail actions``, the ``up`` board, a ticketing or audit
consumer) — and the finding, routed and mandatory, carries the same facts in its actions'
params. Their headers repeat what tells them apart (investigation, action, target,
outcome, domain) and the start of reason and undo, for consumers that route or filter on
headers and for readers that only see a cut body.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aio_pika
import aiormq
import msgspec
from aio_pika.abc import DeliveryMode
from yarl import URL

from schemas import ActionRecord, Finding, encode, utcnow
from schemas.actions import records_for
from schemas.redaction import mask_text
from schemas.routing import RESULTS, action_key, finding_key


HEADER_CHARS = 200  # an ActionRecord's reason and undo repeated in its headers, cut to this


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
    await publish_all(
        [Outgoing(body=body, routing_key=routing_key, message_id=message_id, headers=dict(headers or {}),
                  timestamp=timestamp)],
        amqp_url=amqp_url, username=username, password=password, timeout=timeout, connection_name=connection_name,
    )


@dataclass(frozen=True, kw_only=True)
class Outgoing:
    """One message for ``publish_all``."""

    body: msgspec.Struct
    routing_key: str
    message_id: str
    headers: Mapping[str, Any] = field(default_factory=dict)
    timestamp: datetime | None = None
    mandatory: bool = True  # unroutable is an error (PublishFailed)


def action_messages(records: Sequence[ActionRecord], headers: Mapping[str, Any] | None = None) -> list[Outgoing]:
    """The messages for ``records`` (pure): ``action.<outcome>.<domain>``, not mandatory."""
    return [
        Outgoing(body=r, routing_key=action_key(r.outcome, r.domain), message_id=r.record_id, timestamp=r.at,
                 headers={**(headers or {}), "investigation_id": r.investigation_id, "action": r.action,
                          "target": r.target, "outcome": r.outcome, "domain": r.domain, "executed": r.executed,
                          "reason": r.reason[:HEADER_CHARS], "undo": r.undo[:HEADER_CHARS]},
                 mandatory=False)
        for r in records
    ]


async def publish_action_records(
    finding: Finding,
    *,
    amqp_url: str,
    username: str | None,
    password: str | None,
    timeout: float,
    connection_name: str,
    headers: Mapping[str, Any] | None = None,
) -> list[str]:
    """Publish one ``ActionRecord`` per gated action of ``finding`` (confirmed); returns their routing keys."""
    messages = action_messages(records_for(finding, at=finding.produced_at or utcnow()), headers)
    if messages:
        await publish_all(messages, amqp_url=amqp_url, username=username, password=password, timeout=timeout,
                          connection_name=connection_name)
    return [m.routing_key for m in messages]


async def publish_all(
    messages: Sequence[Outgoing],
    *,
    amqp_url: str,
    username: str | None,
    password: str | None,
    timeout: float,
    connection_name: str,
) -> None:
    """Publish ``messages`` in order over one connection, each confirmed; ``PublishFailed`` at the first failure."""
    connection: aio_pika.abc.AbstractConnection | None = None
    try:
        connection = await aio_pika.connect(
            broker_url(amqp_url, username, password), timeout=timeout,
            client_properties={"connection_name": connection_name},
        )
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(RESULTS, ensure=False)  # no configure permission needed
        for m in messages:
            await exchange.publish(_message(m, username), m.routing_key, mandatory=m.mandatory, timeout=timeout)
    except (aio_pika.exceptions.AMQPError, aiormq.exceptions.AMQPError, ConnectionError, OSError,
            TimeoutError, RuntimeError) as exc:
        raise PublishFailed(_safe(exc, password)) from None
    finally:
        if connection is not None:
            # The outcome is decided; closing is best effort.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), timeout=timeout)


def _message(m: Outgoing, username: str | None) -> aio_pika.Message:
    kind = getattr(type(m.body).__struct_config__, "tag", None)
    return aio_pika.Message(
        encode(m.body),
        content_type="application/json",
        delivery_mode=DeliveryMode.PERSISTENT,
        message_id=m.message_id,
        type=kind if isinstance(kind, str) else None,
        user_id=username,  # verified by the broker: who published is who Vault issued
        headers=dict(m.headers),
        timestamp=m.timestamp,
    )
