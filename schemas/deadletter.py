"""Why a message ended in ``agentjobs.dead``: the record an operator reads first."""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

from .base import NonNegativeInt, Timestamp, Wire

PREVIEW_BYTES = 1024


class ErrorKind(enum.StrEnum):
    PERMANENT = "permanent"  # our code decided the message can never succeed
    DELIVERY_LIMIT = "delivery_limit"  # the broker gave up after x-delivery-limit attempts
    EXPIRED = "expired"
    REJECTED = "rejected"


class DeadLetter(Wire, tag="dead_letter", kw_only=True):
    """Reason record for one dead-lettered message."""

    error_kind: ErrorKind
    reason: Annotated[str, msgspec.Meta(max_length=128)]  # snake_case code, e.g. invalid_json
    message: Annotated[str, msgspec.Meta(max_length=4096)]  # precise detail
    at: Timestamp
    original_exchange: str = ""
    original_routing_key: str = ""
    message_id: str = ""
    content_type: str = ""
    preview: str = ""  # first 1 KB of the body, undecodable bytes replaced
    body_size: NonNegativeInt = 0
    deliveries: NonNegativeInt = 0
    component: str = ""  # dispatcher, trust, bridge ...


def preview(body: bytes) -> str:
    """First ``PREVIEW_BYTES`` of a body as text, never raising."""
    return body[:PREVIEW_BYTES].decode("utf-8", errors="replace")
