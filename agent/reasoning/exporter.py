"""The postgres tool's questions answered from postgres-exporter's metrics in Prometheus.

Why: at the incident the agent is most needed for — every ordinary connection slot
taken — PostgreSQL refuses the agent's (non-superuser) role ("remaining connection
slots are reserved ..."), while postgres-exporter, connected long before, keeps
reporting ``pg_stat_activity_count`` by database and state to Prometheus. So when the
direct source is unreachable or refuses (``refused``), the reasoner asks the same
question here and the finding says which source answered.

What this owns: choosing the exporter's series for the alert (the alert's ``server``,
``instance``, ``job`` labels, else the postgres tool's own server address, else the
server holding the alert's ``datname``, else the only server Prometheus knows), the
PromQL, and answers in the SAME SHAPE as the postgres tool's (``connections``:
``max_connections``, ``total``, ``by_state``, ``by_database``, ``by_application``
when the exporter has that label — Debian's 0.11 does not; ``long_transactions``:
rows of ``state``, ``datname``, ``max_tx_duration_s``). Counts, never sessions: the
exporter has no pids, queries or client addresses, so nothing here can name a
session to end.

A reserved path instead of a fallback exists on PostgreSQL 16+: the bootstrap grants
the agent's Vault role ``pg_use_reserved_connections`` where the server has it, and
``reserved_connections`` (> 0) keeps slots for that role (README, "PostgreSQL at
connection exhaustion"). PostgreSQL 15 has no such role, hence this module.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from agent.tools.base import Observation, bounded, cut_at_word
from schemas import utcnow

from .base import Investigation

SOURCE = "postgres-exporter"
# The labels that identify one exporter target (one PostgreSQL server) in Prometheus.
IDENTITY_LABELS = ("server", "instance", "job")
WHY_CHARS = 600  # of the direct source's refusal quoted in the excerpt (the full text is its own evidence)

# What a refusal to serve us looks like, as opposed to an answer or a permission error on one view:
# no slot (PostgreSQL 15: "... reserved for non-replication superuser connections", 16: "... for roles
# with the SUPERUSER attribute"), too many clients, not reachable, not accepting connections, our login
# refused, or no answer in time.
_REFUSED = re.compile(
    r"remaining connection slots are reserved|too many clients|too many connections"
    r"|connection refused|could not connect|connection to server .* failed|no route to host"
    r"|could not translate host name|name or service not known|network is unreachable"
    r"|the database system is (?:starting up|shutting down|in recovery mode|not accepting connections)"
    r"|server closed the connection|terminating connection due to administrator command"
    r"|password authentication failed|no pg_hba\.conf entry|role \S+ does not exist"
    r"|timed out|timeout expired|connection timeout",
    re.IGNORECASE,
)


def refused(obs: Observation) -> bool:
    """The direct source was unreachable or refused us (slots, login, timeout), not an answer (pure).

    A permission error on one view or a bad parameter is not a refusal: PostgreSQL answered, and
    its exporter would not know more.
    """
    if obs.ok or "budget" in obs.excerpt:  # our own budget ran out: the exporter would not be asked either
        return False
    return bool(_REFUSED.search(obs.excerpt))


def quote(value: str) -> str:
    """A PromQL string literal of ``value`` (untrusted alert text stays a value) (pure)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def selector(matchers: Mapping[str, str]) -> str:
    """``{k="v",...}`` of exact matchers, sorted (pure); ``""`` for none."""
    if not matchers:
        return ""
    return "{" + ",".join(f"{k}={quote(v)}" for k, v in sorted(matchers.items())) + "}"


def candidates(labels: Mapping[str, str], server_hint: str | None = None) -> list[dict[str, str]]:
    """Matchers to try in turn for the alert's server (pure): the alert's identity labels together,
    each of them alone, then the postgres tool's own ``host:port``. An empty list: nothing names it."""
    given = {k: labels[k] for k in IDENTITY_LABELS if labels.get(k)}
    found: list[dict[str, str]] = []
    if given:
        found.append(given)
    found += [{k: v} for k, v in given.items() if k != "job" and len(given) > 1]
    if server_hint and {"server": server_hint} not in found:
        found.append({"server": server_hint})
    return found


def identities(series: Iterable[Mapping[str, Any]]) -> list[dict[str, str]]:
    """The distinct (server, instance, job) label sets of Prometheus series, in order (pure)."""
    seen: list[dict[str, str]] = []
    for s in series:
        metric = s.get("metric") or {}
        ident = {k: str(metric[k]) for k in IDENTITY_LABELS if metric.get(k)}
        if ident and ident not in seen:
            seen.append(ident)
    return seen


def _value(s: Mapping[str, Any]) -> float | None:
    v = s.get("value")
    return float(v) if isinstance(v, int | float) and v == v else None  # NaN is no value


def connections_answer(settings: Sequence[Mapping[str, Any]], activity: Sequence[Mapping[str, Any]],
                       ident: Mapping[str, str]) -> dict[str, Any]:
    """The postgres tool's ``connections`` answer from the exporter's series (pure).

    ``settings``: ``pg_settings_max_connections`` / ``pg_settings_superuser_reserved_connections``
    of one server; ``activity``: ``pg_stat_activity_count`` summed by database, state (and
    application_name where the exporter has it).
    """
    by_name = {str((s.get("metric") or {}).get("__name__", "")): _value(s) for s in settings}
    max_conn = int(by_name.get("pg_settings_max_connections") or 0)
    reserved = by_name.get("pg_settings_superuser_reserved_connections")
    by_state: dict[str, int] = {}
    by_db: dict[str, int] = {}
    by_app: dict[str, dict[str, int]] = {}
    for s in activity:
        n = int(_value(s) or 0)
        if n <= 0:
            continue
        metric = s.get("metric") or {}
        state = str(metric.get("state") or "unknown")
        by_state[state] = by_state.get(state, 0) + n
        db = str(metric.get("datname") or "")
        by_db[db] = by_db.get(db, 0) + n
        if "application_name" in metric:
            app = by_app.setdefault(str(metric["application_name"] or "(none)"), {})
            app[state] = app.get(state, 0) + n
    total = sum(by_state.values())
    applications = [
        {"application_name": app, "total": sum(states.values()), "active": states.get("active", 0),
         "idle": states.get("idle", 0),
         "idle_in_transaction": sum(v for k, v in states.items() if k.startswith("idle in transaction"))}
        for app, states in by_app.items()]
    applications.sort(key=lambda a: (-a["total"], a["application_name"]))
    return {
        "source": SOURCE,
        "series": dict(ident),
        "max_connections": max_conn,
        "superuser_reserved_connections": int(reserved) if reserved is not None else None,
        "total": total,
        "usage_ratio": round(total / max(1, max_conn), 4),
        "by_state": dict(sorted(by_state.items(), key=lambda kv: (-kv[1], kv[0]))),
        "by_database": [{"datname": d, "total": n} for d, n in sorted(by_db.items(), key=lambda kv: (-kv[1], kv[0]))],
        "by_application": applications,  # empty: this exporter has no application_name label
        "by_client": [],  # the exporter has no client addresses
    }


def long_transactions_answer(series: Sequence[Mapping[str, Any]], ident: Mapping[str, str]) -> dict[str, Any]:
    """Rows of ``state``, ``datname``, ``max_tx_duration_s`` (longest first) from
    ``pg_stat_activity_max_tx_duration`` (pure)."""
    rows = []
    for s in series:
        v = _value(s)
        if v is None or v <= 0:
            continue
        metric = s.get("metric") or {}
        rows.append({"state": str(metric.get("state") or "unknown"), "datname": str(metric.get("datname") or ""),
                     "max_tx_duration_s": round(v, 3)})
    rows.sort(key=lambda r: (-r["max_tx_duration_s"], r["datname"], r["state"]))
    return {"source": SOURCE, "series": dict(ident), "rows": rows}


def settings_query(matchers: Mapping[str, str]) -> str:
    """max_connections and superuser_reserved_connections of the servers ``matchers`` select (pure)."""
    names = '__name__=~"pg_settings_max_connections|pg_settings_superuser_reserved_connections"'
    return "{" + ",".join([names, *(f"{k}={quote(v)}" for k, v in sorted(matchers.items()))]) + "}"


def _preface(why: str) -> str:
    return f"answered from {SOURCE} metrics in Prometheus because postgres refused: {cut_at_word(why, WHY_CHARS)}"


def _where(ident: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={quote(v)}" for k, v in sorted(ident.items()))


def server_hint(inv: Investigation) -> str | None:
    """``host:port`` of the postgres tool's server, when the Job has one (the exporter's ``server``)."""
    tool = inv.tools.get("postgres")
    hint = getattr(tool, "server", None)
    return hint if isinstance(hint, str) and hint else None


async def _series(inv: Investigation, promql: str) -> list[Mapping[str, Any]] | None:
    obs = await inv.call("prometheus", "query", {"expr": promql})
    if not obs.ok or not isinstance(obs.data, list):
        return None
    return [s for s in obs.data if isinstance(s, Mapping)]


async def find_server(inv: Investigation, labels: Mapping[str, str]) -> tuple[dict[str, str], list[str]] | None:
    """The one exporter target the alert is about, and the PromQL asked to find it; None: none or ambiguous."""
    asked: list[str] = []
    for matchers in candidates(labels, server_hint(inv)):
        promql = settings_query(matchers)
        asked.append(promql)
        found = identities(await _series(inv, promql) or [])
        if len(found) == 1:
            return found[0], asked
    if any(labels.get(k) for k in IDENTITY_LABELS):
        return None  # the alert names its server, and Prometheus has no (single) exporter target for it
    datname = labels.get("datname") or labels.get("database") or labels.get("db")
    if datname:
        promql = f"count by (server, instance, job) (pg_stat_activity_count{selector({'datname': datname})})"
    else:
        promql = "count by (server, instance, job) (pg_settings_max_connections)"
    asked.append(promql)
    found = identities(await _series(inv, promql) or [])
    return (found[0], asked) if len(found) == 1 else None


async def connections(inv: Investigation, labels: Mapping[str, str], why: str) -> Observation | None:
    """postgres.connections answered from the exporter's metrics; None without Prometheus or such series."""
    if not inv.offers("prometheus", "query"):
        return None
    found = await find_server(inv, labels)
    if found is None:
        return None
    ident, asked = found
    sel = selector(ident)
    settings_q = settings_query(ident)
    activity_q = f"sum by (datname, state, application_name) (pg_stat_activity_count{sel}) > 0"
    settings = await _series(inv, settings_q)
    activity = await _series(inv, activity_q)
    if not settings or activity is None:
        return None
    data = connections_answer(settings, activity, ident)
    if not data["max_connections"]:
        return None
    idle_tx = sum(v for k, v in data["by_state"].items() if k.startswith("idle in transaction"))
    reserved = data["superuser_reserved_connections"]
    lines = [
        _preface(why),
        f"client connections {data['total']}/{data['max_connections']} ({data['usage_ratio']:.0%} of "
        f"max_connections" + (f", {reserved} reserved for superusers" if reserved is not None else "")
        + f"); idle in transaction {idle_tx}",
        "by state: " + (", ".join(f"{k}={v}" for k, v in data["by_state"].items()) or "none"),
        "by database: " + ("; ".join(f"{d['datname'] or '-'} {d['total']}" for d in data["by_database"][:10])
                           or "none"),
    ]
    if data["by_application"]:
        lines.append("by application_name: " + "; ".join(
            f"{a['application_name']} {a['total']} (idle in transaction {a['idle_in_transaction']})"
            for a in data["by_application"][:10]))
    else:
        lines.append("by application_name: not in the exporter's metrics (no application_name label)")
    lines.append(f"(series {_where(ident)}; counts only: the exporter has no sessions, pids or queries)")
    asked_all = list(dict.fromkeys([*asked, settings_q, activity_q]))
    return Observation(tool="prometheus", operation="query", query="\n".join(asked_all),
                       ok=True, at=utcnow(), data=data, excerpt=bounded("\n".join(lines)))


async def long_transactions(inv: Investigation, labels: Mapping[str, str], why: str) -> Observation | None:
    """The longest open transaction by database and state from ``pg_stat_activity_max_tx_duration``;
    None without Prometheus or such series."""
    if not inv.offers("prometheus", "query"):
        return None
    found = await find_server(inv, labels)
    if found is None:
        return None
    ident, asked = found
    promql = f"pg_stat_activity_max_tx_duration{selector(ident)}"
    series = await _series(inv, promql)
    if not series:
        return None
    data = long_transactions_answer(series, ident)
    lines = [_preface(why)]
    if data["rows"]:
        lines += [f"longest transaction {r['max_tx_duration_s']:.0f} s in state {r['state']!r} on database "
                  f"{r['datname'] or '-'}" for r in data["rows"][:20]]
    else:
        lines.append("no open transaction in any state")
    lines.append(f"(series {_where(ident)}; the exporter has no pids or queries)")
    return Observation(tool="prometheus", operation="query", query="\n".join(dict.fromkeys([*asked, promql])), ok=True,
                       at=utcnow(), data=data, excerpt=bounded("\n".join(lines)))
