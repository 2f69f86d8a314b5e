"""Shared set-up for tests that run the dispatcher's Kubernetes code against the emulator."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from dispatcher.jobs import jobspec
from dispatcher.plumbing.retry import Backoff, retry
from dispatcher.jobs.runtime import RuntimeEvent
from dispatcher.jobs.kubernetes import KubernetesRuntime
from dispatcher.plumbing.settings import Settings, load_settings
from schemas import IncidentEvent, Phase, decode_incident, identify
from tests.support.payloads import am_alert, dumps, group


def settings_for(namespace: str, **env: str) -> Settings:
    """The dispatcher's settings from ``env``, taken as given: a test that connects them passes the
    dispatcher identity's URL (``AGENTJOBS_AMQP__URL=vhost.url("dispatcher")``), never the broker
    administrator's."""
    return load_settings(None, {"AGENTJOBS_K8S__NAMESPACE": namespace, "AGENTJOBS_VAULT__AUTH_MODE": "none", **env})


def prepare_cluster(handle) -> None:
    """ServiceAccounts the Jobs name must exist, as they would on a real cluster."""
    for phase in Phase:
        handle.cluster.add_service_account(handle.namespace, f"agentjobs-agent-{phase.value}")


def incident(n: int = 0, *, alertname: str = "HighErrorRate", severity: str = "warning") -> IncidentEvent:
    body = group([am_alert(starts_at="2026-11-26T02:00:00Z", alertname=alertname, severity=severity,
                           instance=f"i-{n}")], group_key=f'{{}}:{{alertname="{alertname}", n="{n}"}}')
    return decode_incident(dumps(body))


def manifest(event: IncidentEvent, s: Settings, phase: Phase = Phase.SHADOW) -> dict:
    plan = jobspec.JobPlan(identity=identify(event), event=event, class_name="default", phase=phase,
                           domain=jobspec.domain_of(event, s))
    return jobspec.build_job(plan, s)


class EventLog:
    """Collects a runtime's events in the background; await what you expect."""

    def __init__(self, runtime: KubernetesRuntime, *, acknowledge: bool = True,
                 changed: asyncio.Event | None = None) -> None:
        self.runtime = runtime
        self.events: list[RuntimeEvent] = []
        self.acknowledge = acknowledge
        self._changed = changed or asyncio.Event()  # share one to wait on several logs
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        async for event in self.runtime.events():
            self.events.append(event)
            if self.acknowledge and event.state.terminal:
                # as the dispatcher's watcher does: acknowledging is retried until it sticks
                await retry(lambda: self.runtime.acknowledge(event), Backoff(base=0.05, max_elapsed=10))
            self._changed.set()

    async def wait_for(self, predicate, timeout: float = 10.0):
        async with asyncio.timeout(timeout):
            while not (result := predicate(self.events)):
                self._changed.clear()
                await self._changed.wait()
        return result

    def terminal(self, job_name: str) -> list[RuntimeEvent]:
        return [e for e in self.events if e.job_name == job_name and e.state.terminal]

    @asynccontextmanager
    async def running(self) -> AsyncIterator[EventLog]:
        self._task = asyncio.create_task(self._run())
        try:
            yield self
        finally:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
