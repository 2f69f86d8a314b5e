"""The Kubernetes executors against the API emulator with the deployed RBAC and admission policy.

The emulator serves the real wire protocol to kubernetes_asyncio; RBAC is enforced with the
Roles and bindings k8s/ renders (production overlay, ``Rbac.load``), and the Deployment
admission policy (k8s/base/rbac/deployment-patches.yaml) is evaluated on every UPDATE with the
CEL-subset interpreter of tests/manifests. Each phase's agent authenticates as its own
ServiceAccount with a token minted like the TokenRequest API, through a kubeconfig that
``engine.open_tools`` loads — the executors act through the kubernetes tool's own client.

The emulator has no Deployment or ReplicaSet controller, so ``Controllers`` stands in for
both: a Deployment gets one ReplicaSet per pod template and that many pods (the emulator's
kubelet runs them, Ready), a deleted pod is replaced, and the Deployment's status follows
its pods. A crash loop is written into a pod's status as a kubelet reports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from kubernetes_asyncio import client
from kubernetes_asyncio.client import ApiException

from agent import config, engine
from agent.reasoning.actions import REGISTRY, gate
from agent.remediation.protocol import FileLedger, Outcome
from schemas import Phase, ProposedAction
from tests.manifests import cel, render
from tests.support.k8s.admission import AdmissionRequest, ValidatingPolicy
from tests.support.k8s.clock import rfc3339
from tests.support.k8s.fixtures import EmulatorHandle, kubeconfig, running_emulator
from tests.support.k8s.resources import DEPLOYMENTS, PODS, REPLICASETS

pytestmark = pytest.mark.integration

RUNS = "agentjobs-runs"  # where the agents' ServiceAccounts live (k8s/base/rbac/agents.yaml)
WORKLOADS = "default"  # the example workload namespace k8s/base/rbac/workloads.yaml binds
APP = "web"
SA = {phase: f"agentjobs-agent-{phase.value}" for phase in Phase}
RBAC_KINDS = ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")


# --- the deployed RBAC and admission policy, in the emulator ----------------------------------

@pytest.fixture(scope="module")
def manifests() -> list[dict]:
    return render.render(render.OVERLAYS["production"])


def admission_policy(objs: list[dict]) -> ValidatingPolicy:
    """The rendered ValidatingAdmissionPolicy + binding, evaluated as the API server would (failurePolicy Fail)."""
    vap = render.one(objs, "ValidatingAdmissionPolicy", "agentjobs-agent-deployment-patches")
    binding = render.one(objs, "ValidatingAdmissionPolicyBinding", "agentjobs-agent-deployment-patches")
    assert binding["spec"]["validationActions"] == ["Deny"] and vap["spec"]["failurePolicy"] == "Fail"
    rules = vap["spec"]["matchConstraints"]["resourceRules"]
    conditions = [cel.compile(c["expression"]) for c in vap["spec"]["matchConditions"]]
    validations = [(cel.compile(v["expression"]), " ".join(v["message"].split())) for v in vap["spec"]["validations"]]

    def check(req: AdmissionRequest) -> str | None:
        if not any(req.rt.group in r["apiGroups"] and req.rt.plural in r["resources"]
                   and req.operation in r["operations"] for r in rules) or req.subresource:
            return None
        env = {"request": {"userInfo": {"username": req.username}, "operation": req.operation,
                           "subResource": req.subresource or ""},
               "object": req.object, "oldObject": req.old_object}
        try:
            if not all(c(**env) for c in conditions):
                return None
            return next((message for v, message in validations if not v(**env)), None)
        except cel.CelError as exc:
            return f"expression could not be evaluated: {exc}"

    return ValidatingPolicy(vap["metadata"]["name"], check, binding=binding["metadata"]["name"])


# --- stand-ins for the Deployment and ReplicaSet controllers ------------------------------------

def _template_hash(template: dict) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


def _owned_by(obj: dict, owner: dict) -> bool:
    return any(r.get("uid") == owner["metadata"]["uid"] and r.get("controller")
               for r in obj["metadata"].get("ownerReferences") or [])


def _ready(p: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in p.get("status", {}).get("conditions") or [])


class Controllers:
    """What the Deployment and ReplicaSet controllers do, as far as the executors can see it."""

    def __init__(self, handle: EmulatorHandle, namespace: str) -> None:
        self.handle, self.ns = handle, namespace
        self.store, self.api = handle.cluster.store, handle.cluster.api
        self._queued = False
        self.store.subscribe(self._on_event)

    def _on_event(self, ev: Any) -> None:
        if ev.rt in (DEPLOYMENTS, PODS) and ev.obj["metadata"].get("namespace") == self.ns and not self._queued:
            self._queued = True
            asyncio.get_running_loop().call_soon(self._sync)

    def _sync(self) -> None:
        self._queued = False
        for d in self.store.list(DEPLOYMENTS, self.ns):
            self._sync_deployment(d)

    def _sync_deployment(self, d: dict) -> None:
        name, template = d["metadata"]["name"], d["spec"]["template"]
        rs_name = f"{name}-{_template_hash(template)}"
        owned = [rs for rs in self.store.list(REPLICASETS, self.ns) if _owned_by(rs, d)]
        current = next((rs for rs in owned if rs["metadata"]["name"] == rs_name), None)
        want = int(d["spec"].get("replicas", 1))
        if current is None:
            labels = {**template["metadata"].get("labels", {}), "pod-template-hash": rs_name.rsplit("-", 1)[1]}
            current = self.store.create(REPLICASETS, {
                "metadata": {"name": rs_name, "namespace": self.ns, "labels": labels,
                             "annotations": {"deployment.kubernetes.io/revision": str(len(owned) + 1)},
                             "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": name,
                                                  "uid": d["metadata"]["uid"], "controller": True}]},
                "spec": {"replicas": want, "selector": {"matchLabels": labels},
                         "template": {**template, "metadata": {**template["metadata"], "labels": labels}}}})
        elif current["spec"]["replicas"] != want:
            current["spec"]["replicas"] = want
            current = self.store.update(REPLICASETS, current)
        pods = [p for p in self.store.list(PODS, self.ns) if not p["metadata"].get("deletionTimestamp")]
        for rs in owned:
            if rs["metadata"]["name"] != rs_name:  # the old template's pods go (maxSurge everything)
                for p in pods:
                    if _owned_by(p, rs):
                        self.handle.cluster.gc.delete(PODS, self.ns, p["metadata"]["name"])
        mine = [p for p in pods if _owned_by(p, current)]
        for _ in range(want - len(mine)):
            tmpl = current["spec"]["template"]
            self.api.create(PODS, self.ns, {
                "metadata": {"generateName": f"{rs_name}-", "labels": dict(tmpl["metadata"]["labels"]),
                             "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs_name,
                                                  "uid": current["metadata"]["uid"], "controller": True}]},
                "spec": {**tmpl["spec"], "restartPolicy": "Always"}})
        for p in mine[want:]:
            self.handle.cluster.gc.delete(PODS, self.ns, p["metadata"]["name"])
        live = [p for p in self.store.list(PODS, self.ns) if not p["metadata"].get("deletionTimestamp")
                and any(_owned_by(p, rs) for rs in [*owned, current])]
        updated = [p for p in live if _owned_by(p, current)]
        ready = [p for p in live if _ready(p)]
        status = {"observedGeneration": d["metadata"].get("generation", 1), "replicas": len(live),
                  "updatedReplicas": len(updated), "readyReplicas": len(ready), "availableReplicas": len(ready),
                  "unavailableReplicas": max(0, want - len(ready))}
        fresh = self.store.get(DEPLOYMENTS, self.ns, d["metadata"]["name"])
        if fresh is not None and fresh.get("status") != status:
            fresh["status"] = status
            self.store.update(DEPLOYMENTS, fresh)


@dataclass
class World:
    handle: EmulatorHandle
    tmp_path: Path
    controllers: Controllers
    tokens: dict[Phase, str] = field(default_factory=dict)

    @property
    def store(self) -> Any:
        return self.handle.cluster.store

    def pods(self) -> list[dict]:
        return [p for p in self.store.list(PODS, WORKLOADS) if not p["metadata"].get("deletionTimestamp")]

    def deployment(self) -> dict:
        return self.store.get(DEPLOYMENTS, WORKLOADS, APP)

    async def settled(self, replicas: int, timeout: float = 10.0) -> list[dict]:
        """Wait until the Deployment runs ``replicas`` Ready pods of one template and says so."""
        def done(_: Any) -> list[dict] | None:
            d, pods = self.deployment(), self.pods()
            st = (d or {}).get("status") or {}
            ok = (d is not None and len(pods) == replicas and all(_ready(p) for p in pods)
                  and st.get("readyReplicas") == replicas and st.get("updatedReplicas") == replicas
                  and st.get("observedGeneration") == d["metadata"]["generation"])
            return sorted(pods, key=lambda p: p["metadata"]["name"]) if ok else None
        return await self.handle.cluster.wait_for(PODS, WORKLOADS, done, timeout)

    def crash_loop(self, name: str, restarts: int = 6) -> dict:
        """What a kubelet reports for a container that keeps dying, and the controller's recount."""
        p = self.store.get(PODS, WORKLOADS, name)
        now = self.handle.clock.time()
        cs = p["status"]["containerStatuses"][0]
        cs.update(ready=False, started=False, restartCount=restarts,
                  state={"waiting": {"reason": "CrashLoopBackOff",
                                     "message": f"back-off 5m0s restarting failed container=app pod={name}"}},
                  lastState={"terminated": {"exitCode": 1, "reason": "Error", "startedAt": rfc3339(now - 30),
                                            "finishedAt": rfc3339(now - 1)}})
        for cond in p["status"]["conditions"]:
            if cond["type"] in ("Ready", "ContainersReady"):
                cond.update(status="False", reason="ContainersNotReady")
        return self.store.update(PODS, p)

    def env(self, phase: Phase, investigation_id: str) -> config.AgentEnv:
        path = self.tmp_path / f"kubeconfig-{phase.value}.json"
        path.write_text(json.dumps(kubeconfig(self.handle.url, self.tokens[phase], namespace=WORKLOADS)))
        work = self.tmp_path / f"work-{phase.value}"
        work.mkdir(exist_ok=True)
        return config.load({"AGENTJOBS_INVESTIGATION_ID": investigation_id, "AGENTJOBS_PHASE": phase.value,
                            "AGENTJOBS_INPUT_DIR": "/in", "AGENTJOBS_AMQP__URL": "amqp://127.0.0.1/",
                            "AGENTJOBS_VAULT__AUTH_MODE": "none", "AGENTJOBS_TOOLS__RABBITMQ": "false",
                            "AGENTJOBS_TOOLS__KUBERNETES": "true", "AGENTJOBS_TOOLS__KUBECONFIG": str(path),
                            "TMPDIR": str(work)})

    @contextlib.asynccontextmanager
    async def as_phase(self, phase: Phase) -> AsyncIterator[client.ApiClient]:
        """A client authenticating as the phase's ServiceAccount (to call the API directly)."""
        async with self.handle.client_for(self.tokens[phase]) as api:
            yield api


@pytest_asyncio.fixture
async def world(manifests: list[dict], tmp_path: Path) -> AsyncIterator[World]:
    async with running_emulator(namespace=RUNS) as handle:
        handle.rbac.enable().load(o for o in manifests if o["kind"] in RBAC_KINDS)
        handle.cluster.policies.append(admission_policy(manifests))
        w = World(handle, tmp_path, Controllers(handle, WORKLOADS))
        w.tokens = {phase: handle.cluster.mint_token(RUNS, sa) for phase, sa in SA.items()}
        handle.cluster.api.create(DEPLOYMENTS, WORKLOADS, {
            "metadata": {"name": APP, "labels": {"app": APP}},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": APP}},
                     "template": {"metadata": {"labels": {"app": APP}},
                                  "spec": {"containers": [{"name": "app", "image": "registry.example/web:1.4.2"}]}}}})
        await w.settled(3)
        yield w


def message(err: pytest.ExceptionInfo[ApiException]) -> str:
    return json.loads(err.value.body)["message"]


def proposal(name: str, target: str, **params: str) -> ProposedAction:
    return ProposedAction(action=name, target=target, risk=REGISTRY[name].risk, params=params)


async def run_gate(w: World, phase: Phase, actions: list[ProposedAction], investigation_id: str = "inv-1"
                   ) -> dict[str, ProposedAction]:
    """The agent's path: open the kubernetes tool as the phase's ServiceAccount, build the executors, gate."""
    env = w.env(phase, investigation_id)
    tools, unavailable = await engine.open_tools(env, db_user=None, db_password=None, postgres_available=False)
    assert [t.name for t in tools] == ["kubernetes"] and unavailable == []
    try:
        executors, closers = engine.executors_for(env, tools)
        assert closers == []
        out = await gate(actions, phase, executors=executors, investigation_id=investigation_id,
                         ledger=engine.ledger_for(env))
    finally:
        await engine.close_tools(tools)
    return {a.action: a for a in out}


def delete_pod(p: dict, **params: str) -> ProposedAction:
    cs = p["status"]["containerStatuses"][0]
    return proposal("delete_pod", f"pod/{p['metadata']['name']} in namespace {WORKLOADS}",
                    uid=p["metadata"]["uid"], restarts=str(cs["restartCount"]), **params)


def scale(replicas: int, **params: str) -> ProposedAction:
    return proposal("scale_deployment", f"deployment/{APP} in namespace {WORKLOADS}", replicas=str(replicas), **params)


def restart(**params: str) -> ProposedAction:
    return proposal("restart_deployment", f"deployment/{APP} in namespace {WORKLOADS}", deployment=APP,
                    namespace=WORKLOADS, **params)


# --- delete_pod ---------------------------------------------------------------------------------

async def test_autonomous_deletes_a_crash_looping_pod_and_verifies_a_ready_replacement(world: World):
    victim = world.crash_loop((await world.settled(3))[0]["metadata"]["name"])

    by = await run_gate(world, Phase.AUTONOMOUS, [delete_pod(victim)])

    a = by["delete_pod"]
    assert a.executed, a.params
    assert (a.params["decision"], a.params["outcome"]) == ("execute", "executed_verified")
    assert "waiting CrashLoopBackOff" in a.params["before"] and "1 new pod(s), 1 ready" in a.params["after"]
    assert a.params["undo"] == "none (its controller replaced it)"
    pods = await world.settled(3)
    assert victim["metadata"]["uid"] not in {p["metadata"]["uid"] for p in pods}


async def test_limited_remediation_deletes_a_crash_looping_pod_and_verifies_it(world: World):
    victim = world.crash_loop((await world.settled(3))[0]["metadata"]["name"])

    by = await run_gate(world, Phase.LIMITED_REMEDIATION, [delete_pod(victim)])

    assert by["delete_pod"].params["outcome"] == "executed_verified"


async def test_a_pod_already_replaced_is_skipped_stale(world: World):
    victim = world.crash_loop((await world.settled(3))[0]["metadata"]["name"])
    stale = delete_pod(victim)
    world.handle.cluster.gc.delete(PODS, WORKLOADS, victim["metadata"]["name"])  # someone else deleted it
    await world.settled(3)

    by = await run_gate(world, Phase.AUTONOMOUS, [stale])

    a = by["delete_pod"]
    assert a.params["outcome"] == "skipped_stale" and not a.executed
    assert "no longer exists" in a.params["reason"]


async def test_a_pod_that_recovered_is_skipped_stale(world: World):
    healthy = (await world.settled(3))[0]

    by = await run_gate(world, Phase.AUTONOMOUS, [delete_pod(healthy)])

    assert by["delete_pod"].params["outcome"] == "skipped_stale"
    assert "running and ready again" in by["delete_pod"].params["reason"]
    assert world.store.get(PODS, WORKLOADS, healthy["metadata"]["name"]) is not None


async def test_the_same_ledger_twice_deletes_once(world: World):
    victim = world.crash_loop((await world.settled(3))[0]["metadata"]["name"])
    action = delete_pod(victim)

    first = await run_gate(world, Phase.AUTONOMOUS, [action])
    deletes = [r for r in world.handle.cluster.requests if r.method == "DELETE"]
    second = await run_gate(world, Phase.AUTONOMOUS, [action])  # a retried Job: same work dir, same ledger

    assert first["delete_pod"].params["outcome"] == "executed_verified"
    assert second["delete_pod"].params["outcome"] == "already_executed"
    assert second["delete_pod"].params["previous_outcome"] == "executed_verified"
    assert [r for r in world.handle.cluster.requests if r.method == "DELETE"] == deletes and len(deletes) == 1
    ledger = FileLedger(world.env(Phase.AUTONOMOUS, "inv-1").action_ledger_file)
    assert ledger.seen(first["delete_pod"].params["idempotency_key"]).outcome is Outcome.EXECUTED_VERIFIED


@pytest.mark.parametrize("phase", [Phase.SHADOW, Phase.READ_ONLY])
async def test_shadow_and_read_only_service_accounts_cannot_delete_a_pod_directly(world: World, phase: Phase):
    victim = (await world.settled(3))[0]["metadata"]["name"]

    async with world.as_phase(phase) as api:
        core = client.CoreV1Api(api)
        assert (await core.read_namespaced_pod(victim, WORKLOADS)).metadata.name == victim  # it may read
        with pytest.raises(ApiException) as err:
            await core.delete_namespaced_pod(victim, WORKLOADS)

    assert err.value.status == 403
    assert f'cannot delete resource "pods" in API group "" in the namespace "{WORKLOADS}"' in message(err)
    assert world.store.get(PODS, WORKLOADS, victim) is not None


# --- scale_deployment ---------------------------------------------------------------------------

async def test_limited_remediation_only_proposes_scaling_and_its_rbac_refuses_a_direct_scale(world: World):
    await world.settled(3)

    by = await run_gate(world, Phase.LIMITED_REMEDIATION, [scale(5, from_replicas="3")])

    a = by["scale_deployment"]
    assert a.params["decision"] == "propose_only" and "outcome" not in a.params and not a.executed
    assert "not medium-risk actions: proposed only" in a.params["reason"]
    assert not world.env(Phase.LIMITED_REMEDIATION, "inv-1").action_ledger_file.exists()  # nothing even claimed
    async with world.as_phase(Phase.LIMITED_REMEDIATION) as api:
        apps = client.AppsV1Api(api)
        with pytest.raises(ApiException) as by_scale:  # the gate bypassed: RBAC has no deployments/scale
            await apps.patch_namespaced_deployment_scale(APP, WORKLOADS, {"spec": {"replicas": 5}})
        with pytest.raises(ApiException) as by_patch:  # patch deployments is granted, but the policy freezes replicas
            await apps.patch_namespaced_deployment(APP, WORKLOADS, {"spec": {"replicas": 5}})

    assert by_scale.value.status == 403
    assert 'cannot patch resource "deployments/scale" in API group "apps"' in message(by_scale)
    assert by_patch.value.status == 403 and "ValidatingAdmissionPolicy 'agentjobs-agent-deployment-patches'" in \
        message(by_patch) and "replicas" in message(by_patch)
    assert world.deployment()["spec"]["replicas"] == 3


async def test_autonomous_scales_verifies_and_records_how_to_undo(world: World):
    await world.settled(3)

    by = await run_gate(world, Phase.AUTONOMOUS, [scale(5, from_replicas="3")])

    a = by["scale_deployment"]
    assert a.executed, a.params
    assert (a.params["decision"], a.params["outcome"]) == ("execute", "executed_verified")
    assert a.params["before"] == "deployment web: replicas=3 (3 ready)"
    assert "5 replicas ready" in a.params["after"]
    assert a.params["undo"] == f"kubectl -n {WORKLOADS} scale deployment/{APP} --replicas=3"
    assert len(await world.settled(5)) == 5
    scales = [r for r in world.handle.cluster.requests if r.path.endswith(f"/deployments/{APP}/scale")]
    assert [(r.method, r.user) for r in scales] == [("PATCH", f"system:serviceaccount:{RUNS}:{SA[Phase.AUTONOMOUS]}")]


async def test_a_replica_count_changed_since_the_finding_is_skipped_stale(world: World):
    await world.settled(3)
    d = world.deployment()
    d["spec"]["replicas"] = 4
    world.handle.cluster.api.save(DEPLOYMENTS, world.deployment(), d)  # an operator scaled it meanwhile
    await world.settled(4)

    by = await run_gate(world, Phase.AUTONOMOUS, [scale(5, from_replicas="3")])

    assert by["scale_deployment"].params["outcome"] == "skipped_stale"
    assert "now has 4 replicas, not the 3 the finding saw" in by["scale_deployment"].params["reason"]
    assert world.deployment()["spec"]["replicas"] == 4


# --- restart_deployment, and what the admission policy forbids ----------------------------------

async def test_limited_remediation_restarts_an_unready_deployment_within_the_admission_policy(world: World):
    pods = await world.settled(3)
    world.crash_loop(pods[1]["metadata"]["name"], restarts=2)
    before = {p["metadata"]["uid"] for p in pods}

    by = await run_gate(world, Phase.LIMITED_REMEDIATION, [restart()])

    a = by["restart_deployment"]
    assert a.executed, a.params
    assert a.params["outcome"] == "executed_verified"
    assert "2 ready" in a.params["before"] and "rolled out" in a.params["after"]
    assert a.params["undo"] == "none (a restart cannot be undone; pods are replaced)"
    d = world.deployment()
    assert "kubectl.kubernetes.io/restartedAt" in d["spec"]["template"]["metadata"]["annotations"]
    assert d["metadata"]["generation"] == 2
    assert not before & {p["metadata"]["uid"] for p in await world.settled(3)}  # every pod replaced


async def test_a_healthy_deployment_is_not_restarted(world: World):
    await world.settled(3)

    by = await run_gate(world, Phase.LIMITED_REMEDIATION, [restart()])

    assert by["restart_deployment"].params["outcome"] == "skipped_stale"
    assert world.deployment()["metadata"]["generation"] == 1


async def test_rollout_undo_and_raise_memory_limit_fail_as_forbidden_by_the_admission_policy(world: World):
    await world.settled(3)
    target = f"deployment/{APP} in namespace {WORKLOADS}"

    by = await run_gate(world, Phase.AUTONOMOUS, [
        proposal("rollout_undo", target, deployment=APP, namespace=WORKLOADS, to_revision="1"),
        proposal("raise_memory_limit", target, deployment=APP, namespace=WORKLOADS, container="app",
                 memory="768Mi")])

    for name in ("rollout_undo", "raise_memory_limit"):
        a = by[name]
        assert a.params["decision"] == "execute" and a.params["outcome"] == "failed" and not a.executed
        assert "not allowed by the agentjobs admission policy" in a.params["reason"]
    assert "kubectl -n default rollout undo deployment/web --to-revision=1" in by["rollout_undo"].params["reason"]
    assert world.deployment()["metadata"]["generation"] == 1
    assert not [r for r in world.handle.cluster.requests if r.method in ("PATCH", "PUT")]
    # and the policy is what would refuse them even past the executor: a pod-template change, directly
    async with world.as_phase(Phase.AUTONOMOUS) as api:
        with pytest.raises(ApiException) as err:
            await client.AppsV1Api(api).patch_namespaced_deployment(APP, WORKLOADS, {"spec": {"template": {"spec": {
                "containers": [{"name": "app", "resources": {"limits": {"memory": "768Mi"}}}]}}}})
    assert err.value.status == 403 and "never change its pod spec" in message(err)
