"""The ``runtime`` fixture every JobRuntime contract scenario runs against.

Each implementation contributes one factory to ``RUNTIME_FACTORIES``; the
``runtime_harness`` fixture is parametrized over them, so a scenario written
once runs against all: ``local`` (``LocalRuntime`` on a temporary state dir)
and ``kubernetes`` (``KubernetesRuntime`` over the real kubernetes_asyncio
client against the API emulator in ``tests/support/k8s``, whose kubelet runs
pod commands as local processes).

Scenario commands are ``sys.executable -c "…"`` and report what they saw by
writing files under ``harness.scratch`` (an absolute host path passed in the
args), so the same probes work for both.

Where the runtimes genuinely differ, the difference lives in the Harness (never
in a skip): ``Expectations`` says what a scenario should observe, and
``let_deadline_pass`` is how a scenario makes a deadline expire without
sleeping (the emulator's clock is advanced; locally the deadline is real time).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncContextManager

import pytest
import pytest_asyncio

from dispatcher.jobs import jobspec
from dispatcher.jobs.runtime import JobRuntime, JobState, RuntimeEvent
from dispatcher.jobs.kubernetes import KubernetesRuntime
from dispatcher.jobs.local import INVESTIGATION_LABEL, LocalRuntime
from schemas import FailureReason, Phase
from dispatcher.plumbing.retry import Backoff, retry
from tests.support.k8s.fixtures import running_emulator

EVENT_TIMEOUT = 45.0  # seconds to wait for an expected event (generous: pods are real processes on a loaded box)
NAMESPACE = "agentjobs-runs"  # where make_job's Jobs live (the emulator's namespace too)
SERVICE_ACCOUNT = f"agentjobs-agent-{Phase.SHADOW.value}"  # as jobspec names it for shadow Jobs


@dataclass(frozen=True)
class Expectations:
    """What a scenario observes where the runtimes genuinely differ (see each field)."""

    # A non-zero exit: locally the agent's own error; on Kubernetes the pod fails, and with
    # backoffLimit 0 the Job controller fails the Job with reason BackoffLimitExceeded.
    nonzero_exit_reason: FailureReason = FailureReason.AGENT_ERROR
    # LocalRuntime supervises the process and quotes its stderr tail; KubernetesRuntime reads
    # Job and pod status only (the exit code and reason are in the message, logs are not).
    reports_stderr_tail: bool = True
    # LocalRuntime's processes die with it (reported CANCELLED); Jobs outlive a dispatcher.
    close_stops_jobs: bool = True


@dataclass
class Harness:
    """A runtime under test, plus what scenarios need around it."""

    kind: str
    runtime: JobRuntime
    scratch: Path  # a host dir the Job's command may write probe files to
    leftover_workdirs: Callable[[], list[Path]]  # per-Job temp dirs still on disk
    reopen: Callable[[], JobRuntime]  # a new runtime on the same backing store (a restart)
    peer: Callable[[], JobRuntime] | None = None  # another runtime alongside (a second replica)
    expect: Expectations = Expectations()
    advance_clock: Callable[[float], None] | None = None  # jumps the backend's clock, if it has one
    acknowledge: bool = True  # acknowledge terminal events, as the watcher does
    events: dict[str, list[RuntimeEvent]] = field(default_factory=lambda: defaultdict(list))
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _pump: asyncio.Task[None] | None = None
    _pump_done: bool = False

    def start(self) -> None:
        """Collect the runtime's events in the background."""
        self._pump = asyncio.create_task(self._collect(), name=f"contract-events-{self.kind}")

    async def _collect(self) -> None:
        try:
            async for event in self.runtime.events():
                if self.acknowledge and event.state.terminal:
                    # retried until it sticks, as the dispatcher's watcher does (a 409 is normal)
                    await retry(lambda: self.runtime.acknowledge(event), Backoff(base=0.05, max_elapsed=10))
                async with self._changed:
                    self.events[event.job_name].append(event)
                    self._changed.notify_all()
        finally:
            async with self._changed:
                self._pump_done = True
                self._changed.notify_all()

    async def wait_for(
        self, name: str, predicate: Callable[[RuntimeEvent], bool], timeout: float = EVENT_TIMEOUT
    ) -> RuntimeEvent:
        """The first event of Job ``name`` matching ``predicate`` (waits up to ``timeout``)."""

        def found() -> RuntimeEvent | None:
            return next((e for e in self.events[name] if predicate(e)), None)

        async with asyncio.timeout(timeout):
            async with self._changed:
                while (event := found()) is None:
                    if self._pump_done:
                        raise AssertionError(f"event stream ended; events of {name}: "
                                             f"{self.events[name]}")
                    await self._changed.wait()
        return event

    async def terminal(self, name: str, timeout: float = EVENT_TIMEOUT) -> RuntimeEvent:
        """The terminal event of Job ``name``."""
        return await self.wait_for(name, lambda e: e.state.terminal, timeout)

    async def let_deadline_pass(self, name: str, deadline: int) -> None:
        """Make Job ``name``'s ``deadline`` (seconds) expire without sleeping in the test.

        Local: the runtime measures the deadline on the real clock, nothing to do. Kubernetes:
        once the Job started (its RUNNING event means ``status.startTime`` is set), jump the
        cluster clock past it, as ``activeDeadlineSeconds`` is measured on that clock.
        """
        if self.advance_clock is None:
            return
        await self.wait_for(name, lambda e: e.state is JobState.RUNNING)
        self.advance_clock(deadline + 1)

    async def close(self) -> None:
        """Close the runtime and wait until its event stream has ended."""
        await self.runtime.close()
        if self._pump is not None:
            async with asyncio.timeout(EVENT_TIMEOUT):
                await self._pump

    async def restart(self, *, acknowledge: bool = True) -> Harness:
        """Close this runtime and start a new one on the same store (a dispatcher restart)."""
        await self.close()
        harness = self.alongside(self.reopen(), acknowledge=acknowledge)
        harness.start()
        return harness

    def alongside(self, runtime: JobRuntime, *, acknowledge: bool = True) -> Harness:
        """A harness for another runtime on the same backing store (not started)."""
        return Harness(kind=self.kind, runtime=runtime, scratch=self.scratch,
                       leftover_workdirs=self.leftover_workdirs, reopen=self.reopen, peer=self.peer,
                       expect=self.expect, advance_clock=self.advance_clock, acknowledge=acknowledge)


def make_job(
    name: str,
    code: str,
    *args: str,
    deadline: int = 60,
    memory: str | None = None,
    cpu: str | None = None,
    env: list[dict[str, Any]] | None = None,
    volumes: list[dict[str, Any]] | None = None,
    mounts: list[dict[str, Any]] | None = None,
    ttl: int | None = None,
    investigation_id: str | None = None,
) -> dict[str, Any]:
    """A batch/v1 Job manifest running ``python -c code args…``, shaped like jobspec's.

    Like ``jobspec.build_job``: the phase's ServiceAccount without an automounted token,
    and the finalizer that keeps the Job until its ending is reported.
    """
    labels = {
        "app.kubernetes.io/managed-by": "agentjobs",
        INVESTIGATION_LABEL: investigation_id or f"inv-{name}",
    }
    limits = {k: v for k, v in (("memory", memory), ("cpu", cpu)) if v is not None}
    container: dict[str, Any] = {
        "name": "agent",
        "image": "ghcr.io/agentjobs/agent:test",
        "command": [sys.executable, "-c", code],
        "args": list(args),
        "env": env or [],
        "resources": {"limits": limits, "requests": dict(limits)},
        "volumeMounts": mounts or [],
    }
    spec: dict[str, Any] = {
        "backoffLimit": 0,
        "activeDeadlineSeconds": deadline,
        "template": {
            "metadata": {"labels": dict(labels)},
            "spec": {"restartPolicy": "Never", "serviceAccountName": SERVICE_ACCOUNT,
                     "automountServiceAccountToken": False, "containers": [container],
                     "volumes": volumes or []},
        },
    }
    if ttl is not None:
        spec["ttlSecondsAfterFinished"] = ttl
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels,
                     "annotations": {"agentjobs.dev/incident-key": f"test/{name}"},
                     "finalizers": [jobspec.FINALIZER]},
        "spec": spec,
    }


@contextlib.asynccontextmanager
async def local_harness(tmp_path: Path) -> AsyncIterator[Harness]:
    """LocalRuntime on a fresh state dir."""
    state = tmp_path / "state"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    opened: list[LocalRuntime] = []

    def reopen() -> LocalRuntime:
        opened.append(LocalRuntime(state, grace_seconds=2.0))
        return opened[-1]

    harness = Harness(
        kind="local",
        runtime=reopen(),
        scratch=scratch,
        leftover_workdirs=lambda: sorted((state / "work").iterdir()),
        reopen=reopen,
        peer=reopen,  # another LocalRuntime on the same state dir, as a second dispatcher's
    )
    harness.start()
    try:
        yield harness
    finally:
        await harness.close()
        for runtime in opened:
            await runtime.close()


@contextlib.asynccontextmanager
async def kubernetes_harness(tmp_path: Path) -> AsyncIterator[Harness]:
    """KubernetesRuntime (real kubernetes_asyncio client) against a fresh emulated cluster.

    The emulator's kubelet runs each pod's command as a local process; its pod sandboxes
    live under ``tmp_path/pods``. ``reopen`` is the same replica restarting (same identity,
    same client); ``peer`` is another replica with its own HTTP client.
    """
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    pods = tmp_path / "pods"
    pods.mkdir()
    async with running_emulator(namespace=NAMESPACE, kubelet_mode="process") as handle:
        handle.cluster.kubelet.work_dir = pods
        for phase in Phase:  # the Jobs' ServiceAccounts exist, as on a real cluster
            handle.cluster.add_service_account(NAMESPACE, f"agentjobs-agent-{phase.value}")
        opened: list[KubernetesRuntime] = []
        clients = []

        def open_runtime(replica: str, api_client: Any) -> KubernetesRuntime:
            opened.append(KubernetesRuntime(api_client, namespace=NAMESPACE, request_timeout=5,
                                            watch_timeout=30, replica=replica))
            return opened[-1]

        def reopen() -> KubernetesRuntime:
            return open_runtime("contract-a", handle.api_client)

        def peer() -> KubernetesRuntime:
            clients.append(handle.client_for(handle.configuration.api_key["BearerToken"]))
            return open_runtime(f"contract-peer-{len(clients)}", clients[-1])

        harness = Harness(
            kind="kubernetes",
            runtime=reopen(),
            scratch=scratch,
            leftover_workdirs=lambda: sorted(pods.iterdir()),
            reopen=reopen,
            peer=peer,
            expect=Expectations(nonzero_exit_reason=FailureReason.BACKOFF_LIMIT_EXCEEDED,
                                reports_stderr_tail=False, close_stops_jobs=False),
            advance_clock=handle.clock.advance,
        )
        harness.start()
        try:
            yield harness
        finally:
            await harness.close()
            for runtime in opened:
                await runtime.close()
            for api_client in clients:
                await api_client.close()


RUNTIME_FACTORIES: dict[str, Callable[[Path], AsyncContextManager[Harness]]] = {
    "local": local_harness,
    "kubernetes": kubernetes_harness,
}


@pytest_asyncio.fixture(params=sorted(RUNTIME_FACTORIES))
async def runtime_harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    """One Harness per JobRuntime implementation."""
    async with RUNTIME_FACTORIES[request.param](tmp_path) as harness:
        yield harness


@pytest.fixture
def runtime(runtime_harness: Harness) -> JobRuntime:
    """The JobRuntime under test."""
    return runtime_harness.runtime
