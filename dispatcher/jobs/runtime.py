"""The port every Job runtime implements, and the events it reports.

A runtime turns one Job manifest (built by ``jobspec.build_job``) into one
running investigation and reports what happens to it. ``KubernetesRuntime``
creates a ``batch/v1`` Job; ``LocalRuntime`` runs the same container command
as a subprocess under the same limits. Both give "exactly one per name":
launching a name that exists answers ``ALREADY_EXISTS`` instead of starting a
second one. Adapters raise only ``PermanentError`` / ``TemporaryError``.

``status(name)`` reads what the runtime durably knows about one Job (the Job
object's conditions, the local record): the dispatcher asks it before it
mints a token or publishes ``dispatched`` for an investigation it has no
memory of, so after a restart an investigation that already ended is known
to have ended — from the runtime, not from the dispatcher's memory.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

import msgspec

from schemas import FailureReason


class LaunchOutcome(enum.StrEnum):
    CREATED = "created"
    ALREADY_EXISTS = "already_exists"  # same investigation launched before (409 semantics)


class JobState(enum.StrEnum):
    RUNNING = "running"  # the agent process/pod started
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # see RuntimeEvent.reason
    CANCELLED = "cancelled"  # cancelled through the runtime (cancel command, resolve)
    LOST = "lost"  # the Job vanished without a terminal state (deleted from outside)

    @property
    def terminal(self) -> bool:
        return self is not JobState.RUNNING


class RuntimeEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One observed change of one Job; terminal events are reported once per Job."""

    job_name: str
    investigation_id: str  # from the Job's label
    state: JobState
    at: datetime
    reason: FailureReason | None = None  # for FAILED/LOST
    message: str = ""  # human-readable detail, e.g. "OOMKilled (exit 137)"
    exit_code: int | None = None
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}


class JobStatus(msgspec.Struct, frozen=True, kw_only=True):
    """What the runtime durably knows about one Job: whether and how it ended."""

    job_name: str
    investigation_id: str
    state: JobState  # RUNNING while not ended (also before its pod/process started)
    created_at: datetime | None = None
    finished_at: datetime | None = None  # when it ended, if it did
    exit_code: int | None = None  # the agent's, when the runtime knows it
    reported: bool = False  # its ending was reported and acknowledged (so was its ``dispatched``)
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}

    @property
    def ended(self) -> bool:
        return self.state.terminal


CANCEL_REASON = "cancelled"  # what a cancel without a reason records (operator, control command)


@runtime_checkable
class JobRuntime(Protocol):
    """Launch, cancel and observe investigation Jobs."""

    @property
    def where(self) -> str:
        """Where this runtime's Jobs live ("kubernetes/<namespace>", "local/<state dir>")."""
        ...

    async def launch(
        self, job: Mapping[str, Any], *, secret: Mapping[str, bytes] | None = None
    ) -> LaunchOutcome:
        """Start the Job described by ``job`` (a batch/v1 Job manifest).

        ``secret`` holds files the Job gets (e.g. the wrapped Vault token): a Secret owned by
        the Job on Kubernetes, files in the work dir locally. Deleted with the Job.
        """
        ...

    async def cancel(self, job_name: str, *, reason: str = CANCEL_REASON) -> bool:
        """Stop and remove a Job; True if it existed.

        ``reason`` is recorded with the Job and comes back as the CANCELLED event's message
        (e.g. ``alert_resolved``), so why it was cancelled survives a dispatcher restart.
        """
        ...

    async def status(self, job_name: str) -> JobStatus | None:
        """The Job's durable state, or None if no Job of that name exists."""
        ...

    def events(self) -> AsyncIterator[RuntimeEvent]:
        """Status changes of every Job this runtime manages.

        A terminal event is emitted once per Job and re-emitted (after a restart) until it
        is acknowledged, so a crash between observing and reporting loses nothing.
        """
        ...

    async def acknowledge(self, event: RuntimeEvent) -> Mapping[str, str] | None:
        """The terminal ``event`` was reported durably: let the Job go (finalizer, record).

        May return the Job's final annotations, for anything recorded on it late.
        """
        ...

    async def active(self) -> list[str]:
        """Names of Jobs that have not reached a terminal state."""
        ...

    async def active_annotations(self) -> dict[str, dict[str, str]]:
        """The annotations of every Job that has not reached a terminal state, by name."""
        ...

    async def close(self) -> None:
        """Release resources; running Jobs keep running (local: are stopped)."""
        ...
