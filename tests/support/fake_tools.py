"""Test doubles of the agent's tool contract, and canned data in the shapes the real tools return.

``FakeTool`` answers from canned data exactly as a tool of ``agent/tools/base.py``
does (``Observation`` objects), so reasoner tests exercise the reasoning, not
the data sources; the builders below make the observations of the usual
2 AM cases (connection exhaustion, idle-in-transaction sessions, firing series).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from urllib.parse import quote_plus

from agent.reasoning import Investigation
from agent.tools.base import Observation, OperationSpec
from schemas import Alert, AlertStatus, IncidentEvent, Phase, utcnow

T0 = datetime.fromisoformat("2026-11-26T02:04:31+00:00")  # when the alert started firing


class FakeTool:
    """A tool answering from canned data (a test double of the Tool contract)."""

    credential_domain = None

    def __init__(self, name: str, answers: Mapping[str, Any], *, failing: Mapping[str, str] | None = None,
                 raising: Mapping[str, Exception] | None = None,
                 params: Mapping[str, tuple[str, ...]] | None = None) -> None:
        self.name = name
        self.params = dict(params or {})  # operation -> parameter names its schema declares
        self.answers = dict(answers)
        self.failing = dict(failing or {})
        self.raising = dict(raising or {})
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def operations(self) -> dict[str, OperationSpec]:
        return {op: OperationSpec(name=op, description=f"{self.name} {op} (fake)",
                                  parameters={"type": "object",
                                              "properties": {p: {"type": "string"} for p in self.params.get(op, ())}})
                for op in {*self.answers, *self.failing, *self.raising}}

    async def run(self, operation: str, params: Mapping[str, Any]) -> Observation:
        self.calls.append((operation, dict(params)))
        query = f"{operation}({json.dumps(dict(params), sort_keys=True)})"
        if operation in self.raising:
            raise self.raising[operation]
        if operation in self.failing:
            return Observation(tool=self.name, operation=operation, query=query, ok=False, at=utcnow(),
                               excerpt=self.failing[operation])
        answer = self.answers[operation]
        data = answer(params) if callable(answer) else answer
        return Observation(tool=self.name, operation=operation, query=query, ok=True, at=utcnow(), data=data,
                           excerpt=json.dumps(data)[:2000])

    async def close(self) -> None:
        pass

    def called(self, operation: str) -> list[dict[str, Any]]:
        return [p for op, p in self.calls if op == operation]


def incident(alertname: str, *, expr: str = "", annotations: Mapping[str, str] | None = None,
             starts_at: datetime = T0, **labels: str) -> IncidentEvent:
    all_labels = {"alertname": alertname, "severity": "critical", "domain": "database", **labels}
    url = f"http://prometheus:9090/graph?g0.expr={quote_plus(expr)}&g0.tab=1" if expr else ""
    alert = Alert(status=AlertStatus.FIRING, labels=all_labels, annotations=dict(annotations or {}),
                  starts_at=starts_at, generator_url=url)
    return IncidentEvent(source="http://alertmanager:9093", group_key=f'{{}}:{{alertname="{alertname}"}}',
                         status=AlertStatus.FIRING, alerts=(alert,), common_labels=all_labels)


def investigation(inc: IncidentEvent, *tools: FakeTool, phase: Phase = Phase.READ_ONLY, **kw: Any) -> Investigation:
    return Investigation(incident=inc, tools={t.name: t for t in tools}, phase=phase, **kw)


# --- canned data in the shapes the tools return (agent/tools/*.py) ----------------------------

SATURATION_EXPR = "sum(pg_stat_activity_count) / sum(pg_settings_max_connections) > 0.9"
FIRING_SERIES = [{"metric": {"instance": "pg-0:9187"}, "value": 0.95, "at": 1795000000.0}]


def app_row(name: str, *, active: int = 0, idle: int = 0, idle_tx: int = 0) -> dict[str, Any]:
    return {"application_name": name, "total": active + idle + idle_tx, "active": active, "idle": idle,
            "idle_in_transaction": idle_tx, "oldest_idle_in_transaction_s": 235.0 if idle_tx else 0.0}


def exhausted_connections() -> dict[str, Any]:
    return {"max_connections": 20, "superuser_reserved_connections": 3, "total": 19, "usage_ratio": 0.95,
            "by_state": {"idle in transaction": 15, "active": 3, "idle": 1},
            "by_application": [app_row("checkout-api", idle_tx=15), app_row("billing", active=2, idle=1),
                               app_row("agentjobs-agent", active=1)],
            "by_client": [{"client_addr": "10.0.3.7", "total": 15, "idle_in_transaction": 15},
                          {"client_addr": "10.0.4.2", "total": 4, "idle_in_transaction": 0}],
            "by_database": [{"datname": "shop", "total": 19}], "oldest_idle_in_transaction_s": 235.0}


def calm_connections(total: int = 12) -> dict[str, Any]:
    """A server far from its limit: a few active sessions, the rest idle, nobody idle in transaction."""
    return {"max_connections": 100, "superuser_reserved_connections": 3, "total": total, "usage_ratio": total / 100,
            "by_state": {"active": 4, "idle": total - 4},
            "by_application": [app_row("checkout-api", active=2, idle=total - 6), app_row("billing", active=2, idle=2)],
            "by_client": [{"client_addr": "10.0.3.7", "total": total, "idle_in_transaction": 0}],
            "by_database": [{"datname": "shop", "total": total}], "oldest_idle_in_transaction_s": 0.0}


def session(pid: int, app: str, *, state: str = "idle in transaction", xact_age_s: float = 0.0,
            running_s: float = 0.0, client: str = "10.0.3.7", query: str = "SELECT 1") -> dict[str, Any]:
    return {"pid": pid, "usename": "shop", "application_name": app, "client_addr": client, "datname": "shop",
            "state": state, "xact_age_s": xact_age_s, "idle_s": xact_age_s * 0.9, "running_s": running_s,
            "wait_event_type": None, "wait_event": None, "wrote": True, "query": query}


def idle_sessions(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_app: dict[str, int] = {}
    for r in rows:
        by_app[r["application_name"] or "(none)"] = by_app.get(r["application_name"] or "(none)", 0) + 1
    return {"total": len(rows), "min_age_s": 30, "by_application": by_app, "sessions": rows}


IDLE_CHECKOUT = idle_sessions([session(4100 + i, "checkout-api", xact_age_s=95.0 + 10 * i,
                                       query="SELECT * FROM carts WHERE id = $1") for i in range(15)])
NO_CHAINS = {"blocked_total": 0, "blocked": [], "blockers": [], "roots": []}


def postgres(**overrides: Any) -> FakeTool:
    answers: dict[str, Any] = {"connections": exhausted_connections(), "idle_in_transaction": IDLE_CHECKOUT,
                               "long_running": {"total": 0, "min_s": 30, "sessions": []},
                               "blocking_chains": NO_CHAINS}
    answers.update(overrides)
    return FakeTool("postgres", answers)


def prometheus(series: Any = FIRING_SERIES) -> FakeTool:
    return FakeTool("prometheus", {"alert_expression": series, "query": series})


def connection_alert(annotations: Mapping[str, str] | None = None) -> IncidentEvent:
    return incident("PostgresTooManyConnections", expr=SATURATION_EXPR, instance="pg-0:9187",
                    annotations=annotations or {"summary": "PostgreSQL uses 95% of max_connections"})


# --- a queue backlog (agent/tools/rabbitmq.py) --------------------------------------------------

def queue_status(ready: int, consumers: int, *, queue: str = "orders", vhost: str = "shop") -> dict[str, Any]:
    return {"vhost": vhost, "queue": queue, "message_count": ready, "consumer_count": consumers}


def rabbitmq(answer: Any = None, *, failing: str | None = None) -> FakeTool:
    """The queue tool answering ``queue_status`` with ``answer`` (or failing with the reason ``failing``)."""
    if failing is not None:
        return FakeTool("rabbitmq", {}, failing={"queue_status": failing}, params={"queue_status": ("queue", "vhost")})
    return FakeTool("rabbitmq", {"queue_status": answer if answer is not None else queue_status(1200, 0)},
                    params={"queue_status": ("queue", "vhost")})


def backlog_alert(alertname: str = "OrdersQueueBacklog", *, queue: str = "orders", vhost: str = "shop",
                  annotations: Mapping[str, str] | None = None, **labels: str) -> IncidentEvent:
    """The alert ``agentjobs up --demo`` sends about its queue backlog (the name is not to be relied on)."""
    return incident(alertname, annotations=annotations,
                    **{"domain": "messaging", "vhost": vhost, "queue": queue, "service": "orders-worker", **labels})
