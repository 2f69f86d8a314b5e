"""The Kubernetes executors without a cluster: what they check, send, verify and record.

The pure parts (targets, staleness, rollout completion, patches) are tested directly; the
executors run through the protocol (``execute``) against ``FakeKube``, an in-memory stand-in
for ``Kube`` that records every call, so "nothing was sent" is checked, not assumed.
"""

from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from agent import config, engine
from agent.reasoning.actions import gate
from agent.remediation import kubernetes as k8s
from agent.remediation.kubernetes import (
    DeletePod,
    RaiseMemoryLimit,
    Ref,
    Replicas,
    RestartDeployment,
    RolloutUndo,
    ScaleDeployment,
    rolled_out,
    scale_ops,
    scale_target,
    scaled,
    stale_pod,
    stale_restart,
    stale_scale,
    target_of,
)
from agent.remediation.protocol import MemoryLedger, Outcome, execute, follows_protocol, idempotency_key
from agent.tools.kubernetes import ApiFailure
from schemas import Phase, ProposedAction, RiskClass

NS = "shop"
NOW = datetime(2026, 11, 26, 2, 6, tzinfo=timezone.utc)
RS_UID = "rs-uid-1"


def pod(name: str = "web-7d9f-abcde", *, uid: str = "pod-uid-1", ready: bool = False, restarts: int = 5,
        waiting: str | None = "CrashLoopBackOff", owner: bool = True, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": NS, "uid": uid, "labels": {"app": "web",
                                                                                "pod-template-hash": "7d9f"}}
    if owner:
        meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9f",
                                    "uid": RS_UID, "controller": True}]
    if deleting:
        meta["deletionTimestamp"] = "2026-11-26T02:00:00Z"
    state = {"waiting": {"reason": waiting}} if waiting else {"running": {"startedAt": "2026-11-26T01:00:00Z"}}
    return {"metadata": meta, "spec": {"containers": [{"name": "app", "image": "web:1"}]},
            "status": {"phase": "Running",
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                       "containerStatuses": [{"name": "app", "ready": ready, "restartCount": restarts,
                                              "state": state}]}}


def deployment(*, replicas: int = 3, ready: int = 1, generation: int = 4, observed: int = 4,
               updated: int | None = None, restarted_at: str | None = None, paused: bool = False,
               uid: str = "dep-uid-1") -> dict[str, Any]:
    annotations = {k8s.RESTARTED_AT: restarted_at} if restarted_at else {}
    return {"metadata": {"name": "web", "namespace": NS, "uid": uid, "generation": generation},
            "spec": {"replicas": replicas, "paused": paused, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}, "annotations": annotations},
                                  "spec": {"containers": [{"name": "app", "image": "web:1"}]}}},
            "status": {"observedGeneration": observed, "replicas": replicas,
                       "updatedReplicas": replicas if updated is None else updated, "readyReplicas": ready,
                       "availableReplicas": ready, "unavailableReplicas": replicas - ready}}


class FakeKube:
    """``Kube`` in memory: a Deployment ``web`` and pods; a tiny controller answers writes at once."""

    def __init__(self, *, deployments: dict[str, dict] | None = None, pods: list[dict] | None = None,
                 hpas: list[str] | None = None, refuse: dict[str, ApiFailure] | None = None,
                 settle: bool = True) -> None:
        self.deployments = deployments if deployments is not None else {"web": deployment()}
        self.pod_list = pods if pods is not None else [pod()]
        self.hpas = hpas or []
        self.refuse = refuse or {}
        self.settle = settle  # the controller brings the status to the spec on the next read
        self.calls: list[tuple[str, Any]] = []
        self._pending: str | None = None

    def _write(self, verb: str) -> None:
        if verb in self.refuse:
            raise self.refuse[verb]

    async def deployment(self, ref: Ref) -> dict | None:
        self.calls.append(("get deployment", ref.name))
        d = self.deployments.get(ref.name)
        if d is not None and self._pending == ref.name and self.settle:
            want = d["spec"]["replicas"]
            d["status"].update(observedGeneration=d["metadata"]["generation"], replicas=want, updatedReplicas=want,
                               readyReplicas=want, availableReplicas=want, unavailableReplicas=0)
        return copy.deepcopy(d)

    async def pod(self, namespace: str, name: str) -> dict | None:
        self.calls.append(("get pod", name))
        return copy.deepcopy(next((p for p in self.pod_list if p["metadata"]["name"] == name), None))

    async def pods(self, namespace: str, selector: str) -> list[dict]:
        self.calls.append(("list pods", selector))
        return copy.deepcopy(self.pod_list)

    async def autoscalers_of(self, ref: Ref) -> list[str]:
        self.calls.append(("list hpas", ref.name))
        return list(self.hpas)

    async def restart(self, ref: Ref, at: datetime) -> dict:
        self.calls.append(("restart", ref.name))
        self._write("restart")
        d = self.deployments[ref.name]
        d["spec"]["template"]["metadata"]["annotations"][k8s.RESTARTED_AT] = k8s.rfc3339(at)
        d["metadata"]["generation"] += 1
        self._pending = ref.name
        return copy.deepcopy(d)

    async def scale(self, ref: Ref, current: int, target: int) -> dict:
        self.calls.append(("scale", (current, target)))
        self._write("scale")
        d = self.deployments[ref.name]
        if d["spec"]["replicas"] != current:
            raise ApiFailure(422, {"reason": "Invalid", "message": "the server rejected our request"})
        d["spec"]["replicas"] = target
        d["metadata"]["generation"] += 1
        self._pending = ref.name
        return {"spec": {"replicas": target}}

    async def delete_pod(self, namespace: str, name: str, uid: str) -> dict:
        self.calls.append(("delete pod", (name, uid)))
        self._write("delete")
        old = next((p for p in self.pod_list if p["metadata"]["name"] == name), None)
        if old is None:
            raise ApiFailure(404, {"reason": "NotFound", "message": f'pods "{name}" not found'})
        if old["metadata"]["uid"] != uid:
            raise ApiFailure(409, {"reason": "Conflict", "message": "Precondition failed: UID in precondition"})
        self.pod_list.remove(old)
        if self.settle:  # the ReplicaSet controller replaces it
            self.pod_list.append(pod("web-7d9f-fresh", uid="pod-uid-2", ready=True, restarts=0, waiting=None))
        return old

    @property
    def writes(self) -> list[str]:
        return [c for c, _ in self.calls if c in ("restart", "scale", "delete pod")]


def action(name: str, target: str, **params: str) -> ProposedAction:
    return ProposedAction(action=name, target=target, risk=k8s_risk(name), params=params)


def k8s_risk(name: str) -> RiskClass:
    from agent.reasoning.actions import REGISTRY

    return REGISTRY[name].risk


def delete(**params: str) -> ProposedAction:
    return action("delete_pod", f"pod/web-7d9f-abcde in namespace {NS}", **params)


def restart(**params: str) -> ProposedAction:
    return action("restart_deployment", f"deployment/web in namespace {NS}", deployment="web", namespace=NS,
                  **params)


def scale(replicas: int, **params: str) -> ProposedAction:
    return action("scale_deployment", f"deployment/web in namespace {NS}", replicas=str(replicas), **params)


def clock() -> datetime:
    return NOW


def make(cls: type, kube: FakeKube, **kwargs: Any) -> Any:
    return cls(kube, namespace="default", verify_timeout=0.2, clock=clock, **kwargs)


# --- targets ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("target", "params", "want"), [
    ("deployment/web in namespace shop", {}, Ref("deployment", "shop", "web")),
    ("deployments.apps/web in namespace shop", {"deployment": "web", "namespace": "shop"},
     Ref("deployment", "shop", "web")),
    ("", {"deployment": "web", "namespace": "shop"}, Ref("deployment", "shop", "web")),
    ("deployment/web", {}, Ref("deployment", "default", "web")),  # the tool's namespace
    ("deployment/web", {"namespace": "shop"}, Ref("deployment", "shop", "web")),
])
def test_the_target_names_one_object(target: str, params: dict[str, str], want: Ref) -> None:
    a = ProposedAction(action="restart_deployment", target=target, risk=RiskClass.LOW, params=params)
    assert target_of(a, "deployment", default_namespace="default") == want


@pytest.mark.parametrize(("target", "params", "why"), [
    ("pod/web in namespace shop", {}, "is not a deployment"),
    ("deployment/web in namespace shop", {"deployment": "api"}, "params.deployment is 'api'"),
    ("deployment/web in namespace shop", {"namespace": "prod"}, "params.namespace is 'prod'"),
    ("", {"namespace": "shop"}, "names no deployment"),
    ("deployment/Web_1 in namespace shop", {}, "not a valid Kubernetes name"),
    ("deployment/web in namespace ../kube-system", {}, "not a valid Kubernetes namespace"),
    ("restart everything now", {}, "is not 'deployment/<name> in namespace <namespace>'"),
])
def test_a_target_that_names_nothing_clearly_is_refused(target: str, params: dict[str, str], why: str) -> None:
    a = ProposedAction(action="restart_deployment", target=target, risk=RiskClass.LOW, params=params)
    got = target_of(a, "deployment", default_namespace="default")
    assert isinstance(got, str) and why in got


# --- delete_pod --------------------------------------------------------------------------------

REF = Ref("pod", NS, "web-7d9f-abcde")


@pytest.mark.parametrize(("seen", "params", "why"), [
    (None, {}, "no longer exists"),
    (pod(uid="pod-uid-9"), {"uid": "pod-uid-1"}, "is now uid pod-uid-9, not the pod-uid-1"),
    (pod(deleting=True), {}, "already being deleted"),
    (pod(owner=False), {}, "has no controller"),
    (pod(restarts=2), {"restarts": "5"}, "fewer than the 5 the finding saw"),
    (pod(ready=True, waiting=None), {}, "running and ready again"),
    (pod(), {"restarts": "many"}, "is not a count"),
])
def test_a_pod_is_stale_unless_it_is_still_the_crash_looping_one(seen, params, why) -> None:
    got = stale_pod(delete(**params), seen, REF)
    assert got is not None and why in got


@pytest.mark.parametrize("seen", [pod(), pod(waiting=None, ready=False), pod(ready=True, waiting="CrashLoopBackOff")])
def test_a_crash_looping_or_unready_pod_holds(seen) -> None:
    assert stale_pod(delete(uid="pod-uid-1", restarts="5"), seen, REF) is None


async def test_delete_pod_deletes_with_the_uid_precondition_and_verifies_a_ready_replacement() -> None:
    kube = FakeKube()
    result = await execute(delete(uid="pod-uid-1", restarts="4"), make(DeletePod, kube), done=MemoryLedger(),
                           investigation_id="inv-1")

    assert result.outcome is Outcome.EXECUTED_VERIFIED, result.reason
    assert ("delete pod", ("web-7d9f-abcde", "pod-uid-1")) in kube.calls
    assert "restarts=5, waiting CrashLoopBackOff" in result.execution.before
    assert "is gone; ReplicaSet/web-7d9f has 1 new pod(s), 1 ready" in result.execution.after
    assert result.undo == "none (its controller replaced it)"


async def test_delete_pod_without_a_ready_replacement_is_not_verified() -> None:
    kube = FakeKube(settle=False)
    result = await execute(delete(), make(DeletePod, kube), done=MemoryLedger())

    assert result.outcome is Outcome.EXECUTED_NOT_VERIFIED
    assert "has 0 new pod(s), 0 ready" in result.execution.after


async def test_a_pod_replaced_between_check_and_act_is_not_deleted() -> None:
    kube = FakeKube(refuse={"delete": ApiFailure(409, {"reason": "Conflict", "message": "Precondition failed"})})
    result = await execute(delete(), make(DeletePod, kube), done=MemoryLedger())

    assert result.outcome is Outcome.FAILED and "replaced between the check and the act" in result.reason


async def test_rbac_refusing_the_delete_is_failed_and_says_so() -> None:
    refused = ApiFailure(403, {"reason": "Forbidden", "message": 'pods "web-7d9f-abcde" is forbidden: User '
                                                                 '"system:serviceaccount:x:y" cannot delete'})
    result = await execute(delete(), make(DeletePod, FakeKube(refuse={"delete": refused})), done=MemoryLedger())

    assert result.outcome is Outcome.FAILED
    assert "refused by the API server (the ServiceAccount's RBAC or an admission policy)" in result.reason
    assert "cannot delete" in result.reason


async def test_a_pod_already_replaced_is_skipped_stale_and_nothing_is_deleted() -> None:
    kube = FakeKube(pods=[pod(uid="pod-uid-2")])
    result = await execute(delete(uid="pod-uid-1"), make(DeletePod, kube), done=MemoryLedger())

    assert result.outcome is Outcome.SKIPPED_STALE and "it was replaced already" in result.reason
    assert kube.writes == []


# --- restart_deployment ------------------------------------------------------------------------

DEP = Ref("deployment", NS, "web")


@pytest.mark.parametrize(("d", "params", "pods", "why"), [
    (None, {}, {}, "no longer exists"),
    (deployment(ready=3), {}, {}, "all 3 replicas of deployment web are ready and available again"),
    (deployment(paused=True), {}, {}, "is paused"),
    (deployment(), {"uid": "dep-uid-0"}, {}, "it was recreated"),
    (deployment(restarted_at="2026-11-26T02:10:00Z"), {"observed_at": "2026-11-26T02:06:00Z"}, {},
     "was restarted at 2026-11-26T02:10:00Z, after the finding observed it"),
    (deployment(), {"observed_at": "yesterday"}, {}, "is not a timestamp"),
    (deployment(), {}, {"web-1": None, "web-2": pod("web-2", ready=True, waiting=None)},
     "none of the pods the finding named (web-1, web-2) is still there and unready"),
])
def test_a_restart_is_stale_once_the_deployment_no_longer_shows_the_condition(d, params, pods, why) -> None:
    got = stale_restart(restart(**params), d, DEP, pods)
    assert got is not None and why in got


def test_a_restart_holds_while_replicas_or_named_pods_are_unready() -> None:
    assert stale_restart(restart(), deployment(ready=2), DEP, {}) is None
    assert stale_restart(restart(observed_at="2026-11-26T02:06:00Z"),
                         deployment(ready=3, restarted_at="2026-11-26T01:00:00Z"), DEP,
                         {"web-1": pod("web-1")}) is None


def test_the_restart_patch_is_what_kubectl_rollout_restart_sends() -> None:
    assert k8s.restart_patch(NOW) == {
        "spec": {"template": {"metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-26T02:06:00Z"}}}}}


def test_a_rollout_is_done_when_the_new_generation_is_observed_updated_and_available() -> None:
    assert rolled_out(Replicas.of(deployment(replicas=3, ready=3, generation=5, observed=5)), 5)
    assert not rolled_out(Replicas.of(deployment(replicas=3, ready=3, generation=5, observed=4)), 5)
    assert not rolled_out(Replicas.of(deployment(replicas=3, ready=3, generation=5, observed=5, updated=2)), 5)
    assert not rolled_out(Replicas.of(deployment(replicas=3, ready=2, generation=5, observed=5)), 5)


async def test_restart_annotates_the_template_and_verifies_the_rollout() -> None:
    kube = FakeKube()
    result = await execute(restart(), make(RestartDeployment, kube), done=MemoryLedger(), investigation_id="inv-1")

    assert result.outcome is Outcome.EXECUTED_VERIFIED, result.reason
    assert kube.writes == ["restart"]
    assert kube.deployments["web"]["spec"]["template"]["metadata"]["annotations"] == {
        k8s.RESTARTED_AT: "2026-11-26T02:06:00Z"}
    assert "1 ready" in result.execution.before and "rolled out" in result.execution.after
    assert result.undo == "none (a restart cannot be undone; pods are replaced)"


async def test_a_rollout_that_does_not_complete_is_not_verified() -> None:
    kube = FakeKube(settle=False)
    result = await execute(restart(), make(RestartDeployment, kube), done=MemoryLedger())

    assert result.outcome is Outcome.EXECUTED_NOT_VERIFIED
    assert "the rollout of generation 5 has not completed" in result.execution.after


async def test_an_admission_policy_refusing_the_restart_is_failed() -> None:
    refused = ApiFailure(403, {"reason": "Forbidden", "message": "ValidatingAdmissionPolicy denied request"})
    result = await execute(restart(), make(RestartDeployment, FakeKube(refuse={"restart": refused})),
                           done=MemoryLedger())

    assert result.outcome is Outcome.FAILED and "ValidatingAdmissionPolicy denied request" in result.reason


# --- scale_deployment -------------------------------------------------------------------------

@pytest.mark.parametrize(("params", "why"), [
    ({"replicas": "-1"}, "is not a replica count"),
    ({"replicas": "three"}, "is not a replica count"),
    ({"replicas": "500"}, "above the 100"),
    ({"replicas": "5", "from_replicas": "x"}, "from_replicas 'x'"),
])
def test_scale_params_are_checked(params: dict[str, str], why: str) -> None:
    got = scale_target(action("scale_deployment", "deployment/web in namespace shop", **params))
    assert isinstance(got, str) and why in got


def test_scale_is_stale_when_the_count_moved_or_is_reached_or_an_autoscaler_owns_it() -> None:
    assert "now has 4 replicas, not the 3" in stale_scale(deployment(replicas=4), DEP, 5, 3, [])
    assert "already has 5 replicas" in stale_scale(deployment(replicas=5), DEP, 5, None, [])
    assert "HorizontalPodAutoscaler web-hpa" in stale_scale(deployment(replicas=3), DEP, 5, 3, ["web-hpa"])
    assert stale_scale(deployment(replicas=3), DEP, 5, 3, []) is None


def test_the_scale_patch_is_a_compare_and_set() -> None:
    assert scale_ops(3, 5) == [{"op": "test", "path": "/spec/replicas", "value": 3},
                               {"op": "replace", "path": "/spec/replicas", "value": 5}]
    assert scaled(Replicas.of(deployment(replicas=5, ready=5, generation=6, observed=6)), 5, 6)
    assert not scaled(Replicas.of(deployment(replicas=5, ready=4, generation=6, observed=6)), 5, 6)


async def test_scale_records_the_previous_count_and_the_undo_command() -> None:
    kube = FakeKube()
    result = await execute(scale(5, from_replicas="3"), make(ScaleDeployment, kube), done=MemoryLedger())

    assert result.outcome is Outcome.EXECUTED_VERIFIED, result.reason
    assert ("scale", (3, 5)) in kube.calls
    assert result.execution.before == "deployment web: replicas=3 (1 ready)"
    assert result.undo == "kubectl -n shop scale deployment/web --replicas=3"
    assert "5 replicas ready" in result.execution.after


async def test_replicas_changed_between_check_and_act_fail_the_compare_and_set() -> None:
    kube = FakeKube()
    executor = make(ScaleDeployment, kube)
    assert await executor.precondition(scale(5)) is None
    kube.deployments["web"]["spec"]["replicas"] = 4  # someone scaled it meanwhile

    done = await executor.act(scale(5))

    assert not done.ok and "changed from 3 to 4 between the check and the act" in done.error
    assert kube.deployments["web"]["spec"]["replicas"] == 4


async def test_a_stale_replica_count_skips_without_scaling() -> None:
    kube = FakeKube(deployments={"web": deployment(replicas=4)})
    result = await execute(scale(5, from_replicas="3"), make(ScaleDeployment, kube), done=MemoryLedger())

    assert result.outcome is Outcome.SKIPPED_STALE and kube.writes == []


# --- what the admission policy forbids --------------------------------------------------------

@pytest.mark.parametrize(("cls", "params", "command"), [
    (RolloutUndo, {"to_revision": "3"}, "kubectl -n shop rollout undo deployment/web --to-revision=3"),
    (RaiseMemoryLimit, {"container": "app", "memory": "768Mi"},
     "kubectl -n shop set resources deployment/web -c app --limits=memory=768Mi"),
    (RaiseMemoryLimit, {"increase": "50%"}, "kubectl -n shop set resources deployment/web --limits=memory=<limit>"),
])
async def test_template_changes_fail_as_not_allowed_by_the_admission_policy_and_send_nothing(
        cls, params, command) -> None:
    kube = FakeKube()
    result = await execute(action(cls.action, f"deployment/web in namespace {NS}", **params), make(cls, kube),
                           done=MemoryLedger())

    assert result.outcome is Outcome.FAILED and not result.executed
    assert "not allowed by the agentjobs admission policy (agentjobs-agent-deployment-patches)" in result.reason
    assert command in result.reason
    assert kube.calls == []


# --- the protocol around them ------------------------------------------------------------------

def test_every_executor_follows_the_protocol_and_covers_the_kubernetes_actions() -> None:
    made = k8s.executors(object.__new__(type("Client", (), {})), namespace="default")
    assert set(made) == {"restart_deployment", "delete_pod", "scale_deployment", "rollout_undo", "raise_memory_limit"}
    assert all(follows_protocol(e) for e in made.values())


def test_observations_are_left_out_of_the_key_and_the_target_is_not() -> None:
    pods = DeletePod.volatile_params
    first = idempotency_key("inv-1", delete(uid="u1", restarts="5", observed_at="2026-11-26T02:00:00Z"), volatile=pods)
    again = idempotency_key("inv-1", delete(uid="u1", restarts="7", observed_at="2026-11-26T02:05:00Z"), volatile=pods)
    other = idempotency_key("inv-1", delete(uid="u2", restarts="5"), volatile=pods)
    assert first == again != other
    scales = ScaleDeployment.volatile_params
    assert idempotency_key("i", scale(5, from_replicas="3"), volatile=scales) == \
        idempotency_key("i", scale(5, from_replicas="4"), volatile=scales) != \
        idempotency_key("i", scale(6, from_replicas="3"), volatile=scales)


async def test_the_same_ledger_twice_acts_once() -> None:
    kube, ledger = FakeKube(), MemoryLedger()
    first = await execute(delete(), make(DeletePod, kube), done=ledger, investigation_id="inv-1")
    kube.pod_list.append(pod())  # as if it crash-looped again under the same name
    second = await execute(delete(), make(DeletePod, kube), done=ledger, investigation_id="inv-1")

    assert first.outcome is Outcome.EXECUTED_VERIFIED
    assert second.outcome is Outcome.ALREADY_EXECUTED and second.executed
    assert kube.writes == ["delete pod"]


async def test_the_gate_runs_delete_pod_in_limited_remediation_and_only_proposes_scaling() -> None:
    kube = FakeKube()
    made = {cls.action: make(cls, kube) for cls in k8s.EXECUTORS}
    out = await gate([delete(), scale(5)], Phase.LIMITED_REMEDIATION, executors=made, investigation_id="inv-1")

    by = {a.action: a for a in out}
    assert by["delete_pod"].executed and by["delete_pod"].params["outcome"] == "executed_verified"
    assert not by["scale_deployment"].executed and by["scale_deployment"].params["decision"] == "propose_only"
    assert ("scale", (3, 5)) not in kube.calls


def _env(phase: Phase) -> config.AgentEnv:
    return config.load({"AGENTJOBS_INVESTIGATION_ID": "inv-1", "AGENTJOBS_PHASE": phase.value,
                        "AGENTJOBS_INPUT_DIR": "/in", "AGENTJOBS_AMQP__URL": "amqp://127.0.0.1/",
                        "AGENTJOBS_VAULT__AUTH_MODE": "none", "AGENTJOBS_TOOLS__RABBITMQ": "false",
                        "AGENTJOBS_TOOLS__KUBERNETES": "true"})


@pytest.mark.parametrize(("phase", "expected"), [
    (Phase.SHADOW, set()), (Phase.READ_ONLY, set()),
    (Phase.LIMITED_REMEDIATION, {"restart_deployment", "delete_pod", "scale_deployment", "rollout_undo",
                                 "raise_memory_limit"}),
    (Phase.AUTONOMOUS, {"restart_deployment", "delete_pod", "scale_deployment", "rollout_undo",
                        "raise_memory_limit"}),
])
async def test_the_engine_builds_them_on_the_kubernetes_tools_own_client(phase: Phase, expected: set[str]) -> None:
    from kubernetes_asyncio.client import ApiClient, Configuration

    from agent.tools.kubernetes import KubernetesTool

    client = ApiClient(Configuration(host="http://127.0.0.1:1"))
    try:
        tool = KubernetesTool(client, namespace="shop")
        found, closers = engine.executors_for(_env(phase), [tool])
        assert set(found) == expected and closers == []  # the tool closes its client
        for executor in found.values():
            assert executor.kube.core.api_client is client and executor.namespace == "shop"
    finally:
        await client.close()


def test_times_are_rfc3339_utc() -> None:
    assert k8s.rfc3339(NOW + timedelta(hours=1, microseconds=5)) == "2026-11-26T03:06:00Z"
    assert k8s.parse_time("2026-11-26T02:06:00Z") == NOW and k8s.parse_time("2026-11-26T02:06:00") is None
