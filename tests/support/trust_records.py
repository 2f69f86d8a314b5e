"""Real investigations for trust tests: what the trust consumer must have seen before a verdict counts.

For each investigation a test gives feedback on, ``record_investigations`` publishes what production
publishes: ``lifecycle.dispatched`` as the dispatcher identity, then a finding (as the dispatcher —
the sender of failure results — or, with ``agent=``, as that Job's own agent user). ``send_feedback``
publishes verdicts as an operator and ``send_pin`` pins as an admin, each with its broker-validated
``user_id``. ``log_entries`` builds the same story as feedback-log entries, for tests that write
the log directly.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable
from datetime import UTC, datetime

import aio_pika

from dispatcher.trust.records import (
    AdmittedFeedback,
    AdmittedPin,
    FindingSeen,
    InvestigationDispatched,
    LogEntry,
    encode_entry,
    entry_type,
)
from schemas import Finding, LifecycleEvent, LifecycleState, OperatorFeedback, Phase, PhasePin, Severity, encode
from schemas.routing import FEEDBACK, FEEDBACK_LOG, RESULTS, finding_key, lifecycle_key, routing_word
from tests.support.identities import url_for, user

T_DISPATCHED = datetime(2026, 11, 27, 1, 0, tzinfo=UTC)


def job_name(investigation_id: str) -> str:
    """A DNS-1123 Job name for an investigation id (as the dispatcher derives one: deterministic)."""
    digest = hashlib.sha256(investigation_id.encode()).hexdigest()[:16]
    return f"aj-trust-{digest}"


def dispatched(investigation_id: str, phase: Phase, *, at: datetime = T_DISPATCHED) -> LifecycleEvent:
    return LifecycleEvent(investigation_id=investigation_id, incident_key=f"key-{investigation_id}",
                          state=LifecycleState.DISPATCHED, at=at, job_name=job_name(investigation_id), phase=phase)


def finding(investigation_id: str, scope: str, phase: Phase) -> Finding:
    return Finding(investigation_id=investigation_id, incident_key=f"key-{investigation_id}",
                   idempotency_key=f"{investigation_id}:finding", summary="pool exhausted",
                   probable_cause="connection leak", confidence=0.8, phase=phase, severity=Severity.CRITICAL,
                   domain=scope, reasoner="rules")


def investigations_of(feedbacks: Iterable[OperatorFeedback]) -> list[tuple[str, str, Phase]]:
    """(investigation id, scope, phase) of each distinct investigation, in first-seen order."""
    out: dict[str, tuple[str, str, Phase]] = {}
    for fb in feedbacks:
        out.setdefault(fb.investigation_id, (fb.investigation_id, fb.scope, fb.phase))
    return list(out.values())


async def _publish_all(url: str, messages: list[tuple[str, str, bytes, str, str]], *, sender_user: str) -> None:
    """(exchange, routing key, body, message id, type) each, confirmed, pipelined in order."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchanges = {name: await channel.get_exchange(name) for name in {m[0] for m in messages}}
        for start in range(0, len(messages), 500):
            await asyncio.gather(*(
                exchanges[ex].publish(aio_pika.Message(body, message_id=mid, type=kind, user_id=sender_user,
                                                       content_type="application/json",
                                                       delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                                      key, mandatory=False, timeout=30)
                for ex, key, body, mid, kind in messages[start:start + 500]))


async def record_investigations(amqp_url: str, investigations: Iterable[tuple[str, str, Phase]], *,
                                agent: dict[str, tuple[str, str]] | None = None) -> None:
    """Publish ``lifecycle.dispatched`` (as the dispatcher) and a finding for each (id, scope, phase).

    ``agent``: investigation id → (user, password) of that Job's agent, which then sends the
    finding instead of the dispatcher.
    """
    items = list(investigations)
    lifecycle = [(RESULTS, lifecycle_key(LifecycleState.DISPATCHED), encode(dispatched(inv, phase)),
                  f"{inv}:dispatched", "lifecycle") for inv, _scope, phase in items]
    await _publish_all(url_for(amqp_url, "dispatcher"), lifecycle, sender_user=user("dispatcher"))
    by_dispatcher = []
    for inv, scope, phase in items:
        f = finding(inv, scope, phase)
        message = (RESULTS, finding_key(f.severity, f.domain, f.phase), encode(f), f.idempotency_key, "finding")
        if agent and inv in agent:
            name, password = agent[inv]
            from dispatcher.plumbing.identities import url_as

            await _publish_all(url_as(amqp_url, name, password), [message], sender_user=name)
        else:
            by_dispatcher.append(message)
    if by_dispatcher:
        await _publish_all(url_for(amqp_url, "dispatcher"), by_dispatcher, sender_user=user("dispatcher"))


async def send_feedback(amqp_url: str, feedbacks: list[OperatorFeedback], *, sender: str = "operator") -> None:
    """Publish verdicts in order (the order is the tally's order) as ``sender`` (operator by default)."""
    connection = await aio_pika.connect(url_for(amqp_url, sender))
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(FEEDBACK)
        for fb in feedbacks:
            await exchange.publish(aio_pika.Message(encode(fb), message_id=fb.feedback_id, user_id=user(sender),
                                                    content_type="application/json", type="feedback",
                                                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                                   f"feedback.{routing_word(fb.scope)}", mandatory=True, timeout=10)


async def record_and_send(amqp_url: str, feedbacks: list[OperatorFeedback]) -> None:
    """The real story: each investigation dispatched and found, then the operators' verdicts."""
    await record_investigations(amqp_url, investigations_of(feedbacks))
    await send_feedback(amqp_url, feedbacks)


async def send_pin(amqp_url: str, pin: PhasePin, *, sender: str = "admin") -> None:
    connection = await aio_pika.connect(url_for(amqp_url, sender))
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(FEEDBACK)
        await exchange.publish(aio_pika.Message(encode(pin), message_id=pin.command_id, user_id=user(sender),
                                                content_type="application/json", type="phase_pin",
                                                delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                               f"pin.{routing_word(pin.scope)}", mandatory=True, timeout=10)


# --------------------------------------------------------------------------- #
# the feedback log, written directly (as the trust identity)
# --------------------------------------------------------------------------- #


def log_entries(story: Iterable[OperatorFeedback | PhasePin], *, recorded_before: float = 60.0) -> list[LogEntry]:
    """Feedback-log entries for ``story``, as the trust consumer writes them: each investigation's
    dispatch and finding (``recorded_before`` s before its first verdict), then the verdict or pin,
    admitted at its ``at``."""
    from datetime import timedelta

    out: list[LogEntry] = []
    seen: set[str] = set()
    dispatcher, before = user("dispatcher"), timedelta(seconds=recorded_before)
    for item in story:
        if isinstance(item, PhasePin):
            out.append(AdmittedPin(pin=item, admitted_at=item.at, sender=user("admin")))
            continue
        if item.investigation_id not in seen:
            seen.add(item.investigation_id)
            event = dispatched(item.investigation_id, item.phase, at=item.at - before)
            out.append(InvestigationDispatched(investigation_id=item.investigation_id, job_name=event.job_name,
                                               phase=item.phase, dispatched_at=event.at, recorded_at=event.at,
                                               sender=dispatcher))
            out.append(FindingSeen(investigation_id=item.investigation_id, domain=item.scope, phase=item.phase,
                                   recorded_at=event.at, sender=dispatcher))
        out.append(AdmittedFeedback(feedback=item, admitted_at=item.at, sender=user("operator")))
    return out


def entry_id(entry: LogEntry) -> str:
    if isinstance(entry, AdmittedFeedback):
        return entry.feedback.feedback_id
    if isinstance(entry, AdmittedPin):
        return entry.pin.command_id
    if isinstance(entry, InvestigationDispatched):
        return f"dispatched:{entry.investigation_id}"
    return f"finding:{entry.investigation_id}:{entry.sender}"


async def append_log(amqp_url: str, entries: list[LogEntry], *, batch: int = 1000) -> None:
    """Append ``entries`` to the feedback log as the trust identity (confirmed, pipelined, in order)."""
    connection = await aio_pika.connect(url_for(amqp_url, "trust"))
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        for start in range(0, len(entries), batch):
            await asyncio.gather(*(
                channel.default_exchange.publish(
                    aio_pika.Message(encode_entry(e), message_id=entry_id(e), type=entry_type(e),
                                     user_id=user("trust"), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    FEEDBACK_LOG, timeout=30)
                for e in entries[start:start + batch]))
