"""``agentjobs tickets``: keeps one ticket per investigation, and reads operators' verdicts back.

Its own queue ``agentjobs.tickets`` (quorum, dead-lettering, single active consumer, declared
by this connector only — no connector, no queue filling up) is bound to the results exchange
for ``lifecycle.#`` and ``finding.#``. Handling one result:

1. check the broker-validated sender: lifecycle events from the dispatcher only, findings from
   the dispatcher or the agent of that investigation's Job; anything else is dead-lettered
   ``forbidden_sender``, as is a message that does not decode (with the decoder's reason);
2. plan the ticket operations (``plan``, pure);
3. apply them through the backend, one investigation at a time; a temporary failure
   (Redmine down, 5xx, timeouts) is retried with backoff *in place*, for as long as it lasts —
   the message stays unacked, so nothing is lost and the queue's delivery limit is not spent on
   an outage; a permanent one (the system refuses the content) is dead-lettered with the reason;
4. ack (the consumer's one ack site).

Exactly one ticket per investigation comes from the backend's lookup by key before every
create, and each note from its op id (``plan``); redeliveries, restarts and lost answers write
nothing twice.

Where the backend reads tickets back (Redmine), a poller looks every ``poll_interval`` seconds
for tickets closed since the last look, turns each operator's closing into ``OperatorFeedback``
(``verdicts``), publishes it to ``agentjobs.feedback`` under the ticketing identity (confirmed),
then notes the verdict privately on the ticket. The feedback id is per closing, so a second look
at the same ticket counts once even if the note was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

import aio_pika
import hvac
from aio_pika.abc import AbstractRobustConnection
from prometheus_client import CollectorRegistry, Counter

from schemas import Finding, LifecycleEvent, LifecycleState, decode, utcnow
from schemas.errors import DecodeError, PermanentError, TemporaryError
from schemas.logs import bound, get_logger
from schemas.routing import DEAD, FEEDBACK, RESULTS, feedback_key

from dispatcher.intake import senders
from dispatcher.intake.consumer import Consumer
from dispatcher.intake.deadletters import Delivery, dead_letter, from_error
from dispatcher.intake.incidents import Outcome
from dispatcher.plumbing.amqp import Publisher, connect
from dispatcher.plumbing.health import HealthServer
from dispatcher.plumbing.identities import TICKETS_QUEUE
from dispatcher.plumbing.metrics import consumer_up
from dispatcher.plumbing.retry import Backoff, retry
from dispatcher.plumbing.settings import Settings
from dispatcher.plumbing.tasks import run_until_signalled, spawn
from dispatcher.tickets import plan as planning
from dispatcher.tickets.backend import Backend, Closed
from dispatcher.tickets.verdicts import verdict

log = get_logger("agentjobs.tickets")
COMPONENT = "tickets"
BINDINGS = ("lifecycle.#", "finding.#")
SCOPES_REMEMBERED = 10_000  # dispatched scopes kept for the findings that follow
POLL_OVERLAP = timedelta(seconds=60)  # each look re-reads this much before the last one (clock skew)
T = TypeVar("T")


class TicketsMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.results = Counter("agentjobs_tickets_results_total",
                               "Results handled, by kind (lifecycle, finding) and outcome "
                               "(applied, dead_lettered, ignored)", ["kind", "outcome"], registry=r)
        self.backend_errors = Counter("agentjobs_tickets_backend_errors_total",
                                      "Ticketing-system calls that failed, by backend and kind (temporary, permanent)",
                                      ["backend", "kind"], registry=r)
        self.feedback = Counter("agentjobs_tickets_feedback_published_total",
                                "Operators' verdicts read off closed tickets and published, by verdict",
                                ["verdict"], registry=r)
        self.dead_lettered = Counter("agentjobs_dead_lettered_total", "Messages dead-lettered, by reason",
                                     ["reason"], registry=r)
        self.consumer_up = consumer_up(r)

    def expect(self, backend: str) -> None:
        """Create the series alerts count with ``increase()`` at 0, so a first error shows as one."""
        for kind in ("temporary", "permanent"):
            self.backend_errors.labels(backend=backend, kind=kind)


class KeyedLocks:
    """One lock per key, forgotten when nobody holds or waits for it: one investigation at a time."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key], self._locks[key]


def tickets_queue_arguments(delivery_limit: int) -> dict[str, Any]:
    return {"x-queue-type": "quorum", "x-single-active-consumer": True, "x-delivery-limit": delivery_limit,
            "x-dead-letter-exchange": DEAD, "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish"}


def read_secret(settings: Settings, key: str) -> str:
    """``key`` of the kv-v2 secret at ``tickets.secret_path``, read with ``vault.token``/``token_file``."""
    from dispatcher.credentials.tokens import dispatcher_token

    try:
        token = dispatcher_token(settings.vault)
    except OSError as exc:
        raise TemporaryError(f"vault.token_file: cannot read {settings.vault.token_file}: {exc.strerror}") from None
    if not token:
        raise TemporaryError(f"no Vault token to read {settings.tickets.secret_path} (vault.token or vault.token_file)")
    client = hvac.Client(url=settings.vault.addr, token=token, timeout=settings.vault.request_timeout,
                         verify=settings.vault.ca_cert or True)
    try:
        answer = client.read(settings.tickets.secret_path)
    except hvac.exceptions.Forbidden:
        raise TemporaryError(f"permission denied reading {settings.tickets.secret_path} "
                             "(the tickets connector's policy is agentjobs-tickets)") from None
    except Exception as exc:  # noqa: BLE001 - unreachable, sealed: the connector cannot start
        raise TemporaryError(f"cannot read {settings.tickets.secret_path} from Vault: {type(exc).__name__}") from None
    value = ((answer or {}).get("data") or {}).get("data", {}).get(key, "")
    if not value:
        raise TemporaryError(f"{settings.tickets.secret_path} has no {key!r}")
    return str(value)


def open_backend(settings: Settings) -> Backend:
    """The configured backend, its secret from Vault unless the settings hold one (development)."""
    t = settings.tickets
    url = t.webhook.url if t.backend == "webhook" else t.redmine.url
    if not url:
        raise ValueError(f"tickets.{t.backend}.url is not set (AGENTJOBS_TICKETS__{t.backend.upper()}__URL)")
    if t.backend == "webhook":
        from dispatcher.tickets.webhook import WebhookBackend

        return WebhookBackend(t.webhook, secret=t.webhook.secret or read_secret(settings, "webhook_secret"))
    from dispatcher.tickets.redmine import RedmineBackend

    return RedmineBackend(t.redmine, api_key=t.redmine.api_key or read_secret(settings, "redmine_api_key"))


class TicketsService:
    name = "agentjobs-tickets"

    def __init__(self, settings: Settings, *, backend: Backend | None = None, health_port: int | None = None,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.settings = settings
        self.metrics = TicketsMetrics()
        self.backend = backend
        self.clock = clock
        self.backoff = Backoff(base=settings.retry.base, cap=settings.retry.cap, max_elapsed=math.inf)
        self.health_port = settings.metrics.port if health_port is None else health_port
        self._serve_health = health_port is not None or settings.metrics.port != 0
        self.crashed = asyncio.Event()
        self._connection: AbstractRobustConnection | None = None
        self._publisher: Publisher | None = None
        self._consumer = Consumer(TICKETS_QUEUE, self.handle, prefetch=settings.tickets.prefetch, name="tickets",
                                  up=self.metrics.consumer_up)
        self.metrics.expect(backend.name if backend is not None else settings.tickets.backend)
        self._locks = KeyedLocks()
        self._scopes: OrderedDict[str, str] = OrderedDict()
        self._since: datetime | None = None
        self._poller: asyncio.Task[None] | None = None
        self._health: HealthServer | None = None

    @property
    def ready(self) -> bool:
        return self._consumer.consuming and not self.crashed.is_set()

    async def start(self) -> None:
        s = self.settings
        if self.backend is None:
            self.backend = open_backend(s)
        await self.backend.start()
        self._connection = await connect(s.amqp, name=self.name)
        try:
            channel = await self._connection.channel()
            queue = await channel.declare_queue(TICKETS_QUEUE, durable=True,
                                                arguments=tickets_queue_arguments(s.amqp.delivery_limit))
            for key in BINDINGS:
                await queue.bind(RESULTS, routing_key=key)
            await channel.close()
        except aio_pika.exceptions.AMQPError as exc:
            raise TemporaryError(f"cannot declare {TICKETS_QUEUE} on {RESULTS} (is the dispatcher's topology "
                                 f"declared, and may {s.identities.ticketing} configure it?): {exc!r}") from exc
        self._publisher = await Publisher.open(self._connection, s.amqp)
        await self._consumer.start(self._connection)
        if self.backend.feedback:
            self._since = self.clock() - timedelta(seconds=s.tickets.lookback)
            self._poller = spawn(self._poll_forever(), name="tickets-poller", on_crash=lambda *_: self.crashed.set())
        if self._serve_health:
            self._health = HealthServer(host=s.metrics.host, port=self.health_port, registry=self.metrics.registry,
                                        ready={"consuming": lambda: self.ready})
            await self._health.start()
        log.info("tickets_started", backend=self.backend.name, queue=TICKETS_QUEUE, feedback=self.backend.feedback)

    # -- one result ----------------------------------------------------------------------

    async def handle(self, delivery: Delivery) -> Outcome:
        key = delivery.routing_key
        kind = "lifecycle" if key.startswith("lifecycle.") else "finding" if key.startswith("finding.") else ""
        if not kind:
            self.metrics.results.labels(kind="other", outcome="ignored").inc()
            return Outcome.ACK  # not bound here (a binding added by hand): nothing for a ticket
        try:
            work = self._plan(delivery, kind)
        except PermanentError as exc:
            return await self._reject(delivery, exc, kind=kind)
        with bound(investigation_id=work.opening.key, event=work.kind):
            try:
                async with self._locks.hold(work.opening.key):
                    applied = await self._hold(lambda: self.backend.apply(work))  # type: ignore[union-attr]
            except PermanentError as exc:
                self.metrics.backend_errors.labels(backend=self._backend_name, kind="permanent").inc()
                return await self._reject(delivery, exc, kind=kind)
            self.metrics.results.labels(kind=kind, outcome="applied").inc()
            log.info("ticket_updated", ticket=applied.ticket, created=applied.created, notes_written=applied.written)
        return Outcome.ACK

    def _plan(self, delivery: Delivery, kind: str) -> planning.Plan:
        """The plan for a result, or ``PermanentError`` (forbidden sender, undecodable)."""
        ids = self.settings.identities
        k8s_auth = self.settings.vault.auth_mode == "kubernetes"
        if kind == "lifecycle":
            refused = senders.one_of(delivery.user_id, [ids.dispatcher], "lifecycle events")
            if refused is not None:
                raise PermanentError(refused.reason, refused.detail)
            event = self._decode(delivery.body, LifecycleEvent)
            if event.state in (LifecycleState.DISPATCHED, LifecycleState.ATTACHED) and event.scope:
                self._remember_scope(event.investigation_id, event.scope)
            return planning.for_lifecycle(event)
        finding = self._decode(delivery.body, Finding)
        refused = senders.finding_of_investigation(ids, delivery.user_id, finding.investigation_id,
                                                   kubernetes_auth=k8s_auth)
        if refused is not None:
            raise PermanentError(refused.reason, refused.detail)
        return planning.for_finding(finding, shadow=self.settings.tickets.shadow,
                                    scope=self._scopes.get(finding.investigation_id, ""))

    @staticmethod
    def _decode(body: bytes, type_: type[T]) -> T:
        try:
            return decode(body, type_)
        except DecodeError as exc:
            raise PermanentError(exc.reason, exc.message) from exc

    def _remember_scope(self, investigation_id: str, scope: str) -> None:
        self._scopes[investigation_id] = scope
        self._scopes.move_to_end(investigation_id)
        while len(self._scopes) > SCOPES_REMEMBERED:
            self._scopes.popitem(last=False)

    @property
    def _backend_name(self) -> str:
        return self.backend.name if self.backend is not None else "none"

    async def _hold(self, work: Callable[[], Awaitable[T]]) -> T:
        """Run ``work`` until it succeeds or fails permanently; temporary failures wait and retry."""
        def on_retry(attempt: int, exc: TemporaryError, wait: float) -> None:
            self.metrics.backend_errors.labels(backend=self._backend_name, kind="temporary").inc()
            log.warning("ticket_backend_unavailable", attempt=attempt, error=exc.message, retry_in_s=round(wait, 2))

        return await retry(work, self.backoff, on_retry=on_retry)

    async def _reject(self, delivery: Delivery, error: PermanentError, *, kind: str) -> Outcome:
        assert self._publisher is not None
        record = from_error(delivery, error, at=utcnow(), component=COMPONENT)
        await self._hold(lambda: dead_letter(self._publisher, delivery, record))  # type: ignore[arg-type]
        self.metrics.dead_lettered.labels(reason=error.reason).inc()
        self.metrics.results.labels(kind=kind, outcome="dead_lettered").inc()
        log.warning("result_dead_lettered", reason=error.reason, detail=error.message, sender=delivery.user_id or None)
        return Outcome.ACK

    # -- verdicts from closed tickets ------------------------------------------------------

    async def _poll_forever(self) -> None:
        while True:
            try:
                await self.poll_once()
            except TemporaryError as exc:
                self.metrics.backend_errors.labels(backend=self._backend_name, kind="temporary").inc()
                log.warning("ticket_poll_failed", error=exc.message)
            await asyncio.sleep(self.settings.tickets.poll_interval)

    async def poll_once(self) -> int:
        """Read tickets closed since the last look; publish a verdict for each new closing. Returns
        how many verdicts were published."""
        assert self.backend is not None and self._since is not None
        started = self.clock()
        published = 0
        for closed in await self.backend.closed_since(self._since - POLL_OVERLAP):
            published += await self._verdict(closed)
        self._since = started
        return published

    async def _verdict(self, closed: Closed) -> int:
        if closed.verdict_noted:
            return 0
        with bound(ticket=closed.ticket, investigation_id=closed.key):
            try:
                feedback = verdict(closed, at=self.clock())
            except ValueError as exc:  # e.g. a record without scope or domain
                feedback = f"unusable_record: {exc}"
            if isinstance(feedback, str):
                log.info("ticket_closed_without_verdict", why=feedback)
                return 0
            assert self._publisher is not None
            await self._hold(lambda: self._publisher.publish_message(  # type: ignore[union-attr]
                FEEDBACK, feedback_key(feedback.verdict.value, feedback.scope), feedback,
                message_id=feedback.feedback_id, mandatory=True))
            self.metrics.feedback.labels(verdict=feedback.verdict.value).inc()
            log.info("ticket_verdict_published", verdict=feedback.verdict.value, changed=list(feedback.changed_fields),
                     operator=feedback.operator, feedback_id=feedback.feedback_id)
            text = (f"agentjobs read this closing as: {feedback.verdict.value}"
                    + (f" (changed: {', '.join(feedback.changed_fields)})" if feedback.changed_fields else "")
                    + f"; feedback {feedback.feedback_id}.")
            with contextlib.suppress(TemporaryError, PermanentError):  # the feedback id dedups a re-read
                await self.backend.note_verdict(closed, text)  # type: ignore[union-attr]
            return 1

    # -- lifecycle -----------------------------------------------------------------------

    async def stop(self, drain: float = 10.0) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._poller
        await self._consumer.stop(drain_timeout=drain)
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._connection.close(), timeout=5)
        if self.backend is not None:
            await self.backend.close()
        if self._health is not None:
            await self._health.stop()
        log.info("tickets_stopped")

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT (exit 0); 2 if it cannot start."""
        return await run_until_signalled(start=self.start, stop=self.stop, crashed=self.crashed, name="tickets")
