"""Where messages go: exchange, queue and stream names and the routing keys built from them.

Part of the wire contract: the dispatcher declares these (``dispatcher/plumbing/topology.py``),
the agent publishes to them, ticketing consumers bind to them. Pure; no broker here.
"""

from __future__ import annotations

import re

from .base import Phase, Severity
from .lifecycle import LifecycleState

INCIDENTS = "agentjobs.incidents"  # exchange and queue: intake
RESULTS = "agentjobs.results"  # exchange: findings and lifecycle events
DEAD = "agentjobs.dead"  # exchange and queue: what could not be handled, with reasons
DEAD_LOG = "agentjobs.dead.log"  # a copy of every dead letter, for the recorder to explain
CONTROL = "agentjobs.control"  # exchange and queue: commands such as cancel
CREDENTIALS = "agentjobs.credentials"  # queue: agents' login-token accessors (kubernetes auth)
CREDENTIALS_KEY = "credentials.issued"  # routing key on agentjobs.results
COSTS = "agentjobs.costs"  # queue: a copy of every finding, for the cost metrics
FEEDBACK = "agentjobs.feedback"  # exchange and queue (single active consumer): operators' verdicts
FEEDBACK_LOG = "agentjobs.feedback-log"  # stream: every trust input, in the order it was applied
PHASES = "agentjobs.phases"  # exchange: PhaseChanged
PHASE_LOG = "agentjobs.phase-log"  # stream bound to agentjobs.phases, replayed by dispatchers
TRUST_SNAPSHOTS = "agentjobs.trust-snapshots"  # stream: the trust ledger now and then, for fast starts
ACTION_LOG = "agentjobs.action-log"  # stream: executions, proposals and approvals, replayed by dispatchers
# bound on agentjobs.results: executions (the limits), proposals an operator may approve, approvals accepted
ACTION_LOG_KEYS = ("action.executed_verified.#", "action.executed_not_verified.#", "action.propose_only.#",
                   "action.never_automatic.#", "action.approved.#")

_ROUTING_WORD = re.compile(r"[^A-Za-z0-9_-]+")


def routing_word(text: str) -> str:
    """One routing-key word (no dots, no wildcards); empty becomes ``unknown``."""
    return _ROUTING_WORD.sub("_", text).strip("_")[:64] or "unknown"


def lifecycle_key(state: LifecycleState) -> str:
    return f"lifecycle.{state.value}"


def finding_key(severity: Severity, domain: str, phase: Phase | None = None) -> str:
    """``finding.<severity>.<domain>``; shadow findings go to ``finding.shadow.<domain>`` instead,
    so operators' queues (bound by severity) never receive what is only being scored."""
    level = "shadow" if phase is Phase.SHADOW else severity.value
    return f"finding.{level}.{routing_word(domain)}"


def action_key(outcome: str, domain: str) -> str:
    """``action.<outcome>.<domain>`` for an ``ActionRecord`` (e.g. ``action.executed_verified.database``)."""
    return f"action.{routing_word(outcome)}.{routing_word(domain)}"


def feedback_key(verdict: str, scope: str) -> str:
    """``feedback.<verdict>.<scope>`` for an ``OperatorFeedback`` (the scope made safe for a routing key)."""
    return f"feedback.{routing_word(verdict)}.{routing_word(scope)}"
