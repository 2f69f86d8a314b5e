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

High risk never runs automatically. ``gate`` marks an action executed only
when its class is allowed, an executor for it exists, and the executor
reported success; this issue registers no executor, so nothing destructive
runs. The phase's RBAC and Vault policies are the second, independent layer.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import msgspec

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
           registry: Mapping[str, ActionSpec] = REGISTRY) -> Decision:
    """What happens to a proposed action in ``phase`` (pure)."""
    name = canonical(action, registry)
    if name is None:
        return Decision.UNKNOWN
    risk = registry[name].risk
    if risk is RiskClass.HIGH:
        return Decision.NEVER_AUTOMATIC
    if phase is Phase.SHADOW:
        return Decision.RECORD_ONLY
    if risk not in allowed_risks(phase):
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


@dataclass(frozen=True, kw_only=True)
class Execution:
    """What an executor did: enough to check it and to undo it."""

    ok: bool
    before: str = ""  # state before, e.g. "replicas=2"
    after: str = ""
    undo: str = ""  # how to undo, e.g. "kubectl -n shop rollout undo deployment/payments"
    error: str = ""


class Executor(Protocol):
    """Carries out one registered action (adapters live with the tools that hold the credentials)."""

    async def execute(self, action: ProposedAction) -> Execution:
        ...


async def gate(actions: Iterable[ProposedAction], phase: Phase, *,
               executors: Mapping[str, Executor] | None = None,
               registry: Mapping[str, ActionSpec] = REGISTRY) -> tuple[ProposedAction, ...]:
    """The actions as they stand after the phase gate; ``executed`` only when allowed, present and successful."""
    executors = executors or {}
    kept, notes = screen(actions, registry)
    for note in notes:
        log.warning("action_dropped", note=note)
    out: list[ProposedAction] = []
    for a in kept:
        decision = decide(a.action, phase, executors=executors.keys(), registry=registry)
        params = {**a.params, "decision": decision.value}
        executed = False
        if decision is Decision.EXECUTE:
            try:
                done = await executors[a.action].execute(a)
            except Exception as exc:  # noqa: BLE001 - a failed remediation is reported, not raised
                done = Execution(ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
            executed = done.ok
            params |= {k: v for k, v in (("before", done.before), ("after", done.after), ("undo", done.undo),
                                         ("error", done.error)) if v}
            log.info("action_executed" if done.ok else "action_failed", action=a.action, target=a.target,
                     phase=phase.value)
        out.append(msgspec.structs.replace(a, params=params, executed=executed))
    return tuple(out)
