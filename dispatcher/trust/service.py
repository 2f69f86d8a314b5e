"""``agentjobs trust``: tallies operator feedback and moves scopes between autonomy phases.

The feedback log (stream ``agentjobs.feedback-log``) is the single source of
truth: every accepted trust input — an operator's verdict, an admin's pin, and
the record of each real investigation (``lifecycle.dispatched`` from the
dispatcher, its finding from its own agent or the dispatcher) — is appended to
it (``dispatcher/trust/records.py``), and the state is only ever fed from it, in
log order. So a restarted or newly active consumer that replays the log has
exactly the state of the one before it: same log → same phases.

Who may say what (the broker-validated ``user_id``, ``dispatcher/intake/senders.py``):
feedback only from operators or admins, pins only from admins, ``lifecycle.dispatched``
only from the dispatcher, findings only from the agent of that investigation's Job or
the dispatcher. Anything else is dead-lettered ``forbidden_sender``, counted, never
applied. Feedback counts only for an investigation trust has recorded, whose finding it
has seen, in the scope and phase recorded (else ``unknown_investigation``, ``no_finding``,
``scope_mismatch``, ``phase_mismatch``), and — when it names an action — only for an action that
finding proposed (else ``unknown_action``); one verdict per investigation (a correction
replaces, ``dispatcher/trust/policy.py``). Verdicts naming an action are counted per action
too (``agentjobs_action_feedback_total``, ``agentjobs phase explain``). Time is this consumer's
clock at admission, written into the log entry: senders cannot backdate, and replay is deterministic.

Handling one delivery from the ``agentjobs.feedback`` queue (single active
consumer: one process tallies at a time, a second one waits to take over):

1. decode and check the sender; anything invalid or forbidden is dead-lettered with its
   reason and acked;
2. check a verdict against the investigations recorded (after the results queue has been
   drained, so a finding published just before its feedback is not missed);
3. append it to the feedback log with the admission time (confirmed);
4. wait until the log follower has applied it (so everything before it too);
5. publish every decision the ledger has made that the phase log does not show
   yet (``PhaseChanged`` on ``agentjobs.phases``, confirmed; the phase log is
   bound to that exchange);
6. ack — the consumer's one ack site (``dispatcher/intake/consumer.py``).

The trust consumer's own queue on the results exchange (``agentjobs.trust-results``,
``lifecycle.dispatched`` and ``finding.#``) is handled the same way: sender check, append
the record, ack.

A crash between any two steps is safe: a redelivered feedback is appended
again and counts once (the ledger de-duplicates by id), a redelivered record
changes nothing, and step 5 publishes whatever decision is still missing,
whoever runs it next.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from prometheus_client import CollectorRegistry, Counter, Gauge

from schemas import Finding, OperatorFeedback, PhaseChanged, PhasePin, decode, utcnow
from schemas.errors import DecodeError, PermanentError, TemporaryError

from dispatcher.trust import records, snapshots
from dispatcher.plumbing.amqp import Publisher, broker_user, connect
from dispatcher.intake import senders
from dispatcher.intake.consumer import Consumer
from dispatcher.intake.deadletters import Delivery, dead_letter, from_error
from dispatcher.plumbing.health import HealthServer
from dispatcher.plumbing.metrics import consumer_up
from dispatcher.intake.incidents import Outcome
from schemas.logs import bound, get_logger
from schemas.routing import routing_word
from dispatcher.plumbing.retry import Backoff, RetriesExhausted, retry
from dispatcher.plumbing.settings import Settings
from dispatcher.plumbing.streamlog import StreamFollower, entry_id_at
from dispatcher.plumbing.tasks import run_until_signalled
from dispatcher.plumbing.topology import TRUST_RESULTS, declare, dispatcher_topology
from schemas.routing import FEEDBACK, FEEDBACK_LOG, PHASE_LOG, PHASES, TRUST_SNAPSHOTS
from dispatcher.trust.policy import Reason, TrustLedger
from dispatcher.trust.records import (
    AdmittedFeedback,
    AdmittedPin,
    FindingSeen,
    InvestigationDispatched,
    InvestigationLedger,
    LogEntry,
)
from dispatcher.trust.snapshots import TrustSnapshot

log = get_logger("agentjobs.trust")
COMPONENT = "trust"
APPLY_TIMEOUT = 30.0  # seconds for an appended entry to come back through the log
COMMAND_MEMORY = 4096  # pin command ids remembered (repeats apply once)
RESULTS_CATCH_UP = 10.0  # seconds a verdict for an unseen investigation waits for the results queue to drain
RESULTS_STALL = 1.0  # seconds without a result handled after which that wait gives up
RESULTS_PREFETCH = 50
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # placeholder until the admission time is stamped


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
        self.refused = Counter(
            "agentjobs_trust_refused_total",
            "Trust inputs refused, never applied (forbidden sender, unknown investigation, scope or phase "
            "mismatch, ...), by reason and kind (feedback, phase_pin, lifecycle, finding, log_entry)",
            ["reason", "kind"], registry=r)
        self.action_feedback = Counter(
            "agentjobs_action_feedback_total",
            "Feedback naming one proposed action, tallied (first delivery), by action, verdict and harmful",
            ["action", "verdict", "harmful"], registry=r)
        self.investigations = Gauge("agentjobs_trust_investigations",
                                    "Investigations the trust consumer has recorded (and remembers)", registry=r)
        self.consumer_up = consumer_up(r)
        # The PhaseDemoted alert counts these with increase(): children exist before the first one.
        for reason in Reason:  # (the label is the reason up to its first ":", see _publish)
            self.changes.labels(reason=reason.value)


def change_id(change: PhaseChanged) -> str:
    """Deterministic message id of a decision, so repeats of it are recognisable (pure)."""
    key = f"{change.scope}|{change.from_phase}|{change.to_phase}|{change.at.isoformat()}|{change.reason}"
    return "phase-" + hashlib.sha256(key.encode()).hexdigest()[:32]


def _is_other_component(settings: Settings, user_id: str) -> bool:
    """True if ``user_id`` is a known identity other than trust (it never wrote the feedback log)."""
    ids = settings.identities
    if not user_id or user_id == ids.trust:
        return False
    return (user_id in (ids.dispatcher, ids.bridge, *ids.operators, *ids.admins)
            or user_id.startswith((ids.agent_prefix, ids.kubernetes_agent_prefix)))


class TrustState:
    """The ledger fed from the feedback log, and what the phase log shows (no I/O).

    ``writers``: the broker users whose feedback-log entries (and phase changes) count — the trust
    identity (``[identities] trust``), plus the consumer's own user if it runs as another one.
    """

    def __init__(self, settings: Settings, metrics: TrustMetrics | None = None, *,
                 writers: tuple[str, ...] | None = None) -> None:
        self.settings = settings
        self.ledger = TrustLedger(settings.trust)
        self.investigations = InvestigationLedger(settings.identities, max_age=settings.trust.max_age,
                                                  kubernetes_auth=settings.vault.auth_mode == "kubernetes")
        self.metrics = metrics
        self.writers = frozenset(writers or (settings.identities.trust,))
        self.decided: dict[str, PhaseChanged] = {}  # scope → the ledger's latest decision
        self.published: dict[str, PhaseChanged] = {}  # scope → the latest change in the phase log
        self.last_admitted: datetime | None = None  # the admission clock as the log shows it
        self.refused_entries = 0  # feedback-log entries not applied (foreign writer, failed checks)
        self._commands: OrderedDict[str, None] = OrderedDict()
        self._applied: dict[str, asyncio.Event] = {}
        # Gauges follow each entry only once replay is done: explaining a scope per replayed
        # entry made start-up replay ~15x slower (benchmarks/trust.py).
        self.exporting = False

    # -- the feedback log --------------------------------------------------------------------

    def on_log_entry(self, message: AbstractIncomingMessage) -> None:
        user_id = message.user_id or ""
        entry: object
        try:
            if message.type in records.ENTRY_TYPES:
                if user_id not in self.writers:  # the log is ours: anyone else's entry is a forgery
                    self._refuse_entry("forbidden_sender", f"{user_id or 'no user_id'!r} may not write "
                                       f"{message.type} entries (allowed: {', '.join(sorted(self.writers))})")
                    return
                entry = records.decode_entry(message.body)
            else:
                # Entries written before the investigation ledger (bare OperatorFeedback / PhasePin):
                # replayed as they were tallied then, on the sender's ``at`` — the only time they
                # carry. Not from a component that never wrote this log, though.
                if _is_other_component(self.settings, user_id):
                    self._refuse_entry("forbidden_sender", f"{user_id!r} may not write the feedback log")
                    return
                entry = decode(message.body)
        except (DecodeError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            # only valid entries are appended; say so if one is not (markers never reach here)
            log.error("feedback_log_entry_undecodable", error=str(exc)[:200], message_id=message.message_id)
            return
        self.apply(entry)
        waiter = self._applied.get(message.message_id or "")
        if waiter is not None:
            waiter.set()

    def _refuse_entry(self, reason: str, detail: str) -> None:
        self.refused_entries += 1
        if self.metrics is not None:
            self.metrics.refused.labels(reason=reason, kind="log_entry").inc()
        log.warning("feedback_log_entry_refused", reason=reason, detail=detail)

    def apply(self, entry: object) -> PhaseChanged | None:
        change: PhaseChanged | None = None
        if isinstance(entry, InvestigationDispatched | FindingSeen):
            self._clock(entry.recorded_at)
            if isinstance(entry, InvestigationDispatched):
                self.investigations.dispatched(entry)
            else:
                self.investigations.finding(entry)
            if self.metrics is not None:
                self.metrics.investigations.set(len(self.investigations))
            return None
        if isinstance(entry, AdmittedFeedback):
            self._clock(entry.admitted_at)
            why = self.investigations.check(entry.feedback)
            if why is not None:  # admission checked it against this same state: only a forgery gets here
                self._refuse_entry(why[0], why[1])
                return None
            # Decisions run on the admission time, never on the sender's claim.
            return self._feedback(msgspec.structs.replace(entry.feedback, at=entry.admitted_at))
        if isinstance(entry, AdmittedPin):
            self._clock(entry.admitted_at)
            return self._pin(msgspec.structs.replace(entry.pin, at=entry.admitted_at))
        # Legacy entries (logs written before admission times): the sender's ``at`` is all they have.
        if isinstance(entry, OperatorFeedback):
            return self._feedback(entry)
        if isinstance(entry, PhasePin):
            return self._pin(entry)
        return change

    def _clock(self, at: datetime) -> None:
        if self.last_admitted is None or at > self.last_admitted:
            self.last_admitted = at

    def _feedback(self, fb: OperatorFeedback) -> PhaseChanged | None:
        first = not self.ledger.has_seen(fb.scope, fb.feedback_id)
        change = self.ledger.apply_feedback(fb)
        if first and self.metrics is not None:
            self.metrics.feedback.labels(verdict=fb.verdict.value).inc()
            if fb.action:
                self.metrics.action_feedback.labels(action=fb.action, verdict=fb.verdict.value,
                                                    harmful=str(fb.harmful).lower()).inc()
        return self._decided(fb.scope, change)

    def _pin(self, pin: PhasePin) -> PhaseChanged | None:
        if pin.command_id in self._commands:
            return None
        self._commands[pin.command_id] = None
        if len(self._commands) > COMMAND_MEMORY:
            self._commands.popitem(last=False)
        if pin.phase is None:
            change = self.ledger.unpin(pin.scope, operator=pin.operator, at=pin.at)
        else:
            change = self.ledger.pin(pin.scope, pin.phase, reason=pin.reason, operator=pin.operator, at=pin.at)
        return self._decided(pin.scope, change)

    def _decided(self, scope: str, change: PhaseChanged | None) -> PhaseChanged | None:
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
        if self.metrics is not None:
            self.metrics.investigations.set(len(self.investigations))

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
                             commands=list(self._commands), investigations=self.investigations.snapshot(),
                             last_admitted=self.last_admitted)

    def restore(self, snapshot: TrustSnapshot) -> None:
        """The state ``snapshot`` was taken in (the caller checked it belongs to this log)."""
        self.ledger = TrustLedger.restore(self.settings.trust, snapshot.ledger)
        self.decided = dict(snapshot.decided)
        self._commands = OrderedDict.fromkeys(snapshot.commands)
        self.investigations.restore(snapshot.investigations)
        self.last_admitted = snapshot.last_admitted

    # -- the phase log -----------------------------------------------------------------------

    def on_phase_entry(self, message: AbstractIncomingMessage) -> None:
        try:
            change = decode(message.body, PhaseChanged)
        except DecodeError:
            return
        if (message.user_id or "") not in self.writers:
            return  # not ours: the dispatcher ignores it too, so it does not stand for a decision of ours
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
                                  feedback_log: StreamFollower, *, read_only: bool = False) -> TrustSnapshot | None:
    """Put ``state`` where the newest usable snapshot was and make ``feedback_log`` start after it.

    None (and the reason logged): no snapshot fits, replay the whole log.
    """
    try:
        snapshot = await snapshots.newest(connection, timeout=60, writers=state.writers, read_only=read_only)
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


def _kind_of(entry: object) -> str:
    """What an input on agentjobs.feedback is, for the refused counter's ``kind`` label."""
    if isinstance(entry, PhasePin):
        return "phase_pin"
    if isinstance(entry, OperatorFeedback):
        return "feedback"
    return "other"


class Refused(PermanentError):
    """A feedback-queue input refused: dead-lettered with ``reason``, counted under ``kind``."""

    def __init__(self, reason: str, message: str, *, kind: str) -> None:
        super().__init__(reason, message)
        self.kind = kind


class TrustService:
    name = "agentjobs-trust"

    def __init__(self, settings: Settings, *, health_port: int | None = None,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.settings = settings
        self.metrics = TrustMetrics()
        self.user = broker_user(settings.amqp.url)  # who this consumer is on the broker
        self.state = TrustState(settings, self.metrics, writers=(settings.identities.trust, self.user))
        self.clock = clock  # the admission clock: the one place trust reads the wall clock
        self.backoff = Backoff.of(settings.retry)
        self.health_port = settings.metrics.port if health_port is None else health_port
        self._serve_health = health_port is not None or settings.metrics.port != 0
        self.crashed = asyncio.Event()
        self.caught_up = False
        self._connection: AbstractRobustConnection | None = None
        self._publisher: Publisher | None = None
        self._probe: AbstractChannel | None = None
        self._feedback_log = StreamFollower(FEEDBACK_LOG, self.state.on_log_entry, name="feedback-log")
        self._phase_log = StreamFollower(PHASE_LOG, self.state.on_phase_entry, name="phase-log")
        self._consumer = Consumer(FEEDBACK, self.handle, prefetch=1, name="feedback", up=self.metrics.consumer_up)
        self._results = Consumer(TRUST_RESULTS, self.handle_result, prefetch=RESULTS_PREFETCH, name="trust-results",
                                 up=self.metrics.consumer_up)
        self._results_inflight = 0
        self._results_handled = 0  # results deliveries settled (progress of the results queue)
        self._results_stalled_at: int | None = None  # _results_handled when the last drain gave up
        self._health: HealthServer | None = None
        self._lock = asyncio.Lock()  # one log append at a time: log order is decision order
        self._applied_at_snapshot = 0  # feedback-log entries applied when the last snapshot was taken
        self._base_applied = 0  # entries the restored snapshot stood for

    @property
    def ready(self) -> bool:
        return (self.caught_up and self._consumer.consuming and self._results.consuming
                and not self.crashed.is_set())

    async def start(self) -> None:
        s = self.settings
        if self.user != s.identities.trust:
            log.warning("trust_identity_mismatch", user=self.user, expected=s.identities.trust,
                        detail="the dispatcher applies phase changes from the trust identity only")
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
                 phase_entries=self._phase_log.applied, scopes=len(self.state.ledger.phases()),
                 investigations=len(self.state.investigations))
        if s.trust.snapshot_every and self._feedback_log.applied >= s.trust.snapshot_every:
            await self._save_snapshot()  # the next start skips what this one replayed
        await self._results.start(self._connection)
        await self._consumer.start(self._connection)
        if self._serve_health:
            self._health = HealthServer(host=s.metrics.host, port=self.health_port, registry=self.metrics.registry,
                                        ready={"replayed_and_consuming": lambda: self.ready})
            await self._health.start()

    def _admission_time(self) -> datetime:
        """Now, on this consumer's clock — never before what the log already shows (pure over the state)."""
        now = self.clock()
        last = self.state.last_admitted
        return now if last is None or now > last else last

    # -- one feedback delivery ---------------------------------------------------------------

    async def handle(self, delivery: Delivery) -> Outcome:
        try:
            entry = self._validate(delivery)
        except Refused as exc:
            return await self._reject(delivery, exc, kind=exc.kind)
        kind = _kind_of(entry)
        entry_id = entry.feedback_id if isinstance(entry, OperatorFeedback) else entry.command_id
        with bound(entry_id=entry_id, scope=entry.scope):
            try:
                if isinstance(entry, OperatorFeedback) and self.state.investigations.check(entry) is not None:
                    # Its finding may be published but not applied yet: drain the results queue
                    # first (without the lock: its handler needs it).
                    await self._durably(self._results_caught_up)
                async with self._lock:
                    if isinstance(entry, OperatorFeedback):
                        why = self.state.investigations.check(entry)
                        if why is not None:
                            return await self._reject(delivery, Refused(*why, kind=kind), kind=kind)
                        admitted: LogEntry = AdmittedFeedback(feedback=entry, admitted_at=self._admission_time(),
                                                              sender=delivery.user_id)
                    else:
                        admitted = AdmittedPin(pin=entry, admitted_at=self._admission_time(), sender=delivery.user_id)
                    await self._durably(lambda: self._append(admitted, entry_id))
                    for change in self.state.unpublished():
                        await self._durably(lambda change=change: self._publish(change))
                    await self._maybe_snapshot()
            except RetriesExhausted as exc:
                log.warning("feedback_requeued", error=exc.last.message)
                return Outcome.REQUEUE
            return Outcome.ACK

    def _validate(self, delivery: Delivery) -> OperatorFeedback | PhasePin:
        """The decoded input if its sender may send it and it is well formed; else ``Refused``."""
        ids = self.settings.identities
        try:
            entry = decode(delivery.body)
        except DecodeError as exc:
            refused = senders.feedback_sender(ids, delivery.user_id)  # nobody else may send anything here
            if refused is not None:
                raise Refused(refused.reason, refused.detail, kind="undecodable") from exc
            raise Refused(exc.reason, exc.message, kind="undecodable") from exc
        kind = _kind_of(entry)
        if isinstance(entry, PhasePin):
            refused = senders.pin_sender(ids, delivery.user_id)
        else:
            refused = senders.feedback_sender(ids, delivery.user_id)
        if refused is not None:
            raise Refused(refused.reason, refused.detail, kind=kind)
        if not isinstance(entry, OperatorFeedback | PhasePin):
            raise Refused("wrong_kind", f"{type(entry).__name__} does not belong on {FEEDBACK}", kind=kind)
        if isinstance(entry, PhasePin) and entry.phase is not None and not entry.reason.strip():
            raise Refused("invalid_command", "a pin needs a reason", kind=kind)
        if not entry.scope.strip():
            raise Refused("invalid_scope", "scope is empty", kind=kind)
        # The sender's ``at`` is kept in the log as sent and never used: time is the admission
        # time (``_admission_time``), so neither a backdated nor a future timestamp moves anything.
        return entry

    async def _results_caught_up(self) -> None:
        """Return once the results queue holds nothing this consumer has not applied yet.

        Bounded: it gives up when the queue makes no progress for ``RESULTS_STALL`` s (another
        replica may be its active consumer, or it is stuck) or after ``RESULTS_CATCH_UP`` s; and
        after giving up it does not wait again until results are handled here again, so a flood of
        verdicts for made-up investigations cannot queue up behind a stalled results queue.
        """
        loop = asyncio.get_running_loop()
        if self._results_stalled_at is not None and self._results_handled == self._results_stalled_at:
            return
        self._results_stalled_at = None
        deadline = loop.time() + RESULTS_CATCH_UP
        progress, since = self._results_handled, loop.time()
        while True:
            ready = await self._results_ready()
            for _ in range(3):
                await asyncio.sleep(0)  # deliveries read before the answer reach their handler
            if ready == 0 and self._results_inflight == 0:
                return
            now = loop.time()
            if self._results_handled != progress:
                progress, since = self._results_handled, now
            if now >= deadline or now - since >= RESULTS_STALL:
                self._results_stalled_at = self._results_handled
                log.warning("results_not_drained", ready=ready, in_flight=self._results_inflight)
                return
            await asyncio.sleep(0.01)

    async def _results_ready(self) -> int:
        assert self._connection is not None
        try:
            if self._probe is None or self._probe.is_closed:
                self._probe = await self._connection.channel()
            queue = await self._probe.declare_queue(TRUST_RESULTS, passive=True)
        except Exception as exc:  # the channel is gone with the connection; retried in place
            self._probe = None
            raise TemporaryError(f"{TRUST_RESULTS}: cannot read its depth ({exc!r})") from exc
        result = queue.declaration_result
        return int(result.message_count or 0)

    # -- one results delivery (lifecycle.dispatched, finding.#) ------------------------------

    async def handle_result(self, delivery: Delivery) -> Outcome:
        self._results_inflight += 1
        kind = "lifecycle" if delivery.routing_key.startswith("lifecycle.") else "finding"
        try:
            # In delivery order, under the lock: whether a finding's sender is that Job's agent
            # depends on the lifecycle.dispatched before it.
            async with self._lock:
                try:
                    entry = self._result_entry(delivery)
                except PermanentError as exc:
                    return await self._reject(delivery, exc, kind=kind)
                if entry is None:  # nothing new: a redelivery, a finding already seen, another state
                    return Outcome.ACK
                entry = msgspec.structs.replace(entry, recorded_at=self._admission_time())
                entry_id = (f"dispatched:{entry.investigation_id}" if isinstance(entry, InvestigationDispatched)
                            else f"finding:{entry.investigation_id}:{entry.sender}")
                with bound(investigation_id=entry.investigation_id):
                    try:
                        await self._durably(lambda: self._append(entry, entry_id))
                        await self._maybe_snapshot()
                    except RetriesExhausted as exc:
                        log.warning("result_requeued", error=exc.last.message)
                        return Outcome.REQUEUE
            return Outcome.ACK
        finally:
            self._results_inflight -= 1
            self._results_handled += 1

    def _result_entry(self, delivery: Delivery) -> InvestigationDispatched | FindingSeen | None:
        """The record a results message makes (None: nothing to record); PermanentError to refuse it."""
        ids = self.settings.identities
        key = delivery.routing_key
        if key.startswith("lifecycle."):
            refused = senders.one_of(delivery.user_id, [ids.dispatcher], "lifecycle events")
            if refused is not None:
                raise PermanentError(refused.reason, refused.detail)
            try:
                event = records.decode_dispatched(delivery.body)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise PermanentError("invalid_lifecycle", str(exc)[:500]) from exc
            if event.state != "dispatched":
                return None
            if event.phase is None or not event.job_name:
                raise PermanentError("invalid_lifecycle", "lifecycle.dispatched without a phase or Job name")
            if self.state.investigations.get(event.investigation_id) is not None:
                return None  # reported again (a redelivery, or the dispatcher re-reporting after a restart)
            return InvestigationDispatched(investigation_id=event.investigation_id, job_name=event.job_name,
                                           phase=event.phase, scope=event.scope, dispatched_at=event.at,
                                           recorded_at=_EPOCH, sender=delivery.user_id)
        if key.startswith("finding."):
            refused = senders.any_agent_or_dispatcher(ids, delivery.user_id, "findings")
            if refused is not None:
                raise PermanentError(refused.reason, refused.detail)
            try:
                finding = decode(delivery.body, Finding)
            except DecodeError as exc:
                raise PermanentError(exc.reason, exc.message) from exc
            known = self.state.investigations.get(finding.investigation_id)
            if known is not None:
                refused = self.state.investigations.finding_refusal(delivery.user_id, known.job_name)
                if refused is not None:
                    raise PermanentError(refused.reason, refused.detail)
            if not self.state.investigations.needs_finding(finding.investigation_id):
                return None
            return FindingSeen(investigation_id=finding.investigation_id, domain=finding.domain, phase=finding.phase,
                               recorded_at=_EPOCH, sender=delivery.user_id, actions=records.actions_of(finding))
        return None  # not bound here; nothing to record

    # -- snapshots ---------------------------------------------------------------------------

    async def _maybe_snapshot(self) -> None:
        every = self.settings.trust.snapshot_every
        if every and self._feedback_log.applied - self._applied_at_snapshot >= every:
            await self._save_snapshot()

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

    async def _append(self, entry: LogEntry, entry_id: str) -> None:
        """Append to the feedback log and wait until the follower has applied it."""
        assert self._publisher is not None
        waiter = self.state.waiter(entry_id)
        waiter.clear()
        try:
            await self._publisher.publish("", FEEDBACK_LOG, records.encode_entry(entry), message_id=entry_id,
                                          type_=records.entry_type(entry))
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

    async def _reject(self, delivery: Delivery, error: PermanentError, *, kind: str) -> Outcome:
        """Dead-letter with the reason and count it; the caller acks (the consumer's one ack site)."""
        assert self._publisher is not None
        record = from_error(delivery, error, at=utcnow(), component=COMPONENT)
        try:
            await self._durably(lambda: dead_letter(self._publisher, delivery, record))
        except RetriesExhausted:
            return Outcome.REQUEUE
        self.metrics.dead_lettered.labels(reason=error.reason).inc()
        self.metrics.refused.labels(reason=error.reason, kind=kind).inc()
        log.warning("trust_input_dead_lettered", kind=kind, reason=error.reason, detail=error.message,
                    sender=delivery.user_id or None)
        return Outcome.ACK

    # -- lifecycle ---------------------------------------------------------------------------

    async def stop(self) -> None:
        await self._consumer.stop(drain_timeout=10)
        await self._results.stop(drain_timeout=10)
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
