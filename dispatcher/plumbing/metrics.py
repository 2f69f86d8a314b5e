"""Prometheus metrics of the dispatcher (``agentjobs_`` prefix, base units).

One ``Metrics`` object per process, on its own registry so tests and several
components in one process (``agentjobs up``) never collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from schemas import Phase

# Dead-letter reasons of a Job the runtime would not create (dispatcher/jobs/k8s_errors.py
# ``classify``, dispatcher/jobs/local.py): the JobLaunchFailures alert matches exactly these.
LAUNCH_REJECTED_REASONS = ("forbidden", "invalid_job", "kubernetes_rejected")
# Why a revocation attempt did not complete (``agentjobs_credential_revocation_failures_total``):
# the revoke itself answered 403 (the dispatcher's policy), or anything else temporary (Vault
# unreachable, 5xx, 429, a lookup answering 403 while another revocation of it is in progress).
REVOCATION_FAILURE_REASONS = ("permission_denied", "vault_error")
NO_PHASE = "unknown"  # phase label of an investigation whose Job carries none (made before phases)


def consumer_up(registry: CollectorRegistry) -> Gauge:
    """``agentjobs_consumer_up{queue}``: one per component registry, set by ``Consumer``."""
    return Gauge("agentjobs_consumer_up",
                 "1 while this process consumes the queue (subscribed, channel open), else 0", ["queue"],
                 registry=registry)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.consumer_up = consumer_up(r)
        self.incidents = Counter(
            "agentjobs_incidents_consumed_total", "Incident deliveries handled, by outcome", ["outcome"], registry=r
        )
        self.active = Gauge(
            "agentjobs_investigations_active", "Investigations admitted and not finished, by class", ["job_class"],
            registry=r,
        )
        self.active_by_phase = Gauge(
            "agentjobs_investigations_active_by_phase",
            "Investigations whose Job runs (launched, not finished), by the autonomy phase it runs in", ["phase"],
            registry=r)
        self.waiting = Gauge("agentjobs_investigations_waiting", "Incidents waiting for admission", registry=r)
        self.last_consumed = Gauge(
            "agentjobs_incidents_last_consumed_timestamp_seconds",
            "Unix time this process last settled an incident delivery off the queue (acked; 0: none yet)",
            registry=r)
        # Sampled by the dispatcher with passive declares (exact, unlike the management API's stats).
        self.queue_messages = Gauge(
            "agentjobs_queue_messages", "Messages ready in the queue (not counting unacked ones), by queue",
            ["queue"], registry=r)
        self.queue_consumers = Gauge(
            "agentjobs_queue_consumers", "Consumers subscribed to the queue (all processes), by queue", ["queue"],
            registry=r)
        self.dispatch_latency = Histogram(
            "agentjobs_dispatch_latency_seconds",
            "From admission request to Job created (or found) and reported",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.outcomes = Counter(
            "agentjobs_job_outcomes_total", "Terminal Job outcomes, by state and reason", ["state", "reason"], registry=r
        )
        # Vault agent tokens (dispatcher/credentials/tokens.py): minted vs revoked shows leaks at a glance.
        self.credentials_minted = Counter(
            "agentjobs_credentials_minted_total", "Per-investigation agent tokens minted (wrapped), by phase",
            ["phase"], registry=r)
        self.credentials_revoked = Counter(
            "agentjobs_credentials_revoked_total",
            "Agent tokens revoked by accessor (revoked), or found already revoked or expired (gone), by outcome",
            ["outcome"], registry=r)
        self.revocation_failures = Counter(
            "agentjobs_credential_revocation_failures_total",
            "Revocation attempts Vault did not complete (the token lives on until a retry, the sweeper or "
            "its TTL), by reason", ["reason"], registry=r)
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
        self._known_labels()

    def _known_labels(self) -> None:
        """Children for the bounded label values alerts count with ``increase()``: a child created by
        its first increment starts at 1, and ``increase()`` never sees that first one."""
        self.outcomes.labels(state="failed", reason="launch_rejected")
        for reason in LAUNCH_REJECTED_REASONS:
            self.dead_lettered.labels(reason=reason)
        for phase in Phase:
            self.credentials_minted.labels(phase=phase.value)
        for outcome in ("revoked", "gone"):
            self.credentials_revoked.labels(outcome=outcome)
        for reason in REVOCATION_FAILURE_REASONS:
            self.revocation_failures.labels(reason=reason)


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
        self.forwarded = Counter(
            "agentjobs_bridge_forwarded_total", "Notifications published to agentjobs.incidents and confirmed (200)",
            registry=self.registry)
        # 503s: Alertmanager retries them, so a count here is delay, not loss — unless it never stops.
        self.unavailable = Counter(
            "agentjobs_bridge_unavailable_total",
            "Notifications answered 503 because the broker did not confirm (broker_down, not_confirmed), by reason",
            ["reason"], registry=self.registry)
        for reason in ("broker_down", "not_confirmed"):
            self.unavailable.labels(reason=reason)
        self.broker_connected = Gauge(
            "agentjobs_bridge_broker_connected", "1 while the bridge's broker connection and channel are open",
            registry=self.registry)
