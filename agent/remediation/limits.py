"""Blast-radius limits, decided outside the model from what the Job's dispatcher allows.

The dispatcher computes, at launch, what a Job may still do (``AGENTJOBS_ACTIONS__*``, read
by ``agent.config`` into ``ActionLimits``):

- ``max_per_investigation``: destructive (LOW or MEDIUM) executions per investigation (default 1);
- ``allowance``: what is left of the scope's hourly cap for this Job (the dispatcher counted the
  scope's executions of the last hour and the other running Jobs' reservations); 0: none;
- ``namespaces`` / ``databases``: the scope's allow-lists; an action on a target outside them is
  refused. An empty list allows nothing; a list the dispatcher did not give (``None``) allows
  nothing either — fail closed. ``"*"`` in a list, written by an operator, allows any;
- ``exhausted_targets``: targets whose per-target hourly cap is reached.

``judge`` (pure) decides, for one action the phase gate allowed, whether a limit stops it:
``refused_target`` (outside the allow-lists, or a target that cannot be told) or
``refused_limit`` (allowance 0, the investigation's or the Job's budget spent, the target
exhausted). What the target *is* comes from the Job, not from the proposal's wording: a
PostgreSQL action acts on the database of the Job's DSN (``database``), a Kubernetes one on the
object its target/params name, in the Kubernetes tool's namespace unless they name another.
The resolved target is recorded in the action's params as ``limit_target`` — the key the
dispatcher's per-target limit counts (it reads it from the ``ActionRecord``).

The gate asks ``judge`` before handing an action to the protocol (``protocol.execute(limit=)``,
applied after the precondition and the kill switch, before the claim),
and counts what was executed — or may have been — against the budget. The engine installs the
Job's limits for the conclusion with ``limited(...)`` (a context variable, like the kill switch's
guard); a gate called without any (tests, tools) applies none.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from schemas import ProposedAction, RiskClass

from .protocol import ACTED, Outcome, Refusal, Result

_KV = re.compile(r"(?P<key>\w+)\s*=\s*(?P<value>'(?:[^'\\]|\\.)*'|[^\s']\S*)")
DESTRUCTIVE = frozenset({RiskClass.LOW, RiskClass.MEDIUM})
ANY = "*"  # in an allow-list: any namespace / database (an operator's explicit choice)
LIMIT_TARGET = "limit_target"  # the param recording the resolved target (what the per-target limit counts)

# Which object each registered action acts on.
KUBERNETES_KINDS = {"restart_deployment": "deployment", "delete_pod": "pod", "scale_deployment": "deployment",
                    "rollout_undo": "deployment", "raise_memory_limit": "deployment"}
DATABASE_ACTIONS = frozenset({"terminate_backend", "terminate_idle_backends"})


@dataclass(frozen=True, kw_only=True)
class ActionLimits:
    """What the Job was allowed (``AGENTJOBS_ACTIONS__*``), and where its executors act."""

    max_per_investigation: int = 1
    allowance: int = 0  # the scope's remaining hourly executions for this Job
    namespaces: frozenset[str] | None = None  # None: the dispatcher gave none — nothing allowed
    databases: frozenset[str] | None = None
    exhausted_targets: frozenset[str] = frozenset()
    # Set by the engine from the Job's tools (not from the environment):
    database: str = ""  # the database the PostgreSQL executors connect to (its DSN's dbname)
    namespace: str = "default"  # the Kubernetes tool's namespace (targets naming none are there)

    @property
    def budget(self) -> int:
        """Destructive executions this Job may carry out in all (pure)."""
        return max(0, min(self.max_per_investigation, self.allowance))

    def at(self, *, database: str | None = None, namespace: str | None = None) -> ActionLimits:
        return replace(self, database=self.database if database is None else database,
                       namespace=self.namespace if namespace is None else namespace)


@dataclass(frozen=True, kw_only=True)
class Verdict:
    refusal: Refusal | None  # None: no limit stops it
    target: str = ""  # the resolved target (``limit_target``), when one could be told


def database_of(dsn: str) -> str:
    """The database a PostgreSQL URL or key=value DSN names, or "" (pure)."""
    dsn = dsn.strip()
    if not dsn:
        return ""
    if "://" in dsn:
        try:
            parts = urlsplit(dsn)
        except ValueError:
            return ""
        named = parse_qs(parts.query).get("dbname")
        return named[-1] if named else unquote(parts.path.lstrip("/"))
    found = ""
    for m in _KV.finditer(dsn):
        if m["key"] == "dbname":
            value = m["value"]
            found = re.sub(r"\\(.)", r"\1", value[1:-1]) if value.startswith("'") else value
    return found


def _allowed(place: str, listed: frozenset[str] | None) -> bool:
    return listed is not None and bool(place) and (place in listed or ANY in listed)


def _refuse_target(why: str) -> Refusal:
    return Refusal(outcome=Outcome.REFUSED_TARGET, reason=why)


def _refuse_limit(why: str) -> Refusal:
    return Refusal(outcome=Outcome.REFUSED_LIMIT, reason=why)


def _listed(kind: str, listed: frozenset[str] | None) -> str:
    if listed is None:
        return f"the dispatcher gave this Job no {kind} allow-list"
    return f"allowed: {', '.join(sorted(listed))}" if listed else f"the {kind} allow-list is empty"


def target_of(action: ProposedAction, limits: ActionLimits) -> tuple[str, str] | str:
    """(``limit_target``, allow-list refusal or "") for ``action``, or why no target can be told (pure)."""
    if action.action in DATABASE_ACTIONS:
        db = limits.database
        if not db:
            return "the Job's database cannot be told (its DSN names none): not acting"
        p = action.params
        who = next(((k, p[k]) for k in ("application_name", "client_addr") if p.get(k)), None)
        target = f"{who[0]} {who[1]!r} on database {db}" if who else f"database {db}"
        named = p.get("datname") or p.get("database") or ""
        if named and named != db:  # the proposal says the session is in another database than the Job's
            return target, f"the proposal names database {named[:80]!r}, not this Job's database {db!r}"
        if not _allowed(db, limits.databases):
            return target, f"database {db!r} is outside this Job's allow-list ({_listed('database', limits.databases)})"
        return target, ""
    kind = KUBERNETES_KINDS.get(action.action)
    if kind is None:
        return f"{action.action} acts on nothing this Job's allow-lists know: not acting"
    from .kubernetes import Ref, target_of as kubernetes_target  # only where the kubernetes tool is open

    ref = kubernetes_target(action, kind, default_namespace=limits.namespace or "default")
    if not isinstance(ref, Ref):
        return f"the target cannot be told ({ref}): not acting"
    if not _allowed(ref.namespace, limits.namespaces):
        return str(ref), (f"namespace {ref.namespace!r} is outside this Job's allow-list "
                          f"({_listed('namespace', limits.namespaces)})")
    return str(ref), ""


def judge(action: ProposedAction, limits: ActionLimits, *, spent: int = 0) -> Verdict:
    """Whether a limit stops ``action`` (allowed by the phase gate), ``spent`` destructive executions
    into this investigation (pure)."""
    found = target_of(action, limits)
    if isinstance(found, str):
        return Verdict(refusal=_refuse_target(found))
    target, outside = found
    if outside:
        return Verdict(refusal=_refuse_target(f"{outside}: not acting"), target=target)
    if target in limits.exhausted_targets:
        return Verdict(target=target, refusal=_refuse_limit(
            f"the per-target limit for {target} is reached (executions in the last hour): not acting"))
    if action.risk not in DESTRUCTIVE:
        return Verdict(refusal=None, target=target)
    if limits.allowance <= 0:
        return Verdict(target=target, refusal=_refuse_limit(
            "the scope's hourly allowance is used up (the dispatcher gave this Job 0): not acting"))
    if spent >= limits.max_per_investigation:
        return Verdict(target=target, refusal=_refuse_limit(
            f"{spent} destructive execution(s) already in this investigation, at most "
            f"{limits.max_per_investigation} allowed: not acting"))
    if spent >= limits.allowance:
        return Verdict(target=target, refusal=_refuse_limit(
            f"{spent} destructive execution(s) already in this investigation, the scope's hourly allowance "
            f"for this Job is {limits.allowance}: not acting"))
    return Verdict(refusal=None, target=target)


def counts(action: ProposedAction, result: Result) -> bool:
    """Whether ``result`` spends one of the investigation's destructive executions (pure).

    What acted, what failed while acting (it may have changed something), and what an earlier
    attempt claimed unless it is known not to have acted.
    """
    if action.risk not in DESTRUCTIVE:
        return False
    if result.outcome in ACTED:
        return True
    if result.outcome is Outcome.FAILED:
        return result.execution is not None
    if result.outcome is Outcome.ALREADY_EXECUTED:
        previous = result.previous.outcome if result.previous is not None else None
        return previous is None or previous in ACTED or previous is Outcome.FAILED
    return False


# --- the engine installs the Job's limits for the conclusion -----------------------------------

_limits: contextvars.ContextVar[ActionLimits | None] = contextvars.ContextVar("agentjobs_action_limits",
                                                                             default=None)


@contextlib.contextmanager
def limited(limits: ActionLimits | None) -> Iterator[None]:
    """Within this block, the gate applies ``limits`` (None: none)."""
    token = _limits.set(limits)
    try:
        yield
    finally:
        _limits.reset(token)


def current_limits() -> ActionLimits | None:
    return _limits.get()


def for_job(limits: ActionLimits, *, postgres_dsn: str, tools: Iterable[Any] = ()) -> ActionLimits:
    """``limits`` where this Job's executors act: its DSN's database, its Kubernetes tool's namespace."""
    namespace = next((str(getattr(t, "namespace", "") or "") for t in tools if getattr(t, "name", "") == "kubernetes"),
                     "")
    return limits.at(database=database_of(postgres_dsn), namespace=namespace or "default")


__all__ = ["ANY", "DESTRUCTIVE", "LIMIT_TARGET", "ActionLimits", "Verdict", "counts", "current_limits",
           "database_of", "for_job", "judge", "limited", "target_of"]
