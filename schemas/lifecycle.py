"""What happened to an investigation, told to whoever holds the ticket.

The dispatcher publishes one ``LifecycleEvent`` per state change on the
results exchange (routing key ``lifecycle.<state>``), so no ticket is left
hanging: every investigation ends in exactly one terminal state.
"""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

from .base import Id, NonNegativeInt, Phase, Severity, Timestamp, Wire

MAX_TICKET_ALERTS = 50  # alerts a dispatched event lists for the ticket (alert_count says how many in all)
_Brief = Annotated[str, msgspec.Meta(max_length=1024)]


class LifecycleState(enum.StrEnum):
    DISPATCHED = "dispatched"  # Job created (or found already created)
    ATTACHED = "attached"  # new alerts joined a running investigation; no new Job
    STARTED = "started"  # the agent's pod is running
    SUCCEEDED = "succeeded"  # the agent published a finding and exited 0
    FAILED = "failed"  # see ``reason``
    CANCELLED = "cancelled"  # group resolved or an operator cancelled it
    # The group resolved after the investigation had ended: informational, so a ticket can
    # close; it follows the terminal state and changes nothing about the investigation.
    RESOLVED = "resolved"

    @property
    def terminal(self) -> bool:
        """True for states after which nothing more happens."""
        return self in _TERMINAL


_TERMINAL = frozenset({LifecycleState.SUCCEEDED, LifecycleState.FAILED, LifecycleState.CANCELLED})


class FailureReason(enum.StrEnum):
    """Why an investigation failed (or, ``alert_resolved``, was cancelled); stable codes for tickets."""

    DEADLINE_EXCEEDED = "deadline_exceeded"
    OOM_KILLED = "oom_killed"
    BACKOFF_LIMIT_EXCEEDED = "backoff_limit_exceeded"
    AGENT_ERROR = "agent_error"  # agent exited non-zero
    NO_FINDING = "no_finding"  # Job ended without publishing a finding
    CREDENTIALS_UNAVAILABLE = "credentials_unavailable"  # agent failed closed
    LAUNCH_REJECTED = "launch_rejected"  # forbidden, quota, invalid spec
    JOB_LOST = "job_lost"  # Job deleted from outside before it finished
    ALERT_RESOLVED = "alert_resolved"  # cancelled: the alert group resolved while the investigation ran
    INTERNAL = "internal"


class AgentExit(enum.IntEnum):
    """The agent's exit codes: the contract between ``agentjobs agent`` and the dispatcher."""

    OK = 0  # finding published and confirmed
    ERROR = 1
    CREDENTIALS_UNAVAILABLE = 3  # failed closed (e.g. the wrapping token was already used)
    UNPUBLISHED = 4  # the finding could not be confirmed by the broker
    PARTIAL = 5  # stopped by SIGTERM; a partial finding (what it had observed) was published and confirmed

    @property
    def published(self) -> bool:
        """True when the agent's own finding (complete or partial) reached the broker."""
        return self in (AgentExit.OK, AgentExit.PARTIAL)

    @property
    def failure(self) -> FailureReason | None:
        """What a non-zero exit tells the ticket."""
        return {
            AgentExit.CREDENTIALS_UNAVAILABLE: FailureReason.CREDENTIALS_UNAVAILABLE,
            AgentExit.UNPUBLISHED: FailureReason.NO_FINDING,
        }.get(self)


class AlertBrief(msgspec.Struct, frozen=True, kw_only=True):
    """One alert as a ticket shows it. Untrusted text from the alert's sender, never instructions."""

    name: _Brief = ""  # alertname
    status: Annotated[str, msgspec.Meta(max_length=16)] = "firing"
    summary: _Brief = ""  # the summary (or description) annotation, cut
    labels: dict[Annotated[str, msgspec.Meta(max_length=256)], _Brief] = {}
    starts_at: Timestamp | None = None


class LifecycleEvent(Wire, tag="lifecycle", kw_only=True):
    """One state change of one investigation."""

    investigation_id: Id
    incident_key: Id  # source + group key, stable across investigations of a group
    state: LifecycleState
    at: Timestamp
    job_name: Annotated[str, msgspec.Meta(max_length=63)] = ""
    phase: Phase | None = None
    reason: FailureReason | None = None  # set when state is failed; cancelled: alert_resolved or None
    message: Annotated[str, msgspec.Meta(max_length=4096)] = ""
    event_id: str = ""  # the incident notification that caused this (dispatched/attached)
    attempt: NonNegativeInt = 0
    alert_count: NonNegativeInt = 0
    # A follow-up investigation (new alerts joined the group after an investigation ended):
    # the id of the group's first investigation, so tickets link the two.
    follows: Annotated[str, msgspec.Meta(max_length=128)] = ""
    # What a ticket opens with (dispatched and attached; empty on the other states): the
    # incident's title, severity and domain, the trust scope its phase was chosen for, and up to
    # MAX_TICKET_ALERTS of its alerts.
    title: Annotated[str, msgspec.Meta(max_length=512)] = ""
    severity: Severity | None = None
    domain: Annotated[str, msgspec.Meta(max_length=512)] = ""
    scope: Annotated[str, msgspec.Meta(max_length=512)] = ""
    alerts: Annotated[tuple[AlertBrief, ...], msgspec.Meta(max_length=MAX_TICKET_ALERTS)] = ()
