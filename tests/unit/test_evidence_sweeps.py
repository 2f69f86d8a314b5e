"""The rules reasoner sweeps what the Job can see: the alert's name orders the work, never decides it.

Real alert rules are named by whoever writes them. These tests take alerts whose names and
expressions match no playbook pattern and show that the evidence — not the words — finds the cause,
beside the name-matching baseline (``RulesReasoner(selection="names")``) that could not.
"""

from __future__ import annotations

from agent.reasoning.rules import RulesReasoner, agree, alert_facts, domain_order, playbook_scores
from schemas import Conclusion
from tests.support.fake_tools import calm_connections, idle_sessions, incident, investigation, postgres, session
from tests.unit.test_reasoning_rules import CHAINS, event, kubernetes, pod

TX_TOO_LONG = "max by (datname) (pg_stat_activity_max_tx_duration) > 15"


def test_the_issue_alert_matches_no_playbook_by_its_words() -> None:
    facts = alert_facts(incident("PostgresTransactionTooLong", expr=TX_TOO_LONG))
    assert set(playbook_scores(facts).values()) == {0.0}


async def test_a_long_transaction_alert_during_a_lock_incident_finds_the_root_blocker() -> None:
    # Given a lock chain (report-job pid 200 idle in transaction blocks four sessions), alerted as a long transaction
    inc = incident("PostgresTransactionTooLong", expr=TX_TOO_LONG, datname="shop")
    pg = postgres(blocking_chains=CHAINS, connections=calm_connections(),
                  idle_in_transaction=idle_sessions([session(200, "report-job", xact_age_s=400.0)]))
    result = await RulesReasoner().investigate(investigation(inc, pg))
    # Then PostgreSQL was asked, and the lock chain is the conclusion, naming the root blocker
    assert pg.called("blocking_chains") and pg.called("connections")
    assert result.conclusion is Conclusion.CONCLUSIVE
    assert result.hypotheses[0].cause == "lock_contention"
    assert "pid 200" in result.probable_cause and '"report-job"' in result.probable_cause
    # ... while the name-matching baseline never looked at the database
    pg = postgres(blocking_chains=CHAINS, connections=calm_connections())
    baseline = await RulesReasoner(selection="names").investigate(investigation(inc, pg))
    assert pg.calls == [] and baseline.conclusion is Conclusion.INCONCLUSIVE


async def test_a_lone_idle_transaction_is_the_cause_when_it_neither_blocks_nor_exhausts() -> None:
    inc = incident("CheckoutDbHygiene", expr=TX_TOO_LONG, datname="shop")
    pg = postgres(connections=calm_connections(),
                  idle_in_transaction=idle_sessions([session(4711, "checkout-api", xact_age_s=420.0)]))
    result = await RulesReasoner().investigate(investigation(inc, pg))
    assert result.conclusion is Conclusion.CONCLUSIVE
    best = result.hypotheses[0]
    assert best.cause == "idle_in_transaction"
    assert "pid 4711" in best.statement and "420 s" in best.statement
    assert any("blocks no other session" in e.excerpt for e in best.evidence_for)


async def test_pending_pods_are_named_with_the_schedulers_reason() -> None:
    k8s = kubernetes([pod("checkout-api-7d9f8b6c5d-a1b2c", phase="Pending"),
                      pod("checkout-api-7d9f8b6c5d-d3e4f", phase="Pending")],
                     events=[event("FailedScheduling", "0/3 nodes are available: 3 Insufficient cpu.",
                                   "Pod/checkout-api-7d9f8b6c5d-a1b2c", 12)])
    inc = incident("CheckoutCapacityShort", namespace="shop", deployment="checkout-api", domain="kubernetes")
    result = await RulesReasoner().investigate(investigation(inc, k8s))
    best = result.hypotheses[0]
    assert result.conclusion is Conclusion.CONCLUSIVE
    assert best.cause == "pods_pending" and "Insufficient cpu" in best.statement
    # Pending pods are not "running but not ready": no restart is proposed for them
    assert all(a.action != "restart_deployment" for a in result.actions)


async def test_an_alert_naming_only_a_namespace_still_finds_the_crash_looping_pod() -> None:
    k8s = kubernetes([pod("payments-6f7d8c9b5-x1y2z", restarts=9, reason="Error", exit_code=1,
                          waiting="CrashLoopBackOff"),
                      pod("payments-6f7d8c9b5-q2w3e", ready=True)])
    inc = incident("ShopNamespaceUnhappy", namespace="shop", domain="kubernetes")
    result = await RulesReasoner().investigate(investigation(inc, k8s))
    # Then the namespace's pods were listed, and the failing pod's Deployment examined
    assert k8s.called("pods") == [{"namespace": "shop"}, {"namespace": "shop", "workload": "payments"}]
    assert k8s.called("rollouts") == [{"namespace": "shop", "deployment": "payments"}]
    assert result.hypotheses[0].cause == "crash_loop" and "payments" in result.hypotheses[0].statement


def test_the_domain_label_and_the_alerts_words_order_the_sweeps_but_every_domain_is_swept() -> None:
    everything = ("database", "messaging", "kubernetes", "http", "generic")
    queue_alert = alert_facts(incident("OrdersQueueBacklog", domain="messaging"))
    assert domain_order(queue_alert, everything)[0] == "messaging"
    assert set(domain_order(queue_alert, everything)) == set(everything)
    db_alert = alert_facts(incident("SomethingOdd", domain="database"))
    assert domain_order(db_alert, everything)[0] == "database"


def test_explanations_that_tell_one_story_are_not_rivals() -> None:
    assert agree("lock_contention", "lock_pileup") and agree("bad_rollout", "crash_loop")
    assert not agree("lock_contention", "slow_queries")


def test_a_refusal_in_the_summary_is_cut_at_a_word_with_the_whole_text_in_the_evidence() -> None:
    from datetime import UTC, datetime

    from agent.reasoning.rules import conclude
    from agent.tools.base import Observation

    refusal = ("connection failed: FATAL:  remaining connection slots are reserved for non-replication superuser "
               "connections (while connecting to 127.0.0.1:5432 as v-token-agentjobs-diagnostics-x1y2z3 for "
               "database shop)")
    failed = Observation(tool="postgres", operation="connections", query="connections()", ok=False,
                         at=datetime.now(UTC), excerpt=refusal)
    result = conclude((), [failed])
    cut = result.summary.split("postgres.connections: ", 1)[1].rstrip(")")
    one_line = " ".join(refusal.split())
    assert cut.endswith("…") and one_line.startswith(cut[:-1])
    assert one_line[len(cut) - 1] == " "  # the cut falls between words
    assert failed.evidence().excerpt == refusal


async def test_two_real_problems_at_once_the_one_alerted_on_comes_first() -> None:
    # Given one server with both an idle-in-transaction hog exhausting connections and a lock chain
    from tests.support.fake_tools import IDLE_CHECKOUT, SATURATION_EXPR

    both = {"blocking_chains": CHAINS, "idle_in_transaction": IDLE_CHECKOUT}
    hog = await RulesReasoner().investigate(investigation(
        incident("PostgresTooManyConnections", expr=SATURATION_EXPR), postgres(**both)))
    locks = await RulesReasoner().investigate(investigation(
        incident("PostgresLockWaits", expr='sum(pg_locks_count{mode=~".*ExclusiveLock"}) > 10'), postgres(**both)))
    # Then each alert gets the explanation of its own symptom, conclusively, with the other one ranked too
    assert hog.conclusion is locks.conclusion is Conclusion.CONCLUSIVE
    assert hog.hypotheses[0].cause == "connection_exhaustion_idle_in_transaction"
    assert locks.hypotheses[0].cause == "lock_contention"
    assert "lock_contention" in {h.cause for h in hog.hypotheses}


async def test_a_session_in_another_database_than_the_alert_names_speaks_against_itself() -> None:
    slow = {"total": 1, "min_s": 30, "sessions": [session(501, "analytics", state="active", running_s=95.0)]}
    pg = postgres(long_running=slow, connections=calm_connections(), idle_in_transaction=idle_sessions([]))
    here = await RulesReasoner().investigate(investigation(incident("DashboardsStale", datname="shop"), pg))
    elsewhere = await RulesReasoner().investigate(investigation(incident("DashboardsStale", datname="ledger"), pg))
    assert here.hypotheses[0].cause == "slow_queries" and here.conclusion is Conclusion.CONCLUSIVE
    [slow_elsewhere] = [h for h in elsewhere.hypotheses if h.cause == "slow_queries"]
    assert any('the alert is about "ledger"' in e.excerpt for e in slow_elsewhere.evidence_against)
    assert elsewhere.conclusion is Conclusion.INCONCLUSIVE
