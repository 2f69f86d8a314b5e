"""Dead letters: the original message, kept whole, plus a record of why.

We publish the original body unchanged to ``agentjobs.dead`` (so it can be
inspected and replayed) with the reason as headers and as a ``DeadLetter``
record in the ``x-agentjobs-dead-letter`` header. The broker also dead-letters
on its own (``x-delivery-limit`` reached, e.g. a message that crashes the
dispatcher every time); such messages carry only ``x-death``. The recorder
reads a copy of everything dead-lettered (``agentjobs.dead.log``) and
publishes a ``DeadLetter`` record to the results exchange for each, so an
operator learns why a message died whichever way it did.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from schemas import DeadLetter, ErrorKind, decode, encode, preview
from schemas.errors import DecodeError, PermanentError

from dispatcher.plumbing.amqp import Publisher
from schemas.routing import DEAD

HEADER_RECORD = "x-agentjobs-dead-letter"
HEADER_REASON = "x-agentjobs-reason"
HEADER_ERROR_KIND = "x-agentjobs-error-kind"
HEADER_MESSAGE = "x-agentjobs-message"
HEADER_ROUTING_KEY = "x-agentjobs-original-routing-key"


class Delivery:
    """The parts of a received message that dead-lettering needs (broker-agnostic)."""

    __slots__ = ("body", "content_type", "delivery_count", "exchange", "headers", "message_id", "routing_key",
                 "user_id")

    def __init__(
        self,
        body: bytes,
        *,
        routing_key: str = "",
        exchange: str = "",
        message_id: str = "",
        content_type: str = "",
        headers: Mapping[str, Any] | None = None,
        delivery_count: int = 0,
        user_id: str = "",
    ) -> None:
        self.body = body
        self.routing_key = routing_key
        self.exchange = exchange
        self.message_id = message_id
        self.content_type = content_type
        self.headers = dict(headers or {})
        self.delivery_count = delivery_count  # previous deliveries (x-delivery-count)
        self.user_id = user_id  # the sender, as the broker validated it ("": none claimed)


def record_for(
    delivery: Delivery, *, reason: str, message: str, kind: ErrorKind, at: datetime, component: str
) -> DeadLetter:
    """The reason record for a dead-lettered delivery (pure)."""
    return DeadLetter(
        error_kind=kind,
        reason=reason[:128],
        message=message[:4096],
        at=at,
        original_exchange=delivery.exchange,
        original_routing_key=delivery.routing_key,
        message_id=delivery.message_id,
        content_type=delivery.content_type,
        preview=preview(delivery.body),
        body_size=len(delivery.body),
        deliveries=delivery.delivery_count + 1,
        component=component,
    )


def headers_for(record: DeadLetter) -> dict[str, Any]:
    """Readable headers (management UI, shovels) plus the full record."""
    return {
        HEADER_RECORD: encode(record).decode(),
        HEADER_REASON: record.reason,
        HEADER_ERROR_KIND: record.error_kind.value,
        HEADER_MESSAGE: record.message[:1024],
        HEADER_ROUTING_KEY: record.original_routing_key,
    }


async def dead_letter(publisher: Publisher, delivery: Delivery, record: DeadLetter) -> None:
    """Publish the original body with its reason to ``agentjobs.dead`` (confirmed)."""
    await publisher.publish(
        DEAD,
        delivery.routing_key or "unrouted",
        delivery.body,
        message_id=delivery.message_id or None,
        headers=headers_for(record),
        content_type=delivery.content_type or "application/octet-stream",
        mandatory=True,
    )


def explain(delivery: Delivery, *, at: datetime) -> DeadLetter:
    """The record of a dead letter: ours from the header, else built from the broker's x-death."""
    raw = delivery.headers.get(HEADER_RECORD)
    if isinstance(raw, bytes | str):
        try:
            return decode(raw.encode() if isinstance(raw, str) else raw, DeadLetter)
        except DecodeError:
            pass
    deaths = delivery.headers.get("x-death") or []
    death = deaths[0] if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping) else {}
    reason = str(death.get("reason") or delivery.headers.get("x-first-death-reason") or "unknown")
    kinds = {"delivery_limit": ErrorKind.DELIVERY_LIMIT, "expired": ErrorKind.EXPIRED}
    keys = death.get("routing-keys") or []
    original = delivery.routing_key
    if isinstance(keys, list) and keys:
        original = keys[0].decode() if isinstance(keys[0], bytes) else str(keys[0])
    queue = death.get("queue", "")
    return DeadLetter(
        error_kind=kinds.get(reason, ErrorKind.REJECTED),
        reason=reason[:128],
        message=(
            f"the broker dead-lettered this message from queue {queue!s} ({reason}); "
            "it was delivered too often without being acknowledged, e.g. because handling it "
            "crashed the consumer or kept failing temporarily"
            if reason == "delivery_limit"
            else f"the broker dead-lettered this message from queue {queue!s} ({reason})"
        ),
        at=at,
        original_exchange=str(death.get("exchange", "")),
        original_routing_key=original,
        message_id=delivery.message_id,
        content_type=delivery.content_type,
        preview=preview(delivery.body),
        body_size=len(delivery.body),
        deliveries=int(death.get("count", 0) or 0),
        component="broker",
    )


def from_error(delivery: Delivery, error: PermanentError, *, at: datetime, component: str) -> DeadLetter:
    """Record for a message our code rejected."""
    return record_for(
        delivery, reason=error.reason, message=error.message, kind=ErrorKind.PERMANENT, at=at, component=component
    )
