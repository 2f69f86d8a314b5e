"""Real Kubernetes failure states in the API emulator: crash loop, OOM kill, a bad rollout, pending pods.

Each problem gets an emulated cluster of its own (in-process, started in milliseconds), whose clock
starts ``HISTORY`` in the past: the Deployment and its first ReplicaSet are created then, so "no
rollout in the last two hours" is true unless the problem rolls one out; the clock is then brought
to the present and the pods are created through the API, scheduled and started by the emulator's
kubelet. What a kubelet with ``restartPolicy: Always`` reports for a container that keeps dying
(waiting in CrashLoopBackOff, the last termination's reason and exit code, a BackOff event) and
what the scheduler reports for a pod it cannot place (Pending, PodScheduled=False, FailedScheduling)
are then written into the pods' status the way tests/integration/test_tool_kubernetes.py does.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from agent.tools.base import Limits, Tool
from agent.tools.kubernetes import KubernetesTool
from tests.scenarios.harness import Sources, rfc3339
from tests.support.k8s.clock import Clock
from tests.support.k8s.clock import rfc3339 as k8s_time
from tests.support.k8s.fixtures import EmulatorHandle, running_emulator
from tests.support.k8s.resources import DEPLOYMENTS, PODS, REPLICASETS

HISTORY_S = 3 * 3600  # the cluster's story starts this long ago
LIMITS = Limits(timeout=5, max_rows=50)
SUFFIXES = ("x7k2p", "m4q9z", "b8w3r", "t2n6d")


def _image(app: str, version: str) -> str:
    return f"registry.example/{app}:{version}"


def deployment(h: EmulatorHandle, app: str, version: str, *, replicas: int, revision: int = 1) -> dict:
    """A Deployment as the cluster stores it (no controller runs in the emulator: status written as one would)."""
    template = {"metadata": {"labels": {"app": app}},
                "spec": {"containers": [{"name": "app", "image": _image(app, version),
                                         "resources": {"limits": {"memory": "256Mi", "cpu": "500m"}}}]}}
    return h.cluster.store.create(DEPLOYMENTS, {
        "metadata": {"name": app, "namespace": h.namespace, "generation": revision,
                     "annotations": {"deployment.kubernetes.io/revision": str(revision)}},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": app}}, "template": template},
        "status": {"observedGeneration": revision, "replicas": replicas, "updatedReplicas": replicas,
                   "readyReplicas": replicas, "availableReplicas": replicas,
                   "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}]},
    })


def replicaset(h: EmulatorHandle, dep: dict, revision: int, version: str, pod_hash: str, *, replicas: int) -> dict:
    app = dep["metadata"]["name"]
    labels = {"app": app, "pod-template-hash": pod_hash}
    return h.cluster.store.create(REPLICASETS, {
        "metadata": {"name": f"{app}-{pod_hash}", "namespace": h.namespace, "labels": labels,
                     "annotations": {"deployment.kubernetes.io/revision": str(revision)},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "controller": True,
                                          "name": app, "uid": dep["metadata"]["uid"]}]},
        "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": [{"name": "app", "image": _image(app, version)}]}}},
        "status": {"replicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas},
    })


async def pods(h: EmulatorHandle, rs: dict, count: int) -> list[str]:
    """``count`` pods of ReplicaSet ``rs``, created through the API and running (kubelet-started)."""
    names = [f"{rs['metadata']['name']}-{SUFFIXES[i]}" for i in range(count)]
    image = rs["spec"]["template"]["spec"]["containers"][0]["image"]
    for name in names:
        h.cluster.api.create(PODS, h.namespace, {
            "metadata": {"name": name, "labels": dict(rs["spec"]["selector"]["matchLabels"]),
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "controller": True,
                                              "name": rs["metadata"]["name"], "uid": rs["metadata"]["uid"]}]},
            "spec": {"restartPolicy": "Always", "containers": [{"name": "app", "image": image}]}})
    await h.cluster.wait_for(PODS, h.namespace, lambda ps: sum(
        1 for p in ps if p["metadata"]["name"] in names and p.get("status", {}).get("phase") == "Running")
        == len(names) or None)
    return names


def crash_loop(h: EmulatorHandle, name: str, *, reason: str, exit_code: int, restarts: int) -> None:
    """What a kubelet reports for a container that keeps dying: waiting in back-off, last termination."""
    store, now = h.cluster.store, h.clock.time()
    pod = store.get(PODS, h.namespace, name)
    cs = pod["status"]["containerStatuses"][0]
    cs.update(ready=False, started=False, restartCount=restarts,
              state={"waiting": {"reason": "CrashLoopBackOff",
                                 "message": f"back-off 5m0s restarting failed container=app pod={name}"}},
              lastState={"terminated": {"exitCode": exit_code, "reason": reason, "startedAt": k8s_time(now - 40),
                                        "finishedAt": k8s_time(now - 2), "containerID": cs.get("containerID")}})
    for cond in pod["status"]["conditions"]:
        if cond["type"] in ("Ready", "ContainersReady"):
            cond.update(status="False", reason="ContainersNotReady")
    store.update(PODS, pod)
    h.cluster.recorder.record(pod, "Warning", "BackOff", "Back-off restarting failed container app in pod "
                              f"{name}_{h.namespace}({pod['metadata']['uid']})", "kubelet")


def unschedulable(h: EmulatorHandle, name: str, why: str) -> None:
    """What the scheduler leaves for a pod no node can take: Pending, unbound, PodScheduled=False."""
    store, now = h.cluster.store, k8s_time(h.clock.time())
    pod = store.get(PODS, h.namespace, name)
    pod["spec"].pop("nodeName", None)
    pod["status"] = {"phase": "Pending", "qosClass": "Burstable",
                     "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                     "message": why, "lastTransitionTime": now, "lastProbeTime": None}]}
    store.update(PODS, pod)
    h.cluster.recorder.record(pod, "Warning", "FailedScheduling", why, "default-scheduler")


def _present(h: EmulatorHandle) -> None:
    h.clock.advance(max(0.0, time.time() - h.clock.time()))


@contextlib.asynccontextmanager
async def cluster(namespace: str) -> AsyncIterator[EmulatorHandle]:
    async with running_emulator(namespace=namespace, clock=Clock(start=time.time() - HISTORY_S)) as h:
        yield h


def _sources(h: EmulatorHandle, **facts: str) -> Sources:
    async def tools() -> list[Tool]:
        return [KubernetesTool(h.api_client, namespace=h.namespace, limits=LIMITS)]

    return Sources(tools=tools, facts={"namespace": h.namespace, "starts_at": rfc3339(h.clock.now()), **facts})


@contextlib.asynccontextmanager
async def crash_looping(_: Any) -> AsyncIterator[Sources]:
    """payments-api, unchanged for hours, exits 1 on start in every replica (a bad secret, say)."""
    async with cluster("payments") as h:
        dep = deployment(h, "payments-api", "3.1.4", replicas=3)
        rs = replicaset(h, dep, 1, "3.1.4", "5d8c7b9f4", replicas=3)
        _present(h)
        names = await pods(h, rs, 3)
        for name in names:
            crash_loop(h, name, reason="Error", exit_code=1, restarts=6)
        yield _sources(h, pod=names[0])


@contextlib.asynccontextmanager
async def oom_killed(_: Any) -> AsyncIterator[Sources]:
    """inventory-sync's workers exceed their 256Mi limit and are OOM-killed again and again."""
    async with cluster("inventory") as h:
        dep = deployment(h, "inventory-sync", "1.9.0", replicas=2)
        rs = replicaset(h, dep, 1, "1.9.0", "6f4d9c8b7", replicas=2)
        _present(h)
        names = await pods(h, rs, 2)
        for name in names:
            crash_loop(h, name, reason="OOMKilled", exit_code=137, restarts=4)
        yield _sources(h, pod=names[0])


@contextlib.asynccontextmanager
async def bad_rollout(_: Any) -> AsyncIterator[Sources]:
    """web-frontend 2.4.0, rolled out six minutes ago, crashes on start; 2.3.0 ran fine for hours."""
    async with cluster("storefront") as h:
        dep = deployment(h, "web-frontend", "2.4.0", replicas=3, revision=2)
        replicaset(h, dep, 1, "2.3.0", "7c9b8d6f5", replicas=0)
        h.clock.advance(max(0.0, time.time() - 360 - h.clock.time()))  # the rollout: 6 minutes ago
        new = replicaset(h, dep, 2, "2.4.0", "8d5f7c9b6", replicas=3)
        _present(h)
        names = await pods(h, new, 3)
        for name in names:
            crash_loop(h, name, reason="Error", exit_code=1, restarts=5)
        yield _sources(h, pod=names[0])


@contextlib.asynccontextmanager
async def pods_pending(_: Any) -> AsyncIterator[Sources]:
    """search-indexer scaled up to 3 replicas asking for more memory than any node has left."""
    why = "0/3 nodes are available: 3 Insufficient memory. preemption: 0/3 nodes are available."
    async with cluster("search") as h:
        dep = deployment(h, "search-indexer", "5.0.2", replicas=3)
        rs = replicaset(h, dep, 1, "5.0.2", "9b7c6d5f8", replicas=3)
        _present(h)
        names = await pods(h, rs, 3)
        for name in names:
            unschedulable(h, name, why)
        yield _sources(h, pod=names[0])
