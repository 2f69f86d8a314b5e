"""The causes the reasoners name, one identifier each, with what it means (the llm reasoner's vocabulary).

The rules reasoner's hypotheses use exactly these identifiers (``tests/unit/test_llm_grounding.py``
checks that every ``cause="..."`` in ``agent/reasoning`` is listed); the llm reasoner is asked to use
them where one fits, so that its hypotheses can be corroborated by the rules' scoring of the same
evidence (``grounding``) and compared in the benchmark.
"""

from __future__ import annotations

CAUSES: dict[str, str] = {
    # PostgreSQL
    "lock_contention": "a session holds locks others wait for (a root blocker, often idle in transaction)",
    "lock_pileup": "sessions pile up waiting for locks and hold their connections",
    "idle_in_transaction": "a session holds a transaction open while idle (locks and snapshot held)",
    "connection_exhaustion_idle_in_transaction": "connections used up by sessions idle in transaction",
    "connection_exhaustion_load": "connections used up by real load (mostly active sessions)",
    "slow_queries": "queries run long without waiting for locks",
    "replication_lag": "a standby is far behind its primary (replay paused, slow, or not receiving WAL)",
    "replication_slot_retains_wal": "an inactive replication slot retains WAL: the disk fills",
    # RabbitMQ
    "no_consumer": "a queue backs up with no consumer",
    "stalled_consumer": "consumers hold their prefetch full of unacknowledged messages and ack nothing",
    "consumers_too_slow": "consumers work but slower than messages arrive",
    "broker_memory_alarm": "the broker's memory alarm is set: publishers are blocked",
    "broker_disk_alarm": "the broker's disk alarm is set: publishers are blocked",
    "publishers_blocked": "publishing connections are blocked by flow control",
    # Kubernetes
    "crash_loop": "containers crash and restart in a loop",
    "oom_killed": "containers are killed for exceeding their memory limit",
    "bad_rollout": "a recent rollout brought the failure",
    "not_a_rollout": "the workload fails, but no recent rollout explains it",
    "pods_pending": "pods cannot be scheduled (resources, affinity, taints)",
    "pods_unready": "pods run but fail their readiness checks",
    "no_pods": "the workload has no pods at all",
    "saturated": "every ready replica is saturated (CPU or load)",
    # HTTP endpoints
    "endpoint_down": "the endpoint refuses connections or cannot be reached",
    "endpoint_unreachable": "nothing behind the endpoint answers (its pods are gone or failing)",
    "endpoint_errors": "the endpoint answers with server errors (5xx)",
    "endpoint_slow": "the endpoint answers too slowly or times out",
    "endpoint_healthy": "the endpoint answers fine now: the problem is elsewhere or has cleared",
    # Any
    "errors_in_logs": "the logs around the alert show errors that explain it",
}


def vocabulary() -> str:
    """The list for a prompt, one ``- id: meaning`` per line (pure)."""
    return "\n".join(f"- {cause}: {meaning}" for cause, meaning in CAUSES.items())
