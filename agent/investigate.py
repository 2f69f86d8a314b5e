"""The investigation, until the investigation-engine issue: one real PostgreSQL check.

With its own dynamic PostgreSQL user (read-only, ``pg_read_all_stats``) the
agent counts client connections by state against ``max_connections``, bounded
by a statement timeout in a read-only session, and turns the sample into a
``Finding`` with simple rules. When PostgreSQL is not configured, its
credentials were refused or the query fails, the finding says so honestly:
inconclusive, confidence 0, the failure as evidence.

Alert text is untrusted data: it is quoted (bounded, control characters
removed) into the summary and never used to build a query or make a decision.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from schemas import Conclusion, Cost, Evidence, Finding, IncidentEvent, identify, utcnow

from .config import AgentEnv

EXCERPT_CHARS = 2000  # bounded excerpt of a tool's answer in the evidence
ALERT_TEXT_CHARS = 120  # how much of the (untrusted) alert name is quoted
SATURATED = 0.9  # used/max_connections from which connections are the probable cause
IDLE_IN_TX_MIN = 5  # idle-in-transaction sessions worth calling out ...
IDLE_IN_TX_SHARE = 0.2  # ... when they are also this share of all client sessions

CONNECTIONS_QUERY = """\
SELECT current_user AS agent_user,
       current_setting('max_connections')::int AS max_connections,
       count(*) FILTER (WHERE backend_type = 'client backend') AS client_connections,
       coalesce((SELECT json_object_agg(state, n) FROM (
                   SELECT coalesce(state, 'unknown') AS state, count(*) AS n
                   FROM pg_stat_activity WHERE backend_type = 'client backend' GROUP BY 1) s),
                '{}'::json) AS by_state,
       coalesce(extract(epoch FROM max(now() - xact_start)
                FILTER (WHERE state = 'idle in transaction')), 0)::float AS oldest_idle_in_tx_s
FROM pg_stat_activity"""

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True, kw_only=True)
class ConnectionSample:
    """What ``CONNECTIONS_QUERY`` returned."""

    agent_user: str
    max_connections: int
    client_connections: int
    by_state: dict[str, int]
    oldest_idle_in_tx_s: float


@dataclass(kw_only=True)
class Tally:
    """Cost accounting for one run (started when the agent starts)."""

    started_wall: float = field(default_factory=time.monotonic)
    started_cpu: float = field(default_factory=time.process_time)
    tool_calls: int = 0

    def cost(self) -> Cost:
        return Cost(tool_calls=self.tool_calls, cpu_seconds=round(max(0.0, time.process_time() - self.started_cpu), 6),
                    wall_seconds=round(max(0.0, time.monotonic() - self.started_wall), 6))


def quote_untrusted(text: str, limit: int = ALERT_TEXT_CHARS) -> str:
    """Alert text made safe to quote: one line, bounded, in quotes (pure)."""
    clean = _CONTROL.sub(" ", text).strip()
    if len(clean) > limit:
        clean = clean[: limit - 1] + "…"
    return json.dumps(clean, ensure_ascii=False)


def bounded(text: str, limit: int = EXCERPT_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def assess(sample: ConnectionSample) -> tuple[str, str, float, Conclusion]:
    """(summary, probable cause, confidence, conclusion) from one sample (pure rules)."""
    used, limit = sample.client_connections, max(1, sample.max_connections)
    share = used / limit
    idle_tx = sample.by_state.get("idle in transaction", 0) + sample.by_state.get(
        "idle in transaction (aborted)", 0)
    if share >= SATURATED:
        return (
            f"PostgreSQL connections near exhaustion: {used} of {limit} ({share:.0%}) in use",
            f"connection exhaustion: {used} client sessions against max_connections={limit}"
            + (f", {idle_tx} of them idle in transaction" if idle_tx else ""),
            0.75,
            Conclusion.CONCLUSIVE,
        )
    if idle_tx >= IDLE_IN_TX_MIN and idle_tx >= IDLE_IN_TX_SHARE * used:
        return (
            f"{idle_tx} PostgreSQL sessions idle in transaction (oldest {sample.oldest_idle_in_tx_s:.0f} s)",
            "sessions holding transactions open without work (locks, connection slots)",
            0.6,
            Conclusion.CONCLUSIVE,
        )
    return (
        f"PostgreSQL connections within limits: {used} of {limit} ({share:.0%}) in use",
        "not connection exhaustion; this check did not find the cause",
        0.2,
        Conclusion.INCONCLUSIVE,
    )


async def sample_connections(env: AgentEnv, *, user: str | None, password: str | None) -> ConnectionSample:
    """Run ``CONNECTIONS_QUERY`` in a read-only session bounded by a statement timeout."""
    import psycopg  # imported here: an agent without PostgreSQL configured never needs it

    timeout_ms = int(env.query_timeout * 1000)
    kwargs: dict[str, object] = {
        "connect_timeout": max(1, int(env.query_timeout)),
        "application_name": f"agentjobs-agent {env.investigation_id[:16]}",
        "options": f"-c statement_timeout={timeout_ms} -c default_transaction_read_only=on",
        "autocommit": True,
    }
    if user is not None:
        kwargs |= {"user": user, "password": password or ""}

    async def query() -> ConnectionSample:
        async with await psycopg.AsyncConnection.connect(env.postgres_dsn, **kwargs) as conn:
            cur = await conn.execute(CONNECTIONS_QUERY)
            row = await cur.fetchone()
        assert row is not None
        agent_user, max_conn, clients, by_state, oldest = row
        return ConnectionSample(agent_user=str(agent_user), max_connections=int(max_conn),
                                client_connections=int(clients),
                                by_state={str(k): int(v) for k, v in (by_state or {}).items()},
                                oldest_idle_in_tx_s=float(oldest or 0.0))

    # statement_timeout bounds the query; this bounds connecting and everything else.
    return await asyncio.wait_for(query(), timeout=env.query_timeout * 3)


def _alert_line(incident: IncidentEvent) -> str:
    return f"alert {quote_untrusted(incident.alertname or incident.group_key)}"


def build_finding(
    incident: IncidentEvent,
    env: AgentEnv,
    *,
    summary: str,
    probable_cause: str,
    confidence: float,
    conclusion: Conclusion,
    evidence: Sequence[Evidence],
    tally: Tally,
) -> Finding:
    """The Finding for this investigation (idempotency key ``<investigation_id>:finding``)."""
    return Finding(
        investigation_id=env.investigation_id,
        incident_key=identify(incident).incident_key,
        idempotency_key=f"{env.investigation_id}:finding",
        summary=bounded(f"{_alert_line(incident)}: {summary}", 16384),
        probable_cause=bounded(probable_cause, 16384),
        confidence=confidence,
        phase=env.phase,
        severity=incident.severity,
        domain=incident.label(env.domain_label),
        conclusion=conclusion,
        evidence=tuple(evidence),
        cost=tally.cost(),
        produced_at=utcnow(),
        reasoner="rules",
    )


def inconclusive(
    incident: IncidentEvent, env: AgentEnv, *, why: str, evidence: Sequence[Evidence], tally: Tally
) -> Finding:
    """An honest 'could not tell' finding with the failure as evidence."""
    return build_finding(
        incident, env, summary=f"investigation inconclusive: {why}",
        probable_cause="unknown: the diagnostics this agent could run did not answer",
        confidence=0.0, conclusion=Conclusion.INCONCLUSIVE, evidence=evidence, tally=tally,
    )


async def investigate(
    incident: IncidentEvent,
    env: AgentEnv,
    *,
    db_user: str | None,
    db_password: str | None,
    prior_evidence: Sequence[Evidence] = (),
    db_unavailable: str | None = None,
    tally: Tally,
) -> Finding:
    """Run the checks and conclude; never raises for a tool failure (that is evidence)."""
    evidence = list(prior_evidence)
    if not env.postgres_dsn:
        evidence.append(Evidence(source="postgres", query="", excerpt="PostgreSQL is not configured "
                                 "(AGENTJOBS_POSTGRES__DSN is empty)", at=utcnow(), ok=False))
        return inconclusive(incident, env, why="no PostgreSQL to examine", evidence=evidence, tally=tally)
    if db_unavailable is not None:
        return inconclusive(incident, env, why=f"no PostgreSQL credentials ({db_unavailable})",
                            evidence=evidence, tally=tally)
    tally.tool_calls += 1
    try:
        sample = await sample_connections(env, user=db_user, password=db_password)
    except Exception as exc:  # noqa: BLE001 - any tool failure becomes evidence
        detail = f"{type(exc).__name__}: {str(exc)[:500]}"
        if db_password:
            detail = detail.replace(db_password, "***")
        evidence.append(Evidence(source="postgres", query=CONNECTIONS_QUERY, excerpt=bounded(detail),
                                 at=utcnow(), ok=False))
        return inconclusive(incident, env, why="the PostgreSQL query failed", evidence=evidence, tally=tally)
    excerpt = json.dumps(
        {"agent_user": sample.agent_user, "max_connections": sample.max_connections,
         "client_connections": sample.client_connections, "by_state": sample.by_state,
         "oldest_idle_in_tx_s": round(sample.oldest_idle_in_tx_s, 1)},
        sort_keys=True,
    )
    evidence.append(Evidence(source="postgres", query=CONNECTIONS_QUERY, excerpt=bounded(excerpt), at=utcnow()))
    summary, cause, confidence, conclusion = assess(sample)
    return build_finding(incident, env, summary=summary, probable_cause=cause, confidence=confidence,
                         conclusion=conclusion, evidence=evidence, tally=tally)
