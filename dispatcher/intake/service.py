"""``agentjobs dispatcher``: wires settings, broker, runtime and handlers into one service.

Start order: connect → declare topology → publisher → watcher → consumers →
health server. Stop order (SIGTERM): stop consuming and drain in-flight
deliveries, stop the watcher, close the runtime, close the connection. A
crashed background task stops the service (non-zero exit) instead of
leaving a half-working process that still looks alive.

Besides its own work it samples what Prometheus alerts on: the depth and consumers of the
queues (``QueueDepths``, every 15 s, exact counts from passive declares), investigations
active by class and by phase, and when an incident was last settled off the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import ChannelNotFoundEntity

from dispatcher.intake.actions_log import ActionLog
from dispatcher.intake.admission import AdmissionGate
from dispatcher.plumbing.amqp import Publisher, connect
from dispatcher.intake.consumer import Consumer
from dispatcher.intake.approvals import Approvals
from dispatcher.intake.control import ControlHandler, DeadLetterRecorder, LoginTokenRecorder
from dispatcher.intake.costs import CostRecorder
from dispatcher.credentials.tokens import Credentials, VaultCredentials, open_credentials
from dispatcher.plumbing.health import HealthServer
from dispatcher.intake.deadletters import Delivery
from dispatcher.intake.incidents import Intake, Outcome
from schemas import Phase
from schemas.logs import get_logger
from dispatcher.plumbing.metrics import NO_PHASE, Metrics
from dispatcher.plumbing.identities import TICKETS_QUEUE
from dispatcher.intake.phases import LoggedPhases, PhaseSource
from dispatcher.intake.reporting import Reporter
from dispatcher.plumbing.retry import Backoff, retry
from dispatcher.jobs.runtime import JobRuntime
from dispatcher.plumbing.settings import Settings
from dispatcher.plumbing.streamlog import StreamFollower
from dispatcher.plumbing.tasks import run_until_signalled, spawn
from dispatcher.credentials.token_sweep import TokenSweeper
from dispatcher.plumbing.topology import TRUST_RESULTS, declare, dispatcher_topology
from schemas.routing import ACTION_LOG, CONTROL, COSTS, CREDENTIALS, DEAD, DEAD_LOG, FEEDBACK, INCIDENTS, PHASE_LOG
from dispatcher.intake.tracker import Tracked, Tracker
from dispatcher.intake.watcher import Watcher

GC_THRESHOLDS = (50_000, 20, 100)  # gen0 allocations, gen0 runs per gen1, gen1 runs per gen2 (default 700, 10, 10)
log = get_logger("agentjobs.dispatcher")
QUEUE_SAMPLE_INTERVAL = 15.0  # seconds between samples of the queues' depths
# Declared by the dispatcher's topology: always there.
SAMPLED_QUEUES = (INCIDENTS, DEAD, DEAD_LOG, CONTROL, COSTS, FEEDBACK, TRUST_RESULTS)
# Declared by their own component when it runs (`agentjobs tickets`): sampled while they exist.
OPTIONAL_QUEUES = (TICKETS_QUEUE,)
CONSUMED_QUEUES = (INCIDENTS, CONTROL, DEAD_LOG, COSTS)  # (and CREDENTIALS with kubernetes auth)


class QueueDepths:
    """Samples ready messages and consumers per queue into gauges; a failed sample never stops anything.

    Each queue is declared passively on a plain channel of its own: a queue that does not exist
    closes the channel it was asked on (404), and a robust channel would reopen itself after it.
    A queue that is gone loses its series (no stale depth); any other failure keeps the last one.
    """

    def __init__(self, metrics: Metrics, connection: Callable[[], AbstractRobustConnection | None], *,
                 queues: Sequence[str] = SAMPLED_QUEUES, optional: Sequence[str] = OPTIONAL_QUEUES,
                 interval: float = QUEUE_SAMPLE_INTERVAL) -> None:
        self.metrics = metrics
        self.connection = connection
        self.queues = tuple(queues)
        self.optional = frozenset(optional)
        self.interval = interval
        self.samples = 0  # completed sampling rounds

    async def run(self) -> None:
        """Sample now and every ``interval`` seconds until cancelled."""
        while True:
            await self.sample()
            await asyncio.sleep(self.interval)

    async def sample(self) -> dict[str, tuple[int, int] | None]:
        """One round: (messages, consumers) per queue, None where the queue does not exist."""
        found: dict[str, tuple[int, int] | None] = {}
        connection = self.connection()
        if connection is None or connection.is_closed or not connection.connected.is_set():
            log.debug("queue_sample_skipped", reason="not connected")  # consumer_up says so already
            return found
        for name in (*self.queues, *sorted(self.optional - set(self.queues))):
            try:
                found[name] = counts = await self._declare(connection, name)
            except ChannelNotFoundEntity:
                found[name] = None
                self._forget(name)
                if name not in self.optional:
                    log.warning("queue_sample_missing", queue=name)
                continue
            except Exception as exc:  # broker away, channel limit, …: the next round tries again
                log.warning("queue_sample_failed", queue=name, error=repr(exc))
                continue
            self.metrics.queue_messages.labels(queue=name).set(counts[0])
            self.metrics.queue_consumers.labels(queue=name).set(counts[1])
        self.samples += 1
        return found

    async def _declare(self, connection: AbstractRobustConnection, name: str) -> tuple[int, int]:
        async with asyncio.timeout(5), aio_pika.Channel(connection, publisher_confirms=False) as channel:
            queue = await channel.declare_queue(name, passive=True)
            result = queue.declaration_result
            return int(result.message_count or 0), int(result.consumer_count or 0)

    def _forget(self, name: str) -> None:
        for gauge in (self.metrics.queue_messages, self.metrics.queue_consumers):
            with contextlib.suppress(KeyError):
                gauge.remove(name)


def active_by_phase(tracked: Iterable[Tracked]) -> dict[str, int]:
    """Running investigations per phase label, every phase present (pure over tracker entries)."""
    counts = Counter(t.phase.value if t.phase is not None else NO_PHASE for t in tracked)
    return {label: counts.get(label, 0) for label in (*(p.value for p in Phase), NO_PHASE)}


class DispatcherService:
    def __init__(
        self,
        settings: Settings,
        runtime: JobRuntime,
        *,
        phases: PhaseSource | None = None,
        metrics: Metrics | None = None,
        credentials: Credentials | None = None,
        name: str = "agentjobs-dispatcher",
        health_port: int | None = None,
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        # Phases come from the trust consumer's phase log unless a source is given (tests, tools).
        self.phase_log: StreamFollower | None = None
        if phases is None:
            logged = LoggedPhases(settings.trust.initial_phase, trust_user=settings.identities.trust,
                                  on_refused=lambda: self.metrics.phase_changes_refused.inc())
            self.phase_log = StreamFollower(PHASE_LOG, logged.on_log_entry, name="phase-log")
            phases = logged
        self.phases = phases
        self.metrics = metrics or Metrics()
        self.credentials = credentials or open_credentials(settings.vault, scope=runtime.where, metrics=self.metrics)
        self.name = name
        # An explicit port (0: any free one) always serves; from settings, port 0 disables.
        self.health_port = settings.metrics.port if health_port is None else health_port
        self._serve_health = health_port is not None or settings.metrics.port != 0
        self.gate = AdmissionGate(
            max_active=settings.admission.max_active,
            class_caps={k: c.max_active for k, c in settings.classes.items()},
        )
        self.tracker = Tracker()
        # Executions agents reported (agentjobs.action-log) and the reservations of running Jobs.
        self.actions = ActionLog(settings=settings.actions, identities=settings.identities,
                                 running=self._running)
        self.action_log = StreamFollower(ACTION_LOG, self.actions.on_log_entry, name="action-log")
        self.crashed = asyncio.Event()
        self._connection: AbstractRobustConnection | None = None
        self._consumers: list[Consumer] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._health: HealthServer | None = None
        self.intake: Intake | None = None
        self.sweeper: TokenSweeper | None = None
        self.queue_depths = QueueDepths(self.metrics, lambda: self._connection)
        for queue in CONSUMED_QUEUES:  # 0 until start() subscribes: a start stuck replaying shows
            self.metrics.consumer_up.labels(queue=queue).set(0)

    @property
    def ready(self) -> bool:
        return bool(self._consumers) and all(c.consuming for c in self._consumers) and not self.crashed.is_set()

    def _running(self, investigation_id: str) -> bool:
        tracked = self.tracker.get(investigation_id)
        return tracked is not None and not tracked.finished

    def _on_crash(self, name: str, exc: BaseException) -> None:
        self.crashed.set()

    async def start(self) -> None:
        s = self.settings
        self._connection = await connect(s.amqp, name=self.name)
        channel = await self._connection.channel()
        await declare(channel, dispatcher_topology(s.amqp))
        await channel.close()
        if self.phase_log is not None:  # replay every phase change before the first Job is built
            await self.phase_log.start(self._connection)
            await self.phase_log.catch_up(self._connection, timeout=60)
        # the last hour's executions before the first Job's allowance is computed
        await self.action_log.start(self._connection)
        await self.action_log.catch_up(self._connection, timeout=60)
        publisher = await Publisher.open(self._connection, s.amqp)
        reporter = Reporter(publisher)
        self.intake = Intake(
            settings=s, runtime=self.runtime, publisher=publisher, gate=self.gate, tracker=self.tracker,
            phases=self.phases, metrics=self.metrics, backoff=Backoff.of(s.retry), credentials=self.credentials,
            actions=self.actions,
        )
        watcher = Watcher(runtime=self.runtime, reporter=reporter, gate=self.gate, tracker=self.tracker,
                          metrics=self.metrics, credentials=self.credentials)
        self._tasks.append(spawn(watcher.run(), name="watcher", on_crash=self._on_crash))
        self._tasks.append(spawn(self._gauges(), name="gauges", on_crash=self._on_crash))
        self._tasks.append(spawn(self.queue_depths.run(), name="queue-depths", on_crash=self._on_crash))
        self.sweeper = self._sweeper(self.intake)
        if self.sweeper is not None:
            self._tasks.append(spawn(self.sweeper.run(), name="token-sweeper", on_crash=self._on_crash))
        backoff = Backoff.of(s.retry)
        connection = self._connection
        approvals = Approvals(log_=self.actions, settings=s.actions, identities=s.identities,
                              launch=self.intake.launch_approved,
                              publish=lambda record: retry(lambda: reporter.action(record), backoff),
                              catch_up=lambda: self.action_log.catch_up(connection, timeout=5),
                              scope_of=self.actions.scope_for)
        control = ControlHandler(runtime=self.runtime, publisher=publisher, identities=s.identities,
                                 metrics=self.metrics, backoff=backoff, approvals=approvals)
        recorder = DeadLetterRecorder(reporter=reporter, metrics=self.metrics, backoff=backoff)
        up = self.metrics.consumer_up
        self._consumers = [
            Consumer(INCIDENTS, self._handle_incident, prefetch=s.amqp.prefetch, name="incidents", up=up,
                     batch_acks=True),  # an incident's ACK means its outcome is durable
            Consumer(CONTROL, control.handle, prefetch=16, name="control", up=up),
            Consumer(DEAD_LOG, recorder.handle, prefetch=64, name="dead-letter-recorder", up=up),
            Consumer(COSTS, CostRecorder(metrics=self.metrics, publisher=publisher, identities=s.identities,
                                         backoff=backoff).handle, prefetch=64, name="cost-recorder", up=up),
        ]
        if s.vault.auth_mode == "kubernetes":
            logins = LoginTokenRecorder(runtime=self.runtime, credentials=self.credentials, publisher=publisher,
                                        identities=s.identities, metrics=self.metrics, backoff=backoff)
            self._consumers.append(Consumer(CREDENTIALS, logins.handle, prefetch=16, name="login-tokens", up=up))
        for consumer in self._consumers:
            await consumer.start(self._connection)
        if self._serve_health:
            self._health = HealthServer(
                host=s.metrics.host, port=self.health_port, registry=self.metrics.registry,
                ready={"consuming": lambda: self.ready},
            )
            await self._health.start()
        # What exists now (modules, clients, settings) lives as long as the process: keep it out
        # of the collector's scans — full collections were the dispatcher's latency tail. And
        # collect the young generation less often (GC_THRESHOLDS): an incident's short-lived
        # objects (manifest dicts, frames, futures) then die young instead of being promoted
        # into the generations whose collections scan every tracked investigation.
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        log.info("dispatcher_started", runtime=type(self.runtime).__name__, prefetch=s.amqp.prefetch,
                 max_active=s.admission.max_active)

    def _sweeper(self, intake: Intake) -> TokenSweeper | None:
        """Revokes agent tokens no live Job holds — when tokens are minted here and sweeping is on."""
        vault = self.settings.vault
        credentials = self.credentials
        if (vault.auth_mode != "per-investigation" or not vault.sweep_interval
                or not isinstance(credentials, VaultCredentials) or not credentials.scope):
            return None
        if vault.sweep_grace <= self.settings.retry.max_elapsed + vault.request_timeout:
            log.warning("token_sweep_grace_short", sweep_grace_s=vault.sweep_grace,
                        launch_window_s=self.settings.retry.max_elapsed + vault.request_timeout,
                        hint="another replica may still be creating the Job of a token this young; "
                             "raise vault.sweep_grace above retry.max_elapsed when running replicas")
        return TokenSweeper(credentials=credentials, runtime=self.runtime, scope=credentials.scope,
                            grace=vault.sweep_grace, interval=vault.sweep_interval, launching=intake.launching,
                            metrics=self.metrics)

    async def _handle_incident(self, delivery: Delivery) -> Outcome:
        """The intake's handler, noting when a delivery left the queue (a requeue is no progress)."""
        assert self.intake is not None
        outcome = await self.intake.handle(delivery)
        if outcome is Outcome.ACK:
            self.metrics.last_consumed.set_to_current_time()
        return outcome

    async def _gauges(self) -> None:
        while True:
            self.metrics.waiting.set(self.gate.waiting)
            by_class = self.gate.active_by_class()
            for class_name in self.settings.classes:
                self.metrics.active.labels(job_class=class_name).set(by_class.get(class_name, 0))
            for phase, count in active_by_phase(self.tracker.active()).items():
                self.metrics.active_by_phase.labels(phase=phase).set(count)
            await asyncio.sleep(1.0)

    async def stop(self, *, drain_timeout: float = 30.0) -> None:
        log.info("dispatcher_stopping")
        for consumer in self._consumers:
            await consumer.stop(drain_timeout=drain_timeout)
        if self.phase_log is not None:
            await self.phase_log.stop()
        await self.action_log.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await self.runtime.close()
        with contextlib.suppress(Exception):
            await self.credentials.close()
        if self._connection is not None:
            with contextlib.suppress(Exception):  # a broker that is away must not hold up the exit
                await asyncio.wait_for(self._connection.close(), timeout=5)
        if self._health is not None:
            await self._health.stop()
        log.info("dispatcher_stopped")

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT (exit 0), a crashed task (1), or a failed start (2)."""
        return await run_until_signalled(start=self.start, stop=lambda drain: self.stop(drain_timeout=drain),
                                         crashed=self.crashed, name="dispatcher")
