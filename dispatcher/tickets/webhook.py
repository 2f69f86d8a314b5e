"""A generic outbound webhook as a ticketing backend: each plan POSTed as one signed JSON document.

The receiver (any HTTP service: a chat bridge, an in-house tracker) gets the ticket's key, its
opening and the notes of one result::

    POST <url>
    Content-Type: application/json
    Idempotency-Key: <sha256 of key and op ids>      # the same for a redelivery: drop repeats
    X-Agentjobs-Timestamp: <unix seconds>
    X-Agentjobs-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>

A 2xx is success; 408, 429, 5xx and connection errors are temporary (the result is held and
retried with backoff); any other 4xx is permanent (dead-lettered ``webhook_rejected``). A
webhook reads nothing back: receivers that know operators' verdicts publish ``OperatorFeedback``
under an operator identity themselves.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from datetime import datetime

import aiohttp
import msgspec

from schemas.errors import PermanentError, TemporaryError

from dispatcher.plumbing.settings import WebhookSettings
from dispatcher.tickets.backend import Applied, Closed
from dispatcher.tickets.plan import Plan

REJECTED = "webhook_rejected"
SIGNATURE_HEADER = "X-Agentjobs-Signature"
TIMESTAMP_HEADER = "X-Agentjobs-Timestamp"
_TEMPORARY = {408, 425, 429}
_encoder = msgspec.json.Encoder()


def idempotency_key(plan: Plan) -> str:
    ops = "\x00".join(n.op_id for n in plan.notes) or f"open:{plan.kind}"
    return hashlib.sha256(f"{plan.opening.key}\x00{ops}".encode()).hexdigest()


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>`` of HMAC-SHA256 over ``timestamp.body`` (what receivers recompute)."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def document(plan: Plan) -> bytes:
    return _encoder.encode({"kind": "agentjobs.ticket", "event": plan.kind, "key": plan.opening.key,
                            "opening": plan.opening, "notes": plan.notes})


class WebhookBackend:
    name = "webhook"
    feedback = False

    def __init__(self, settings: WebhookSettings, *, secret: str, clock: Callable[[], float] = time.time) -> None:
        if not settings.url:
            raise ValueError("tickets.webhook.url is not set")
        if not secret:
            raise ValueError("no webhook secret (tickets.secret_path key webhook_secret, or tickets.webhook.secret)")
        self.settings = settings
        self._secret = secret
        self._clock = clock
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.settings.request_timeout))

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    async def apply(self, plan: Plan) -> Applied:
        assert self._http is not None, "start() first"
        body = document(plan)
        stamp = str(int(self._clock()))
        headers = {"Content-Type": "application/json", "Idempotency-Key": idempotency_key(plan),
                   TIMESTAMP_HEADER: stamp, SIGNATURE_HEADER: signature(self._secret, stamp, body)}
        try:
            async with self._http.post(self.settings.url, data=body, headers=headers) as answer:
                status = answer.status
                detail = (await answer.text())[:300]
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise TemporaryError(f"webhook POST: {type(exc).__name__} {exc}".strip()) from exc
        if 200 <= status < 300:
            return Applied(ticket=plan.opening.key, created=False, written=len(plan.notes))
        if status >= 500 or status in _TEMPORARY:
            raise TemporaryError(f"webhook POST: HTTP {status} {detail}".strip())
        raise PermanentError(REJECTED, f"webhook refused the ticket update: HTTP {status} {detail}".strip())

    async def closed_since(self, since: datetime) -> list[Closed]:
        return []

    async def note_verdict(self, closed: Closed, text: str) -> None:
        return None
