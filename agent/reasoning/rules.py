"""The deterministic ``rules`` reasoner: playbooks, competing hypotheses, honest "inconclusive".

How it decides:

1. ``alert_facts`` reads the incident — alertname, labels, annotations and the
   PromQL in the ``generatorURL``. That text is untrusted: it is only *matched*
   against patterns to choose playbooks (which run read-only diagnostics) and
   never becomes a decision, an action or a query by itself. Label values used
   as tool parameters are validated (Kubernetes names, AMQP queue and vhost
   names) or escaped (LogQL).
2. ``choose_playbooks`` scores the playbooks against those facts; the best
   (ties: all of them) run, and the queue playbook whenever the alert names a
   queue. Nothing matches → the generic sweep (the alert's own expression, the
   named queue, the related pods and events, the logs).
3. Each playbook calls tools through ``Investigation.call`` and drafts
   competing hypotheses; every piece of evidence moves a hypothesis' log-odds
   up or down and is kept, with the reason, as evidence for or against it.
4. The best hypothesis wins only if it is probable enough *and* clearly ahead
   of the runner-up; otherwise the assessment is "inconclusive", says why and
   proposes no action.

Kubernetes proposals carry what the executors' preconditions re-check
(``agent/remediation/kubernetes.py``), as observed: ``delete_pod`` for one
crash-looping pod of a Deployment whose other replicas are ready (its
ReplicaSet recreates it; params ``namespace``, ``pod``, ``uid``, ``restarts``,
``observed_at``), ``restart_deployment`` when every replica crash-loops or
pods are stuck unready (``pods``: the pods seen), and ``scale_deployment`` when
every ready pod is saturated (the alert's expression holds for each of them)
— one replica more than the Deployment's ``from_replicas``, at most
``SCALE_MAX_REPLICAS``, with the ``trigger``.

Reading tool output is tolerant and isolated: one small ``read_*`` function
per observation kind, so shape changes in the tools are fixed in one place.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from agent.tools.base import Observation, bounded, cut_at_word
from schemas import Conclusion, Evidence, IncidentEvent, ProposedAction

from .actions import REGISTRY
from .base import Assessment, Hypothesis, Investigation, quote_untrusted

NAME = "rules"

# Thresholds. Shares are fractions, times are seconds.
SATURATED = 0.85  # connections in use / max_connections: exhausted
NEAR_SATURATED = 0.7
NOT_SATURATED = 0.5
IDLE_TX_MIN_AGE = 30  # seconds idle in transaction before a session counts
IDLE_TX_SHARE = 0.2  # share of all sessions idle in transaction worth blaming
CULPRIT_SHARE = 0.5  # share of the idle-in-transaction sessions one application must hold
LONG_RUNNING_MIN = 30  # seconds before a query counts as long-running
LOCK_WAIT_LONG = 30  # seconds of lock wait that hurts
CRASH_RESTARTS = 3  # restarts from which a pod is crash-looping
SCALE_MAX_REPLICAS = 20  # scale_deployment is never proposed beyond this many replicas
ROLLOUT_RECENT = timedelta(minutes=30)  # a rollout this close before the alert is the prime suspect
ROLLOUT_WINDOW = timedelta(hours=2)  # ... and within this window still a suspect
LOG_WINDOW = "30m"  # logs.error_counts window
LOG_ERROR_RATIO = 0.05  # error lines / all lines that count as an error spike
LOG_ERRORS_MIN = 10
QUEUE_BACKLOG = 100  # ready messages from which a queue with consumers counts as backed up
QUEUE_BACKLOG_PER_CONSUMER = 1000  # ready messages per consumer that say the consumers fall far behind
# Decision.
PRIOR = -2.0  # log-odds of a hypothesis before any evidence (≈ 0.12)
MAX_SCORE = 0.95  # rules are never certain
CONCLUSIVE_SCORE = 0.6  # the best hypothesis must reach this ...
CONCLUSIVE_MARGIN = 0.15  # ... and lead the runner-up by this much
CONCLUSIVE_LOG_ODDS_MARGIN = 1.0  # ... or, both near the ceiling, by this much weight of evidence
SYMPTOM_WEIGHT = 1.5  # a probable hypothesis that explains the very symptom the alert is about (a tie-break)
INCONCLUSIVE_CONFIDENCE = 0.4  # confidence is capped here when inconclusive
AGENT_APPLICATION_PREFIX = "agentjobs-agent"  # our own diagnostics session is never the culprit

_IDLE_TX_STATES = ("idle in transaction", "idle in transaction (aborted)")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_POD_OF_DEPLOYMENT = re.compile(r"^(?P<deployment>[a-z0-9][-a-z0-9.]*?)-[a-z0-9]{6,10}-[a-z0-9]{5}$")
_LOG_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


# --------------------------------------------------------------------------------------------
# Reading observations: tolerant, one function per kind. The fields relied on are named in each
# docstring (the tools' shapes first, then aliases), so shape changes are fixed in one place.
# --------------------------------------------------------------------------------------------

_LIST_KEYS = ("items", "rows", "result", "results", "data", "pods", "events", "replica_sets", "rollouts",
              "sessions", "chains", "lines", "series", "entries", "streams")
NO_APPLICATION = "(none)"  # how the postgres tool names sessions without application_name


def rows(data: Any) -> list[Mapping[str, Any]]:
    """The list of row objects in ``data`` (a list, or an object wrapping one)."""
    if isinstance(data, list):
        return [r for r in data if isinstance(r, Mapping)]
    if isinstance(data, Mapping):
        for key in _LIST_KEYS:
            if isinstance(data.get(key), list | Mapping):
                found = rows(data[key])
                if found:
                    return found
    return []


def _pick(row: Any, *names: str) -> Any:
    if not isinstance(row, Mapping):
        return None
    for n in names:
        if row.get(n) is not None:
            return row[n]
    return None


def _int(v: Any, default: int | None = None) -> int | None:
    if isinstance(v, bool):
        return int(v)
    try:
        return int(float(v))
    except (TypeError, ValueError, OverflowError):
        return default


def _float(v: Any, default: float | None = None) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return default
    return f if math.isfinite(f) else default


def _str(v: Any) -> str:
    return "" if v is None else str(v)


def _app(v: Any) -> str:
    """An application_name; the tool's placeholder for "none" is the empty string here."""
    name = _str(v)
    return "" if name == NO_APPLICATION else name


def _time(v: Any) -> datetime | None:
    if isinstance(v, datetime):
        return v if v.tzinfo else v.replace(tzinfo=UTC)
    if isinstance(v, str) and v:
        try:
            t = datetime.fromisoformat(v.replace("Z", "+00:00"))
            return t if t.tzinfo else t.replace(tzinfo=UTC)
        except ValueError:
            pass
    f = _float(v)
    if f is None or isinstance(v, bool):
        return None
    try:
        return datetime.fromtimestamp(f / 1e9 if f > 1e14 else f, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _counts(v: Any) -> dict[str, int]:
    """``{"state": n}`` from a mapping of counts (a bare number is a total)."""
    if isinstance(v, Mapping):
        return {str(k): n for k, raw in v.items() if (n := _int(raw)) is not None}
    n = _int(v)
    return {"total": n} if n is not None else {}


_STATE_COLUMNS = (("active", "active"), ("idle", "idle"), ("idle_in_transaction", "idle in transaction"),
                  ("total", "total"))


def _grouped(raw: Any, key_names: tuple[str, ...], normalise: Callable[[Any], str]) -> dict[str, dict[str, int]]:
    """Counts per group from ``{group: {state: n}}``, ``{group: n}`` or rows with per-state columns or
    ``state``/``count``."""
    out: dict[str, dict[str, int]] = {}
    if isinstance(raw, Mapping):
        return {normalise(k): _counts(v) for k, v in raw.items()}
    for r in rows(raw):
        group = normalise(_pick(r, *key_names))
        states = out.setdefault(group, {})
        if r.get("state") is not None:
            n = _int(_pick(r, "count", "n", "connections"), 0) or 0
            states[_str(r["state"])] = states.get(_str(r["state"]), 0) + n
            continue
        for column, state in _STATE_COLUMNS:
            if (n := _int(r.get(column))) is not None:
                states[state] = states.get(state, 0) + n
    return out


@dataclass(frozen=True, kw_only=True)
class Connections:
    max_connections: int
    total: int
    by_state: dict[str, int]
    by_application: dict[str, dict[str, int]]  # application_name ("" when unset) → {state: n, "total": n}
    by_client: dict[str, dict[str, int]]  # client address → {"total": n, "idle in transaction": n}


def read_connections(obs: Observation) -> Connections | None:
    """postgres.connections: ``max_connections``, ``total``, ``by_state{state:n}``, ``by_application`` (rows of
    ``application_name``, ``total``, ``active``, ``idle``, ``idle_in_transaction``; or ``{app:{state:n}}``),
    ``by_client`` / ``by_client_addr`` (rows of ``client_addr``, ``total``, ``idle_in_transaction``)."""
    d = obs.data if obs.ok else None
    if not isinstance(d, Mapping):
        return None
    by_state = _counts(_pick(d, "by_state", "states"))
    by_app = _grouped(_pick(d, "by_application", "by_application_name", "applications"),
                      ("application_name", "application", "app"), _app)
    by_client = _grouped(_pick(d, "by_client", "by_client_addr", "clients"), ("client_addr", "client"), _str)
    total = _int(_pick(d, "total", "client_connections", "connections", "used"))
    if total is None:
        total = sum(by_state.values())
    max_conn = _int(_pick(d, "max_connections", "max"), 0) or 0
    return Connections(max_connections=max_conn, total=total, by_state=by_state, by_application=by_app,
                       by_client=by_client)


@dataclass(frozen=True, kw_only=True)
class Session:
    pid: int | None
    application: str  # "" when unset
    client_addr: str
    seconds: float  # transaction age (idle in transaction) or query duration (long-running)
    state: str
    query: str
    user: str = ""  # usename, when the tool reports it
    backend_start: str = ""  # when the tool reports it (identifies the session beyond its pid)
    database: str = ""  # datname, when the tool reports it


def _sessions(obs: Observation, seconds: tuple[str, ...]) -> list[Session]:
    if not obs.ok:
        return []
    return [Session(pid=_int(_pick(r, "pid")), application=_app(_pick(r, "application_name", "application", "app")),
                    client_addr=_str(_pick(r, "client_addr", "client")),
                    seconds=_float(_pick(r, *seconds), 0.0) or 0.0, state=_str(_pick(r, "state")),
                    query=_str(_pick(r, "query")), user=_str(_pick(r, "usename", "user")),
                    backend_start=_str(_pick(r, "backend_start")), database=_str(_pick(r, "datname", "database")))
            for r in rows(obs.data)]


def read_idle_in_transaction(obs: Observation) -> list[Session]:
    """postgres.idle_in_transaction ``sessions``: ``pid``, ``application_name``, ``client_addr``, ``xact_age_s``
    (or ``age_s``, ``idle_s``), ``state``, ``query``."""
    return _sessions(obs, ("xact_age_s", "age_s", "idle_s", "seconds"))


def read_idle_by_application(obs: Observation) -> dict[str, int]:
    """postgres.idle_in_transaction ``by_application{app: n}`` (all sessions, not only the rows returned)."""
    raw = _pick(obs.data, "by_application") if obs.ok else None
    return {_app(k): n for k, v in raw.items() if (n := _int(v))} if isinstance(raw, Mapping) else {}


def read_long_running(obs: Observation) -> list[Session]:
    """postgres.long_running ``sessions``: ``pid``, ``application_name``, ``running_s`` (or ``duration_s``),
    ``state``, ``query``."""
    return _sessions(obs, ("running_s", "duration_s", "seconds"))


@dataclass(frozen=True, kw_only=True)
class Blocked:
    pid: int | None
    application: str
    blocking_pids: tuple[int, ...]
    blocking_apps: tuple[str, ...]  # aligned with blocking_pids when known, else empty
    wait_s: float
    query: str


def read_blocking(obs: Observation) -> list[Blocked]:
    """postgres.blocking_chains ``blocked`` rows: ``pid``, ``application_name``, ``blocked_by[]``,
    ``lock_wait_s``, ``query`` (applications of blockers from ``blockers``); or flat rows of ``blocked_pid``,
    ``blocked_app``, ``blocking_pids[]``, ``blocking_apps[]``, ``wait_s``."""
    if not obs.ok:
        return []
    d = obs.data
    listed = _pick(d, "blocked")
    source = rows(listed) if isinstance(listed, list) else rows(d)
    apps = {pid: s.application for pid, s in read_blockers(obs).items()}
    out = []
    for r in source:
        raw_pids = _pick(r, "blocked_by", "blocking_pids")
        pids = tuple(p for p in (_int(x) for x in (raw_pids if isinstance(raw_pids, list) else [raw_pids]))
                     if p is not None)
        raw_apps = _pick(r, "blocking_apps", "blocking_applications")
        given = tuple(_app(a) for a in raw_apps) if isinstance(raw_apps, list) else ()
        known = given if len(given) == len(pids) else tuple(apps.get(p, "") for p in pids) if apps else ()
        out.append(Blocked(pid=_int(_pick(r, "blocked_pid", "pid")),
                           application=_app(_pick(r, "blocked_app", "application_name", "application")),
                           blocking_pids=pids, blocking_apps=known,
                           wait_s=_float(_pick(r, "lock_wait_s", "wait_s", "waiting_s"), 0.0) or 0.0,
                           query=_str(_pick(r, "query", "blocked_query"))))
    return out


def read_blockers(obs: Observation) -> dict[int, Session]:
    """postgres.blocking_chains ``blockers`` rows (the sessions holding the locks) by pid: ``pid``,
    ``application_name``, ``client_addr``, ``state``, ``xact_age_s``, ``query``."""
    listed = _pick(obs.data, "blockers") if obs.ok else None
    if not isinstance(listed, list):
        return {}
    return {s.pid: s for s in _sessions(Observation(tool=obs.tool, operation=obs.operation, query=obs.query, ok=True,
                                                    at=obs.at, data=listed), ("xact_age_s", "age_s", "seconds"))
            if s.pid is not None}


@dataclass(frozen=True, kw_only=True)
class Pod:
    name: str
    phase: str
    ready: bool | None
    restarts: int
    last_reason: str  # last termination reason, e.g. OOMKilled, Error
    exit_code: int | None
    waiting: str  # waiting reason, e.g. CrashLoopBackOff
    uid: str = ""  # metadata.uid, when the tool reports it
    owner: str = ""  # the controller, e.g. ReplicaSet/checkout-api-7d9f8b6c5d
    deleting: bool = False


def _ready(v: Any) -> bool | None:
    if isinstance(v, bool):
        return v
    if isinstance(v, str):
        if "/" in v:
            a, _, b = v.partition("/")
            return a.strip() == b.strip()
        return {"true": True, "false": False}.get(v.strip().lower())
    return None


def read_pods(obs: Observation) -> list[Pod]:
    """kubernetes.pods ``pods``: ``name``, ``uid``, ``owner``, ``deleting``, ``phase``, ``ready``, ``restarts``,
    ``waiting_reason``, ``last_termination{reason, exit_code}`` (or ``last_termination_reason``/``exit_code``,
    or the containers' ``last_reason``/``last_exit_code``)."""
    if not obs.ok:
        return []
    out = []
    for r in rows(obs.data):
        term = r.get("last_termination")
        containers = [c for c in r.get("containers") or [] if isinstance(c, Mapping)]
        last_c = next((c for c in containers if c.get("last_reason")), {})
        reason = _pick(term, "reason") or _pick(r, "last_termination_reason", "last_reason", "termination_reason") \
            or _pick(last_c, "last_reason")
        code = _pick(term, "exit_code", "exitCode")
        if code is None:
            code = _pick(r, "exit_code", "last_exit_code", "exitCode")
        if code is None:
            code = _pick(last_c, "last_exit_code")
        out.append(Pod(name=_str(_pick(r, "name")), phase=_str(_pick(r, "phase", "status")),
                       ready=_ready(_pick(r, "ready")),
                       restarts=_int(_pick(r, "restarts", "restart_count", "restartCount"), 0) or 0,
                       last_reason=_str(reason), exit_code=_int(code),
                       waiting=_str(_pick(r, "waiting_reason", "waiting")), uid=_str(_pick(r, "uid")),
                       owner=_str(_pick(r, "owner", "controller")), deleting=bool(r.get("deleting"))))
    return out


@dataclass(frozen=True, kw_only=True)
class DeploymentStatus:
    name: str
    replicas: int  # desired (spec.replicas)
    ready: int
    available: int
    unavailable: int


def read_deployment(obs: Observation) -> DeploymentStatus | None:
    """kubernetes.rollouts ``deployment``: ``name``, ``replicas`` (desired), ``ready_replicas``,
    ``available_replicas``, ``unavailable_replicas``; None without a desired count."""
    d = _pick(obs.data, "deployment") if obs.ok else None
    replicas = _int(_pick(d, "replicas", "spec_replicas"))
    if not isinstance(d, Mapping) or replicas is None:
        return None
    ready = _int(_pick(d, "ready_replicas", "readyReplicas"), 0) or 0
    available = _int(_pick(d, "available_replicas", "availableReplicas"), ready) or 0
    unavailable = _int(_pick(d, "unavailable_replicas", "unavailableReplicas"))
    return DeploymentStatus(name=_str(_pick(d, "name")), replicas=max(0, replicas), ready=ready, available=available,
                            unavailable=max(0, replicas - available) if unavailable is None else unavailable)


@dataclass(frozen=True, kw_only=True)
class Event:
    reason: str
    message: str
    type: str
    count: int
    last: datetime | None
    object: str  # e.g. Pod/checkout-api-7d9f8b6c5d-x2x4z


def read_events(obs: Observation) -> list[Event]:
    """kubernetes.events ``events``: ``reason``, ``message``, ``type``, ``count``, ``last_seen`` (or
    ``last_timestamp``), ``object``."""
    if not obs.ok:
        return []
    return [Event(reason=_str(_pick(r, "reason")), message=_str(_pick(r, "message")), type=_str(_pick(r, "type")),
                  count=_int(_pick(r, "count"), 1) or 1,
                  last=_time(_pick(r, "last_seen", "last_timestamp", "lastTimestamp", "event_time")),
                  object=_str(_pick(r, "object", "involved_object", "involvedObject")))
            for r in rows(obs.data)]


@dataclass(frozen=True, kw_only=True)
class Rollout:
    revision: int | None
    created: datetime | None
    images: tuple[str, ...]


def read_rollouts(obs: Observation) -> list[Rollout]:
    """kubernetes.rollouts ``replica_sets`` (or a list): ``revision``, ``created``, ``images[]``; newest first."""
    if not obs.ok:
        return []
    out = []
    for r in rows(obs.data):
        imgs = _pick(r, "images", "image")
        out.append(Rollout(revision=_int(_pick(r, "revision")),
                           created=_time(_pick(r, "created", "created_at", "creationTimestamp")),
                           images=tuple(map(str, imgs)) if isinstance(imgs, list) else (str(imgs),) if imgs else ()))
    return sorted(out, key=lambda r: (r.revision or 0, r.created or datetime.min.replace(tzinfo=UTC)), reverse=True)


@dataclass(frozen=True, kw_only=True)
class Sample:
    labels: dict[str, str]
    value: float | None  # latest value


def read_series(obs: Observation) -> list[Sample]:
    """prometheus query/alert_expression: series with ``metric{}`` and ``value`` (a number or ``[ts, "v"]``)
    or ``values`` (the last point counts)."""
    if not obs.ok:
        return []
    out = []
    for r in rows(obs.data):
        metric = _pick(r, "metric", "labels")
        point = _pick(r, "value")
        values = _pick(r, "values")
        if point is None and isinstance(values, list) and values:
            point = values[-1]
        v = _float(point[1]) if isinstance(point, list | tuple) and len(point) == 2 else _float(point)
        out.append(Sample(labels={str(k): str(x) for k, x in metric.items()} if isinstance(metric, Mapping) else {},
                          value=v))
    return out


@dataclass(frozen=True, kw_only=True)
class ErrorCounts:
    total: int  # all lines in the window
    errors: int  # lines matching the error pattern
    samples: tuple[str, ...]


def read_error_counts(obs: Observation) -> ErrorCounts | None:
    """logs.error_counts: ``total`` (matching lines) with ``lines_total`` (all lines) and ``samples[{line}]``;
    or ``errors`` with ``total`` (all lines)."""
    d = obs.data if obs.ok else None
    if not isinstance(d, Mapping):
        return None
    if d.get("lines_total") is not None:
        errors, total = _int(d.get("total")), _int(d.get("lines_total"))
    else:
        errors, total = _int(_pick(d, "errors", "error_lines")), _int(_pick(d, "total", "lines"))
    if errors is None:
        return None
    samples = tuple(_str(_pick(s, "line", "message")) for s in rows(d.get("samples")))
    return ErrorCounts(total=max(total or 0, errors), errors=errors, samples=samples)


@dataclass(frozen=True, kw_only=True)
class QueueStatus:
    vhost: str
    queue: str
    ready: int  # messages waiting for delivery
    consumers: int


def read_queue_status(obs: Observation) -> QueueStatus | None:
    """rabbitmq.queue_status: ``vhost``, ``queue``, ``message_count`` (ready; or ``messages_ready``, ``ready``),
    ``consumer_count`` (or ``consumers``)."""
    d = obs.data if obs.ok else None
    if not isinstance(d, Mapping):
        return None
    ready = _int(_pick(d, "message_count", "messages_ready", "ready"))
    consumers = _int(_pick(d, "consumer_count", "consumers"))
    if ready is None or consumers is None:
        return None
    return QueueStatus(vhost=_str(_pick(d, "vhost")), queue=_str(_pick(d, "queue", "name")), ready=max(0, ready),
                       consumers=max(0, consumers))


# --------------------------------------------------------------------------------------------
# The alert, as facts to match (never to obey).
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class AlertFacts:
    name: str
    labels: dict[str, str]  # the group's common labels over the first firing alert's
    text: str  # lower-cased annotations (summary, description, message), for matching only
    expression: str  # PromQL from generatorURL (g0.expr), for matching; the tool re-runs it
    generator_url: str
    starts_at: datetime
    namespace: str | None  # validated Kubernetes names, or None
    workload: str | None
    pod: str | None
    container: str | None
    instance: str
    queue: str | None = None  # a valid AMQP queue name from the ``queue`` label, or None
    vhost: str | None = None  # ... and its vhost (``vhost`` label); None: the agent's own vhost


def k8s_name(value: str) -> str | None:
    """``value`` if it is a DNS-1123 name (what a Kubernetes object can be called), else None (pure)."""
    v = value.strip()
    return v if v and len(v) <= 253 and _DNS1123.match(v) else None


def amqp_name(value: str) -> str | None:
    """``value`` if it can name an AMQP queue or vhost (1-255 bytes, no control characters), else None (pure)."""
    v = value.strip()
    if not v or len(v.encode()) > 255 or any(ord(c) < 32 or ord(c) == 127 for c in v):
        return None
    return v


def alert_expression(generator_url: str) -> str:
    """The PromQL in a Prometheus ``generatorURL`` (``g0.expr``), or empty (pure)."""
    try:
        query = parse_qs(urlsplit(generator_url).query)
    except ValueError:
        return ""
    return (query.get("g0.expr") or query.get("expr") or [""])[0]


def alert_facts(incident: IncidentEvent) -> AlertFacts:
    """What the rules match on, from the incident (pure)."""
    first = (incident.firing_alerts or incident.alerts)[0]
    labels = {**first.labels, **incident.common_labels, **incident.group_labels}
    annotations = {**first.annotations, **incident.common_annotations}
    text = " ".join(v for k, v in sorted(annotations.items()) if k in ("summary", "description", "message", "title"))
    pod = k8s_name(labels.get("pod", ""))
    # The workload: named outright, else derived from a Deployment's pod name, else guessed from the service.
    named = [k8s_name(labels.get(key, "")) for key in ("deployment", "workload", "app_kubernetes_io_name", "app")]
    derived = m["deployment"] if pod is not None and (m := _POD_OF_DEPLOYMENT.match(pod)) else None
    guessed = [k8s_name(labels.get(key, "")) for key in ("service", "container")]
    workload = next((w for w in (*named, derived, *guessed) if w), None)
    starts = min(a.starts_at for a in (incident.firing_alerts or incident.alerts))
    return AlertFacts(
        name=incident.alertname or first.name,
        labels=labels,
        text=text.lower()[:8192],
        expression=alert_expression(first.generator_url)[:8192],
        generator_url=first.generator_url,
        starts_at=starts,
        namespace=k8s_name(labels.get("namespace", "") or labels.get("kubernetes_namespace", "")
                           or labels.get("exported_namespace", "")),
        workload=workload,
        pod=pod,
        container=k8s_name(labels.get("container", "")),
        instance=labels.get("instance", "") or labels.get("server", "") or labels.get("datname", ""),
        queue=amqp_name(labels.get("queue", "") or labels.get("queue_name", "")),
        vhost=amqp_name(labels.get("vhost", "") or labels.get("virtual_host", "")),
    )


PATTERNS: Mapping[str, re.Pattern[str]] = {
    "connections": re.compile(r"connection|max_connections|too.?many.?clients|numbackends|pg_stat_activity_count"
                              r"|idle.?in.?transaction|pool.?exhaust"),
    "locks": re.compile(r"lock|blocking|blocked|deadlock|long.?running.?(query|queries|transaction)"
                        r"|waiting.?(queries|sessions)|pg_blocking"),
    "pods": re.compile(r"crash.?loop|oom|out.?of.?memory|restart|back.?off|kube_pod_container_status"
                       r"|container.?terminated|container_memory"),
    "rollout": re.compile(r"error.?rate|5xx|errors?.?ratio|high.?errors?|latency|duration_seconds|slo\b|burn.?rate"
                          r"|response.?time|apdex|status=~?\"5"),
    "endpoint": re.compile(r"(^|[^a-z_:])up\s*(\{[^}]*\}\s*)?(==|<|!=)"  # PromQL: up == 0, up{job="x"} < 1
                           r"|instance.?down|target.?down|endpoint|probe|blackbox|unreachable|health.?check"
                           r"|service.?down"),
    "queues": re.compile(r"queue|backlog|messages.?ready|consumer|rabbitmq"),
    # Workload saturation only: a saturated connection pool or queue is the connections/queues playbooks'.
    "saturation": re.compile(r"cpu|throttl|overload|high.?load|too.?busy|max.?replicas|hpa\b"
                             r"|(pod|replica|deployment|workload|container)s?.?saturat"),
}
# Where a match counts how much: the alert's name and expression are chosen by whoever wrote the rule,
# the annotations are free text.
WEIGHTS = {"name": 3.0, "expression": 2.0, "text": 1.0}


def playbook_scores(alert: AlertFacts) -> dict[str, float]:
    """How strongly each playbook matches the alert (pure)."""
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", alert.name).lower()
    sources = {"name": name, "expression": alert.expression.lower(), "text": alert.text}
    return {pb: sum(w for src, w in WEIGHTS.items() if pattern.search(sources[src]))
            for pb, pattern in PATTERNS.items()}


def choose_playbooks(alert: AlertFacts) -> tuple[str, ...]:
    """The best-matching playbooks (ties: all), plus ``queues`` when the alert names a queue; ``("sweep",)`` when
    none matches (the sweep looks at a named queue too) (pure)."""
    scores = playbook_scores(alert)
    best = max(scores.values())
    if best <= 0:
        return ("sweep",)
    chosen = tuple(pb for pb, s in scores.items() if s == best)
    # A named queue is a concrete thing to look at, whatever else the alert's words matched.
    return chosen + ("queues",) if alert.queue is not None and "queues" not in chosen else chosen


# --------------------------------------------------------------------------------------------
# Hypotheses.
# --------------------------------------------------------------------------------------------

def _why(obs: Observation, why: str) -> Evidence:
    return Evidence(source=obs.tool[:512], query=bounded(obs.query, 16384), excerpt=bounded(why), at=obs.at, ok=obs.ok)


@dataclass(kw_only=True)
class Draft:
    """A hypothesis being scored: log-odds moved by each piece of evidence."""

    cause: str
    statement: str
    logit: float = PRIOR
    evidence_for: list[Evidence] = field(default_factory=list)
    evidence_against: list[Evidence] = field(default_factory=list)
    actions: list[ProposedAction] = field(default_factory=list)

    def supports(self, obs: Observation, why: str, weight: float = 1.0) -> None:
        self.logit += weight
        self.evidence_for.append(_why(obs, why))

    def contradicts(self, obs: Observation, why: str, weight: float = 1.0) -> None:
        self.logit -= weight
        self.evidence_against.append(_why(obs, why))

    def propose(self, action: str, target: str, rationale: str, **params: str) -> None:
        self.actions.append(ProposedAction(action=action, target=target, risk=REGISTRY[action].risk,
                                           rationale=bounded(rationale), params=params))

    def finish(self) -> Hypothesis:
        score = min(MAX_SCORE, 1.0 / (1.0 + math.exp(-self.logit)))
        return Hypothesis(cause=self.cause, statement=self.statement, score=round(score, 3),
                          evidence_for=tuple(self.evidence_for), evidence_against=tuple(self.evidence_against),
                          actions=tuple(self.actions), log_odds=round(self.logit, 3))


Playbook = Callable[[Investigation, AlertFacts], Awaitable[list[Draft]]]


def _q(text: str) -> str:
    return quote_untrusted(text or "(none)", 80)


def _idle_tx(states: Mapping[str, int]) -> int:
    return sum(states.get(s, 0) for s in _IDLE_TX_STATES)


def _total(states: Mapping[str, int]) -> int:
    return states["total"] if "total" in states else sum(states.values())


def _span(td: timedelta) -> str:
    minutes = td.total_seconds() / 60
    return f"{minutes / 60:g} h" if minutes >= 60 else f"{minutes:.0f} min"


def _top(counts: Counter[str]) -> tuple[str, int]:
    """The most frequent key and its count (ties: alphabetical), or ("", 0)."""
    ranked = sorted((+counts).items(), key=lambda kv: (-kv[1], kv[0]))
    return ranked[0] if ranked else ("", 0)


def _ours(app: str) -> bool:
    return app.startswith(AGENT_APPLICATION_PREFIX)


# --- database connection exhaustion ---------------------------------------------------------

async def connections_playbook(inv: Investigation, alert: AlertFacts) -> list[Draft]:
    """Who holds the connections: idle transactions of one application, load, or a lock pile-up."""
    conn_obs = await _connections(inv, alert)
    if _direct(inv, conn_obs):
        idle_obs = await inv.call("postgres", "idle_in_transaction", {"min_age_s": IDLE_TX_MIN_AGE})
        chain_obs = await inv.call("postgres", "blocking_chains", {})
    else:  # only the exporter's metrics: counts, no sessions
        idle_obs = _not_examined("postgres", "idle_in_transaction", "PostgreSQL itself did not answer")
        chain_obs = _not_examined("postgres", "blocking_chains", "PostgreSQL itself did not answer")
    conn, idle, chains = read_connections(conn_obs), read_idle_in_transaction(idle_obs), read_blocking(chain_obs)
    idle = [s for s in idle if not _ours(s.application)]

    # The culprit: the application with most sessions idle in transaction.
    per_app = Counter({app: _idle_tx(states) for app, states in (conn.by_application if conn else {}).items()
                       if not _ours(app)})
    if not +per_app:
        per_app = Counter({a: n for a, n in read_idle_by_application(idle_obs).items() if not _ours(a)})
    if not +per_app:
        per_app = Counter(s.application for s in idle)
    culprit, culprit_idle = _top(per_app)
    idle_total = max(_idle_tx(conn.by_state) if conn else 0, sum(per_app.values()), len(idle))
    oldest = max((s.seconds for s in idle if s.application == culprit), default=0.0)
    culprit_total = _total(conn.by_application.get(culprit, {}) if conn else {}) or culprit_idle
    # Sessions without application_name are named by their client address instead.
    client = ""
    if not culprit and culprit_idle:
        client = _top(Counter(s.client_addr for s in idle if not s.application and s.client_addr))[0] or _top(
            Counter({c: _idle_tx(states) for c, states in (conn.by_client if conn else {}).items()}))[0]
    who = (f"application {_q(culprit)}" if culprit else
           f"client {_q(client)} (no application_name)" if client else "")
    selector = {"application_name": culprit} if culprit else {"client_addr": client} if client else {}

    if conn and conn.max_connections:
        used = f"{conn.total} connections in use (max_connections {conn.max_connections})"
    else:
        used = "the connections in use"
    idle_h = Draft(cause="connection_exhaustion_idle_in_transaction",
                   statement=f"database connection exhaustion: {who} holds {culprit_total} "
                             f"of {used}, {culprit_idle} idle in transaction"
                             + (f" (oldest open for {int(oldest)} s)" if oldest else "") if who else
                             "database connection exhaustion: sessions idle in transaction hold the connections")
    load_h = Draft(cause="connection_exhaustion_load",
                   statement=f"database connection exhaustion from load: {used}")
    pile_h = Draft(cause="lock_pileup", statement="sessions pile up waiting for locks and hold their connections")

    if conn is not None:
        share = conn.total / conn.max_connections if conn.max_connections else 0.0
        active = conn.by_state.get("active", 0)
        if share >= SATURATED:
            for h in (idle_h, load_h):
                h.supports(conn_obs, f"{conn.total} of {conn.max_connections} connections in use ({share:.0%})", 2.0)
        elif share >= NEAR_SATURATED:
            for h in (idle_h, load_h):
                h.supports(conn_obs, f"{conn.total} of {conn.max_connections} connections in use ({share:.0%})", 1.0)
        elif conn.max_connections and share < NOT_SATURATED:
            for h in (idle_h, load_h):
                h.contradicts(conn_obs, f"only {conn.total} of {conn.max_connections} connections in use "
                                        f"({share:.0%}): not exhausted now", 2.0)
        if conn.total and idle_total >= max(3, IDLE_TX_SHARE * conn.total):
            idle_h.supports(conn_obs, f"{idle_total} of {conn.total} sessions are idle in transaction", 1.5)
            load_h.contradicts(conn_obs, f"{idle_total} of {conn.total} sessions are idle in transaction, "
                                         "not working", 1.5)
        elif idle_total == 0:
            idle_h.contradicts(conn_obs, "no session is idle in transaction", 2.0)
        if conn.total and active >= 0.6 * conn.total:
            load_h.supports(conn_obs, f"{active} of {conn.total} sessions are active", 1.5)
            # said only where the evidence says it: "mostly active" beside 0 connections contradicted itself
            load_h.statement += ", mostly active sessions" + (
                ", no single application holding idle transactions" if not culprit_idle else "")
    if who and culprit_idle and culprit_idle >= CULPRIT_SHARE * max(1, idle_total):
        src = conn_obs if conn and conn.by_application else idle_obs
        idle_h.supports(src, f"{who} holds {culprit_idle} of the {idle_total} sessions idle in transaction", 1.0)
    if oldest >= 2 * IDLE_TX_MIN_AGE:
        idle_h.supports(idle_obs, f"its oldest idle transaction has been open for {oldest:.0f} s", 0.5)
    elif idle_obs.ok and not idle:
        idle_h.contradicts(idle_obs, f"no session idle in transaction for {IDLE_TX_MIN_AGE} s or more", 1.0)
    if selector and culprit_idle:
        [(key, value)] = selector.items()
        target = f"{key} {_q(value)}" + (f" on {_q(alert.instance)}" if alert.instance else "")
        idle_h.propose("terminate_idle_backends", target,
                       f"end the sessions of {who} idle in transaction for {2 * IDLE_TX_MIN_AGE} s or more; "
                       "fix the transaction handling in the application afterwards",
                       **selector, min_idle_s=str(2 * IDLE_TX_MIN_AGE))

    blocked = {c.pid for c in chains}
    if conn is not None and conn.max_connections and conn.total / conn.max_connections < NEAR_SATURATED:
        pile_h.contradicts(conn_obs, f"only {conn.total} of {conn.max_connections} connections are in use: "
                                     "waiting sessions do not exhaust them", 1.5)
    if len(blocked) >= 3:
        pile_h.supports(chain_obs, f"{len(blocked)} sessions wait for locks", 2.0)
        if conn and conn.total:
            pile_h.supports(chain_obs, f"{len(blocked)} of {conn.total} connections are stuck waiting", 0.5)
        _propose_root_blocker(pile_h, chains, idle, [], alert, chain_obs)
    elif chain_obs.ok:
        pile_h.contradicts(chain_obs, "no session waits for a lock" if not chains
                           else f"only {len(blocked)} session(s) wait for locks", 2.0)
    return [idle_h, load_h, pile_h]


# --- lock contention ------------------------------------------------------------------------

def root_blockers(chains: Iterable[Blocked]) -> list[tuple[int, int]]:
    """(pid, sessions it blocks directly or transitively) for blockers that wait on nobody, most first (pure)."""
    chains = list(chains)
    edges: dict[int, set[int]] = {}
    blocked = {c.pid for c in chains if c.pid is not None}
    for c in chains:
        for p in c.blocking_pids:
            if c.pid is not None:
                edges.setdefault(p, set()).add(c.pid)

    def reach(pid: int) -> set[int]:
        seen: set[int] = set()
        todo = [pid]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen and nxt != pid:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    roots = [p for p in edges if p not in blocked]
    if not roots and edges:  # a cycle (a deadlock PostgreSQL has not broken yet): everyone is blocked
        roots = list(edges)
    return sorted(((p, len(reach(p))) for p in roots), key=lambda x: (-x[1], x[0]))


def _app_of(pid: int, chains: Iterable[Blocked], *sessions: Iterable[Session]) -> str:
    for c in chains:
        if pid in c.blocking_pids and len(c.blocking_apps) == len(c.blocking_pids):
            return c.blocking_apps[c.blocking_pids.index(pid)]
        if c.pid == pid and c.application:
            return c.application
    for group in sessions:
        for s in group:
            if s.pid == pid:
                return s.application
    return ""


def _propose_root_blocker(h: Draft, chains: list[Blocked], idle: list[Session], long: list[Session],
                          alert: AlertFacts, chain_obs: Observation | None = None) -> tuple[int, int, str] | None:
    roots = root_blockers(chains)
    if not roots:
        return None
    pid, n = roots[0]
    app = _app_of(pid, chains, idle, long)
    target = f"pid {pid}" + (f" on {_q(alert.instance)}" if alert.instance else "")
    h.propose("terminate_backend", target,
              f"pid {pid} (application {_q(app)}) is the root of a lock chain blocking {n} session(s)",
              pid=str(pid), application_name=app, **_session_identity(pid, chain_obs))
    return pid, n, app


def _session_identity(pid: int, chain_obs: Observation | None) -> dict[str, str]:
    """What tells the blocker's session apart from a later one with the same pid (for the executor's
    precondition): its user, its backend_start when reported, and when it was observed with how old
    its transaction was then."""
    if chain_obs is None or not chain_obs.ok:
        return {}
    seen = read_blockers(chain_obs).get(pid)
    if seen is None:
        return {}
    out = {"observed_at": chain_obs.at.isoformat()}
    if seen.user:
        out["usename"] = seen.user
    if seen.backend_start:
        out["backend_start"] = seen.backend_start
    if seen.seconds > 0:  # the transaction age when observed (blocker rows carry xact_age_s)
        out["xact_age_s"] = f"{seen.seconds:.3f}"
    return out


async def locks_playbook(inv: Investigation, alert: AlertFacts) -> list[Draft]:
    """Who blocks whom: a root blocker (often a forgotten transaction) or merely slow queries."""
    chain_obs = await inv.call("postgres", "blocking_chains", {})
    long_obs = await inv.call("postgres", "long_running", {"min_s": LONG_RUNNING_MIN})
    idle_obs = await inv.call("postgres", "idle_in_transaction", {"min_age_s": IDLE_TX_MIN_AGE})
    chains, long, idle = read_blocking(chain_obs), read_long_running(long_obs), read_idle_in_transaction(idle_obs)
    blockers = read_blockers(chain_obs)
    long = [s for s in long if not _ours(s.application)]

    lock_h = Draft(cause="lock_contention", statement="lock contention")
    slow_h = Draft(cause="slow_queries", statement="slow queries without lock contention")
    blocked = {c.pid for c in chains}
    root = _propose_root_blocker(lock_h, chains, idle, long, alert, chain_obs)
    if root is not None:
        pid, n, app = root
        # What the root is doing: from the tool's blocker rows, else the idle/long-running lists.
        seen = blockers.get(pid)
        idle_root = next((s for s in idle if s.pid == pid), None)
        idle_src = idle_obs
        if idle_root is None and seen is not None and seen.state.startswith("idle in transaction"):
            idle_root, idle_src = seen, chain_obs
        long_root = next((s for s in long if s.pid == pid), None)
        held = (f", idle in transaction, transaction open {int(idle_root.seconds)} s" if idle_root
                else f", running for {int(long_root.seconds)} s" if long_root
                else f", {seen.state}" if seen is not None and seen.state else "")
        lock_h.statement = (f"lock contention: pid {pid} (application {_q(app)}{held}) blocks {n} session(s)")
        lock_h.supports(chain_obs, f"{len(blocked)} session(s) wait for locks; root blocker pid {pid} "
                                   f"blocks {n}", 2.0)
        if n >= 3:
            lock_h.supports(chain_obs, f"one root blocks {n} sessions", 1.0)
        longest = max((c.wait_s for c in chains), default=0.0)
        if longest >= LOCK_WAIT_LONG:
            lock_h.supports(chain_obs, f"the longest lock wait is {longest:.0f} s", 0.5)
        if idle_root:
            lock_h.supports(idle_src, f"the root blocker pid {pid} holds its locks idle in transaction "
                                      f"(transaction open {int(idle_root.seconds)} s)", 1.0)
        slow_h.contradicts(chain_obs, f"{len(blocked)} session(s) are blocked by others, not just slow", 1.0)
        if seen is not None:
            assess_database(lock_h, chain_obs, seen, alert)
    elif chain_obs.ok:
        lock_h.contradicts(chain_obs, "no session waits for a lock", 2.5)
    unblocked_long = [s for s in long if s.pid not in blocked]
    if unblocked_long:
        worst = max(unblocked_long, key=lambda s: s.seconds)
        slow_h.statement = (f"slow queries without lock contention: {len(unblocked_long)} running for "
                            f"{LONG_RUNNING_MIN} s or more (longest {int(worst.seconds)} s, application "
                            f"{_q(worst.application)})")
        slow_h.supports(long_obs, f"{len(unblocked_long)} query(ies) run long without waiting for a lock", 1.5)
        if worst.seconds >= 2 * LONG_RUNNING_MIN:
            slow_h.supports(long_obs, f"the longest has run for {int(worst.seconds)} s", 1.0)
        if chain_obs.ok and not chains:
            slow_h.supports(chain_obs, "no session waits for a lock: the time is spent running", 0.5)
        assess_database(slow_h, long_obs, worst, alert)
    elif long_obs.ok:
        slow_h.contradicts(long_obs, f"no unblocked query runs for {LONG_RUNNING_MIN} s or more", 1.5)
    return [lock_h, slow_h]


# --- pods: crash loop, OOM, unready; and rollouts ---------------------------------------------

def _accepts(inv: Investigation, tool: str, operation: str, param: str) -> bool:
    """Whether the operation's parameter schema names ``param`` (optional parameters differ between tools)."""
    try:
        spec = inv.tools[tool].operations()[operation]
        return param in (spec.parameters.get("properties") or {})
    except Exception:  # noqa: BLE001 - an absent or broken tool accepts nothing
        return False


def _deployment_target(alert: AlertFacts) -> str:
    return f"deployment/{alert.workload} in namespace {alert.namespace}"


async def _kubernetes_observations(inv: Investigation, alert: AlertFacts
                                   ) -> tuple[Observation, Observation, Observation] | None:
    if alert.namespace is None or alert.workload is None:
        return None
    pods = await inv.call("kubernetes", "pods", {"namespace": alert.namespace, "workload": alert.workload})
    scope = {"name_prefix": alert.workload} if _accepts(inv, "kubernetes", "events", "name_prefix") else {}
    events = await inv.call("kubernetes", "events", {"namespace": alert.namespace, **scope})
    rollouts = await inv.call("kubernetes", "rollouts", {"namespace": alert.namespace, "deployment": alert.workload})
    return pods, events, rollouts


def _recent_rollout(rollouts: list[Rollout], alert: AlertFacts) -> tuple[Rollout, timedelta] | None:
    """The newest rollout created before the alert started, and how long before (pure)."""
    for r in rollouts:
        if r.created is not None and r.created <= alert.starts_at:
            return r, alert.starts_at - r.created
    return None


def suspect_rollout(rollouts: list[Rollout], alert: AlertFacts) -> tuple[Rollout, timedelta] | None:
    """The rollout created within ``ROLLOUT_WINDOW`` before the alert, and how long before (pure)."""
    found = _recent_rollout(rollouts, alert)
    return found if found is not None and found[1] <= ROLLOUT_WINDOW else None


def assess_rollout(h: Draft, obs: Observation, alert: AlertFacts) -> bool:
    """Score ``h`` (a bad-rollout hypothesis) from the Deployment's rollouts; True if one is suspect."""
    if not obs.ok:
        return False
    rollouts = read_rollouts(obs)
    found = suspect_rollout(rollouts, alert)
    if found is None:
        h.contradicts(obs, f"no rollout of {alert.workload} in the {_span(ROLLOUT_WINDOW)} before the alert", 2.5)
        return False
    r, ago = found
    minutes = ago.total_seconds() / 60
    images = ", ".join(r.images) or "unknown images"
    h.statement = (f"regression from the rollout of deployment {alert.workload} (revision {r.revision}, "
                   f"{images}) {minutes:.0f} min before the alert")
    h.supports(obs, f"revision {r.revision} rolled out {minutes:.0f} min before the alert started",
               2.5 if ago <= ROLLOUT_RECENT else 1.5)
    older = [x for x in rollouts if x is not r and x.revision is not None and r.revision is not None
             and x.revision < r.revision]
    if older and older[0].images and older[0].images != r.images:
        h.supports(obs, f"images changed from {', '.join(older[0].images)} to {images}", 0.5)
    h.propose("rollout_undo", _deployment_target(alert),
              f"roll deployment {alert.workload} back from revision {r.revision}",
              deployment=alert.workload or "", namespace=alert.namespace or "",
              **({"to_revision": str(older[0].revision)} if older else {}))
    return True


def assess_pods(alert: AlertFacts, pods_obs: Observation, events_obs: Observation, rollouts_obs: Observation,
                *, rollout_h: Draft | None = None) -> list[Draft]:
    """OOM, crash loop (with or without a recent rollout), unready pods, no pods: drafted from pods and events."""
    pods, events = read_pods(pods_obs), read_events(events_obs)
    wl = alert.workload or ""
    events = [e for e in events if not e.object or wl in e.object]
    oom = [p for p in pods if p.last_reason.lower() == "oomkilled"]
    crashing = [p for p in pods if p.restarts >= CRASH_RESTARTS or p.waiting.lower() == "crashloopbackoff"]
    errored = [p for p in crashing if p.last_reason.lower() != "oomkilled"]
    pending = [p for p in pods if p.phase.lower() == "pending" and not p.restarts]
    unready = [p for p in pods if p.ready is False and p not in pending]
    unschedulable = [e for e in events if e.reason.lower() in ("failedscheduling", "notriggerscaleup")]
    oom_events = [e for e in events if "oom" in e.reason.lower() or "oomkilled" in e.message.lower()
                  or "out of memory" in e.message.lower()]
    backoff = [e for e in events if e.reason.lower() in ("backoff", "crashloopbackoff")
               or "back-off restarting" in e.message.lower()]
    target = _deployment_target(alert)

    oom_h = Draft(cause="oom_killed", statement=f"pods of {wl} are OOM-killed: the memory limit is too low "
                                                "for the workload (or it leaks)")
    crash_h = Draft(cause="crash_loop", statement=f"pods of {wl} crash-loop: the application exits with an error")
    rollout_h = rollout_h or Draft(cause="bad_rollout", statement=f"a recent rollout of {wl} broke it")
    unready_h = Draft(cause="pods_unready", statement=f"pods of {wl} are running but not ready")
    none_h = Draft(cause="no_pods", statement=f"no pods of {wl} exist (scaled to zero, evicted or unschedulable)")
    pending_h = Draft(cause="pods_pending", statement=f"pods of {wl} stay Pending: they are not scheduled")

    if pods_obs.ok and not pods:
        none_h.supports(pods_obs, f"no pods found for workload {wl}", 2.5)
    elif pods:
        none_h.contradicts(pods_obs, f"{len(pods)} pod(s) of {wl} exist", 3.0)
    if oom:
        oom_h.supports(pods_obs, f"{len(oom)} of {len(pods)} pod(s) last terminated OOMKilled "
                                 f"({', '.join(p.name for p in oom[:3])})", 2.5)
        crash_h.contradicts(pods_obs, "the containers are killed for memory, not exiting on an error", 1.0)
    elif pods:
        oom_h.contradicts(pods_obs, "no pod was OOMKilled", 2.0)
    if oom_events:
        oom_h.supports(events_obs, f"{len(oom_events)} event(s) report out-of-memory kills", 1.0)
    if oom and crashing:
        oom_h.supports(pods_obs, f"{len(crashing)} pod(s) crash-looping", 0.5)
    if oom:
        container = alert.container or ""
        oom_h.propose("raise_memory_limit", target,
                      f"pods of {wl} exceed their memory limit; raise it (and look for a leak)",
                      deployment=wl, namespace=alert.namespace or "", increase="50%",
                      **({"container": container} if container else {}))
    healthy = [p for p in pods if p.ready and p not in crashing]
    alone = errored[0] if len(errored) == 1 and not oom and healthy else None  # one pod crash-loops, others fine
    if errored:
        codes = sorted({str(p.exit_code) for p in errored if p.exit_code is not None})
        crash_h.supports(pods_obs, f"{len(errored)} pod(s) crash-looping, last reason "
                                   f"{', '.join(sorted({p.last_reason or 'unknown' for p in errored}))}"
                                   + (f", exit code {', '.join(codes)}" if codes else ""), 2.0)
        if backoff:
            crash_h.supports(events_obs, f"{len(backoff)} back-off event(s) restarting the failed container", 1.0)
        if alone is not None:
            crash_h.statement = (f"pod {alone.name} of {wl} crash-loops while its other {len(healthy)} "
                                 "replica(s) run fine: that pod, not the workload, is broken")
            crash_h.supports(pods_obs, f"only {alone.name} crash-loops; {len(healthy)} other pod(s) of {wl} are "
                                       "ready", 1.5)
        if not oom:
            propose_crash_loop(crash_h, alert, pods_obs, pods, errored, alone)
    elif pods and not oom:
        crash_h.contradicts(pods_obs, "no pod is crash-looping", 2.0)
    if assess_rollout(rollout_h, rollouts_obs, alert) and errored:
        if alone is not None:
            rollout_h.contradicts(pods_obs, f"{len(healthy)} other pod(s) of {wl} run fine: the rollout does not "
                                            "make every pod crash", 1.0)
        else:
            # A crash loop right after a rollout is explained by it; an OOM kill is explained by the limit first.
            rollout_h.supports(pods_obs, "the pods started crash-looping after it", 1.5)
    if unready and not crashing:
        unready_h.supports(pods_obs, f"{len(unready)} of {len(pods)} pod(s) not ready with few restarts", 1.5)
        if len(unready) == len(pods):
            unready_h.supports(pods_obs, "no pod is ready", 0.5)
        probes = [e for e in events if e.reason.lower() == "unhealthy" or "probe failed" in e.message.lower()]
        if probes:
            unready_h.supports(events_obs, f"{len(probes)} event(s) report failing probes", 1.0)
        unready_h.propose("restart_deployment", target,
                          f"pods of {wl} are stuck unready without crashing; a rolling restart replaces them",
                          deployment=wl, namespace=alert.namespace or "")
    elif pods and not unready:
        unready_h.contradicts(pods_obs, f"all {len(pods)} pod(s) are ready", 2.0)
    assess_pending(pending_h, pods_obs, events_obs, pods, pending, unschedulable)
    return [oom_h, crash_h, rollout_h, unready_h, none_h, pending_h]


def assess_pending(h: Draft, pods_obs: Observation, events_obs: Observation, pods: list[Pod], pending: list[Pod],
                   unschedulable: list[Event]) -> None:
    """Pods that never start: Pending without restarts, and the scheduler's events saying why (pure)."""
    if pending:
        shown = ", ".join(p.name for p in pending[:3]) + (", ..." if len(pending) > 3 else "")
        h.supports(pods_obs, f"{len(pending)} of {len(pods)} pod(s) are Pending and never started ({shown})", 2.0)
    elif pods:
        h.contradicts(pods_obs, "no pod is Pending", 2.0)
    if unschedulable:
        why = unschedulable[0].message
        h.statement = f"{h.statement}: {quote_untrusted(why, 200)}" if why else h.statement
        h.supports(events_obs, f"{sum(e.count for e in unschedulable)} scheduling failure event(s): "
                               f"{quote_untrusted(why or unschedulable[0].reason, 200)}", 1.5)
    elif pending and events_obs.ok:
        h.contradicts(events_obs, "no scheduling failure event", 0.5)


def _observed_at(obs: Observation) -> str:
    return obs.at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _of_deployment(p: Pod, workload: str) -> bool:
    """The pod's controller is a ReplicaSet of Deployment ``workload`` (it recreates a deleted pod) (pure)."""
    kind, _, name = p.owner.partition("/")
    return kind == "ReplicaSet" and name.startswith(f"{workload}-") and not p.deleting


def propose_crash_loop(h: Draft, alert: AlertFacts, pods_obs: Observation, pods: list[Pod], errored: list[Pod],
                       alone: Pod | None) -> None:
    """The crash loop's action: delete the one pod that crash-loops beside healthy replicas (its
    ReplicaSet recreates it), or restart the Deployment when every replica crash-loops (pure)."""
    wl, ns = alert.workload or "", alert.namespace or ""
    if alone is not None and _of_deployment(alone, wl) and k8s_name(alone.name):
        h.propose("delete_pod", f"pod/{alone.name} in namespace {ns}",
                  f"only pod {alone.name} of {wl} crash-loops ({alone.restarts} restarts); deleting it lets its "
                  f"ReplicaSet recreate it while the other replicas serve",
                  namespace=ns, pod=alone.name, restarts=str(alone.restarts), observed_at=_observed_at(pods_obs),
                  **({"uid": alone.uid} if alone.uid else {}))
    elif len(errored) == len(pods):
        names = [p.name for p in errored if k8s_name(p.name)][:50]
        h.propose("restart_deployment", _deployment_target(alert),
                  f"every pod of {wl} crash-loops; a rolling restart replaces them (if the cause is in the code "
                  "or its configuration, it comes back: roll back or fix it)",
                  deployment=wl, namespace=ns, observed_at=_observed_at(pods_obs),
                  **({"pods": ",".join(names)} if names else {}))


async def pods_playbook(inv: Investigation, alert: AlertFacts) -> list[Draft]:
    """Crash loop or OOM: the workload's pods, events and rollouts."""
    got = await _kubernetes_observations(inv, alert)
    if got is None:
        return []
    return assess_pods(alert, *got)


def _log_selector(alert: AlertFacts) -> str | None:
    """A LogQL stream selector from the alert's labels, values escaped (pure); None without labels."""
    picks = []
    for key in ("namespace", "app", "job", "container", "service"):
        if alert.labels.get(key) and _LOG_LABEL.match(key):
            picks.append((key, alert.labels[key]))
        if len(picks) == 2:
            break
    if not picks:
        return None
    # A JSON string literal is a valid LogQL (Go) string: quotes, backslashes and control characters escaped.
    return "{" + ", ".join(f"{k}={json.dumps(v)}" for k, v in picks) + "}"


async def assess_logs(inv: Investigation, alert: AlertFacts, h: Draft) -> Observation | None:
    """Error lines around the incident support ``h``; a quiet log contradicts it."""
    selector = _log_selector(alert)
    if selector is None or not inv.offers("logs", "error_counts"):
        return None
    obs = await inv.call("logs", "error_counts", {"selector": selector, "window": LOG_WINDOW})
    counts = read_error_counts(obs)
    if counts is None:
        return obs
    ratio = counts.errors / counts.total if counts.total else 0.0
    if counts.errors >= LOG_ERRORS_MIN and ratio >= LOG_ERROR_RATIO:
        h.supports(obs, f"{counts.errors} of {counts.total} log lines in {LOG_WINDOW} are errors ({ratio:.0%})", 1.0)
    else:
        h.contradicts(obs, f"{counts.errors} of {counts.total} log lines in {LOG_WINDOW} are errors", 0.5)
    if counts.errors and not counts.samples and inv.offers("logs", "query_range"):
        end = datetime.now(UTC)
        start = min(alert.starts_at - timedelta(minutes=15), end - timedelta(minutes=5))
        await inv.call("logs", "query_range", {"query": selector + ' |~ "(?i)(error|exception|fatal|panic)"',
                                               "start": start.isoformat(), "end": end.isoformat(), "limit": 20})
    return obs


async def rollout_playbook(inv: Investigation, alert: AlertFacts) -> list[Draft]:
    """Error-rate or latency spike: was there a rollout just before, do the logs and pods agree?"""
    drafts: list[Draft] = []
    rollout_h = Draft(cause="bad_rollout", statement=f"a recent rollout of {alert.workload or 'the service'} "
                                                     "caused the regression")
    other_h = Draft(cause="not_a_rollout", statement="a regression not explained by a recent rollout "
                                                      "(a dependency, load or data)")
    got = await _kubernetes_observations(inv, alert)
    if got is not None:
        pods_obs, events_obs, rollouts_obs = got
        drafts = assess_pods(alert, pods_obs, events_obs, rollouts_obs, rollout_h=rollout_h)
        if suspect_rollout(read_rollouts(rollouts_obs), alert):
            other_h.contradicts(rollouts_obs, "a rollout happened just before the alert", 1.0)
        elif rollouts_obs.ok:
            other_h.supports(rollouts_obs, f"no rollout of {alert.workload} in the {_span(ROLLOUT_WINDOW)} before "
                                           "the alert", 1.5)
    else:
        drafts = [rollout_h]
    logs_obs = await assess_logs(inv, alert, rollout_h)
    if logs_obs is not None and (counts := read_error_counts(logs_obs)) and counts.errors >= LOG_ERRORS_MIN:
        other_h.supports(logs_obs, f"{counts.errors} error lines in the logs", 0.5)
    return [*drafts, other_h]


async def endpoint_playbook(inv: Investigation, alert: AlertFacts) -> list[Draft]:
    """Endpoint or probe down: are the pods behind it running and ready?"""
    got = await _kubernetes_observations(inv, alert)
    if got is None:
        return []
    pods_obs, events_obs, rollouts_obs = got
    drafts = assess_pods(alert, pods_obs, events_obs, rollouts_obs)
    pods = read_pods(pods_obs)
    path_h = Draft(cause="endpoint_unreachable", statement=f"the pods of {alert.workload} are healthy: the endpoint is "
                                                           "unreachable (Service, network path or probe config)")
    if pods and all(p.ready and p.restarts < CRASH_RESTARTS for p in pods):
        path_h.supports(pods_obs, f"all {len(pods)} pod(s) are ready and stable", 1.5)
    elif pods:
        path_h.contradicts(pods_obs, "some pods are not ready or crash-looping", 1.5)
    return [*drafts, path_h]


# --- saturation: every ready pod busy, one replica more ------------------------------------------

def _failing(p: Pod) -> bool:
    return (p.restarts >= CRASH_RESTARTS or p.waiting.lower() == "crashloopbackoff"
            or p.last_reason.lower() == "oomkilled")


def assess_saturation(alert: AlertFacts, pods_obs: Observation, rollouts_obs: Observation,
                      expr_obs: Observation | None) -> Draft:
    """Are the workload's replicas too few for the load? From its pods, its Deployment's counts and
    the alert's own expression re-run (its series name the pods over the threshold) (pure)."""
    wl, ns = alert.workload or "", alert.namespace or ""
    h = Draft(cause="saturated", statement=f"every ready pod of {wl} is saturated: its replicas are too few for "
                                           "the load")
    if expr_obs is None or not expr_obs.ok or not pods_obs.ok:
        return h  # nothing says how busy the pods are: not examined
    pods, dep, series = read_pods(pods_obs), read_deployment(rollouts_obs), read_series(expr_obs)
    if not series:
        h.contradicts(expr_obs, "the alert's expression returns nothing now: no pod is over its threshold", 2.0)
        return h
    ready = [p for p in pods if p.ready and not _failing(p)]
    failing = [p for p in pods if _failing(p)]
    if not ready:
        h.contradicts(pods_obs, f"no pod of {wl} is ready and stable: there is no load to share", 1.5)
        return h
    named = {s.labels["pod"] for s in series if s.labels.get("pod")}
    hot = [p for p in ready if p.name in named]
    every = bool(named) and len(hot) == len(ready)
    if not named:
        h.supports(expr_obs, f"the alert's expression holds ({len(series)} series), though not per pod", 0.5)
    elif every:
        shown = ", ".join(p.name for p in hot[:5]) + (", ..." if len(hot) > 5 else "")
        h.supports(expr_obs, f"all {len(ready)} ready pod(s) of {wl} are over the alert's threshold ({shown})", 2.5)
    else:
        h.contradicts(expr_obs, f"only {len(hot)} of {len(ready)} ready pod(s) of {wl} are over the alert's "
                                "threshold: the load is uneven, more replicas would not spread it", 2.0)
    if failing:
        h.contradicts(pods_obs, f"{len(failing)} pod(s) of {wl} crash-loop or were OOM-killed: more replicas of a "
                                "failing pod do not help", 1.5)
    else:
        h.supports(pods_obs, f"no pod of {wl} crash-loops or was OOM-killed: the pods are busy, not broken", 0.5)
    if suspect_rollout(read_rollouts(rollouts_obs), alert):
        h.contradicts(rollouts_obs, f"{wl} was rolled out just before: a new version may need more, scaling would "
                                    "hide it", 1.0)
    below = dep is not None and not failing and dep.unavailable > 0 and dep.available < dep.replicas
    if below:
        h.supports(rollouts_obs, f"{dep.available} of {dep.replicas} desired replica(s) of {wl} are available: the "
                                 "others are unready under the load, not crashing", 1.0)
    if every and not failing and dep is not None and 1 <= dep.replicas < SCALE_MAX_REPLICAS:
        target = dep.replicas + 1
        why = (f"{dep.available} of {dep.replicas} replicas available and every ready pod saturated" if below
               else f"all {len(ready)} ready pod(s) saturated")
        h.propose("scale_deployment", _deployment_target(alert),
                  f"{why}: scale deployment {wl} from {dep.replicas} to {target} replicas",
                  namespace=ns, deployment=wl, from_replicas=str(dep.replicas), replicas=str(target),
                  trigger="below_available_under_load" if below else "all_ready_pods_saturated",
                  observed_at=_observed_at(expr_obs))
    return h


async def saturation_playbook(inv: Investigation, alert: AlertFacts) -> list[Draft]:
    """CPU or load saturation: are all ready pods over the alert's threshold (then one replica more), or do
    crashes, OOM kills or a rollout explain it?"""
    got = await _kubernetes_observations(inv, alert)
    if got is None:
        return []
    pods_obs, events_obs, rollouts_obs = got
    expr_obs = None
    if alert.generator_url and inv.offers("prometheus", "alert_expression"):  # cached: investigate ran it
        expr_obs = await inv.call("prometheus", "alert_expression", {"generator_url": alert.generator_url})
    return [*assess_pods(alert, pods_obs, events_obs, rollouts_obs),
            assess_saturation(alert, pods_obs, rollouts_obs, expr_obs)]


# --- message queues: backlog without consumers, or consumers falling behind --------------------

def _queue_where(alert: AlertFacts) -> str:
    return f"queue {_q(alert.queue or '')}" + (f" in vhost {_q(alert.vhost)}" if alert.vhost else "")


def assess_queue(alert: AlertFacts, obs: Observation) -> list[Draft]:
    """No consumer, or consumers too slow, from the queue's ready messages and consumers (pure)."""
    where = _queue_where(alert)
    none_h = Draft(cause="no_consumer", statement=f"{where} has ready messages and no consumer")
    slow_h = Draft(cause="consumers_too_slow", statement=f"the consumers of {where} do not keep up with its "
                                                          "publishers")
    status = read_queue_status(obs)
    if status is None:  # the queue could not be read: the failure is in the finding, no hypothesis is touched
        return [none_h, slow_h]
    where = f"queue {_q(status.queue or alert.queue or '')} in vhost {_q(status.vhost or alert.vhost or '')}"
    n, c = status.ready, status.consumers
    if n == 0:
        for h in (none_h, slow_h):
            h.contradicts(obs, f"{where} is empty now (0 ready messages, {c} consumer(s)): no backlog", 2.5)
        return [none_h, slow_h]
    if c == 0:
        none_h.statement = f"{where} has {n} ready message{'' if n == 1 else 's'} and no consumer"
        none_h.supports(obs, f"{where} has no consumer", 2.0)
        none_h.supports(obs, f"{n} message(s) in {where} are ready, waiting for delivery", 1.5)
        if n >= QUEUE_BACKLOG:
            none_h.supports(obs, f"{n} ready messages is a backlog (>= {QUEUE_BACKLOG})", 0.5)
        slow_h.contradicts(obs, f"{where} has no consumer that could be slow", 3.0)
        return [none_h, slow_h]
    none_h.contradicts(obs, f"{where} has {c} consumer(s)", 3.0)
    slow_h.statement = f"the {c} consumer(s) of {where} do not keep up: {n} messages are ready"
    if n >= QUEUE_BACKLOG:
        slow_h.supports(obs, f"{n} messages in {where} are ready despite {c} consumer(s)", 1.5)
        if n >= QUEUE_BACKLOG_PER_CONSUMER * c:
            slow_h.supports(obs, f"{n // c} ready messages per consumer", 0.5)
    else:
        slow_h.contradicts(obs, f"only {n} message(s) in {where} are ready with {c} consumer(s): no real backlog",
                           1.0)
    return [none_h, slow_h]


async def queues_playbook(inv: Investigation, alert: AlertFacts) -> list[Draft]:
    """Queue backlog: does the queue the alert names have consumers, and how many messages wait?"""
    if alert.queue is None:
        return []
    params = {"queue": alert.queue, **({"vhost": alert.vhost} if alert.vhost else {})}
    return assess_queue(alert, await inv.call("rabbitmq", "queue_status", params))


async def sweep_playbook(inv: Investigation, alert: AlertFacts) -> list[Draft]:
    """Unknown alerts: the queue the labels name, related pods (if the labels name them) and the logs, rather than
    nothing."""
    drafts: list[Draft] = []
    if alert.queue is not None and inv.offers("rabbitmq", "queue_status"):
        drafts += await queues_playbook(inv, alert)
    if inv.offers("kubernetes", "pods"):
        got = await _kubernetes_observations(inv, alert)
        if got is not None:
            drafts += assess_pods(alert, *got)
    errors_h = Draft(cause="errors_in_logs", statement="the service logs errors around the incident")
    if await assess_logs(inv, alert, errors_h) is not None:
        drafts.append(errors_h)
    return drafts


PLAYBOOKS: Mapping[str, Playbook] = {
    "connections": connections_playbook,
    "locks": locks_playbook,
    "pods": pods_playbook,
    "rollout": rollout_playbook,
    "endpoint": endpoint_playbook,
    "queues": queues_playbook,
    "saturation": saturation_playbook,
    "sweep": sweep_playbook,
}


# --------------------------------------------------------------------------------------------
# Domain sweeps: what is looked at follows from what the Job can see, never from the alert's name.
# --------------------------------------------------------------------------------------------

DOMAINS = ("database", "messaging", "kubernetes", "http", "generic")
# The playbooks whose words speak for a domain (ordering only) and the domain label values naming it.
DOMAIN_PLAYBOOKS: Mapping[str, tuple[str, ...]] = {
    "database": ("connections", "locks"), "messaging": ("queues",),
    "kubernetes": ("pods", "rollout", "saturation"), "http": ("endpoint",), "generic": (),
}
DOMAIN_WORDS: Mapping[str, tuple[str, ...]] = {
    "database": ("database", "databases", "db", "postgres", "postgresql", "pg", "sql"),
    "messaging": ("messaging", "rabbitmq", "amqp", "queue", "queues", "broker"),
    "kubernetes": ("kubernetes", "k8s", "cluster", "platform", "workload"),
    "http": ("http", "service", "web", "api", "endpoint", "frontend"),
    "generic": (),
}
_DATABASE_LABELS = ("datname", "database", "db", "server")


def domain_order(alert: AlertFacts, available: Iterable[str]) -> tuple[str, ...]:
    """``available`` domains, the ones the alert speaks for first: its ``domain`` label, then how strongly its
    name, expression and annotations match each domain's playbooks (pure). Every one of them is swept; the
    order only decides what goes first when the tool budget runs short."""
    scores = playbook_scores(alert)
    label = alert.labels.get("domain", "").strip().lower()

    def weight(domain: str) -> float:
        named = 10.0 if label and (label == domain or label in DOMAIN_WORDS[domain]) else 0.0
        return named + max((scores.get(pb, 0.0) for pb in DOMAIN_PLAYBOOKS[domain]), default=0.0)

    return tuple(sorted(available, key=lambda d: (-weight(d), DOMAINS.index(d))))


def names_database(alert: AlertFacts) -> bool:
    """Whether the alert is about a PostgreSQL server: a database label, its domain, or pg_ metrics (pure)."""
    return (any(alert.labels.get(k) for k in _DATABASE_LABELS)
            or alert.labels.get("domain", "").lower() in DOMAIN_WORDS["database"]
            or "pg_" in alert.expression)


def available_domains(inv: Investigation, alert: AlertFacts) -> tuple[str, ...]:
    """The domains this Job has a source for (pure but for asking the tools what they offer)."""
    found = []
    if inv.offers("postgres", "connections") or (inv.offers("prometheus", "query") and names_database(alert)):
        found.append("database")
    if inv.offers("rabbitmq", "queues") or (alert.queue is not None and inv.offers("rabbitmq", "queue_status")):
        found.append("messaging")
    if inv.offers("kubernetes", "pods") and alert.namespace is not None:
        found.append("kubernetes")
    if inv.offers("http", "probe") or (inv.offers("prometheus", "targets") and _names_endpoint(alert)):
        found.append("http")
    return (*found, "generic")


def _names_endpoint(alert: AlertFacts) -> bool:
    """Whether the alert's ``instance`` is a scrape target Prometheus can say something about (pure)."""
    from . import http_sweep as endpoint

    instance = alert.labels.get("instance", "").strip()
    return bool(endpoint.host_port(instance) or instance.lower().startswith(("http://", "https://")))


def _refused(obs: Observation) -> bool:
    """The direct source could not be reached or refused us (slots, login, timeout), as opposed to answering."""
    from . import exporter

    return exporter.refused(obs)


def _direct(inv: Investigation, conn_obs: Observation) -> bool:
    """Whether PostgreSQL itself answers (else its sessions cannot be asked about, only its exporter's counts)."""
    return inv.offers("postgres", "connections") and conn_obs.tool == "postgres" and (
        conn_obs.ok or not _refused(conn_obs))


async def _connections(inv: Investigation, alert: AlertFacts) -> Observation:
    """postgres.connections, or — when PostgreSQL refuses or is not there — the same question answered from
    its exporter's metrics in Prometheus (the observation names the source that answered)."""
    direct = inv.offers("postgres", "connections")
    obs = await inv.call("postgres", "connections", {}) if direct else None
    if obs is not None and (obs.ok or not _refused(obs)):
        return obs
    from . import exporter

    why = obs.excerpt if obs is not None else "PostgreSQL is not available to this Job"
    fallback = await exporter.connections(inv, alert.labels, why) if inv.offers("prometheus", "query") else None
    if fallback is not None:
        return fallback
    if obs is not None:
        return obs
    return Observation(tool="postgres", operation="connections", query="", ok=False, at=datetime.now(UTC),
                       excerpt="neither PostgreSQL nor its exporter's metrics are available to this Job")


def assess_database(h: Draft, obs: Observation, session: Session, alert: AlertFacts) -> None:
    """The session is in the database the alert names (it is about this one), or in another (pure)."""
    named = alert.labels.get("datname", "").strip()
    if not named or not session.database:
        return
    if session.database == named:
        h.supports(obs, f"pid {session.pid} is in database {_q(named)}, the one the alert names", 0.5)
    else:
        h.contradicts(obs, f"pid {session.pid} is in database {_q(session.database)}, the alert is about "
                           f"{_q(named)}", 1.5)


def assess_idle_holder(idle_obs: Observation, chain_obs: Observation, conn: Connections | None,
                       conn_obs: Observation, alert: AlertFacts) -> Draft:
    """One session (or a few) keeping a transaction open while idle — the hazard itself when it neither
    blocks others nor exhausts the connections (then those explain the incident better) (pure)."""
    h = Draft(cause="idle_in_transaction", statement="a session holds a transaction open while idle")
    if not idle_obs.ok:
        return h
    idle = [s for s in read_idle_in_transaction(idle_obs) if not _ours(s.application)]
    if not idle:
        h.contradicts(idle_obs, f"no session idle in transaction for {IDLE_TX_MIN_AGE} s or more", 2.0)
        return h
    worst = max(idle, key=lambda s: s.seconds)
    who = f"application {_q(worst.application)}" if worst.application else f"client {_q(worst.client_addr)}"
    others = f"; {len(idle)} sessions idle in transaction for {IDLE_TX_MIN_AGE} s or more" if len(idle) > 1 else ""
    h.statement = (f"{who} (pid {worst.pid}) holds a transaction open while idle for {int(worst.seconds)} s"
                   f"{others}: its locks and snapshot stay held until it commits or is ended")
    h.supports(idle_obs, f"pid {worst.pid} ({who}) has been idle in transaction for {int(worst.seconds)} s", 1.5)
    if worst.seconds >= 2 * IDLE_TX_MIN_AGE:
        h.supports(idle_obs, f"that transaction has been open for {int(worst.seconds)} s, over "
                             f"{2 * IDLE_TX_MIN_AGE} s", 1.0)
    assess_database(h, idle_obs, worst, alert)
    idle_pids = {s.pid for s in idle}
    blocking = [(pid, n) for pid, n in root_blockers(read_blocking(chain_obs)) if pid in idle_pids]
    if blocking:
        pid, n = blocking[0]
        h.contradicts(chain_obs, f"idle pid {pid} blocks {n} session(s): the lock contention it causes is the "
                                 "incident", 1.5)
    elif chain_obs.ok:
        h.supports(chain_obs, "it blocks no other session (yet)", 0.5)
    if conn is not None and conn.max_connections and conn.total / conn.max_connections >= NEAR_SATURATED:
        h.contradicts(conn_obs, f"{conn.total} of {conn.max_connections} connections are in use: the exhaustion "
                                "explains the incident better", 1.5)
    if worst.application and worst.seconds >= 2 * IDLE_TX_MIN_AGE:
        h.propose("terminate_idle_backends", f"application_name {_q(worst.application)}",
                  f"end the sessions of {who} idle in transaction for {2 * IDLE_TX_MIN_AGE} s or more; fix the "
                  "transaction handling in the application afterwards",
                  application_name=worst.application, min_idle_s=str(2 * IDLE_TX_MIN_AGE))
    return h


async def database_sweep(inv: Investigation, alert: AlertFacts) -> list[Draft]:
    """Every question an SRE asks a PostgreSQL server first, whatever the alert is called: connection usage
    against max_connections and who holds them, sessions idle in transaction, locks and blocking chains,
    long-running queries, replication (standbys behind, slots retaining WAL). Shared calls are answered once
    (``Investigation.call`` caches them)."""
    drafts = await connections_playbook(inv, alert)
    if not _direct(inv, await _connections(inv, alert)):
        return drafts  # the exporter answered what it can (connection usage); asking again is refused again
    drafts += await locks_playbook(inv, alert)
    idle_obs = await inv.call("postgres", "idle_in_transaction", {"min_age_s": IDLE_TX_MIN_AGE})
    chain_obs = await inv.call("postgres", "blocking_chains", {})
    conn_obs = await _connections(inv, alert)
    drafts.append(assess_idle_holder(idle_obs, chain_obs, read_connections(conn_obs), conn_obs, alert))
    from . import replication

    return drafts + await replication.sweep(inv, alert)


def failing_workload(pods: Iterable[Pod]) -> str | None:
    """The Deployment most of the failing pods (crash-looping, OOM-killed, unready or Pending) belong to, from
    their ReplicaSet owner or their name; None if nothing fails (pure)."""
    owners: Counter[str] = Counter()
    for p in pods:
        if not (_failing(p) or p.ready is False or p.phase.lower() == "pending"):
            continue
        kind, _, name = p.owner.partition("/")
        by_owner = name.rsplit("-", 1)[0] if kind == "ReplicaSet" and "-" in name else None
        by_name = m["deployment"] if (m := _POD_OF_DEPLOYMENT.match(p.name)) else None
        if (found := k8s_name(by_name or by_owner or "")) is not None:
            owners[found] += 1
    name, n = _top(owners)
    return name if n else None


def _not_examined(tool: str, operation: str, why: str) -> Observation:
    return Observation(tool=tool, operation=operation, query="", ok=False, at=datetime.now(UTC), excerpt=why)


async def kubernetes_sweep(inv: Investigation, alert: AlertFacts) -> list[Draft]:
    """The workload's (else the namespace's) pods — phases, restarts, OOM kills, pending — its events and recent
    rollouts, and, when the alert's expression names pods, whether every ready one is saturated."""
    if alert.workload is None:  # the namespace's pods: whichever workload in it is failing is the suspect
        pods_obs = await inv.call("kubernetes", "pods", {"namespace": alert.namespace or ""})
        suspect = failing_workload(read_pods(pods_obs))
        if suspect is None:
            return []  # nothing in the namespace fails: no workload to hold a hypothesis about
        alert = replace(alert, workload=suspect)
    # The same observations either way; what the alert says about itself (an error-rate or an endpoint
    # alert) adds the hypotheses only such an alert can have: a regression without a rollout, a healthy
    # workload behind an unreachable endpoint.
    words = playbook_scores(alert)
    drafts = await (rollout_playbook if words["rollout"] > 0 else pods_playbook)(inv, alert)
    if words["endpoint"] > 0:
        drafts += [d for d in await endpoint_playbook(inv, alert) if d.cause == "endpoint_unreachable"]
    got = await _kubernetes_observations(inv, alert)  # cached
    if got is not None and alert.generator_url and inv.offers("prometheus", "alert_expression"):
        expr_obs = await inv.call("prometheus", "alert_expression", {"generator_url": alert.generator_url})
        drafts.append(assess_saturation(alert, got[0], got[2], expr_obs))
    return drafts


async def messaging_sweep(inv: Investigation, alert: AlertFacts) -> list[Draft]:
    """The broker: alarms, blocked publishers, queues backed up without or with stalled consumers."""
    if inv.offers("rabbitmq", "queues"):
        from . import messaging

        return await messaging.sweep(inv, alert)
    return await queues_playbook(inv, alert)


async def http_sweep(inv: Investigation, alert: AlertFacts) -> list[Draft]:
    """The endpoint the alert names: does it answer, how, how fast; what Prometheus saw scraping it."""
    from . import http_sweep as endpoint

    drafts = await endpoint.sweep(inv, alert)
    if endpoint.about_endpoint(alert):
        return drafts
    # "It answers fine" is a finding only about the endpoint the alert is about; beside an alert about
    # something else (a database behind an exporter) it explains nothing.
    return [d for d in drafts if d.cause != "endpoint_healthy"]


async def generic_sweep(inv: Investigation, alert: AlertFacts) -> list[Draft]:
    """What any incident gets: the logs around it."""
    errors_h = Draft(cause="errors_in_logs", statement="the service logs errors around the incident")
    return [errors_h] if await assess_logs(inv, alert, errors_h) is not None else []


SWEEPS: Mapping[str, Playbook] = {
    "database": database_sweep,
    "messaging": messaging_sweep,
    "kubernetes": kubernetes_sweep,
    "http": http_sweep,
    "generic": generic_sweep,
}


# The symptom each cause explains, as the playbook whose words describe that symptom in an alert.
SYMPTOMS: Mapping[str, tuple[str, ...]] = {
    "connection_exhaustion_idle_in_transaction": ("connections",), "connection_exhaustion_load": ("connections",),
    "lock_pileup": ("connections", "locks"), "lock_contention": ("locks",), "slow_queries": ("locks",),
    "idle_in_transaction": ("connections", "locks"),
    "oom_killed": ("pods",), "crash_loop": ("pods",), "pods_unready": ("pods", "endpoint"), "no_pods": ("pods",),
    "pods_pending": ("pods",), "bad_rollout": ("rollout",), "not_a_rollout": ("rollout",),
    "endpoint_unreachable": ("endpoint",), "endpoint_down": ("endpoint",), "endpoint_errors": ("rollout", "endpoint"),
    "endpoint_slow": ("rollout", "endpoint"), "saturated": ("saturation",),
    "no_consumer": ("queues",), "stalled_consumer": ("queues",), "consumers_too_slow": ("queues",),
    "broker_memory_alarm": ("queues",), "broker_disk_alarm": ("queues",), "publishers_blocked": ("queues",),
}


def weigh_symptom(drafts: Iterable[Draft], alert: AlertFacts) -> None:
    """Raise, a little, each hypothesis the evidence already makes probable that explains the symptom the
    alert's words describe — two real problems at once, the one alerted on comes first. Words never create a
    hypothesis nor support one nothing observed supports; an alert whose words match nothing raises none."""
    scores = playbook_scores(alert)
    about = {pb for pb, score in scores.items() if score > 0}
    if not about:
        return
    said = Observation(tool="alert", operation="symptom", query=f"alertname {alert.name}", ok=True,
                       at=datetime.now(UTC))
    for d in drafts:  # only the strong: a tie-break between real problems, never what makes a weak case conclusive
        if 1.0 / (1.0 + math.exp(-d.logit)) >= CONCLUSIVE_SCORE and about & set(SYMPTOMS.get(d.cause, ())):
            d.supports(said, f"it explains the symptom the alert {_q(alert.name)} describes", SYMPTOM_WEIGHT)


async def sweep_domains(inv: Investigation, alert: AlertFacts) -> tuple[list[Draft], tuple[str, ...]]:
    """Every domain the Job can see, swept in the order the alert suggests; the evidence ranks the result."""
    drafts: list[Draft] = []
    available = available_domains(inv, alert)
    for domain in domain_order(alert, available):
        drafts += await SWEEPS[domain](inv, alert)
    notes: tuple[str, ...] = ()
    if inv.offers("kubernetes", "pods") and alert.namespace is None:
        notes += ("the alert's labels name no valid namespace: Kubernetes was not consulted",)
    if names_database(alert) and "database" not in available:
        notes += ("the alert is about a database, but this Job has no PostgreSQL source (nor Prometheus for its "
                  "exporter's metrics): it was not consulted",)
    if alert.queue is None and inv.offers("rabbitmq", "queue_status") and "messaging" not in available:
        notes += ("the alert's labels name no queue (label queue, with vhost) and this Job cannot list the "
                  "broker's queues (no management API): the broker was not consulted",)
    if alert.queue is not None and "messaging" not in available:
        notes += (f"the alert names {_queue_where(alert)}, but this Job has no RabbitMQ source: the broker was not "
                  "consulted",)
    return drafts, notes


# --------------------------------------------------------------------------------------------
# The reasoner.
# --------------------------------------------------------------------------------------------

def cleared(expr_obs: Observation | None) -> bool:
    """Whether the alert's own expression, re-run, returns nothing now (pure)."""
    return expr_obs is not None and expr_obs.ok and not read_series(expr_obs)


def _apply_alert_expression(drafts: list[Draft], obs: Observation | None) -> None:
    """The alert's own expression, re-run: still true raises every hypothesis a little, cleared lowers them."""
    if obs is None or not obs.ok:
        return
    series = read_series(obs)
    for d in drafts:
        if series:
            d.supports(obs, f"the alert's expression still returns {len(series)} series", 0.25)
        else:
            d.contradicts(obs, "the alert's expression returns nothing now: the condition has cleared", 0.75)


def rank(drafts: Iterable[Draft]) -> tuple[Hypothesis, ...]:
    """Hypotheses best first (ties: the one with more evidence for it, then by name) (pure)."""
    # A hypothesis no evidence touched was not examined (its tool failed or was absent): leave it out.
    done = [d.finish() for d in drafts if d.evidence_for or d.evidence_against]
    by_cause: dict[str, Hypothesis] = {}
    for h in done:  # the same cause from two playbooks: keep the better-supported one
        if h.cause not in by_cause or _weight(h) > _weight(by_cause[h.cause]):
            by_cause[h.cause] = h
    return tuple(sorted(by_cause.values(), key=lambda h: (-_weight(h), -len(h.evidence_for), h.cause)))


def _weight(h: Hypothesis) -> float:
    return h.log_odds if h.log_odds is not None else h.score


def leads(best: Hypothesis, other: float | Hypothesis) -> bool:
    """Whether ``best`` is clearly ahead of ``other``: by ``CONCLUSIVE_MARGIN`` in score or — both near the
    ceiling, where scores stop telling them apart — by ``CONCLUSIVE_LOG_ODDS_MARGIN`` in evidence (pure)."""
    if isinstance(other, float):
        return best.score - other >= CONCLUSIVE_MARGIN
    if best.score - other.score >= CONCLUSIVE_MARGIN:
        return True
    return (best.log_odds is not None and other.log_odds is not None
            and best.log_odds - other.log_odds >= CONCLUSIVE_LOG_ODDS_MARGIN)


# Causes that tell the same story from two sides: they are not rivals when both fit. A lock chain that
# piles sessions up until the connections run out is lock contention *and* a pile-up; a session idle in
# transaction that holds most connections is one story; a rollout that makes every pod crash-loop too.
AGREEING: tuple[frozenset[str], ...] = (
    frozenset({"lock_contention", "lock_pileup"}),
    frozenset({"connection_exhaustion_idle_in_transaction", "idle_in_transaction"}),
    frozenset({"bad_rollout", "crash_loop"}),
    frozenset({"oom_killed", "crash_loop"}),
    # An endpoint down because its pods crash, are OOM-killed, unready or gone; errors after a rollout;
    # slow because every replica is saturated.
    *(frozenset({down, why}) for down in ("endpoint_down", "endpoint_unreachable")
      for why in ("endpoint_down", "crash_loop", "oom_killed", "pods_unready", "no_pods", "pods_pending")
      if down != why),
    frozenset({"endpoint_errors", "bad_rollout"}),
    frozenset({"endpoint_slow", "saturated"}),
    # A backlog that fills the broker's memory or disk sets off the alarm that blocks the publishers.
    *(frozenset({alarm, other}) for alarm in ("broker_memory_alarm", "broker_disk_alarm")
      for other in ("no_consumer", "consumers_too_slow", "stalled_consumer", "publishers_blocked")),
)


def agree(a: str, b: str) -> bool:
    """Whether causes ``a`` and ``b`` are one explanation seen from two sides (pure)."""
    return a == b or any(a in group and b in group for group in AGREEING)


def conclude(hypotheses: tuple[Hypothesis, ...], failures: list[Observation], *, reasoner: str = NAME,
             notes: tuple[str, ...] = ()) -> Assessment:
    """The assessment from ranked hypotheses: conclusive only if the best is probable and clearly ahead (pure)."""
    failed = "; ".join(f"{o.tool}.{o.operation}: {cut_at_word(o.excerpt, 160)}" for o in failures[:5])
    best = hypotheses[0] if hypotheses else None
    rival = next((h for h in hypotheses[1:] if best is not None and not agree(best.cause, h.cause)), None)
    runner_up = rival.score if rival is not None else 0.0
    if best is None or not best.evidence_for:
        why = "no diagnostic supported any explanation"
        return Assessment(
            reasoner=reasoner, summary=f"inconclusive: {why}" + (f" (failed: {failed})" if failed else ""),
            probable_cause="unknown: the diagnostics this agent could run did not point to a cause",
            confidence=0.0, conclusion=Conclusion.INCONCLUSIVE, hypotheses=hypotheses, notes=notes)
    if best.score >= CONCLUSIVE_SCORE and leads(best, rival if rival is not None else 0.0):
        return Assessment(reasoner=reasoner, summary=best.statement, probable_cause=best.statement,
                          confidence=best.score, conclusion=Conclusion.CONCLUSIVE, hypotheses=hypotheses,
                          actions=best.actions, notes=notes)
    why = ("the evidence is thin" if best.score < CONCLUSIVE_SCORE
           else f"two explanations fit about equally well ({best.score:.2f} vs {runner_up:.2f})")
    return Assessment(
        reasoner=reasoner,
        summary=f"inconclusive: {why}; leading hypothesis: {best.statement}"
                + (f" (failed: {failed})" if failed else ""),
        probable_cause=f"unknown; leading hypothesis ({best.score:.2f}): {best.statement}",
        confidence=round(min(best.score, INCONCLUSIVE_CONFIDENCE), 3), conclusion=Conclusion.INCONCLUSIVE,
        hypotheses=hypotheses, notes=notes)


Selection = Literal["evidence", "names"]


class RulesReasoner:
    """Deterministic playbooks over the tools; no network beyond the tools.

    ``selection``: ``"evidence"`` (default) sweeps every domain whose sources the Job offers, the
    alert's name and expression only ordering the work; ``"names"`` is the earlier behaviour — only
    the playbooks the alert's words match run — kept as the benchmark's baseline.
    """

    name = NAME

    def __init__(self, *, selection: Selection = "evidence") -> None:
        self.selection: Selection = selection

    async def investigate(self, inv: Investigation) -> Assessment:
        """Sweep what the Job can see (or, baseline, run the playbooks the alert's words call for) and
        conclude (never raises for a tool failure)."""
        alert = alert_facts(inv.incident)
        expr_obs = None
        if alert.generator_url and inv.offers("prometheus", "alert_expression"):
            expr_obs = await inv.call("prometheus", "alert_expression", {"generator_url": alert.generator_url})
        if self.selection == "names":
            drafts, notes = await _by_names(inv, alert)
        else:
            drafts, notes = await sweep_domains(inv, alert)
            if not cleared(expr_obs):  # a symptom that is gone now raises nothing
                weigh_symptom(drafts, alert)
        _apply_alert_expression(drafts, expr_obs)
        failures = [o for o in inv.observations if not o.ok]
        return conclude(rank(drafts), failures, notes=notes)


async def _by_names(inv: Investigation, alert: AlertFacts) -> tuple[list[Draft], tuple[str, ...]]:
    """The baseline: only the playbooks the alert's name, expression and annotations match."""
    drafts: list[Draft] = []
    chosen = choose_playbooks(alert)
    for name in chosen:
        drafts += await PLAYBOOKS[name](inv, alert)
    notes: tuple[str, ...] = ()
    if alert.namespace is None or alert.workload is None:
        if any(pb in chosen for pb in ("pods", "rollout", "endpoint", "saturation")):
            notes = ("the alert's labels name no valid namespace and workload: Kubernetes was not consulted",)
    if alert.queue is None and "queues" in chosen:
        notes += ("the alert's labels name no queue (label queue, with vhost): the broker was not consulted",)
    return drafts, notes
