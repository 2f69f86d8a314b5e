"""The messaging sweep's pure assessments, over observations shaped as the rabbitmq tool returns them.

Each case is calibrated against ``rules.rank`` and ``rules.conclude``: a clear case
is conclusive (score >= 0.6, ahead of the runner-up by >= 0.15) with the right
cause; a healthy broker concludes nothing.
"""

from __future__ import annotations

from typing import Any

from agent.config import load
from agent.reasoning import messaging
from agent.reasoning.rules import conclude, rank
from agent.tools.base import Observation
from agent.tools.rabbitmq import prefetch_window
from dispatcher.jobs import jobspec
from dispatcher.plumbing.settings import load_settings
from schemas import Conclusion, Phase, decode_incident, identify, utcnow
from tests.support.payloads import SAMPLE_WEBHOOK, dumps
from tests.unit.test_agent_config import BASE

GIB = 1 << 30


def obs(operation: str, data: Any, *, ok: bool = True) -> Observation:
    return Observation(tool="rabbitmq", operation=operation, query=f"{operation}()", ok=ok, at=utcnow(),
                       data=data if ok else None, excerpt="" if ok else "HTTP 401")


def node(name: str = "rabbit@a", *, mem_alarm: bool = False, disk_alarm: bool = False,
         mem_used: int = 1 * GIB, mem_limit: int = 4 * GIB) -> dict[str, Any]:
    return {"name": name, "running": True, "mem_alarm": mem_alarm, "disk_free_alarm": disk_alarm,
            "mem_used": mem_used, "mem_limit": mem_limit, "disk_free": 50 * GIB, "disk_free_limit": GIB // 20}


def overview(*nodes: dict[str, Any]) -> Observation:
    return obs("overview", {"nodes": list(nodes or [node()]), "alarms": []})


def connections(*held: tuple[str, str]) -> Observation:
    rows = [{"name": f"10.0.0.{i}:5{i} -> 10.0.0.9:5672", "user": "orders-app", "vhost": "shop",
             "client_name": client, "state": state} for i, (client, state) in enumerate(held)]
    return obs("connections", {"vhost": None, "total": len(rows) + 3, "held": len(rows), "connections": rows})


def queue(name: str = "orders", *, ready: int, unacked: int = 0, consumers: int = 0,
          publish: float | None = 0.0, deliver: float | None = 0.0, ack: float | None = 0.0,
          growth: float | None = 0.0, prefetch: tuple[int, ...] | None = None, ack_required: bool = True,
          vhost: str = "shop") -> dict[str, Any]:
    row = {"vhost": vhost, "name": name, "type": "classic", "state": "running", "messages_ready": ready,
           "messages_unacknowledged": unacked, "consumers": consumers, "consumer_utilisation": None,
           "publish_rate": publish, "deliver_rate": deliver, "ack_rate": ack, "ready_rate": growth, "idle_since": ""}
    if prefetch is not None:
        row["consumer_details"] = [{"channel": f"ch {i}", "connection": "c", "user": "worker", "consumer_tag": f"t{i}",
                                    "prefetch_count": p, "ack_required": ack_required, "active": True}
                                   for i, p in enumerate(prefetch)]
        row["channels"] = [{"name": f"ch {i}", "messages_unacknowledged": unacked // len(prefetch),
                            "prefetch_count": p} for i, p in enumerate(prefetch)]
    return row


def detail(**kw: Any) -> Observation:
    return obs("queue", queue(**kw))


def view(o: Observation) -> messaging.QueueView:
    found = messaging.read_queue_detail(o)
    assert found is not None
    return found


def verdict(drafts):
    hypotheses = rank(drafts)
    return hypotheses, conclude(hypotheses, [])


# --- alarms and held publishers -------------------------------------------------------------------

def test_a_memory_alarm_is_the_conclusion_and_blocked_publishers_agree_with_it():
    ov = overview(node(mem_alarm=True, mem_used=5 * GIB, mem_limit=4 * GIB))
    conns = connections(("orders-publisher", "blocked"), ("billing", "blocking"))
    hypotheses, assessment = verdict([*messaging.assess_alarms(ov, conns),
                                      messaging.assess_held_publishers(conns, ov)])
    assert assessment.conclusion is Conclusion.CONCLUSIVE, assessment.summary
    best = hypotheses[0]
    assert best.cause == "broker_memory_alarm" and '"rabbit@a" is in a memory alarm' in best.statement
    assert any("mem_used 5.00 GiB of limit 4.00 GiB" in e.excerpt for e in best.evidence_for)
    assert any("2 connections blocked or blocking" in e.excerpt for e in best.evidence_for)
    # the publishers are blocked *by* the alarm: that hypothesis is argued down, and the disk is fine
    held = next(h for h in hypotheses if h.cause == "publishers_blocked")
    assert held.evidence_against and held.score < 0.3
    disk = next(h for h in hypotheses if h.cause == "broker_disk_alarm")
    assert not disk.evidence_for and "no node is in a disk alarm" in disk.evidence_against[0].excerpt


def test_a_disk_alarm_is_named_as_such():
    ov = overview(node(disk_alarm=True))
    hypotheses, assessment = verdict(messaging.assess_alarms(ov, connections(("p", "blocked"))))
    assert assessment.conclusion is Conclusion.CONCLUSIVE and hypotheses[0].cause == "broker_disk_alarm"


def test_publishers_in_flow_control_without_an_alarm_are_publishers_blocked():
    ov = overview()
    conns = connections(("orders-publisher", "flow"), ("audit-publisher", "flow"), ("billing", "flow"))
    hypotheses, assessment = verdict([*messaging.assess_alarms(ov, conns), messaging.assess_held_publishers(conns, ov)])
    assert assessment.conclusion is Conclusion.CONCLUSIVE, assessment.summary
    assert hypotheses[0].cause == "publishers_blocked"
    assert '"orders-publisher" (flow, user "orders-app")' in hypotheses[0].statement
    assert any("no node is in a memory or disk alarm" in e.excerpt for e in hypotheses[0].evidence_for)


def test_one_connection_in_flow_for_a_moment_is_not_a_confident_finding():
    ov, conns = overview(), connections(("orders-publisher", "flow"))  # 1 of 4 connections
    assert messaging.assess_held_publishers(conns, ov).finish().score < 0.6
    assert messaging.assess_held_publishers(conns, ov, scoped=False).finish().score < 0.4


def test_a_healthy_broker_concludes_nothing():
    ov, conns = overview(), connections()
    hypotheses, assessment = verdict([*messaging.assess_alarms(ov, conns), messaging.assess_held_publishers(conns, ov),
                                      *messaging.assess_no_backlog(obs("queues", {"queues": []}), "vhost \"shop\"")])
    assert assessment.conclusion is Conclusion.INCONCLUSIVE
    assert all(not h.evidence_for and h.evidence_against for h in hypotheses)
    assert {h.cause for h in hypotheses} == {"broker_memory_alarm", "broker_disk_alarm", "publishers_blocked",
                                             "no_consumer", "stalled_consumer", "consumers_too_slow"}


def test_a_failed_overview_examines_no_alarm_hypothesis():
    assert rank(messaging.assess_alarms(obs("overview", None, ok=False))) == ()
    assert rank([messaging.assess_held_publishers(obs("connections", None, ok=False))]) == ()


# --- queues ---------------------------------------------------------------------------------------

def test_a_backlog_without_consumer_is_no_consumer():
    o = detail(ready=250, publish=12.0, growth=12.0)
    hypotheses, assessment = verdict(messaging.assess_queue_view(o, view(o), named=False))
    assert assessment.conclusion is Conclusion.CONCLUSIVE
    assert hypotheses[0].cause == "no_consumer"
    assert hypotheses[0].statement == 'queue "orders" in vhost "shop" has 250 ready messages and no consumer'
    assert all(h.evidence_against for h in hypotheses[1:])


def test_an_idle_backlog_in_a_vhost_the_alert_does_not_name_is_not_blamed_with_confidence():
    o = detail(name="orders.parked", ready=5000)
    _, unscoped = verdict(messaging.assess_queue_view(o, view(o), named=False, scoped=False))
    assert unscoped.conclusion is Conclusion.INCONCLUSIVE
    # ... but one that publishers still fill is found, even there
    live = detail(name="orders", ready=5000, publish=40.0, growth=40.0)
    hypotheses, found = verdict(messaging.assess_queue_view(live, view(live), named=False, scoped=False))
    assert found.conclusion is Conclusion.CONCLUSIVE and hypotheses[0].cause == "no_consumer"
    assert any("names neither" in e.excerpt for e in hypotheses[0].evidence_against)


def test_a_small_idle_queue_nobody_named_is_not_blamed_with_confidence():
    o = detail(name="orders.dlq", ready=4)
    hypotheses, assessment = verdict(messaging.assess_queue_view(o, view(o), named=False))
    assert assessment.conclusion is Conclusion.INCONCLUSIVE
    # ... while the same queue named by the alert is
    _, named = verdict(messaging.assess_queue_view(o, view(o), named=True))
    assert named.conclusion is Conclusion.CONCLUSIVE and named.hypotheses[0].cause == "no_consumer"


def test_consumers_whose_prefetch_windows_are_full_and_never_ack_are_stalled():
    o = detail(ready=40, unacked=20, consumers=2, prefetch=(10, 10), deliver=0.0, ack=0.0, growth=2.0)
    hypotheses, assessment = verdict(messaging.assess_queue_view(o, view(o), named=True))
    assert assessment.conclusion is Conclusion.CONCLUSIVE, assessment.summary
    best = hypotheses[0]
    assert best.cause == "stalled_consumer"
    assert any("every consumer's prefetch window is full: 20 unacked = prefetch 10+10" in e.excerpt
               for e in best.evidence_for)
    slow = next(h for h in hypotheses if h.cause == "consumers_too_slow")
    assert any("stuck, not slow" in e.excerpt for e in slow.evidence_against)


def test_consumers_with_room_in_their_windows_are_not_stalled():
    o = detail(ready=40, unacked=3, consumers=2, prefetch=(10, 10), deliver=0.0, ack=0.0)
    stalled = next(h for h in rank(messaging.assess_queue_view(o, view(o), named=True))
                   if h.cause == "stalled_consumer")
    assert any("have room for more" in e.excerpt for e in stalled.evidence_against)
    assert stalled.score < 0.6


def test_auto_ack_consumers_cannot_stall_on_a_window():
    o = detail(ready=40, unacked=0, consumers=1, prefetch=(0,), ack_required=False, deliver=0.0, ack=0.0)
    stalled = next(h for h in rank(messaging.assess_queue_view(o, view(o), named=True))
                   if h.cause == "stalled_consumer")
    assert any("no prefetch limit or do not acknowledge" in e.excerpt for e in stalled.evidence_against)


def test_deliveries_flowing_while_the_backlog_grows_is_consumers_too_slow():
    o = detail(ready=5000, unacked=20, consumers=2, prefetch=(10, 10), publish=300.0, deliver=80.0, ack=80.0,
               growth=220.0)
    hypotheses, assessment = verdict(messaging.assess_queue_view(o, view(o), named=True))
    assert assessment.conclusion is Conclusion.CONCLUSIVE, assessment.summary
    assert hypotheses[0].cause == "consumers_too_slow"
    stalled = next(h for h in hypotheses if h.cause == "stalled_consumer")
    assert any("deliveries and acks flow" in e.excerpt for e in stalled.evidence_against)


def test_an_empty_queue_supports_no_queue_hypothesis():
    o = detail(ready=0, consumers=1, prefetch=(10,))
    hypotheses, assessment = verdict(messaging.assess_queue_view(o, view(o), named=True))
    assert assessment.conclusion is Conclusion.INCONCLUSIVE
    assert all(not h.evidence_for for h in hypotheses)


def test_the_listing_is_read_most_ready_first_and_suspects_skip_queues_already_seen():
    listing = obs("queues", {"queues": [queue("a", ready=3), queue("b", ready=900), queue("c", ready=0),
                                        {"vhost": "shop", "name": "unsampled", "messages_ready": None}]})
    views = messaging.read_queues(listing)
    assert [v.name for v in views] == ["b", "a", "c"]
    assert [v.name for v in messaging.suspects(views, {("shop", "b")})] == ["a"]
    assert messaging.read_queues(obs("queues", None, ok=False)) is None


def test_the_prefetch_window_is_unknown_without_consumer_details():
    listed = messaging.read_queues(obs("queues", {"queues": [queue(ready=10, consumers=1)]}))[0]
    assert listed.window is None and not listed.detailed
    assert view(detail(ready=10, consumers=2, prefetch=(5, 7))).window == 12
    assert view(detail(ready=10, consumers=2, prefetch=(5, 0))).window is None  # 0: unlimited


# --- how the management URL reaches the agent ----------------------------------------------------

def _job_env(settings) -> dict[str, str]:
    event = decode_incident(dumps(SAMPLE_WEBHOOK))
    plan = jobspec.JobPlan(identity=identify(event), event=event, class_name=jobspec.choose_class(event, settings),
                           phase=Phase.SHADOW, domain=jobspec.domain_of(event, settings))
    containers = jobspec.build_job(plan, settings)["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", "") for e in containers[0]["env"]}


def test_the_management_url_travels_from_settings_through_the_job_to_the_agent():
    url = "http://rabbitmq.messaging:15672"
    env = _job_env(load_settings(None, {"AGENTJOBS_TOOLS__RABBITMQ_MANAGEMENT_URL": url}))
    assert env["AGENTJOBS_TOOLS__RABBITMQ_MANAGEMENT_URL"] == url
    agent = load(BASE | {"AGENTJOBS_TOOLS__RABBITMQ_MANAGEMENT_URL": env["AGENTJOBS_TOOLS__RABBITMQ_MANAGEMENT_URL"]})
    assert agent.tools.rabbitmq_management_url == url


def test_without_a_management_url_or_with_the_rabbitmq_tool_off_the_job_is_told_none():
    assert "AGENTJOBS_TOOLS__RABBITMQ_MANAGEMENT_URL" not in _job_env(load_settings(None, {}))
    off = load_settings(None, {"AGENTJOBS_TOOLS__RABBITMQ_MANAGEMENT_URL": "http://rabbitmq:15672",
                               "AGENTJOBS_TOOLS__RABBITMQ": "false"})
    assert "AGENTJOBS_TOOLS__RABBITMQ_MANAGEMENT_URL" not in _job_env(off)
    assert load(BASE).tools.rabbitmq_management_url == ""


def test_a_channel_wide_prefetch_is_a_window_too():
    consumers = [{"channel": "ch", "prefetch_count": 0, "ack_required": True},
                 {"channel": "ch", "prefetch_count": 0, "ack_required": True}]
    assert prefetch_window(consumers, [{"name": "ch", "global_prefetch_count": 8}]) == 8  # shared, counted once
    assert prefetch_window(consumers, [{"name": "ch", "global_prefetch_count": 0}]) is None  # unlimited
    assert prefetch_window([{**consumers[0], "prefetch_count": 3, "ack_required": False}]) is None  # auto-ack
    o = detail(ready=30, unacked=8, consumers=2, prefetch=(0, 0), deliver=0.0, ack=0.0)
    o = obs("queue", {**o.data, "prefetch_total": 8})
    hypotheses, assessment = verdict(messaging.assess_queue_view(o, view(o), named=True))
    assert assessment.conclusion is Conclusion.CONCLUSIVE and hypotheses[0].cause == "stalled_consumer"
    assert any("8 unacked = prefetch 8 over 2 consumers" in e.excerpt for e in hypotheses[0].evidence_for)


def test_the_passive_declares_exact_counts_win_over_the_management_apis_lagging_sample() -> None:
    # Given a queue just filled: the management API has not sampled it yet (0 ready), the declare says 500
    sampled = detail(ready=0, consumers=0)
    declared = obs("queue_status", {"vhost": "shop", "queue": "orders", "message_count": 500, "consumer_count": 0})
    cited, exact = messaging.exact_counts(sampled, view(sampled), declared)
    # Then the exact counts are assessed, citing the declare
    assert cited is declared and (exact.ready, exact.consumers) == (500, 0)
    hypotheses, result = verdict(messaging.assess_queue_view(cited, exact, named=True))
    assert hypotheses[0].cause == "no_consumer" and result.conclusion is Conclusion.CONCLUSIVE
    # ... and where both agree, the richer management observation stays the one cited
    same = obs("queue_status", {"vhost": "shop", "queue": "orders", "message_count": 0, "consumer_count": 0})
    assert messaging.exact_counts(sampled, view(sampled), same)[0] is sampled
