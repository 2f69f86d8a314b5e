"""The rules reasoner's Kubernetes proposals (issue 18): ``delete_pod``, ``restart_deployment``, ``scale_deployment``.

Fakes of the tool contract return the shapes ``agent/tools/kubernetes.py`` and the prometheus tool
produce. The proposals carry what the executors' preconditions re-check
(``agent/remediation/kubernetes.py``): the pod's uid and restart count as observed, the replica
count seen (``from_replicas``), one replica more (``replicas``), and why (``trigger``).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from agent.reasoning import RulesReasoner
from agent.reasoning.rules import SCALE_MAX_REPLICAS, alert_facts, choose_playbooks, read_deployment, read_pods
from agent.remediation.kubernetes import scale_target, target_of
from agent.tools.base import Observation
from schemas import Conclusion, RiskClass, utcnow
from tests.support.fake_tools import T0, FakeTool, incident, investigation, prometheus

RS = "checkout-api-5c7b9d8f6"
CPU_EXPR = ('sum by (pod) (rate(container_cpu_usage_seconds_total{namespace="shop",pod=~"checkout-api-.*"}[5m])) '
            '/ sum by (pod) (kube_pod_container_resource_limits{namespace="shop",resource="cpu"}) > 0.9')


def pod(suffix: str, *, ready: bool = True, restarts: int = 0, crash: bool = False, oom: bool = False,
        owner: str | None = f"ReplicaSet/{RS}") -> dict[str, Any]:
    reason = "OOMKilled" if oom else "Error" if crash else None
    last = {"container": "checkout", "reason": reason, "exit_code": 137 if oom else 1,
            "finished_at": "2026-11-26T02:03:00Z", "message": None} if reason else None
    return {"name": f"{RS}-{suffix}", "uid": f"uid-{suffix}", "phase": "Running", "reason": None,
            "ready": ready and not (crash or oom), "restarts": restarts,
            "waiting_reason": "CrashLoopBackOff" if crash or oom else None, "last_termination": last,
            "node": "node-1", "owner": owner, "deleting": False, "containers": []}


def deployment(replicas: int, *, ready: int | None = None, available: int | None = None) -> dict[str, Any]:
    ready = replicas if ready is None else ready
    available = ready if available is None else available
    return {"name": "checkout-api", "namespace": "shop", "revision": 3, "replicas": replicas,
            "ready_replicas": ready, "available_replicas": available,
            "unavailable_replicas": max(0, replicas - available), "updated_replicas": replicas}


def rs(revision: int, created) -> dict[str, Any]:
    return {"name": f"checkout-api-{revision}abc", "revision": revision, "created": created.isoformat(),
            "images": [f"shop/checkout:1.{revision}.0"], "replicas": 3, "ready_replicas": 3,
            "available_replicas": 3, "current": False}


OLD = [rs(3, T0 - timedelta(days=3)), rs(2, T0 - timedelta(days=9))]


def backoff(suffix: str) -> dict[str, Any]:
    return {"type": "Warning", "reason": "BackOff", "message": "Back-off restarting failed container checkout",
            "object": f"Pod/{RS}-{suffix}", "count": 12, "last_seen": "2026-11-26T02:04:00Z",
            "first_seen": "2026-11-26T01:50:00Z", "source": "kubelet"}


def kubernetes(pods: list[dict[str, Any]], dep: dict[str, Any] | None = None, rollouts: list | None = None,
               events: list | None = None) -> FakeTool:
    return FakeTool("kubernetes", {
        "pods": {"namespace": "shop", "selector": "app=checkout-api", "matched_by": "deployment",
                 "total": len(pods), "pods": pods},
        "events": {"namespace": "shop", "total": len(events or []), "events": list(events or [])},
        "rollouts": {"deployment": dep or deployment(len(pods)), "total": 2,
                     "replica_sets": OLD if rollouts is None else rollouts},
    }, params={"pods": ("namespace", "selector", "workload"),
               "events": ("namespace", "involved_object", "name_prefix", "kind", "type"),
               "rollouts": ("namespace", "deployment")})


def crash_alert():
    return incident("KubePodCrashLooping", expr="rate(kube_pod_container_status_restarts_total[5m]) > 0",
                    namespace="shop", deployment="checkout-api")


def cpu_alert():
    return incident("CheckoutCPUSaturated", expr=CPU_EXPR, namespace="shop", deployment="checkout-api")


def hot(*suffixes: str) -> FakeTool:
    return prometheus([{"metric": {"namespace": "shop", "pod": f"{RS}-{s}"}, "value": 0.97} for s in suffixes])


# --- reading the observations ------------------------------------------------------------------

def test_pods_and_the_deployment_are_read_with_what_the_executors_recheck() -> None:
    obs = Observation(tool="kubernetes", operation="pods", query="q", ok=True, at=utcnow(),
                      data={"pods": [pod("a", restarts=6, crash=True)]})
    [p] = read_pods(obs)
    assert (p.uid, p.owner, p.restarts, p.deleting) == ("uid-a", f"ReplicaSet/{RS}", 6, False)
    rollouts = Observation(tool="kubernetes", operation="rollouts", query="q", ok=True, at=utcnow(),
                           data={"deployment": deployment(3, ready=2)})
    d = read_deployment(rollouts)
    assert (d.replicas, d.ready, d.available, d.unavailable) == (3, 2, 2, 1)
    assert read_deployment(Observation(tool="kubernetes", operation="rollouts", query="q", ok=True, at=utcnow(),
                                       data={"deployment": {"name": "x"}})) is None


# --- a crash loop: one pod, or all of them ------------------------------------------------------

async def test_one_crash_looping_pod_beside_healthy_replicas_is_proposed_for_deletion() -> None:
    k8s = kubernetes([pod("aaaaa", restarts=7, crash=True), pod("bbbbb"), pod("ccccc")])
    result = await RulesReasoner().investigate(investigation(crash_alert(), k8s))
    assert result.conclusion is Conclusion.CONCLUSIVE
    best = result.hypotheses[0]
    assert best.cause == "crash_loop" and f"pod {RS}-aaaaa of checkout-api crash-loops" in best.statement
    [action] = result.actions
    assert (action.action, action.risk, action.target) == ("delete_pod", RiskClass.LOW,
                                                           f"pod/{RS}-aaaaa in namespace shop")
    assert {k: v for k, v in action.params.items() if k != "observed_at"} == {
        "namespace": "shop", "pod": f"{RS}-aaaaa", "uid": "uid-aaaaa", "restarts": "7"}
    assert action.params["observed_at"].endswith("Z")
    # and it names the object as the executor resolves it
    assert str(target_of(action, "pod", default_namespace="default")) == f"pod/{RS}-aaaaa in namespace shop"


async def test_a_recent_rollout_does_not_explain_one_pod_crashing_beside_healthy_ones() -> None:
    k8s = kubernetes([pod("aaaaa", restarts=7, crash=True), pod("bbbbb"), pod("ccccc")],
                     rollouts=[rs(4, T0 - timedelta(minutes=10)), *OLD])
    result = await RulesReasoner().investigate(investigation(crash_alert(), k8s))
    assert result.hypotheses[0].cause == "crash_loop"
    by_cause = {h.cause: h for h in result.hypotheses}
    against = by_cause["bad_rollout"].evidence_against
    assert any("the rollout does not make every pod crash" in e.excerpt for e in against)
    assert [a.action for a in result.actions] == ["delete_pod"]


async def test_when_every_replica_crash_loops_a_restart_is_proposed_naming_the_pods_seen() -> None:
    k8s = kubernetes([pod("aaaaa", restarts=7, crash=True), pod("bbbbb", restarts=5, crash=True)],
                     events=[backoff("aaaaa"), backoff("bbbbb")])
    result = await RulesReasoner().investigate(investigation(crash_alert(), k8s))
    assert result.conclusion is Conclusion.CONCLUSIVE and result.hypotheses[0].cause == "crash_loop"
    [action] = result.actions
    assert (action.action, action.target) == ("restart_deployment", "deployment/checkout-api in namespace shop")
    assert action.params["pods"] == f"{RS}-aaaaa,{RS}-bbbbb"
    assert (action.params["deployment"], action.params["namespace"]) == ("checkout-api", "shop")


async def test_a_pod_its_controller_would_not_recreate_as_a_deployment_replica_is_not_deleted() -> None:
    for owner in (None, "StatefulSet/checkout-api", "ReplicaSet/other-5c7b9d8f6"):
        k8s = kubernetes([pod("aaaaa", restarts=7, crash=True, owner=owner), pod("bbbbb"), pod("ccccc")])
        result = await RulesReasoner().investigate(investigation(crash_alert(), k8s))
        assert all(a.action != "delete_pod" for a in result.actions), owner


async def test_some_but_not_all_pods_crash_looping_proposes_no_deletion_of_one_of_them() -> None:
    k8s = kubernetes([pod("aaaaa", restarts=7, crash=True), pod("bbbbb", restarts=4, crash=True), pod("ccccc")])
    result = await RulesReasoner().investigate(investigation(crash_alert(), k8s))
    assert result.hypotheses[0].cause == "crash_loop"
    assert result.actions == ()


# --- saturation: one replica more ---------------------------------------------------------------

def test_cpu_and_saturation_alerts_choose_the_saturation_playbook() -> None:
    assert choose_playbooks(alert_facts(cpu_alert())) == ("saturation",)
    assert choose_playbooks(alert_facts(incident("CheckoutOverloaded", namespace="shop"))) == ("saturation",)
    # a saturated connection pool or queue is not a workload's: their own playbooks
    assert choose_playbooks(alert_facts(incident("PostgresConnectionPoolSaturated"))) == ("connections",)
    assert choose_playbooks(alert_facts(incident("RabbitMQConsumerSaturation"))) == ("queues",)


async def test_every_ready_pod_saturated_proposes_one_replica_more() -> None:
    k8s = kubernetes([pod("aaaaa"), pod("bbbbb"), pod("ccccc")])
    prom = hot("aaaaa", "bbbbb", "ccccc")
    result = await RulesReasoner().investigate(investigation(cpu_alert(), k8s, prom))
    assert result.conclusion is Conclusion.CONCLUSIVE and result.hypotheses[0].cause == "saturated"
    assert len(prom.called("alert_expression")) == 1  # the playbook reads the same (cached) observation
    [action] = result.actions
    assert (action.action, action.risk, action.target) == ("scale_deployment", RiskClass.MEDIUM,
                                                           "deployment/checkout-api in namespace shop")
    assert {k: v for k, v in action.params.items() if k != "observed_at"} == {
        "namespace": "shop", "deployment": "checkout-api", "from_replicas": "3", "replicas": "4",
        "trigger": "all_ready_pods_saturated"}
    assert scale_target(action) == (4, 3)  # what the executor reads from it
    assert "all 3 ready pod(s) saturated" in action.rationale


async def test_a_deployment_below_its_available_replicas_under_load_is_scaled_too() -> None:
    k8s = kubernetes([pod("aaaaa"), pod("bbbbb"), pod("ccccc", ready=False)], dep=deployment(3, ready=2))
    result = await RulesReasoner().investigate(investigation(cpu_alert(), k8s, hot("aaaaa", "bbbbb")))
    assert result.hypotheses[0].cause == "saturated"
    [action] = result.actions
    assert (action.params["from_replicas"], action.params["replicas"], action.params["trigger"]) == (
        "3", "4", "below_available_under_load")


async def test_uneven_load_crashing_pods_or_the_ceiling_propose_no_scaling() -> None:
    cases = {
        "uneven": (kubernetes([pod("aaaaa"), pod("bbbbb"), pod("ccccc")]), hot("aaaaa")),
        "crashing": (kubernetes([pod("aaaaa"), pod("bbbbb"), pod("ccccc", restarts=6, crash=True)]),
                     hot("aaaaa", "bbbbb")),
        "ceiling": (kubernetes([pod("aaaaa")], dep=deployment(SCALE_MAX_REPLICAS, ready=SCALE_MAX_REPLICAS)),
                    hot("aaaaa")),
        "cleared": (kubernetes([pod("aaaaa")]), prometheus([])),
    }
    for name, (k8s, prom) in cases.items():
        result = await RulesReasoner().investigate(investigation(cpu_alert(), k8s, prom))
        assert all(a.action != "scale_deployment" for a in result.actions), name
    result = await RulesReasoner().investigate(investigation(cpu_alert(), *cases["uneven"]))
    saturated = {h.cause: h for h in result.hypotheses}["saturated"]
    assert any("the load is uneven" in e.excerpt for e in saturated.evidence_against)


async def test_a_rollout_just_before_the_saturation_is_blamed_rather_than_scaled_around() -> None:
    k8s = kubernetes([pod("aaaaa"), pod("bbbbb")], rollouts=[rs(4, T0 - timedelta(minutes=10)), *OLD])
    result = await RulesReasoner().investigate(investigation(cpu_alert(), k8s, hot("aaaaa", "bbbbb")))
    assert result.hypotheses[0].cause == "bad_rollout"
    assert [a.action for a in result.actions] == ["rollout_undo"]
    saturated = {h.cause: h for h in result.hypotheses}["saturated"]
    assert any("scaling would hide it" in e.excerpt for e in saturated.evidence_against)
