"""Prometheus metrics of the dispatcher (``agentjobs_`` prefix, base units).

One ``Metrics`` object per process, on its own registry so tests and several
components in one process (``agentjobs up``) never collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.incidents = Counter(
            "agentjobs_incidents_consumed_total", "Incident deliveries handled, by outcome", ["outcome"], registry=r
        )
        self.active = Gauge(
            "agentjobs_investigations_active", "Investigations admitted and not finished, by class", ["job_class"],
            registry=r,
        )
        self.waiting = Gauge("agentjobs_investigations_waiting", "Incidents waiting for admission", registry=r)
        self.dispatch_latency = Histogram(
            "agentjobs_dispatch_latency_seconds",
            "From admission request to Job created (or found) and reported",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.outcomes = Counter(
            "agentjobs_job_outcomes_total", "Terminal Job outcomes, by state and reason", ["state", "reason"], registry=r
        )
        self.orphan_tokens_revoked = Counter(
            "agentjobs_orphan_agent_tokens_revoked_total", "Agent tokens no live Job held, revoked by the sweeper",
            registry=r)
        self.revocations_refused = Counter(
            "agentjobs_token_revocations_refused_total",
            "Token accessors the dispatcher was asked to revoke but left alone: not an agent token of this "
            "installation/investigation (dispatcher/credentials/tokens.py revocable), by reason",
            ["reason"], registry=r)
        self.phase_changes_refused = Counter(
            "agentjobs_phase_changes_refused_total",
            "Entries of the phase log not sent by the trust identity: never applied (dispatcher/intake/phases.py)",
            registry=r)
        self.retries = Counter("agentjobs_retries_total", "Temporary errors retried in place", registry=r)
        self.dead_lettered = Counter(
            "agentjobs_dead_lettered_total", "Messages dead-lettered, by reason", ["reason"], registry=r
        )
        # What investigations cost (from findings; see dispatcher/intake/costs.py)
        self.investigations_costed = Counter(
            "agentjobs_investigations_costed_total", "Findings whose cost was recorded, by domain and reasoner",
            ["domain", "reasoner"], registry=r)
        self.tool_calls = Counter(
            "agentjobs_investigation_tool_calls_total", "Tool calls agents made, by domain and reasoner",
            ["domain", "reasoner"], registry=r)
        self.llm_tokens = Counter(
            "agentjobs_investigation_llm_tokens_total", "LLM tokens agents used, by domain and kind",
            ["domain", "kind"], registry=r)
        self.llm_cost = Counter(
            "agentjobs_investigation_llm_cost_usd_total", "LLM price of investigations (per-model table), by domain",
            ["domain"], registry=r)
        self.agent_cpu = Counter(
            "agentjobs_investigation_cpu_seconds_total", "CPU seconds of agents' reasoning, by domain",
            ["domain"], registry=r)
        self.agent_wall = Histogram(
            "agentjobs_investigation_wall_seconds", "Wall time of agents' reasoning, by domain", ["domain"],
            buckets=(0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600), registry=r)


class BridgeMetrics:
    """The webhook bridge's metrics, on its own registry, served on the bridge's ``/metrics``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        # Alertmanager does not retry a 4xx: a count from it is a notification it gave up on.
        self.refused = Counter(
            "agentjobs_bridge_refused_total",
            "Requests refused with a 4xx (Alertmanager does not retry them), by reason",
            ["reason"], registry=self.registry)
        # Connections closed before a request reached the app: slow headers, over the cap.
        self.connections_refused = Counter(
            "agentjobs_bridge_connections_refused_total",
            "Connections closed without a request (header_timeout) or refused (too_many_connections), by reason",
            ["reason"], registry=self.registry)
        self.connections_open = Gauge(
            "agentjobs_bridge_connections_open", "HTTP connections open now (capped by bridge.max_connections)",
            registry=self.registry)
