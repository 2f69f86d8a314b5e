"""Turns runtime events into what tickets see, and frees admission slots.

For every Job: ``started`` when its agent runs, then exactly one terminal
lifecycle event, and for every ending other than success an inconclusive
result carrying the reason (see ``reporting``) — unless the agent's exit code
says its own finding was confirmed (0, or 5: stopped by SIGTERM after
publishing a partial finding from what it had observed), so a ticket gets one
finding per investigation. A Job cancelled because its alert resolved (the
runtime returns the cancel's reason as the event's message) ends
``cancelled`` with reason ``alert_resolved``. Publishing is retried until
the broker confirms — a terminal state is never dropped because RabbitMQ
hiccupped. An ending is reported only after its ``dispatched``: if nobody
here confirmed it (the launching dispatcher died between the Job and the
publish), it goes first (same message id), so an acknowledged ending means
the ticket had both and a restarted intake never re-announces it. Jobs first seen here (launched by another replica, or before a
restart) are counted against the caps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

from schemas import AgentExit, LifecycleState

from dispatcher.jobs import jobspec
from dispatcher.intake.admission import AdmissionGate
from dispatcher.credentials.tokens import Credentials, Expected, NoCredentials
from schemas.logs import bound, get_logger
from dispatcher.plumbing.metrics import Metrics
from dispatcher.intake.reporting import Reporter, dispatched_late, failure_result, lifecycle_for
from schemas.routing import lifecycle_key
from dispatcher.plumbing.retry import Backoff, retry
from dispatcher.jobs.runtime import JobRuntime, RuntimeEvent
from dispatcher.intake.tracker import Tracked, Tracker, from_job

log = get_logger("agentjobs.watcher")
# Reporting a terminal state never gives up; it only backs off.
REPORT_BACKOFF = Backoff(base=0.1, cap=2.0, max_elapsed=float("inf"))
CONCURRENT_ENDINGS = 32  # endings reported in parallel, so one slow report blocks no other


def _tracked_from_labels(event: RuntimeEvent) -> Tracked:
    # Launched elsewhere (another replica, or before a crash) — maybe without telling the
    # ticket; the next notification for it re-publishes `dispatched` (same message id).
    return from_job(investigation_id=event.investigation_id, job_name=event.job_name, labels=event.labels,
                    annotations=event.annotations)


def agent_published(event: RuntimeEvent) -> bool:
    """The agent's exit code says its own finding (complete or partial) was confirmed (pure)."""
    try:
        return event.exit_code is not None and AgentExit(event.exit_code).published
    except ValueError:
        return False


class Watcher:
    def __init__(
        self, *, runtime: JobRuntime, reporter: Reporter, gate: AdmissionGate, tracker: Tracker, metrics: Metrics,
        credentials: Credentials | None = None,
    ) -> None:
        self.credentials: Credentials = credentials or NoCredentials()
        self.runtime = runtime
        self.reporter = reporter
        self.gate = gate
        self.tracker = tracker
        self.metrics = metrics
        self._failure: BaseException | None = None

    async def run(self) -> None:
        """Consume runtime events until cancelled; each ending is reported in its own task."""
        limit = asyncio.Semaphore(CONCURRENT_ENDINGS)
        endings: set[asyncio.Task[None]] = set()

        async def report(event: RuntimeEvent) -> None:
            async with limit:
                with bound(investigation_id=event.investigation_id, job_name=event.job_name):
                    await self.handle(event)

        try:
            async for event in self.runtime.events():
                if self._failure is not None:
                    raise self._failure  # a report crashed: stop the service rather than go deaf
                if not event.state.terminal:
                    with bound(investigation_id=event.investigation_id, job_name=event.job_name):
                        await self.handle(event)
                    continue
                await limit.acquire()  # back-pressure: do not read ahead without bound
                limit.release()
                task = asyncio.create_task(report(event), name=f"report-{event.job_name}")
                endings.add(task)
                task.add_done_callback(endings.discard)
                task.add_done_callback(self._check)
        finally:
            for task in endings:
                task.cancel()

    def _check(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("report_crashed", task=task.get_name(), error=repr(task.exception()))
            self._failure = task.exception()

    async def handle(self, event: RuntimeEvent) -> None:
        tracked = self.tracker.get(event.investigation_id)
        if tracked is None:
            tracked = self.tracker.add(_tracked_from_labels(event))
        if not event.state.terminal:
            self.gate.occupy(event.investigation_id, tracked.class_name)
            lifecycle = lifecycle_for(event, tracked)
            await self._publish(lambda: self.reporter.lifecycle(lifecycle))
            log.info("job_started")
            return
        revoked = await self._revoke_tokens(event, event.annotations, set())  # first: nothing outlives the Job
        if not tracked.dispatch_reported:  # its launcher died before telling: the ticket hears it first
            dispatched = dispatched_late(event, tracked)
            await self._publish(lambda: self.reporter.lifecycle(dispatched))
            tracked.dispatch_reported = True
        lifecycle = lifecycle_for(event, tracked)
        await self._publish(lambda: self.reporter.lifecycle(lifecycle))
        if lifecycle.state is not LifecycleState.SUCCEEDED and not agent_published(event):
            result = failure_result(lifecycle, severity=tracked.severity, domain=tracked.domain)
            await self._publish(lambda: self.reporter.finding(result))
        final: list[Mapping[str, str] | None] = []

        async def acknowledge() -> None:
            final.append(await self.runtime.acknowledge(event))

        await self._publish(acknowledge)
        if final and final[-1]:
            await self._revoke_tokens(event, final[-1], revoked)  # e.g. a login token recorded late
        self.gate.release(event.investigation_id)
        self.tracker.finish(event.investigation_id, at=event.at)
        reason = lifecycle.reason.value if lifecycle.reason else ""
        self.metrics.outcomes.labels(state=lifecycle.state.value, reason=reason).inc()
        log.info("job_finished", state=lifecycle.state.value, reason=reason, routing_key=lifecycle_key(lifecycle.state))

    async def _revoke_tokens(self, event: RuntimeEvent, annotations: Mapping[str, str], done: set[str]) -> set[str]:
        """Revoke every token accessor recorded on the Job that is not revoked yet — each only if
        Vault says it is an agent token of this installation and, if minted, of this investigation."""
        expected = Expected(scope=self.runtime.where, investigation_id=event.investigation_id)
        for key in jobspec.TOKEN_ANNOTATIONS:
            accessor = annotations.get(key)
            if accessor and accessor not in done:
                await self._publish(lambda a=accessor: self.credentials.revoke(a, expected=expected))
                done.add(accessor)
        return done

    async def _publish(self, work: Callable[[], Awaitable[None]]) -> None:
        await retry(work, REPORT_BACKOFF, on_retry=lambda n, e, w: log.warning("report_retry", attempt=n, error=e.message))
