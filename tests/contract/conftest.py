"""The ``runtime`` fixture every JobRuntime contract scenario runs against.

Each implementation contributes one factory to ``RUNTIME_FACTORIES``; the
``runtime_harness`` fixture is parametrized over them, so a scenario written
once runs against all. Today: ``local`` (``LocalRuntime``). A Kubernetes-backed
implementation (``KubernetesRuntime`` against the emulator in
``tests/support/k8s``) joins by adding a factory that yields a ``Harness``.

Scenario commands are ``sys.executable -c "…"`` and report what they saw by
writing files under ``harness.scratch`` (an absolute host path passed in the
args): the emulator's kubelet simulation runs pod commands as local processes
too, so the same probes work for both.
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

from dispatcher.runtime import JobRuntime, RuntimeEvent
from dispatcher.runtime_local import INVESTIGATION_LABEL, LocalRuntime

EVENT_TIMEOUT = 20.0  # seconds to wait for an expected event (generous for a loaded CI box)


@dataclass
class Harness:
    """A runtime under test, plus what scenarios need around it."""

    kind: str
    runtime: JobRuntime
    scratch: Path  # a host dir the Job's command may write probe files to
    leftover_workdirs: Callable[[], list[Path]]  # per-Job temp dirs still on disk
    reopen: Callable[[], JobRuntime]  # a new runtime on the same backing store (a restart)
    reports_stderr_tail: bool = True  # failure messages quote the stderr tail
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
                    await self.runtime.acknowledge(event)
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

    async def close(self) -> None:
        """Close the runtime and wait until its event stream has ended."""
        await self.runtime.close()
        if self._pump is not None:
            async with asyncio.timeout(EVENT_TIMEOUT):
                await self._pump

    async def restart(self, *, acknowledge: bool = True) -> Harness:
        """Close this runtime and start a new one on the same store (a dispatcher restart)."""
        await self.close()
        harness = Harness(kind=self.kind, runtime=self.reopen(), scratch=self.scratch,
                          leftover_workdirs=self.leftover_workdirs, reopen=self.reopen,
                          reports_stderr_tail=self.reports_stderr_tail, acknowledge=acknowledge)
        harness.start()
        return harness


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
    """A batch/v1 Job manifest running ``python -c code args…``, shaped like jobspec's."""
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
            "spec": {"restartPolicy": "Never", "containers": [container],
                     "volumes": volumes or []},
        },
    }
    if ttl is not None:
        spec["ttlSecondsAfterFinished"] = ttl
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": "agentjobs-runs", "labels": labels,
                     "annotations": {"agentjobs.dev/incident-key": f"test/{name}"}},
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
    )
    harness.start()
    try:
        yield harness
    finally:
        await harness.close()
        for runtime in opened:
            await runtime.close()


RUNTIME_FACTORIES: dict[str, Callable[[Path], AsyncContextManager[Harness]]] = {
    "local": local_harness,
    # "kubernetes-emulator": emulator_harness,  ← KubernetesRuntime against tests/support/k8s
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
