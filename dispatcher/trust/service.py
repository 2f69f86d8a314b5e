"""``agentjobs trust``: tallies operator feedback and moves scopes between autonomy phases.

The feedback log (stream ``agentjobs.feedback-log``) is the single source of
truth: every accepted trust input — an ``OperatorFeedback`` or a ``PhasePin``
command — is appended to it, and the ``TrustLedger`` is only ever fed from it,
in log order. So a restarted or newly active consumer that replays the log has
exactly the state of the one before it: same log → same phases.

Handling one delivery from the ``agentjobs.feedback`` queue (single active
consumer: one process tallies at a time, a second one waits to take over):

1. decode; anything invalid is dead-lettered with its reason and acked;
2. append it to the feedback log (confirmed);
3. wait until the log follower has applied it (so everything before it too);
4. publish every decision the ledger has made that the phase log does not show
   yet (``PhaseChanged`` on ``agentjobs.phases``, confirmed; the phase log is
   bound to that exchange);
5. ack — the consumer's one ack site.

A crash between any two steps is safe: a redelivered feedback is appended
again and counts once (the ledger de-duplicates by id), and step 4 publishes
whatever decision is still missing, whoever runs it next.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import OrderedDict
from datetime import timedelta
from typing import Any

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from prometheus_client import CollectorRegistry, Counter, Gauge

from schemas import OperatorFeedback, PhaseChanged, PhasePin, decode, encode, utcnow
from schemas.errors import DecodeError, PermanentError, TemporaryError

from dispatcher.trust import snapshots
from dispatcher.plumbing.amqp import Publisher, connect
from dispatcher.intake.consumer import Consumer
from dispatcher.intake.deadletters import Delivery, dead_letter, from_error
from dispatcher.plumbing.health import HealthServer
from dispatcher.intake.incidents import Outcome
from schemas.logs import bound, get_logger
from schemas.routing import routing_word
from dispatcher.plumbing.retry import Backoff, RetriesExhausted, retry
from dispatcher.plumbing.settings import Settings
from dispatcher.plumbing.streamlog import StreamFollower, entry_id_at
from dispatcher.plumbing.tasks import run_until_signalled
from dispatcher.plumbing.topology import declare, dispatcher_topology
from schemas.routing import FEEDBACK, FEEDBACK_LOG, PHASE_LOG, PHASES, TRUST_SNAPSHOTS
from dispatcher.trust.policy import TrustLedger
from dispatcher.trust.snapshots import TrustSnapshot

log = get_logger("agentjobs.trust")
COMPONENT = "trust"
APPLY_TIMEOUT = 30.0  # seconds for an appended entry to come back through the log
COMMAND_MEMORY = 4096  # pin command ids remembered (repeats apply once)
MAX_CLOCK_SKEW = 300  # seconds an event's timestamp may be ahead of this consumer's clock


class TrustMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.feedback = Counter("agentjobs_feedback_total", "Feedback tallied (first delivery), by verdict",
                                ["verdict"], registry=r)
        self.rate = Gauge("agentjobs_trust_modification_rate", "Modification rate in the window, by scope",
                          ["scope"], registry=r)
        self.samples = Gauge("agentjobs_trust_samples", "Feedbacks in the window, by scope", ["scope"], registry=r)
        self.phase = Gauge("agentjobs_trust_phase", "1 for the scope's current phase", ["scope", "phase"],
                           registry=r)
        self.changes = Counter("agentjobs_phase_changes_total", "Phase changes published, by reason",
                               ["reason"], registry=r)
        self.dead_lettered = Counter("agentjobs_dead_lettered_total", "Messages dead-lettered, by reason",
                                     ["reason"], registry=r)


def change_id(change: PhaseChanged) -> str:
    """Deterministic message id of a decision, so repeats of it are recognisable (pure)."""
    key = f"{change.scope}|{change.from_phase}|{change.to_phase}|{change.at.isoformat()}|{change.reason}"
    return "phase-" + hashlib.sha256(key.encode()).hexdigest()[:32]


class TrustState:
    """The ledger fed from the feedback log, and what the phase log shows (no I/O)."""

    def __init__(self, settings: Settings, metrics: TrustMetrics | None = None) -> None:
        self.settings = settings
        self.ledger = TrustLedger(settings.trust)
        self.metrics = metrics
        self.decided: dict[str, PhaseChanged] = {}  # scope → the ledger's latest decision
        self.published: dict[str, PhaseChanged] = {}  # scope → the latest change in the phase log
        self._commands: OrderedDict[str, None] = OrderedDict()
        self._applied: dict[str, asyncio.Event] = {}
        # Gauges follow each entry only once replay is done: explaining a scope per replayed
        # entry made start-up replay ~15x slower (benchmarks/trust.py).
        self.exporting = False

    # -- the feedback log --------------------------------------------------------------------

    def on_log_entry(self, message: AbstractIncomingMessage) -> None:
        try:
            entry = decode(message.body)
        except DecodeError as exc:  # only valid entries are appended; say so if one is not
            log.error("feedback_log_entry_undecodable", error=exc.message, message_id=message.message_id)
            return
        self.apply(entry)
        waiter = self._applied.get(message.message_id or "")
        if waiter is not None:
            waiter.set()

    def apply(self, entry: object) -> PhaseChanged | None:
        change: PhaseChanged | None = None
        if isinstance(entry, OperatorFeedback):
            first = not self.ledger.has_seen(entry.scope, entry.feedback_id)
            change = self.ledger.apply_feedback(entry)
            scope = entry.scope
            if first and self.metrics is not None:
                self.metrics.feedback.labels(verdict=entry.verdict.value).inc()
        elif isinstance(entry, PhasePin):
            if entry.command_id in self._commands:
                return None
            self._commands[entry.command_id] = None
            if len(self._commands) > COMMAND_MEMORY:
                self._commands.popitem(last=False)
            scope = entry.scope
            if entry.phase is None:
                change = self.ledger.unpin(entry.scope, operator=entry.operator, at=entry.at)
            else:
                change = self.ledger.pin(entry.scope, entry.phase, reason=entry.reason, operator=entry.operator,
                                         at=entry.at)
        else:
            return None
        if change is not None:
            self.decided[change.scope] = change
        if self.exporting:
            self._export(scope)
        return change

    def export_all(self) -> None:
        """Set every scope's gauges (after replay) and keep them current from now on."""
        self.exporting = True
        for scope in self.ledger.phases():
            self._export(scope)

    def _export(self, scope: str) -> None:
        if self.metrics is None:
            return
        explained = self.ledger.explain(scope)
        self.metrics.rate.labels(scope=scope).set(explained.modification_rate or 0.0)
        self.metrics.samples.labels(scope=scope).set(explained.samples)
        current = self.ledger.phase_for(scope)
        for phase in type(current):
            self.metrics.phase.labels(scope=scope, phase=phase.value).set(1 if phase is current else 0)

    def waiter(self, message_id: str) -> asyncio.Event:
        return self._applied.setdefault(message_id, asyncio.Event())

    def forget(self, message_id: str) -> None:
        self._applied.pop(message_id, None)

    # -- snapshots ---------------------------------------------------------------------------

    def snapshot(self, *, log_offset: int, log_entry_id: str, applied: int) -> TrustSnapshot:
        return TrustSnapshot(format=snapshots.FORMAT, policy=snapshots.policy_fingerprint(self.settings.trust),
                             log_offset=log_offset, log_entry_id=log_entry_id, applied=applied, taken_at=utcnow(),
                             ledger=self.ledger.snapshot(), decided=dict(self.decided),
                             commands=list(self._commands))

    def restore(self, snapshot: TrustSnapshot) -> None:
        """The state ``snapshot`` was taken in (the caller checked it belongs to this log)."""
        self.ledger = TrustLedger.restore(self.settings.trust, snapshot.ledger)
        self.decided = dict(snapshot.decided)
        self._commands = OrderedDict.fromkeys(snapshot.commands)

    # -- the phase log -----------------------------------------------------------------------

    def on_phase_entry(self, message: AbstractIncomingMessage) -> None:
        try:
            change = decode(message.body, PhaseChanged)
        except DecodeError:
            return
        known = self.published.get(change.scope)
        if known is None or change.at >= known.at:
            self.published[change.scope] = change

    def unpublished(self) -> list[PhaseChanged]:
        """Decisions newer than what the phase log shows, oldest first (pure over the state)."""
        missing = []
        for scope, change in self.decided.items():
            shown = self.published.get(scope)
            if shown is None or change.at > shown.at or (change.at == shown.at and change_id(change) != change_id(shown)):
                missing.append(change)
        return sorted(missing, key=lambda c: (c.at, c.scope))


async def restore_newest_snapshot(connection: AbstractRobustConnection, state: TrustState,
                                  feedback_log: StreamFollower) -> TrustSnapshot | None:
    """Put ``state`` where the newest usable snapshot was and make ``feedback_log`` start after it.

    None (and the reason logged): no snapshot fits, replay the whole log.
    """
    try:
        snapshot = await snapshots.newest(connection, timeout=60)
        if snapshot is None:
            return None
        at_offset = await entry_id_at(connection, FEEDBACK_LOG, snapshot.log_offset)
    except TemporaryError as exc:
        log.warning("trust_snapshot_not_read", error=exc.message)
        return None
    why = snapshots.unusable(snapshot, state.settings.trust, at_offset)
    if why is not None:
        log.warning("trust_snapshot_ignored", reason=why, log_offset=snapshot.log_offset)
        return None
    state.restore(snapshot)
    feedback_log.resume_after(snapshot.log_offset)
    log.info("trust_snapshot_restored", log_offset=snapshot.log_offset, applied=snapshot.applied,
             taken_at=snapshot.taken_at.isoformat(), scopes=len(snapshot.ledger.scopes))
    return snapshot


class TrustService:
    name = "agentjobs-trust"

    def __init__(self, settings: Settings, *, health_port: int | None = None) -> None:
        self.settings = settings
        self.metrics = TrustMetrics()
        self.state = TrustState(settings, self.metrics)
        self.backoff = Backoff.of(settings.retry)
        self.health_port = settings.metrics.port if health_port is None else health_port
        self._serve_health = health_port is not None or settings.metrics.port != 0
        self.crashed = asyncio.Event()
        self.caught_up = False
        self._connection: AbstractRobustConnection | None = None
        self._publisher: Publisher | None = None
        self._feedback_log = StreamFollower(FEEDBACK_LOG, self.state.on_log_entry, name="feedback-log")
        self._phase_log = StreamFollower(PHASE_LOG, self.state.on_phase_entry, name="phase-log")
        self._consumer = Consumer(FEEDBACK, self.handle, prefetch=1, name="feedback")
        self._health: HealthServer | None = None
        self._lock = asyncio.Lock()  # one delivery at a time (prefetch 1 too): log order is decision order
        self._applied_at_snapshot = 0  # feedback-log entries applied when the last snapshot was taken
        self._base_applied = 0  # entries the restored snapshot stood for

    @property
    def ready(self) -> bool:
        return self.caught_up and self._consumer.consuming and not self.crashed.is_set()

    async def start(self) -> None:
        s = self.settings
        self._connection = await connect(s.amqp, name=self.name)
        channel = await self._connection.channel()
        await declare(channel, dispatcher_topology(s.amqp))
        await channel.close()
        self._publisher = await Publisher.open(self._connection, s.amqp)
        restored = await self._restore_snapshot() if s.trust.snapshot_every else None
        await self._feedback_log.start(self._connection)
        await self._phase_log.start(self._connection)
        await self._feedback_log.catch_up(self._connection, timeout=120)
        await self._phase_log.catch_up(self._connection, timeout=120)
        self.caught_up = True
        self.state.export_all()
        log.info("trust_replayed", feedback_entries=self._feedback_log.applied,
                 from_snapshot_at_offset=restored.log_offset if restored else None,
                 phase_entries=self._phase_log.applied, scopes=len(self.state.ledger.phases()))
        if s.trust.snapshot_every and self._feedback_log.applied >= s.trust.snapshot_every:
            await self._save_snapshot()  # the next start skips what this one replayed
        await self._consumer.start(self._connection)
        if self._serve_health:
            self._health = HealthServer(host=s.metrics.host, port=self.health_port, registry=self.metrics.registry,
                                        ready={"replayed_and_consuming": lambda: self.ready})
            await self._health.start()

    # -- one delivery ------------------------------------------------------------------------

    async def handle(self, delivery: Delivery) -> Outcome:
        async with self._lock:
            try:
                entry = self._validate(delivery)
            except PermanentError as exc:
                return await self._reject(delivery, exc)
            entry_id = entry.feedback_id if isinstance(entry, OperatorFeedback) else entry.command_id
            with bound(entry_id=entry_id, scope=entry.scope):
                try:
                    await self._durably(lambda: self._append(entry, entry_id))
                    for change in self.state.unpublished():
                        await self._durably(lambda change=change: self._publish(change))
                except RetriesExhausted as exc:
                    log.warning("feedback_requeued", error=exc.last.message)
                    return Outcome.REQUEUE
                every = self.settings.trust.snapshot_every
                if every and self._feedback_log.applied - self._applied_at_snapshot >= every:
                    await self._save_snapshot()
                return Outcome.ACK

    def _validate(self, delivery: Delivery) -> OperatorFeedback | PhasePin:
        try:
            entry = decode(delivery.body)
        except DecodeError as exc:
            raise PermanentError(exc.reason, exc.message) from exc
        if not isinstance(entry, OperatorFeedback | PhasePin):
            raise PermanentError("wrong_kind", f"{type(entry).__name__} does not belong on {FEEDBACK}")
        if isinstance(entry, PhasePin) and entry.phase is not None and not entry.reason.strip():
            raise PermanentError("invalid_command", "a pin needs a reason")
        if not entry.scope.strip():
            raise PermanentError("invalid_scope", "scope is empty")
        # The one place the wall clock is consulted: admission into the log. Decisions replayed
        # from the log use event times only, so they stay reproducible; but a timestamp from the
        # future would move a scope's clock ahead and age every real feedback out of its window,
        # and a backdated one would count toward a dwell that never happened.
        now = utcnow()
        if entry.at > now + timedelta(seconds=MAX_CLOCK_SKEW):
            raise PermanentError("future_timestamp", f"at={entry.at.isoformat()} is ahead of this consumer's "
                                 f"clock ({now.isoformat()}) by more than {MAX_CLOCK_SKEW} s")
        if isinstance(entry, OperatorFeedback) and entry.at < now - timedelta(seconds=self.settings.trust.max_age):
            raise PermanentError("stale_feedback", f"at={entry.at.isoformat()} is older than trust.max_age "
                                 f"({self.settings.trust.max_age:g} s): it could never count")
        return entry

    # -- snapshots ---------------------------------------------------------------------------

    async def _restore_snapshot(self) -> TrustSnapshot | None:
        assert self._connection is not None
        snapshot = await restore_newest_snapshot(self._connection, self.state, self._feedback_log)
        if snapshot is not None:
            self._base_applied = snapshot.applied
        return snapshot

    async def _save_snapshot(self) -> None:
        """Append the state as it is now; a failure only means a slower next start."""
        assert self._publisher is not None
        follower = self._feedback_log
        snapshot = self.state.snapshot(log_offset=follower.offset, log_entry_id=follower.last_id,
                                       applied=self._base_applied + follower.applied)
        try:
            await self._publisher.publish("", TRUST_SNAPSHOTS, snapshots.encode_snapshot(snapshot),
                                          content_type=snapshots.CONTENT_TYPE, type_=snapshots.SNAPSHOT_TYPE,
                                          message_id=f"trust-snapshot-{follower.offset}")
        except TemporaryError as exc:
            log.warning("trust_snapshot_not_saved", error=exc.message)
            return
        self._applied_at_snapshot = follower.applied
        log.info("trust_snapshot_saved", log_offset=snapshot.log_offset, applied=snapshot.applied)

    async def _append(self, entry: OperatorFeedback | PhasePin, entry_id: str) -> None:
        """Append to the feedback log and wait until the follower has applied it."""
        assert self._publisher is not None
        waiter = self.state.waiter(entry_id)
        waiter.clear()
        try:
            await self._publisher.publish("", FEEDBACK_LOG, encode(entry), message_id=entry_id,
                                          type_=type(entry).__struct_config__.tag)
            try:
                async with asyncio.timeout(APPLY_TIMEOUT):
                    await waiter.wait()
            except TimeoutError as exc:
                raise TemporaryError(f"{FEEDBACK_LOG}: appended entry not back within {APPLY_TIMEOUT:g} s") from exc
        finally:
            self.state.forget(entry_id)

    async def _publish(self, change: PhaseChanged) -> None:
        assert self._publisher is not None
        await self._publisher.publish_message(PHASES, f"phase.{routing_word(change.scope)}", change,
                                              message_id=change_id(change), mandatory=True)
        known = self.state.published.get(change.scope)
        if known is None or change.at >= known.at:
            self.state.published[change.scope] = change
        self.metrics.changes.labels(reason=change.reason.split(":")[0]).inc()
        log.info("phase_changed", scope=change.scope, from_phase=str(change.from_phase), to_phase=change.to_phase.value,
                 reason=change.reason, samples=change.samples, modification_rate=change.modification_rate)

    async def _durably(self, work: Any) -> Any:
        return await retry(work, self.backoff, on_retry=lambda attempt, exc, wait: log.warning(
            "temporary_error", attempt=attempt, error=exc.message, retry_in_s=round(wait, 3)))

    async def _reject(self, delivery: Delivery, error: PermanentError) -> Outcome:
        assert self._publisher is not None
        record = from_error(delivery, error, at=utcnow(), component=COMPONENT)
        try:
            await self._durably(lambda: dead_letter(self._publisher, delivery, record))
        except RetriesExhausted:
            return Outcome.REQUEUE
        self.metrics.dead_lettered.labels(reason=error.reason).inc()
        log.warning("feedback_dead_lettered", reason=error.reason, detail=error.message)
        return Outcome.ACK

    # -- lifecycle ---------------------------------------------------------------------------

    async def stop(self) -> None:
        await self._consumer.stop(drain_timeout=10)
        await self._feedback_log.stop()
        await self._phase_log.stop()
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._connection.close(), timeout=5)
        if self._health is not None:
            await self._health.stop()
        log.info("trust_stopped")

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT (exit 0); 2 if it cannot start."""
        return await run_until_signalled(start=self.start, stop=lambda _drain: self.stop(), name="trust")
