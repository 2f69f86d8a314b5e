"""What the alerting rules rely on from the metrics, without any service running.

``increase()`` never sees the first increment of a labelled child created by that increment
(the series starts at 1), so the children alerts count are created at 0 up front; and the
phase gauge has a value for every phase, so a phase nobody runs in reads 0, not "no data".
"""

from __future__ import annotations

from prometheus_client import generate_latest

from dispatcher.intake.service import active_by_phase
from dispatcher.intake.tracker import Tracked
from dispatcher.plumbing.metrics import (
    LAUNCH_REJECTED_REASONS,
    NO_PHASE,
    REVOCATION_FAILURE_REASONS,
    BridgeMetrics,
    Metrics,
)
from dispatcher.trust.service import TrustMetrics
from schemas import Phase


def _tracked(n: int, phase: Phase | None) -> Tracked:
    return Tracked(investigation_id=f"inv-{n}", incident_key=f"key-{n}", job_name=f"aj-{n}", phase=phase)


def test_active_by_phase_counts_every_phase_and_the_unknown_one() -> None:
    running = [_tracked(1, Phase.SHADOW), _tracked(2, Phase.SHADOW), _tracked(3, Phase.AUTONOMOUS),
               _tracked(4, None)]
    assert active_by_phase(running) == {"shadow": 2, "read-only": 0, "limited-remediation": 0, "autonomous": 1,
                                        NO_PHASE: 1}
    assert set(active_by_phase([]).values()) == {0}


def test_the_dispatchers_alerted_counters_start_at_zero() -> None:
    r = Metrics().registry
    assert r.get_sample_value("agentjobs_job_outcomes_total", {"state": "failed", "reason": "launch_rejected"}) == 0
    for reason in LAUNCH_REJECTED_REASONS:
        assert r.get_sample_value("agentjobs_dead_lettered_total", {"reason": reason}) == 0
    for reason in REVOCATION_FAILURE_REASONS:
        assert r.get_sample_value("agentjobs_credential_revocation_failures_total", {"reason": reason}) == 0
    for phase in Phase:
        assert r.get_sample_value("agentjobs_credentials_minted_total", {"phase": phase.value}) == 0
    for outcome in ("revoked", "gone"):
        assert r.get_sample_value("agentjobs_credentials_revoked_total", {"outcome": outcome}) == 0
    assert r.get_sample_value("agentjobs_incidents_last_consumed_timestamp_seconds") == 0


def test_trust_and_the_bridge_expose_what_their_alerts_count() -> None:
    trust = TrustMetrics().registry
    for reason in ("demoted", "harmful_action", "promoted"):
        assert trust.get_sample_value("agentjobs_phase_changes_total", {"reason": reason}) == 0
    assert "# TYPE agentjobs_consumer_up gauge" in generate_latest(trust).decode()
    bridge = BridgeMetrics().registry
    for reason in ("broker_down", "not_confirmed"):
        assert bridge.get_sample_value("agentjobs_bridge_unavailable_total", {"reason": reason}) == 0
    assert bridge.get_sample_value("agentjobs_bridge_forwarded_total") == 0
