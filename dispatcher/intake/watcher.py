"""Turns runtime events into what tickets see, and frees admission slots.

For every Job: ``started`` when its agent runs, then exactly one terminal
lifecycle event, and for every ending other than success an inconclusive
result carrying the reason (see ``reporting``). Publishing is retried until
the broker confirms — a terminal state is never dropped because RabbitMQ
hiccupped. Jobs first seen here (launched by another replica, or before a
restart) are counted against the caps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

from schemas import LifecycleState, Severity

from dispatcher.jobs import jobspec
from dispatcher.intake.admission import AdmissionGate
from dispatcher.credentials.tokens import Credentials, Expected, NoCredentials
from schemas.logs import bound, get_logger
from dispatcher.plumbing.metrics import Metrics
from dispatcher.intake.reporting import Reporter, failure_result, lifecycle_for
from schemas.routing import lifecycle_key
from dispatcher.plumbing.retry import Backoff, retry
from dispatcher.jobs.runtime import JobRuntime, RuntimeEvent
from dispatcher.intake.tracker import Tracked, Tracker

log = get_logger("agentjobs.watcher")
# Reporting a terminal state never gives up; it only backs off.
REPORT_BACKOFF = Backoff(base=0.1, cap=2.0, max_elapsed=float("inf"))
CONCURRENT_ENDINGS = 32  # endings reported in parallel, so one slow report blocks no other


def _tracked_from_labels(event: RuntimeEvent) -> Tracked:
    labels = event.labels
    try:
        severity = Severity(labels.get(jobspec.LABEL_SEVERITY, "warning"))
    except ValueError:
        severity = Severity.WARNING
    return Tracked(
        investigation_id=event.investigation_id,
        incident_key=labels.get(jobspec.LABEL_INCIDENT, "unknown"),
        job_name=event.job_name,
        class_name=labels.get(jobspec.LABEL_CLASS, "default"),
        severity=severity,
        domain=labels.get(jobspec.LABEL_DOMAIN, ""),
        # Launched elsewhere (another replica, or before a crash) — maybe without telling the
        # ticket; the next notification for it re-publishes `dispatched` (same message id).
        dispatch_reported=False,
    )


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
        lifecycle = lifecycle_for(event, tracked)
        await self._publish(lambda: self.reporter.lifecycle(lifecycle))
        if lifecycle.state is not LifecycleState.SUCCEEDED:
            result = failure_result(lifecycle, severity=tracked.severity, domain=tracked.domain)
            await self._publish(lambda: self.reporter.finding(result))
        final: list[Mapping[str, str] | None] = []

        async def acknowledge() -> None:
            final.append(await self.runtime.acknowledge(event))

        await self._publish(acknowledge)
        if final and final[-1]:
            await self._revoke_tokens(event, final[-1], revoked)  # e.g. a login token recorded late
        self.gate.release(event.investigation_id)
        self.tracker.finish(event.investigation_id)
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
