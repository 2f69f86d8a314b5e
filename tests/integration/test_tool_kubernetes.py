"""The ``kubernetes`` tool against the API emulator: crash-looping and OOM-killed pods, events, rollouts.

Pods are created through the emulator's API and scheduled/started by its
kubelet; a crash loop is then written into the pod's status the way a kubelet
with ``restartPolicy: Always`` reports it (the emulator's kubelet runs Job pods,
which never restart). Deployments and ReplicaSets are stored and served by the
emulator (no controller rolls them out): the tests write them as a cluster would.
"""

from __future__ import annotations

import pytest

from agent.tools.base import Limits
from agent.tools.kubernetes import KubernetesTool, selector_string
from tests.support.k8s.clock import rfc3339
from tests.support.k8s.resources import DEPLOYMENTS, PODS, REPLICASETS

pytestmark = pytest.mark.integration

APP = "checkout-api"


@pytest.fixture
def tool(k8s_emulator):
    return KubernetesTool(k8s_emulator.api_client, namespace=k8s_emulator.namespace,
                          limits=Limits(timeout=5, max_rows=50))


async def _pod(handle, name: str, labels: dict[str, str], *, restart_policy: str = "Always") -> dict:
    handle.cluster.api.create(PODS, handle.namespace, {
        "metadata": {"name": name, "labels": labels},
        "spec": {"restartPolicy": restart_policy,
                 "containers": [{"name": "app", "image": f"registry.example/{APP}:1.4.2"}]}})
    return await handle.cluster.wait_for(
        PODS, handle.namespace,
        lambda pods: next((p for p in pods if p["metadata"]["name"] == name
                           and p.get("status", {}).get("phase") == "Running"), None))


def _crash_loop(handle, name: str, *, reason: str, exit_code: int, restarts: int) -> None:
    """What a kubelet reports for a container that keeps dying: waiting in back-off, last termination."""
    store, now = handle.cluster.store, handle.clock.time()
    pod = store.get(PODS, handle.namespace, name)
    cs = pod["status"]["containerStatuses"][0]
    cs.update(ready=False, started=False, restartCount=restarts,
              state={"waiting": {"reason": "CrashLoopBackOff",
                                 "message": f"back-off 5m0s restarting failed container=app pod={name}"}},
              lastState={"terminated": {"exitCode": exit_code, "reason": reason, "startedAt": rfc3339(now - 30),
                                        "finishedAt": rfc3339(now - 1), "containerID": cs.get("containerID")}})
    for cond in pod["status"]["conditions"]:
        if cond["type"] in ("Ready", "ContainersReady"):
            cond.update(status="False", reason="ContainersNotReady")
    store.update(PODS, pod)
    handle.cluster.recorder.record(pod, "Warning", "BackOff", "Back-off restarting failed container app in pod "
                                   f"{name}_{handle.namespace}({pod['metadata']['uid']})", "kubelet")


async def _workload(handle) -> None:
    labels = {"app": APP, "pod-template-hash": "7d9f"}
    for suffix in ("healthy", "crashing", "oom"):
        await _pod(handle, f"{APP}-7d9f-{suffix}", labels)
    await _pod(handle, "billing-5c4b-x", {"app": "billing"})
    _crash_loop(handle, f"{APP}-7d9f-crashing", reason="Error", exit_code=1, restarts=5)
    _crash_loop(handle, f"{APP}-7d9f-oom", reason="OOMKilled", exit_code=137, restarts=3)


async def test_pods_of_a_workload_show_crash_loops_and_oom_kills(k8s_emulator, tool):
    await _workload(k8s_emulator)

    obs = await tool.run("pods", {"workload": APP})

    assert obs.ok, obs.excerpt
    assert obs.data["matched_by"] == "labels-or-name" and obs.data["total"] == 3
    pods = {p["name"]: p for p in obs.data["pods"]}
    assert set(pods) == {f"{APP}-7d9f-healthy", f"{APP}-7d9f-crashing", f"{APP}-7d9f-oom"}
    oom = pods[f"{APP}-7d9f-oom"]
    assert (oom["phase"], oom["ready"], oom["restarts"], oom["waiting_reason"]) == ("Running", False, 3,
                                                                                    "CrashLoopBackOff")
    assert (oom["last_termination"]["reason"], oom["last_termination"]["exit_code"]) == ("OOMKilled", 137)
    assert oom["containers"][0]["last_reason"] == "OOMKilled" and oom["containers"][0]["image"].endswith(":1.4.2")
    crashing = pods[f"{APP}-7d9f-crashing"]
    assert (crashing["last_termination"]["reason"], crashing["last_termination"]["exit_code"]) == ("Error", 1)
    healthy = pods[f"{APP}-7d9f-healthy"]
    assert (healthy["ready"], healthy["restarts"], healthy["last_termination"]) == (True, 0, None)
    # not-ready pods first, most restarts first
    assert [p["name"] for p in obs.data["pods"]][0] == f"{APP}-7d9f-crashing"
    assert "CrashLoopBackOff 2" in obs.excerpt and "OOMKilled 1" in obs.excerpt
    assert "last=OOMKilled exit 137" in obs.excerpt
    assert obs.query.startswith(f"GET /apis/apps/v1/namespaces/{k8s_emulator.namespace}/deployments/{APP}")


async def test_pods_by_label_selector(k8s_emulator, tool):
    await _workload(k8s_emulator)

    obs = await tool.run("pods", {"selector": f"app={APP}"})

    assert obs.ok and obs.data["selector"] == f"app={APP}" and obs.data["total"] == 3
    assert obs.query == f"GET /api/v1/namespaces/{k8s_emulator.namespace}/pods?labelSelector=app%3D{APP}"


async def test_an_oom_killed_job_pod_is_reported_as_the_kubelet_left_it(k8s_emulator, tool):
    await _pod(k8s_emulator, "nightly-report-abc12", {"job-name": "nightly-report"}, restart_policy="Never")
    k8s_emulator.kubelet.oom(k8s_emulator.namespace, "nightly-report-abc12")

    obs = await tool.run("pods", {"workload": "nightly-report"})

    (pod,) = obs.data["pods"]
    assert (pod["phase"], pod["ready"]) == ("Failed", False)
    assert (pod["last_termination"]["reason"], pod["last_termination"]["exit_code"]) == ("OOMKilled", 137)
    assert pod["containers"][0]["state"] == "terminated"


async def test_pods_of_a_deployment_are_found_through_its_selector(k8s_emulator, tool):
    await _workload(k8s_emulator)
    _deployment(k8s_emulator, revision=1)

    obs = await tool.run("pods", {"workload": APP})

    assert obs.ok and obs.data["matched_by"] == "deployment"
    assert obs.data["selector"] == f"app={APP}" and obs.data["total"] == 3


async def test_events_newest_first_filtered_by_object_prefix_and_type(k8s_emulator, tool):
    await _workload(k8s_emulator)
    for _ in range(3):  # the crash loop keeps backing off
        k8s_emulator.clock.advance(10)
        _crash_loop(k8s_emulator, f"{APP}-7d9f-oom", reason="OOMKilled", exit_code=137, restarts=4)

    one = await tool.run("events", {"involved_object": f"{APP}-7d9f-oom"})
    warnings = await tool.run("events", {"name_prefix": f"{APP}-", "type": "Warning"})

    assert one.ok, one.excerpt
    assert {e["object"] for e in one.data["events"]} == {f"Pod/{APP}-7d9f-oom"}
    assert {"Scheduled", "Started", "BackOff"} <= {e["reason"] for e in one.data["events"]}
    seen = [e["last_seen"] for e in one.data["events"]]
    assert seen == sorted(seen, reverse=True)
    assert warnings.ok and warnings.data["total"] == 5  # one back-off of the crashing pod, four of the oom one
    assert {e["reason"] for e in warnings.data["events"]} == {"BackOff"}
    assert {e["object"] for e in warnings.data["events"]} == {f"Pod/{APP}-7d9f-oom", f"Pod/{APP}-7d9f-crashing"}
    assert "fieldSelector=involvedObject.name%3D" in one.query
    assert "Warning BackOff" in warnings.excerpt


async def test_events_are_capped_at_max_rows(k8s_emulator):
    await _workload(k8s_emulator)
    small = KubernetesTool(k8s_emulator.api_client, namespace=k8s_emulator.namespace, limits=Limits(max_rows=2))

    obs = await small.run("events", {})

    assert obs.ok and obs.truncated and len(obs.data["events"]) == 2 and obs.data["total"] > 2


async def test_rollouts_list_replicasets_by_revision_with_images(k8s_emulator, tool):
    deployment = _deployment(k8s_emulator, revision=3)
    for revision, image in ((1, "1.4.0"), (2, "1.4.1"), (3, "1.4.2")):
        _replicaset(k8s_emulator, deployment, revision, image, replicas=3 if revision == 3 else 0)
    other = _deployment(k8s_emulator, revision=1, name=f"{APP}-canary")
    _replicaset(k8s_emulator, other, 1, "9.9.9", replicas=1)  # same labels, another owner

    obs = await tool.run("rollouts", {"deployment": APP})

    assert obs.ok, obs.excerpt
    assert [rs["revision"] for rs in obs.data["replica_sets"]] == [3, 2, 1]
    newest = obs.data["replica_sets"][0]
    assert newest["current"] and newest["images"] == [f"registry.example/{APP}:1.4.2"] and newest["replicas"] == 3
    assert newest["created"] > obs.data["replica_sets"][1]["created"]
    assert not any(rs["current"] for rs in obs.data["replica_sets"][1:])
    d = obs.data["deployment"]
    assert (d["revision"], d["replicas"], d["ready_replicas"], d["unavailable_replicas"]) == (3, 3, 1, 2)
    assert d["conditions"][0]["type"] == "Available"
    assert "revision 3" in obs.excerpt and ":1.4.2 (current)" not in obs.excerpt
    assert "(current)" in obs.excerpt


async def test_a_missing_deployment_is_a_failed_observation(k8s_emulator, tool):
    obs = await tool.run("rollouts", {"deployment": "nope"})

    assert not obs.ok and "404" in obs.excerpt and "nope" in obs.excerpt


async def test_a_missing_deployment_makes_rollouts_fail_and_pods_fall_back_to_labels(k8s_emulator, tool):
    await _workload(k8s_emulator)

    rollouts = await tool.run("rollouts", {"deployment": APP})
    pods = await tool.run("pods", {"workload": APP})

    assert not rollouts.ok and "404" in rollouts.excerpt
    assert pods.ok and pods.data["total"] == 3


async def test_forbidden_reads_are_failed_observations(k8s_emulator):
    k8s_emulator.rbac.enable()
    token = k8s_emulator.cluster.mint_token(k8s_emulator.namespace, "no-rights")
    client = k8s_emulator.client_for(token)
    try:
        obs = await KubernetesTool(client, namespace=k8s_emulator.namespace).run("pods", {"selector": "app=x"})
    finally:
        await client.close()

    assert not obs.ok and "403" in obs.excerpt and "Forbidden" in obs.excerpt


async def test_an_api_server_that_hangs_is_bounded_by_the_timeout(k8s_emulator):
    k8s_emulator.faults.inject("GET", r"/events", timeout=True, times=None)
    slow = KubernetesTool(k8s_emulator.api_client, namespace=k8s_emulator.namespace, limits=Limits(timeout=0.5))
    obs = await slow.run("events", {})

    assert not obs.ok and "timed out after 0.5 s" in obs.excerpt


async def test_an_answer_larger_than_max_bytes_is_a_failed_observation(k8s_emulator):
    await _workload(k8s_emulator)
    tiny = KubernetesTool(k8s_emulator.api_client, namespace=k8s_emulator.namespace, limits=Limits(max_bytes=1000))

    obs = await tiny.run("pods", {"selector": f"app={APP}"})

    assert not obs.ok and "max_bytes" in obs.excerpt


async def test_without_a_selector_or_workload_the_whole_namespace_is_listed_failing_pods_first(k8s_emulator, tool):
    # Given an alert that names only a namespace, and a workload in it with a crash-looping pod
    await _workload(k8s_emulator)
    obs = await tool.run("pods", {})
    # Then every pod of the namespace is listed, the failing ones before the ready one
    assert obs.ok and obs.data["matched_by"] == "namespace"
    names = [p["name"] for p in obs.data["pods"]]
    assert set(names) >= {f"{APP}-7d9f-healthy", f"{APP}-7d9f-crashing", f"{APP}-7d9f-oom"}
    assert names.index(f"{APP}-7d9f-healthy") > max(names.index(f"{APP}-7d9f-crashing"),
                                                    names.index(f"{APP}-7d9f-oom"))


async def test_invalid_parameters_are_failed_observations(tool):
    assert "required" in (await tool.run("rollouts", {})).excerpt
    assert "unknown operation" in (await tool.run("delete_pod", {"name": "x"})).excerpt
    assert "not a valid Kubernetes name" in (await tool.run("pods", {"workload": "x,app!=y"})).excerpt
    assert "not a valid Kubernetes name" in (await tool.run("events", {"involved_object": "a,type=Normal"})).excerpt
    assert "not a valid Kubernetes name" in (await tool.run("rollouts", {"deployment": "../secrets/x"})).excerpt


def test_label_selectors_are_rendered_like_kubectl():
    assert selector_string({"matchLabels": {"b": "2", "a": "1"},
                            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["web", "api"]},
                                                 {"key": "canary", "operator": "DoesNotExist"}]}) == \
        "a=1,b=2,tier in (web,api),!canary"


# --------------------------------------------------------------------------- #


def _deployment(handle, *, revision: int, name: str = APP) -> dict:
    return handle.cluster.store.create(DEPLOYMENTS, {
        "metadata": {"name": name, "namespace": handle.namespace, "generation": revision,
                     "annotations": {"deployment.kubernetes.io/revision": str(revision)}},
        "spec": {"replicas": 3, "selector": {"matchLabels": {"app": APP}},
                 "template": {"metadata": {"labels": {"app": APP}},
                              "spec": {"containers": [{"name": "app", "image": f"registry.example/{APP}:1.4.2"}]}}},
        "status": {"observedGeneration": revision, "replicas": 3, "updatedReplicas": 3, "readyReplicas": 1,
                   "availableReplicas": 1, "unavailableReplicas": 2,
                   "conditions": [{"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable",
                                   "message": "Deployment does not have minimum availability."}]},
    })


def _replicaset(handle, deployment: dict, revision: int, image: str, *, replicas: int) -> dict:
    handle.clock.advance(60)  # each rollout a minute after the one before
    name = f"{deployment['metadata']['name']}-{revision:04d}"
    return handle.cluster.store.create(REPLICASETS, {
        "metadata": {"name": name, "namespace": handle.namespace, "labels": {"app": APP},
                     "annotations": {"deployment.kubernetes.io/revision": str(revision)},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "controller": True,
                                          "name": deployment["metadata"]["name"],
                                          "uid": deployment["metadata"]["uid"]}]},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": APP}},
                 "template": {"metadata": {"labels": {"app": APP}},
                              "spec": {"containers": [{"name": "app", "image": f"registry.example/{APP}:{image}"}]}}},
        "status": {"replicas": replicas, "readyReplicas": min(replicas, 1), "availableReplicas": min(replicas, 1)},
    })
