"""Remediation actions and the phase gate, decided outside any model.

The registry names every action the agent may propose and fixes its risk
class; a proposer (the rules reasoner, or an LLM that may have read a hostile
alert) chooses neither the risk nor whether anything runs. ``allowed_risks``
maps the autonomy phase to the risk classes that may run automatically:

=====================  ==========================================
shadow                 nothing (the would-be action is recorded)
read-only              nothing (proposed only)
limited-remediation    read, low
autonomous             read, low, medium
=====================  ==========================================

High risk never runs automatically. ``decide`` is the first layer: ``gate``
hands an action to its executor only when its class is allowed and an executor
for it exists in this Job; the executor then follows the protocol of
``agent.remediation.protocol`` (re-check the precondition, act once under an
idempotency key, verify, record undo information) and the action is marked
``executed`` only if it acted. Everything is recorded in the action's params:
``decision``, ``outcome``, ``reason``, ``before``/``after``, ``undo``, ``error``.
An executor without the protocol (only ``execute``) is run once with no
precondition and no verification (``executed_not_verified``). The phase's
RBAC and Vault policies are the second, independent layer.

Blast-radius limits (``agent.remediation.limits``: destructive executions per
investigation, the scope's hourly allowance the dispatcher computed, per-target
limits, namespace/database allow-lists) are applied to each action the phase
allows before it reaches its executor: ``refused_limit`` / ``refused_target``,
recorded like any outcome, with the resolved target in ``limit_target``. They
come from ``limits=`` or the ones the engine installed (``limits.limited``);
without either, none apply.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, MutableSet
from dataclasses import dataclass, replace
from typing import Protocol

import msgspec

from agent.remediation import limits as blast_radius
from agent.remediation.protocol import (
    RECORDED,
    Execution,
    Ledger,
    MemoryLedger,
    Outcome,
    RemediationExecutor,
    Result,
    execute,
    follows_protocol,
)
from schemas import logs
from schemas import Phase, ProposedAction, RiskClass

log = logs.get_logger("agentjobs.agent.actions")


@dataclass(frozen=True, kw_only=True)
class ActionSpec:
    name: str
    risk: RiskClass
    description: str  # one sentence, shown to the LLM and to operators
    target: str  # what ``ProposedAction.target`` names, e.g. "deployment/<name> in namespace <ns>"


REGISTRY: Mapping[str, ActionSpec] = {
    spec.name: spec
    for spec in (
        ActionSpec(name="restart_deployment", risk=RiskClass.LOW,
                   description="Rolling restart of a Deployment's pods (kubectl rollout restart).",
                   target="deployment/<name> in namespace <namespace>"),
        ActionSpec(name="delete_pod", risk=RiskClass.LOW,
                   description="Delete one pod so its controller replaces it.",
                   target="pod/<name> in namespace <namespace>"),
        ActionSpec(name="scale_deployment", risk=RiskClass.MEDIUM,
                   description="Change a Deployment's replica count (params: replicas).",
                   target="deployment/<name> in namespace <namespace>"),
        ActionSpec(name="rollout_undo", risk=RiskClass.MEDIUM,
                   description="Roll a Deployment back to its previous revision (kubectl rollout undo).",
                   target="deployment/<name> in namespace <namespace>"),
        ActionSpec(name="raise_memory_limit", risk=RiskClass.MEDIUM,
                   description="Raise a container's memory limit (params: container, memory); causes a rollout.",
                   target="deployment/<name> in namespace <namespace>"),
        ActionSpec(name="terminate_idle_backends", risk=RiskClass.MEDIUM,
                   description="pg_terminate_backend for one application's sessions idle in transaction "
                               "(params: application_name or client_addr, min_idle_s).",
                   target="application_name <name> on database <instance>"),
        ActionSpec(name="terminate_backend", risk=RiskClass.MEDIUM,
                   description="pg_terminate_backend for one session, e.g. the root of a lock chain (params: pid).",
                   target="pid <pid> on database <instance>"),
        ActionSpec(name="failover_database", risk=RiskClass.HIGH,
                   description="Promote a replica to primary. Never automatic.",
                   target="database cluster <name>"),
    )
}
# Names models and runbooks commonly use for the same thing.
ALIASES: Mapping[str, str] = {"rollout_restart": "restart_deployment", "rollback_deployment": "rollout_undo",
                              "pg_terminate_backend": "terminate_backend"}

_ALLOWED: Mapping[Phase, frozenset[RiskClass]] = {
    Phase.SHADOW: frozenset(),
    Phase.READ_ONLY: frozenset(),
    Phase.LIMITED_REMEDIATION: frozenset({RiskClass.READ, RiskClass.LOW}),
    Phase.AUTONOMOUS: frozenset({RiskClass.READ, RiskClass.LOW, RiskClass.MEDIUM}),
}


def allowed_risks(phase: Phase) -> frozenset[RiskClass]:
    """Risk classes that may run automatically in ``phase`` (pure; never HIGH)."""
    return _ALLOWED[phase] - {RiskClass.HIGH}


class Decision(enum.StrEnum):
    EXECUTE = "execute"  # allowed and an executor exists
    NO_EXECUTOR = "no_executor"  # allowed, but nothing here can carry it out
    RECORD_ONLY = "record_only"  # shadow: what the agent would have done
    PROPOSE_ONLY = "propose_only"  # the phase does not allow this risk class
    NEVER_AUTOMATIC = "never_automatic"  # high risk
    UNKNOWN = "unknown"  # not in the registry: dropped


def canonical(name: str, registry: Mapping[str, ActionSpec] = REGISTRY) -> str | None:
    """The registry name for ``name`` (aliases and case folded), or None (pure)."""
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    return key if key in registry else None


def decide(action: str, phase: Phase, *, executors: Iterable[str] = (),
           registry: Mapping[str, ActionSpec] = REGISTRY, approved: bool = False) -> Decision:
    """What happens to a proposed action in ``phase`` (pure).

    ``approved``: an operator approved exactly this action (a follow-up Job, ``agent.approved``):
    neither its risk class nor the phase's automatic allowance holds it back — the phase's
    credentials, the limits, the kill switch and the protocol still do; shadow still runs nothing.
    """
    name = canonical(action, registry)
    if name is None:
        return Decision.UNKNOWN
    risk = registry[name].risk
    if risk is RiskClass.HIGH and not approved:
        return Decision.NEVER_AUTOMATIC
    if phase is Phase.SHADOW:
        return Decision.RECORD_ONLY
    if risk not in allowed_risks(phase) and not approved:
        return Decision.PROPOSE_ONLY
    return Decision.EXECUTE if name in set(executors) else Decision.NO_EXECUTOR


def screen(actions: Iterable[ProposedAction], registry: Mapping[str, ActionSpec] = REGISTRY
           ) -> tuple[tuple[ProposedAction, ...], tuple[str, ...]]:
    """(registered actions with canonical names and registry risk, notes on dropped ones) (pure)."""
    kept: list[ProposedAction] = []
    notes: list[str] = []
    seen: set[tuple[str, str, tuple[tuple[str, str], ...]]] = set()
    for a in actions:
        name = canonical(a.action, registry)
        if name is None:
            notes.append(f"dropped proposed action {a.action[:80]!r}: not in the action registry")
            continue
        # The proposer never decides risk or execution: both are reset from the registry.
        fixed = msgspec.structs.replace(a, action=name, risk=registry[name].risk, executed=False)
        ident = (fixed.action, fixed.target, tuple(sorted(fixed.params.items())))
        if ident not in seen:
            seen.add(ident)
            kept.append(fixed)
    return tuple(kept), tuple(notes)


class Executor(Protocol):
    """An executor without the protocol: carries out one registered action, nothing else.

    Executors that follow ``agent.remediation.protocol.RemediationExecutor`` (precondition,
    act, verify, undo) are preferred; this one is run once, unchecked and unverified.
    """

    async def execute(self, action: ProposedAction) -> Execution:
        ...


class _Unverified:
    """An ``Executor`` seen through the protocol: no precondition, no verification."""

    verify_timeout = 0.0
    volatile_params: frozenset[str] = frozenset()

    def __init__(self, inner: Executor) -> None:
        self.inner = inner

    async def precondition(self, action: ProposedAction) -> str | None:
        return None

    async def act(self, action: ProposedAction) -> Execution:
        return await self.inner.execute(action)

    async def verify(self, action: ProposedAction, *, timeout: float) -> bool:
        return False

    def undo(self, action: ProposedAction, done: Execution) -> str:
        return done.undo


def why_not(decision: Decision, action: ProposedAction, phase: Phase) -> str:
    """The recorded reason an action was not handed to an executor (pure)."""
    if decision is Decision.RECORD_ONLY:
        return "phase shadow: recorded what the agent would have done; nothing runs"
    if decision is Decision.PROPOSE_ONLY:
        runs = ", ".join(sorted(r.value for r in allowed_risks(phase))) or "nothing"
        return f"phase {phase.value} runs {runs} automatically, not {action.risk.value}-risk actions: proposed only"
    if decision is Decision.NEVER_AUTOMATIC:
        return "high-risk actions never run automatically"
    if decision is Decision.NO_EXECUTOR:
        return f"allowed in phase {phase.value}, but this Job has no executor for {action.action}"
    return ""


async def gate(actions: Iterable[ProposedAction], phase: Phase, *,
               executors: Mapping[str, RemediationExecutor | Executor] | None = None,
               registry: Mapping[str, ActionSpec] = REGISTRY, investigation_id: str = "",
               ledger: Ledger | MutableSet[str] | None = None,
               limits: blast_radius.ActionLimits | None = None, approved: bool = False) -> tuple[ProposedAction, ...]:
    """The actions as they stand after the phase gate; ``executed`` only when allowed, present and acted.

    ``ledger`` holds the idempotency keys already acted on (keyed by ``investigation_id``); without
    one, a ledger for this call only. ``limits``: the Job's blast-radius limits (default: the ones
    installed with ``limits.limited``, if any).
    """
    executors = executors or {}
    bounds = limits if limits is not None else blast_radius.current_limits()
    spent = 0  # destructive executions (or attempts that may have acted) in this investigation
    done: Ledger | MutableSet[str] = ledger if ledger is not None else MemoryLedger()
    kept, notes = screen(actions, registry)
    for note in notes:
        log.warning("action_dropped", note=note)
    out: list[ProposedAction] = []
    for a in kept:
        # What the gate and the executor record is theirs to write, never the proposer's.
        a = msgspec.structs.replace(a, params={k: v for k, v in a.params.items()
                                               if k not in RECORDED and k != blast_radius.LIMIT_TARGET})
        decision = decide(a.action, phase, executors=executors.keys(), registry=registry, approved=approved)
        params = {**a.params, "decision": decision.value}
        executed = False
        if decision is Decision.EXECUTE:
            executor = executors[a.action]
            checked = follows_protocol(executor)
            runner: RemediationExecutor = executor if checked else _Unverified(executor)  # type: ignore[assignment]
            verdict = blast_radius.judge(a, bounds, spent=spent) if bounds is not None else None
            result = await execute(a, runner, done=done, investigation_id=investigation_id,
                                   limit=verdict.refusal if verdict is not None else None)
            if not checked and result.outcome is Outcome.EXECUTED_NOT_VERIFIED:
                result = replace(result, reason="executed; this executor neither re-checks nor verifies")
            spent += blast_radius.counts(a, result)
            executed = result.executed
            params |= result.params()
            if verdict is not None and verdict.target:
                params[blast_radius.LIMIT_TARGET] = verdict.target
            _log_result(a, result, phase)
        else:
            params["reason"] = why_not(decision, a, phase)
        out.append(msgspec.structs.replace(a, params=params, executed=executed))
    return tuple(out)


def _log_result(a: ProposedAction, result: Result, phase: Phase) -> None:
    event = {Outcome.EXECUTED_VERIFIED: "action_executed", Outcome.EXECUTED_NOT_VERIFIED: "action_executed",
             Outcome.FAILED: "action_failed", Outcome.SKIPPED_STALE: "action_skipped",
             Outcome.ALREADY_EXECUTED: "action_skipped"}.get(result.outcome, "action_refused")  # kill switch, limits
    log.info(event, action=a.action, target=a.target, phase=phase.value, outcome=result.outcome.value,
             reason=result.reason[:300], idempotency_key=result.key)
