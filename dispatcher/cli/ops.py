"""Operator commands against the running system: publish an incident, tail the result streams.

``tail`` listens through its own exclusive, auto-deleted queue bound to the
exchange — it sees copies and never takes a message from a real consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aio_pika
import msgspec

from schemas import (
    DecodeError,
    OperatorFeedback,
    PhaseChanged,
    PhasePin,
    decode,
    decode_incident,
    encode,
    identify,
)
from schemas.errors import TemporaryError

from dispatcher.intake.deadletters import HEADER_MESSAGE, HEADER_REASON
from schemas.redaction import redact
from schemas.routing import routing_word
from dispatcher.plumbing.amqp import broker_user
from dispatcher.plumbing.settings import Settings
from dispatcher.plumbing.identities import url_for_component
from dispatcher.plumbing.topology import dispatcher_topology
from schemas.routing import DEAD, FEEDBACK, INCIDENTS, PHASES, RESULTS, feedback_key

if TYPE_CHECKING:
    from dispatcher.trust.service import TrustState

STREAMS: dict[str, tuple[str, str]] = {  # name → (exchange, binding)
    "findings": (RESULTS, "finding.#"),
    "lifecycle": (RESULTS, "lifecycle.#"),
    "actions": (RESULTS, "action.#"),  # ActionRecords: action.<outcome>.<domain>
    "dead": (DEAD, "#"),
    "phases": (PHASES, "#"),
    "feedback": (FEEDBACK, "#"),
    "all": (RESULTS, "#"),
}


class OpsError(Exception):
    """A clear, user-facing failure (exit 2)."""


def _url(settings: Settings, component: str) -> str:
    """Who this command speaks as: the operator (or admin, for pins) credentials ``agentjobs up``
    stored in its state dir for this broker, else ``amqp.url`` (a deployment's own operator user)."""
    return url_for_component(settings.amqp.url, settings.runtime.state_dir, component)


async def _connect(settings: Settings, component: str = "operator") -> aio_pika.abc.AbstractConnection:
    try:
        return await aio_pika.connect(_url(settings, component), timeout=10)
    except Exception as exc:
        raise OpsError(f"cannot reach RabbitMQ ({type(exc).__name__}); is it running? (see `agentjobs up`)") from None


async def _exchange(connection: aio_pika.abc.AbstractConnection, name: str, *,
                    confirms: bool = False) -> tuple[aio_pika.abc.AbstractChannel, aio_pika.abc.AbstractExchange]:
    """A channel and the existing exchange ``name``: operators declare nothing of the topology
    (the dispatcher and the trust consumer own it), so a broker where neither ran is an error."""
    channel = await connection.channel(publisher_confirms=confirms, on_return_raises=confirms)
    try:
        return channel, await channel.get_exchange(name, ensure=True)
    except aio_pika.exceptions.ChannelClosed as exc:  # NOT_FOUND (404) closes the channel
        raise OpsError(f"exchange {name} does not exist on this broker yet: start the dispatcher "
                       f"(`agentjobs up`) first ({exc})") from None


async def publish_incident(settings: Settings, body: bytes, *, routing_key: str = "cli") -> dict[str, str]:
    """Validate and publish one incident (any accepted format) with a broker confirm."""
    try:
        event = decode_incident(body, max_bytes=settings.bridge.max_body_bytes)
    except DecodeError as exc:
        raise OpsError(f"not an incident: {exc.reason}: {exc.message}") from None
    ident = identify(event)
    connection = await _connect(settings)
    async with connection:
        _, exchange = await _exchange(connection, INCIDENTS, confirms=True)
        message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=event.event_id,
                                   user_id=broker_user(_url(settings, "operator")),
                                   content_type="application/json")
        await exchange.publish(message, routing_key, timeout=settings.amqp.publish_timeout)
    return {"event_id": event.event_id, "investigation_id": ident.investigation_id, "job_name": ident.job_name}


def feedback_routing_key(feedback: OperatorFeedback) -> str:
    """``feedback.<verdict>.<scope>`` (pure; the scope made safe for a routing key)."""
    return feedback_key(feedback.verdict.value, feedback.scope)


async def publish_feedback(settings: Settings, body: bytes) -> dict[str, str]:
    """Validate and publish one operator feedback with a broker confirm (unroutable is an error)."""
    try:
        feedback = decode(body, OperatorFeedback)
    except DecodeError as exc:
        raise OpsError(f"not an operator feedback: {exc.reason}: {exc.message}") from None
    connection = await _connect(settings)
    async with connection:
        _, exchange = await _exchange(connection, FEEDBACK, confirms=True)
        message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                   user_id=broker_user(_url(settings, "operator")),
                                   message_id=feedback.feedback_id, content_type="application/json",
                                   type="feedback")
        key = feedback_routing_key(feedback)
        await exchange.publish(message, key, mandatory=True, timeout=settings.amqp.publish_timeout)
    return {"feedback_id": feedback.feedback_id, "scope": feedback.scope, "verdict": feedback.verdict.value,
            "routing_key": key}


async def queue_depths(settings: Settings) -> dict[str, dict[str, int]]:
    """Ready messages and consumers of the dispatcher's queues."""
    depths: dict[str, dict[str, int]] = {}
    connection = await _connect(settings)
    async with connection:
        for name in (q.name for q in dispatcher_topology(settings.amqp).queues):
            channel = await connection.channel()
            try:
                declared = await channel.declare_queue(name, passive=True)
            except aio_pika.exceptions.ChannelClosed:
                continue  # not declared yet: nothing ever ran here
            result = declared.declaration_result
            depths[name] = {"ready": result.message_count, "consumers": result.consumer_count}
            await channel.close()
    return depths


async def active_investigations(settings: Settings, now: datetime) -> list[dict[str, Any]]:
    """Investigations whose Job has not ended, from the runtime's own records (read only)."""
    from dispatcher.jobs import jobspec
    if settings.runtime.kind == "local":
        from dispatcher.jobs.local import is_live, read_records

        records = read_records(Path(settings.runtime.state_dir) / "local")
        return [
            {"job_name": r.name, "investigation_id": r.investigation_id, "state": r.state,
             "class": r.labels.get(jobspec.LABEL_CLASS, ""), "phase": r.labels.get(jobspec.LABEL_PHASE, ""),
             "domain": r.labels.get(jobspec.LABEL_DOMAIN, ""), "age_s": int((now - r.created_at).total_seconds())}
            for r in records if is_live(r)
        ]
    from dispatcher.jobs.kubernetes import KubernetesRuntime, ending_of

    runtime = await KubernetesRuntime.from_settings(settings.k8s)
    try:
        jobs = await runtime.jobs()
    finally:
        await runtime.close()
    out = []
    for job in jobs:
        if ending_of(job) is not None:
            continue
        meta, labels = job["metadata"], job["metadata"].get("labels") or {}
        created = datetime.fromisoformat(meta["creationTimestamp"].replace("Z", "+00:00"))
        out.append({"job_name": meta["name"], "investigation_id": labels.get(jobspec.LABEL_INVESTIGATION, ""),
                    "state": "active" if (job.get("status") or {}).get("active") else "pending",
                    "class": labels.get(jobspec.LABEL_CLASS, ""), "phase": labels.get(jobspec.LABEL_PHASE, ""),
                    "domain": labels.get(jobspec.LABEL_DOMAIN, ""), "age_s": int((now - created).total_seconds())})
    return out


def matches(record: Mapping[str, Any], filters: Mapping[str, str]) -> bool:
    """True if every ``key=value`` filter equals the record's top-level field (pure)."""
    return all(str(record.get(k, "")) == v for k, v in filters.items())


def render_json(routing_key: str, record: Mapping[str, Any], headers: Mapping[str, Any]) -> str:
    """One JSON line for a message, secrets masked (pure)."""
    return json.dumps(redact({"routing_key": routing_key, "headers": dict(headers), **record}))


def render(stream: str, routing_key: str, record: Mapping[str, Any], headers: Mapping[str, Any]) -> str:
    """One readable line for a message, secrets masked (pure)."""
    record, headers = redact(dict(record)), redact(dict(headers))
    kind = record.get("kind", "")
    if stream == "dead":
        return (f"dead  {headers.get(HEADER_REASON, record.get('reason', 'broker'))}: "
                f"{str(headers.get(HEADER_MESSAGE, ''))[:120]}  (from {routing_key})")
    if kind == "finding":
        return (f"finding  {routing_key}  {record.get('job_name', record.get('investigation_id', ''))[:40]}  "
                f"{record.get('conclusion', '')}  {record.get('confidence', 0):.2f}  {record.get('summary', '')[:100]}")
    if kind == "phase_changed":
        numbers = ""
        if record.get("samples"):
            numbers = f", n={record['samples']}, rate={record.get('modification_rate') or 0:.2f}"
        return (f"phase    {record.get('scope', '')}  {record.get('from_phase') or '-'} → {record.get('to_phase', '')}"
                f"  ({record.get('reason', '')}{numbers})")
    if kind == "feedback":
        changed = f" changed {','.join(record['changed_fields'])}" if record.get("changed_fields") else ""
        harmful = "  HARMFUL" if record.get("harmful") else ""
        return (f"feedback {record.get('scope', '')}  {record.get('verdict', '')}{changed}{harmful}  "
                f"{record.get('investigation_id', '')[:16]}  by {record.get('operator') or '-'}")
    if kind == "lifecycle":
        reason = f" ({record['reason']})" if record.get("reason") else ""
        return f"{record.get('state', ''):<10} {record.get('job_name', '')}{reason}"
    if kind == "action_record" or routing_key.startswith("action."):
        return render_action(routing_key, record, headers)
    return f"{routing_key}  {json.dumps(record)[:160]}"


def render_action(routing_key: str, record: Mapping[str, Any], headers: Mapping[str, Any]) -> str:
    """One line for an ActionRecord (pure): what, on what, how it ended, why, how to undo it.

    ``record`` is the decoded record; when the generic decoder did not know its kind it holds
    only the (cut) ``body``: then the record is decoded from that, and failing that the line
    comes from the message's headers (action, target, outcome, investigation_id, the start of
    reason and undo), which the agent sets on every record.
    """
    fields: Mapping[str, Any] = record
    if record.get("kind") != "action_record":
        fields = dict(headers)
        body = record.get("body")
        if isinstance(body, str):
            from schemas import ActionRecord

            with contextlib.suppress(DecodeError):
                fields = redact(msgspec.to_builtins(decode(body.encode(), ActionRecord)))
    what = " ".join(str(x) for x in (fields.get("action", ""), fields.get("target", "")) if x)
    line = (f"action   {routing_key}  {what}  {fields.get('outcome', '')}  "
            f"{str(fields.get('investigation_id', ''))[:16]}")
    if fields.get("reason"):
        line += f"  {str(fields['reason'])[:120]}"
    if fields.get("approved_by") and fields.get("outcome") not in ("approved", "approval_refused"):
        line += f"  (approved by {str(fields['approved_by'])[:64]})"
    if fields.get("undo"):
        line += f"  undo: {str(fields['undo'])[:100]}"
    return line


async def tail(
    settings: Settings, stream: str, *, follow: bool, as_json: bool, filters: Mapping[str, str],
    echo: Callable[[str], None], idle_seconds: float = 2.0, status: Callable[[str], None] | None = None,
) -> int:
    """Print messages of ``stream`` as they arrive; returns how many were shown.

    ``status`` (stderr in the CLI, so ``--json`` output stays clean) hears once the copy queue
    is bound: from then on nothing published is missed.
    """
    exchange_name, binding = STREAMS[stream]
    shown = 0
    arrived = asyncio.Event()
    connection = await _connect(settings)
    async with connection:
        channel, exchange = await _exchange(connection, exchange_name)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, binding)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal shown
            try:
                record: dict[str, Any] = msgspec.to_builtins(decode(message.body))
            except DecodeError:
                record = {"body": message.body[:1024].decode("utf-8", "replace")}
            headers = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in (message.headers or {}).items()}
            if not matches(record, filters):
                return
            shown += 1
            if as_json:
                echo(render_json(message.routing_key or "", record, headers))
            else:
                echo(render(stream, message.routing_key or "", record, headers))
            arrived.set()

        await queue.consume(on_message, no_ack=True)
        if status is not None:
            until = "Ctrl-C stops" if follow else f"stops after {idle_seconds:g} s without messages"
            status(f"tail: {stream} from exchange {exchange_name} ({binding}); {until}")
        while True:
            arrived.clear()
            try:
                await asyncio.wait_for(arrived.wait(), None if follow else idle_seconds)
            except TimeoutError:
                return shown


async def trust_state(settings: Settings) -> TrustState:
    """The trust state as the trust consumer has it: replayed from the feedback and phase logs (read only)."""
    from dispatcher.plumbing.streamlog import StreamFollower
    from schemas.routing import FEEDBACK_LOG, PHASE_LOG
    from dispatcher.trust.service import TrustState, restore_newest_snapshot

    state = TrustState(settings)
    connection = await _connect(settings)
    async with connection:
        await _exchange(connection, FEEDBACK)  # the trust consumer ran here: its logs exist
        followers = [StreamFollower(FEEDBACK_LOG, state.on_log_entry, name="feedback-log"),
                     StreamFollower(PHASE_LOG, state.on_phase_entry, name="phase-log")]
        if settings.trust.snapshot_every:  # as the consumer starts: from its newest snapshot
            await restore_newest_snapshot(connection, state, followers[0], read_only=True)
        for follower in followers:
            await follower.start(connection)
            try:
                await follower.catch_up(connection, timeout=60, read_only=True)
            except TemporaryError as exc:
                raise OpsError(f"could not read the trust logs: {exc.message}") from None
    return state


async def request_pin(settings: Settings, pin: PhasePin, *, wait: float) -> PhaseChanged | None:
    """Send a pin/unpin command (confirmed) and wait up to ``wait`` s for the trust consumer's change."""
    connection = await _connect(settings, "admin")  # pins: admins only
    async with connection:
        channel, exchange = await _exchange(connection, FEEDBACK, confirms=True)
        watch = await channel.declare_queue(exclusive=True, auto_delete=True)
        await watch.bind(PHASES, f"phase.{routing_word(pin.scope)}")
        await exchange.publish(aio_pika.Message(encode(pin), delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                                user_id=broker_user(_url(settings, "admin")),
                                                message_id=pin.command_id, content_type="application/json",
                                                type="phase_pin"),
                               f"pin.{routing_word(pin.scope)}", mandatory=True, timeout=settings.amqp.publish_timeout)
        deadline = asyncio.get_running_loop().time() + wait
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            message = await watch.get(no_ack=True, fail=False)
            if message is None:
                await asyncio.sleep(min(0.1, left))
                continue
            with contextlib.suppress(DecodeError):
                change = decode(message.body, PhaseChanged)
                if change.operator == pin.operator and change.scope == pin.scope:
                    return change
    return None
