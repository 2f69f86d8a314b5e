"""The scenario harness: an induced, real problem, the alert an SRE wrote for it, and one investigation.

A ``Scenario`` is what issue 19 asks the agent to get right without a playbook written for it:

* ``rule`` — the alert rule as whoever was on call wrote it (name, PromQL, labels, annotations).
  ``$name`` placeholders are filled from the facts the induction yields (a port, a vhost, a pod),
  and ``incident`` turns it into the Alertmanager v4 webhook body the bridge would receive,
  converted by the real ``schemas.alertmanager.to_incident``;
* ``induce`` — an async context manager that makes the problem happen for real (sessions holding
  locks, a queue nobody consumes, a pod OOM-killed in the API emulator, an endpoint answering 503)
  and yields the ``Sources`` an agent's Job would see: a factory of the real tools and the facts;
* ``expected`` — the cause the top hypothesis must name, and ``evidence`` — substrings (templates
  too) its statement or evidence must cite: the decisive fact, not just the label.

``investigate`` runs a ``RulesReasoner`` through ``agent.reasoning.base.Investigation`` over fresh
real tools and closes them. ``induced`` sets a whole group up (one world, every induction of the
group, then each one's ``settled`` wait, concurrently) so the pytest modules and the benchmark
share exactly one code path. Plain Python, no pytest: ``benchmarks/investigation.py`` imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from string import Template
from typing import Any
from urllib.parse import quote_plus

from agent.reasoning.base import Assessment, Budget, Hypothesis, Investigation, Reasoner
from agent.reasoning.rules import alert_facts, playbook_scores
from agent.tools.base import Tool
from schemas import IncidentEvent, Phase

PROMETHEUS_UI = "http://prometheus.scenarios.invalid:9090"  # generatorURL host when no real Prometheus runs
ALERTMANAGER_URL = "http://alertmanager.scenarios.invalid:9093"  # the webhook's externalURL (never contacted)
CONFIDENT = 0.6  # a wrong finding at or above this confidence is "confident wrong" (issue 19)


@dataclass(frozen=True, kw_only=True)
class Rule:
    """An alert rule as an SRE writes it; ``$fact`` placeholders are filled per induction."""

    alertname: str
    expr: str
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(kw_only=True)
class Sources:
    """What one induced problem offers the agent's Job: its tools (fresh per investigation) and the facts
    the alert and the expected evidence name (ports, vhosts, pods, start time)."""

    tools: Callable[[], Awaitable[list[Tool]]]
    # Instead of ``tools``, where the Job's tools depend on the alert (e.g. the PostgreSQL target its
    # labels select): the tools for this incident.
    tools_for: Callable[[IncidentEvent], Awaitable[list[Tool]]] | None = None
    facts: dict[str, str] = field(default_factory=dict)
    # Awaited once after every induction of the group is in place (e.g. until transactions are old
    # enough to count): the waits of a group overlap instead of adding up.
    settled: Callable[[], Awaitable[None]] | None = None
    prometheus_url: str = ""  # a real Prometheus the generatorURL points at (the agent re-runs the expression)


Induce = Callable[[Any], contextlib.AbstractAsyncContextManager[Sources]]


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """One induced problem, its alert, and what a correct investigation concludes."""

    name: str
    group: str  # the world it needs (see tests/scenarios/worlds.py WORLDS)
    rule: Rule
    induce: Induce
    expected: str  # the top hypothesis' cause
    evidence: tuple[str, ...]  # templates: each must appear in the top hypothesis' statement or evidence
    awaits: str | None = None  # what has not landed yet: the test is xfail(strict) until it does

    def incident(self, sources: Sources) -> IncidentEvent:
        """The Alertmanager webhook for this rule, firing, as the bridge turns it into an incident."""
        from schemas import decode
        from schemas.alertmanager import AlertmanagerWebhook, to_incident

        facts = sources.facts
        labels = {"alertname": self.rule.alertname, **{k: fill(v, facts) for k, v in self.rule.labels.items()}}
        annotations = {k: fill(v, facts) for k, v in self.rule.annotations.items()}
        expr = fill(self.rule.expr, facts)
        starts = facts.get("starts_at") or rfc3339(datetime.now(UTC) - timedelta(seconds=30))
        ui = sources.prometheus_url or PROMETHEUS_UI
        alert = {
            "status": "firing",
            "labels": labels,
            "annotations": annotations,
            "startsAt": starts,
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": f"{ui}/graph?g0.expr={quote_plus(expr)}&g0.tab=1",
            "fingerprint": hashlib.sha256(json.dumps(labels, sort_keys=True).encode()).hexdigest()[:16],
        }
        body = {
            "version": "4",
            "groupKey": f'{{}}:{{alertname="{self.rule.alertname}"}}',
            "status": "firing",
            "receiver": "agentjobs",
            "groupLabels": {"alertname": self.rule.alertname},
            "commonLabels": labels,
            "commonAnnotations": annotations,
            "externalURL": ALERTMANAGER_URL,
            "truncatedAlerts": 0,
            "alerts": [alert],
        }
        return to_incident(decode(json.dumps(body).encode(), AlertmanagerWebhook), event_id=uuid.uuid4().hex)

    def matches_a_playbook(self) -> bool:
        """Whether the alert's name, expression or annotations match any playbook pattern (facts
        unfilled: the placeholders are values, never the words that match)."""
        return any(s > 0 for s in playbook_scores(alert_facts(self.incident(Sources(tools=_no_tools)))).values())


async def _no_tools() -> list[Tool]:
    return []


def fill(template: str, facts: Mapping[str, str]) -> str:
    """``$name`` placeholders replaced by the facts (unknown ones left as they are) (pure)."""
    return Template(template).safe_substitute(facts)


def rfc3339(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


async def close_all(tools: Iterable[Tool]) -> None:
    """Close every tool that has ``close`` (sessions, HTTP clients); one failing does not stop the rest."""
    for tool in tools:
        close = getattr(tool, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await close()


async def investigate(sources: Sources, incident: IncidentEvent, reasoner: Reasoner) -> Assessment:
    """One read-only investigation of ``incident`` by ``reasoner`` over fresh real tools."""
    return (await investigation(sources, incident, reasoner))[0]


async def investigation(sources: Sources, incident: IncidentEvent, reasoner: Reasoner, *,
                        budget: Budget | None = None) -> tuple[Assessment, Investigation]:
    """``investigate``, with the investigation itself (its tally: tool calls, tokens) and its budget."""
    tools = await (sources.tools_for(incident) if sources.tools_for is not None else sources.tools())
    try:
        inv = Investigation(incident=incident, tools={t.name: t for t in tools}, phase=Phase.READ_ONLY,
                            **({"budget": budget} if budget is not None else {}))
        return await reasoner.investigate(inv), inv
    finally:
        await close_all(tools)


def cited(h: Hypothesis) -> str:
    """Everything a hypothesis says for itself: its statement and the excerpts of its evidence."""
    return "\n".join([h.statement, *(f"{e.source}: {e.excerpt}" for e in h.evidence_for)])


def missing_evidence(scenario: Scenario, sources: Sources, assessment: Assessment) -> list[str]:
    """The expected evidence the top hypothesis does not cite (all of it if there is no hypothesis) (pure)."""
    wanted = [fill(e, sources.facts) for e in scenario.evidence]
    if not assessment.hypotheses:
        return wanted
    text = cited(assessment.hypotheses[0])
    return [w for w in wanted if w not in text]


def top_cause(assessment: Assessment) -> str:
    return assessment.hypotheses[0].cause if assessment.hypotheses else "(none)"


def explain(assessment: Assessment) -> str:
    """A readable account of an assessment for assertion messages."""
    lines = [f"{assessment.conclusion.value} {assessment.confidence:.2f}: {assessment.summary}"]
    for h in assessment.hypotheses[:4]:
        lines.append(f"  {h.cause} {h.score:.2f}: {h.statement}")
        lines += [f"    + {e.source}: {e.excerpt[:300]}" for e in h.evidence_for]
        lines += [f"    - {e.source}: {e.excerpt[:300]}" for e in h.evidence_against]
    lines += [f"  note: {n}" for n in assessment.notes]
    return "\n".join(lines)


@contextlib.asynccontextmanager
async def induced(scenarios: Sequence[Scenario], world: Any) -> AsyncIterator[dict[str, Sources]]:
    """Every scenario's problem induced in ``world``, then all of them settled: name → Sources."""
    async with contextlib.AsyncExitStack() as stack:
        found: dict[str, Sources] = {}
        for s in scenarios:
            found[s.name] = await stack.enter_async_context(s.induce(world))
        await asyncio.gather(*(src.settled() for src in found.values() if src.settled is not None))
        yield found
