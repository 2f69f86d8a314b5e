"""The AMQP topology: one declarative description, declared at start and exported.

Every component declares what it uses idempotently at start-up (declaring an
existing entity with the same arguments is a no-op), and the same description
is exported as RabbitMQ definitions JSON (``k8s/rabbitmq/definitions.json``)
for ``rabbitmqctl import_definitions``. A test keeps the two in step.

Quorum queues dead-letter ``at-least-once`` (RabbitMQ >= 3.10), which needs
``x-overflow: reject-publish``: a full queue pushes back on publishers (they
see a nack) instead of dropping the oldest incident.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from dispatcher.plumbing.settings import AmqpSettings, IdentitySettings
from schemas.routing import (
    ACTION_LOG,
    ACTION_LOG_KEYS,
    INCIDENTS,
    RESULTS,
    DEAD,
    DEAD_LOG,
    CONTROL,
    CREDENTIALS,
    CREDENTIALS_KEY,
    COSTS,
    FEEDBACK,
    FEEDBACK_LOG,
    PHASES,
    PHASE_LOG,
    TRUST_SNAPSHOTS,
)

# The trust consumer's own copy of what it records about investigations: lifecycle.dispatched from
# the dispatcher and every finding (dispatcher/trust/records.py). Single active consumer, like
# agentjobs.feedback: one replica appends records to the feedback log at a time.
TRUST_RESULTS = "agentjobs.trust-results"
TRUST_RESULTS_KEYS = ("lifecycle.dispatched", "finding.#")

# Streams keep everything up to this size: replay from the first offset must see the whole history.
STREAM_MAX_BYTES = 10 * 1024**3
# Only the newest snapshot is ever read: keep a few segments' worth.
SNAPSHOT_STREAM_MAX_BYTES = 64 * 1024**2  # a start reads all of it: keep it small
SNAPSHOT_SEGMENT_BYTES = 8 * 1024**2
DEFINITIONS_FILE = Path(__file__).resolve().parents[2] / "k8s" / "rabbitmq" / "definitions.json"


class Exchange(msgspec.Struct, frozen=True):
    name: str
    type: str = "topic"


class Queue(msgspec.Struct, frozen=True):
    name: str
    arguments: dict[str, Any] = {}


class Binding(msgspec.Struct, frozen=True):
    exchange: str
    queue: str
    routing_key: str = "#"


class Topology(msgspec.Struct, frozen=True):
    exchanges: tuple[Exchange, ...]
    queues: tuple[Queue, ...]
    bindings: tuple[Binding, ...]


def _quorum(dead_letter: bool, delivery_limit: int) -> dict[str, Any]:
    args: dict[str, Any] = {"x-queue-type": "quorum"}
    if dead_letter:
        args |= {
            "x-delivery-limit": delivery_limit,
            "x-dead-letter-exchange": DEAD,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }
    return args


# The action log is read for the last hour only (the hourly limits): a day of it is plenty.
ACTION_LOG_MAX_AGE = "1D"


def _stream() -> dict[str, Any]:
    return {"x-queue-type": "stream", "x-max-length-bytes": STREAM_MAX_BYTES}


def dispatcher_topology(amqp: AmqpSettings) -> Topology:
    """The product's topology (pure): every component declares all of it, so start order is free."""
    return Topology(
        exchanges=(Exchange(INCIDENTS), Exchange(RESULTS), Exchange(DEAD), Exchange(CONTROL),
                   Exchange(FEEDBACK), Exchange(PHASES)),
        queues=(
            Queue(INCIDENTS, _quorum(True, amqp.delivery_limit)),
            Queue(DEAD, _quorum(False, amqp.delivery_limit)),
            Queue(DEAD_LOG, _quorum(False, amqp.delivery_limit)),
            Queue(CONTROL, _quorum(True, amqp.delivery_limit)),
            Queue(CREDENTIALS, _quorum(True, amqp.delivery_limit)),
            Queue(COSTS, _quorum(True, amqp.delivery_limit)),
            Queue(FEEDBACK, _quorum(True, amqp.delivery_limit) | {"x-single-active-consumer": True}),
            Queue(TRUST_RESULTS, _quorum(True, amqp.delivery_limit) | {"x-single-active-consumer": True}),
            Queue(FEEDBACK_LOG, _stream()),
            Queue(PHASE_LOG, _stream()),
            Queue(ACTION_LOG, _stream() | {"x-max-age": ACTION_LOG_MAX_AGE}),
            Queue(TRUST_SNAPSHOTS, {"x-queue-type": "stream", "x-max-length-bytes": SNAPSHOT_STREAM_MAX_BYTES,
                                    "x-stream-max-segment-size-bytes": SNAPSHOT_SEGMENT_BYTES}),
        ),
        bindings=(
            Binding(INCIDENTS, INCIDENTS),
            Binding(DEAD, DEAD),
            Binding(DEAD, DEAD_LOG),
            Binding(CONTROL, CONTROL),
            Binding(RESULTS, CREDENTIALS, CREDENTIALS_KEY),
            Binding(RESULTS, COSTS, "finding.#"),
            Binding(FEEDBACK, FEEDBACK),
            *(Binding(RESULTS, TRUST_RESULTS, key) for key in TRUST_RESULTS_KEYS),
            Binding(PHASES, PHASE_LOG),
            *(Binding(RESULTS, ACTION_LOG, key) for key in ACTION_LOG_KEYS),
        ),
    )


def definitions(topology: Topology, vhost: str = "/") -> dict[str, Any]:
    """RabbitMQ definitions JSON (the management API / import_definitions format)."""
    return {
        "exchanges": [
            {"name": e.name, "vhost": vhost, "type": e.type, "durable": True, "auto_delete": False,
             "internal": False, "arguments": {}}
            for e in topology.exchanges
        ],
        "queues": [
            {"name": q.name, "vhost": vhost, "durable": True, "auto_delete": False,
             "arguments": dict(q.arguments)}
            for q in topology.queues
        ],
        "bindings": [
            {"source": b.exchange, "vhost": vhost, "destination": b.queue, "destination_type": "queue",
             "routing_key": b.routing_key, "arguments": {}}
            for b in topology.bindings
        ],
    }


def render_definitions(topology: Topology, identities: IdentitySettings | None = None) -> str:
    """Deterministic JSON text of ``definitions`` plus every component identity's user and rights
    (``dispatcher/plumbing/identities.py``; no passwords: set each from its component's Secret)."""
    from dispatcher.plumbing.identities import definitions as identity_definitions

    doc = definitions(topology) | identity_definitions(identities or IdentitySettings())
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


async def declare(channel: Any, topology: Topology) -> None:
    """Declare every exchange, queue and binding (idempotent) on an aio-pika channel."""
    import aio_pika

    exchanges = {}
    for e in topology.exchanges:
        exchanges[e.name] = await channel.declare_exchange(
            e.name, aio_pika.ExchangeType(e.type), durable=True
        )
    for q in topology.queues:
        queue = await channel.declare_queue(q.name, durable=True, arguments=dict(q.arguments))
        for b in topology.bindings:
            if b.queue == q.name:
                await queue.bind(exchanges[b.exchange], routing_key=b.routing_key)
