"""The rules reasoner's Kubernetes proposals, carried out through the phase gate against the API emulator.

The world of ``test_remediation_kubernetes.py`` (the deployed RBAC and admission policy, stand-in
Deployment/ReplicaSet controllers, Deployment ``web`` with 3 Ready replicas): the agent's kubernetes
tool, opened as the phase's ServiceAccount, is what the rules reasoner observes, and its proposals go
through ``gate`` to the executors built from that same tool. One crash-looping pod → ``delete_pod``
(LOW), executed in limited-remediation; every ready pod saturated (the alert's expression, from a
fake prometheus tool, names each of them) → ``scale_deployment`` (MEDIUM), proposed only in
limited-remediation, executed in autonomous.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from urllib.parse import quote_plus

import pytest

from agent import engine
from agent.reasoning import Investigation, RulesReasoner
from agent.reasoning.actions import gate
from schemas import Alert, AlertStatus, Conclusion, IncidentEvent, Phase, ProposedAction
from tests.integration.test_remediation_kubernetes import APP, WORKLOADS, World, manifests, world  # noqa: F401
from tests.support.fake_tools import FakeTool
from tests.support.k8s.resources import DEPLOYMENTS, REPLICASETS

pytestmark = pytest.mark.integration
CPU_EXPR = (f'sum by (pod) (rate(container_cpu_usage_seconds_total{{namespace="{WORKLOADS}",pod=~"{APP}-.*"}}[5m]))'
            f' / sum by (pod) (kube_pod_container_resource_limits{{resource="cpu"}}) > 0.9')


def _incident(w: World, alertname: str, *, expr: str = "", **labels: str) -> IncidentEvent:
    """A firing alert about ``web``, started just before its ReplicaSet was created by the world's set-up (so
    no rollout precedes the alert: a crash or saturation is not a rollout's regression here)."""
    [rs] = w.store.list(REPLICASETS, WORKLOADS)
    created = datetime.fromisoformat(rs["metadata"]["creationTimestamp"].replace("Z", "+00:00"))
    all_labels = {"alertname": alertname, "severity": "critical", "domain": "kubernetes", "namespace": WORKLOADS,
                  "deployment": APP, **labels}
    url = f"http://prometheus:9090/graph?g0.expr={quote_plus(expr)}&g0.tab=1" if expr else ""
    alert = Alert(status=AlertStatus.FIRING, labels=all_labels, annotations={},
                  starts_at=created - timedelta(minutes=1), generator_url=url)
    return IncidentEvent(source="http://alertmanager:9093", group_key=f'{{}}:{{alertname="{alertname}"}}',
                         status=AlertStatus.FIRING, alerts=(alert,), common_labels=all_labels)


async def investigate_and_gate(w: World, phase: Phase, incident: IncidentEvent, *extra: FakeTool,
                               investigation_id: str) -> tuple[tuple[ProposedAction, ...], dict[str, ProposedAction]]:
    """The agent's path: the kubernetes tool as the phase's ServiceAccount, the rules reasoner over it (and
    ``extra`` tools), then the gate with the executors built from that tool."""
    env = w.env(phase, investigation_id)
    tools, unavailable = await engine.open_tools(env, db_user=None, db_password=None, postgres_available=False)
    assert [t.name for t in tools] == ["kubernetes"] and unavailable == []
    try:
        inv = Investigation(incident=incident, tools={t.name: t for t in (*tools, *extra)}, phase=phase)
        assessment = await RulesReasoner().investigate(inv)
        assert assessment.conclusion is Conclusion.CONCLUSIVE, assessment.summary
        executors, _ = engine.executors_for(env, tools)
        gated = await gate(assessment.actions, phase, executors=executors, investigation_id=investigation_id,
                           ledger=engine.ledger_for(env))
    finally:
        await engine.close_tools(tools)
    return assessment.actions, {a.action: a for a in gated}


def _saturated(w: World) -> FakeTool:
    """Prometheus re-running the alert's expression: every ready pod of web over its CPU limit share."""
    series = [{"metric": {"namespace": WORKLOADS, "pod": p["metadata"]["name"]}, "value": 0.97} for p in w.pods()]
    return FakeTool("prometheus", {"alert_expression": series, "query": series})


async def test_the_rules_delete_one_crash_looping_pod_in_limited_remediation_and_its_replacement_is_ready(
        world: World):
    # Given one of web's three pods crash-looping, the others Ready
    victim = world.crash_loop((await world.settled(3))[0]["metadata"]["name"], restarts=6)
    incident = _incident(world, "KubePodCrashLooping", pod=victim["metadata"]["name"],
                         expr="rate(kube_pod_container_status_restarts_total[5m]) > 0")
    # When the rules reasoner investigates in limited-remediation and the gate runs its proposal
    proposed, by = await investigate_and_gate(world, Phase.LIMITED_REMEDIATION, incident,
                                              investigation_id="inv-rules-delete")
    # Then it proposed deleting exactly that pod, with the uid and restart count it observed
    [action] = proposed
    assert (action.action, action.target) == ("delete_pod", f"pod/{victim['metadata']['name']} in namespace default")
    assert (action.params["pod"], action.params["uid"], action.params["restarts"], action.params["namespace"]) == (
        victim["metadata"]["name"], victim["metadata"]["uid"], "6", WORKLOADS)
    # and the LOW-risk action ran through the protocol: the pod is gone and a Ready replacement serves
    done = by["delete_pod"]
    assert done.executed and done.params["decision"] == "execute"
    assert done.params["outcome"] == "executed_verified", done.params
    assert "1 ready" in done.params["after"]
    names = {p["metadata"]["name"] for p in await world.settled(3)}
    assert victim["metadata"]["name"] not in names


async def test_the_rules_scale_a_saturated_deployment_only_in_autonomous(world: World):
    await world.settled(3)
    incident = _incident(world, "WebCPUSaturated", expr=CPU_EXPR)
    # When every ready pod is saturated, in limited-remediation the MEDIUM-risk proposal is only proposed
    proposed, by = await investigate_and_gate(world, Phase.LIMITED_REMEDIATION, incident, _saturated(world),
                                              investigation_id="inv-rules-scale-1")
    [action] = proposed
    assert action.action == "scale_deployment"
    assert {k: action.params[k] for k in ("namespace", "deployment", "from_replicas", "replicas", "trigger")} == {
        "namespace": WORKLOADS, "deployment": APP, "from_replicas": "3", "replicas": "4",
        "trigger": "all_ready_pods_saturated"}
    held = by["scale_deployment"]
    assert (held.executed, held.params["decision"]) == (False, "propose_only")
    assert world.deployment()["spec"]["replicas"] == 3
    # and in autonomous it is executed: 4 Ready replicas, with the undo recorded
    _, by = await investigate_and_gate(world, Phase.AUTONOMOUS, incident, _saturated(world),
                                       investigation_id="inv-rules-scale-2")
    scaled = by["scale_deployment"]
    assert scaled.executed and scaled.params["outcome"] == "executed_verified", scaled.params
    assert scaled.params["undo"] == f"kubectl -n {WORKLOADS} scale deployment/{APP} --replicas=3"
    assert world.store.get(DEPLOYMENTS, WORKLOADS, APP)["spec"]["replicas"] == 4
    await world.settled(4)
