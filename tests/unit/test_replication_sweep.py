"""Replication in the database sweep (agent/reasoning/replication.py): standbys behind, slots hoarding WAL.

Observations are shaped as ``postgres.replication`` returns them (tests/scenarios induce the real thing on
a private primary and standby: ``pg_replica_replay_paused``, ``pg_inactive_slot_retains_wal``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from agent.reasoning.replication import LAG_BYTES, SLOT_RETAINED_BYTES, assess
from agent.reasoning.rules import AlertFacts
from agent.tools.base import Observation

MiB = 1048576


def alert(name: str = "RevenueReportsStale", expression: str = "time() - max(x) > 900") -> AlertFacts:
    return AlertFacts(name=name, labels={}, text="", expression=expression, generator_url="",
                      starts_at=datetime.now(UTC), namespace=None, workload=None, pod=None, container=None,
                      instance="")


def observed(**data: Any) -> Observation:
    base: dict[str, Any] = {"in_recovery": False, "standbys": [], "slots": [], "received_not_replayed_bytes": None,
                            "last_replay_age_s": None, "replay_pause_state": None, "wal_receiver_status": None}
    return Observation(tool="postgres", operation="replication", query="", ok=True, at=datetime.now(UTC),
                       data={**base, **data})


def standby(name: str = "reports-replica", *, write: int = 0, replay: int = 0, lag: float | None = 0.2,
            state: str = "streaming") -> dict[str, Any]:
    return {"application_name": name, "client_addr": "10.0.0.7", "state": state, "sync_state": "async",
            "write_lag_s": 0, "flush_lag_s": 0, "replay_lag_s": lag, "replay_behind_bytes": replay,
            "write_behind_bytes": write}


def slot(name: str = "backup_host_b", *, active: bool = False, retained: int | None = 0,
         wal_status: str = "reserved") -> dict[str, Any]:
    return {"slot_name": name, "slot_type": "physical", "active": active, "wal_status": wal_status,
            "retained_bytes": retained}


def by_cause(obs: Observation, facts: AlertFacts | None = None) -> dict[str, Any]:
    return {d.cause: d for d in assess(obs, facts or alert())}


def test_a_standby_that_receives_but_does_not_replay_lags_though_its_replay_lag_interval_looks_small() -> None:
    found = by_cause(observed(standbys=[standby("fast"), standby(replay=400 * MiB, lag=0.49)]))
    lag = found["replication_lag"]
    assert lag.logit > 0
    assert 'standby "reports-replica" (10.0.0.7) replays 400 MiB behind' in lag.statement
    assert "receives the WAL but does not replay it" in lag.statement


def test_a_standby_that_does_not_receive_fast_enough_is_told_apart() -> None:
    lag = by_cause(observed(standbys=[standby(write=300 * MiB, replay=300 * MiB, state="catchup")]))["replication_lag"]
    assert "does not receive the WAL fast enough" in lag.statement
    assert any("catchup, not streaming" in e.excerpt for e in lag.evidence_for)


def test_standbys_close_behind_speak_against_lag() -> None:
    lag = by_cause(observed(standbys=[standby(replay=LAG_BYTES - 1)]))["replication_lag"]
    assert lag.logit < -2 and not lag.evidence_for
    assert "1 standby(s) connected, the furthest behind" in lag.evidence_against[0].excerpt


def test_paused_replay_on_a_standby_is_the_cause_with_how_to_resume() -> None:
    lag = by_cause(observed(in_recovery=True, received_not_replayed_bytes=350 * MiB, last_replay_age_s=95.0,
                            replay_pause_state="paused", wal_receiver_status="streaming"))["replication_lag"]
    assert lag.statement.startswith("replication lag: replay is paused on this standby (350 MiB received")
    assert "pg_wal_replay_resume()" in lag.statement
    assert any("95 s old" in e.excerpt for e in lag.evidence_for)


def test_a_standby_not_receiving_wal_lags_and_one_caught_up_does_not() -> None:
    cut_off = by_cause(observed(in_recovery=True, received_not_replayed_bytes=0, last_replay_age_s=400.0,
                                replay_pause_state="not paused", wal_receiver_status=None))["replication_lag"]
    assert "receives no WAL from its primary" in cut_off.statement and cut_off.logit > 0
    caught_up = by_cause(observed(in_recovery=True, received_not_replayed_bytes=0, last_replay_age_s=400.0,
                                  replay_pause_state="not paused", wal_receiver_status="streaming"))
    assert caught_up["replication_lag"].logit < -2  # an idle primary leaves nothing to replay: not lag


def test_an_inactive_slot_holding_wal_fills_the_disk() -> None:
    found = by_cause(observed(slots=[slot("live", active=True, retained=900 * MiB),
                                     slot(retained=2048 * MiB, wal_status="extended")]))
    h = found["replication_slot_retains_wal"]
    assert h.statement.startswith('replication slot "backup_host_b" (physical, inactive, wal_status extended) '
                                  "retains 2048 MiB of WAL")
    assert any("beyond max_wal_size" in e.excerpt for e in h.evidence_for)
    assert found["replication_lag"].logit < -2  # no standby connected


def test_small_or_unreserved_slots_speak_against_it() -> None:
    h = by_cause(observed(slots=[slot(retained=SLOT_RETAINED_BYTES // 2), slot("new", retained=None)])
                 )["replication_slot_retains_wal"]
    assert h.logit < -2 and "the most an inactive one holds is 128 MiB" in h.evidence_against[0].excerpt


def test_a_server_without_replication_adds_nothing_unless_the_alert_speaks_of_replication() -> None:
    assert assess(observed(), alert()) == []
    about = by_cause(observed(), alert("PostgresReplicaLagging", "pg_replication_lag_seconds > 60"))
    assert set(about) == {"replication_lag"} and about["replication_lag"].logit < -2


def test_a_failed_observation_says_nothing() -> None:
    failed = Observation(tool="postgres", operation="replication", query="", ok=False, at=datetime.now(UTC),
                         excerpt="permission denied")
    assert assess(failed, alert("ReplicaLag")) == []
