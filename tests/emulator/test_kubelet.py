"""Process-mode kubelet: the pod's command really runs, with its env, files, limits and logs."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest
from kubernetes_asyncio import client, watch

from tests.support.k8s.resources import PODS

from .helpers import condition, finished, job_body, wait_job

PROCESS = pytest.mark.parametrize("k8s_emulator", [{"kubelet_mode": "process"}], indirect=True)
PY = sys.executable


async def _pod_of(k8s_emulator, job: str) -> str:
    return (await k8s_emulator.cluster.wait_for_pod(k8s_emulator.namespace, job))[
        "metadata"]["name"]


@PROCESS
async def test_python_job_runs_and_its_output_is_readable(k8s_emulator):
    ns = k8s_emulator.namespace
    batch = client.BatchV1Api(k8s_emulator.api_client)
    core = client.CoreV1Api(k8s_emulator.api_client)
    await batch.create_namespaced_job(ns, job_body("hello", command=[
        "python", "-c", "import sys; print('finding: disk full'); print('oops', file=sys.stderr)"]))
    job = await wait_job(batch, ns, "hello", finished)
    assert condition(job, "Complete") is not None and job.status.succeeded == 1
    pod = await _pod_of(k8s_emulator, "hello")
    log = await core.read_namespaced_pod_log(pod, ns)
    assert "finding: disk full\n" in log and "oops\n" in log
    read = await core.read_namespaced_pod(pod, ns)
    term = read.status.container_statuses[0].state.terminated
    assert (read.status.phase, term.exit_code, term.reason) == ("Succeeded", 0, "Completed")


@PROCESS
async def test_nonzero_exit_fails_pod_with_its_exit_code(k8s_emulator):
    ns = k8s_emulator.namespace
    batch = client.BatchV1Api(k8s_emulator.api_client)
    await batch.create_namespaced_job(ns, job_body("exit3", backoffLimit=0,
                                                   command=["sh", "-c", "exit 3"]))
    job = await wait_job(batch, ns, "exit3", finished)
    assert condition(job, "Failed").reason == "BackoffLimitExceeded"
    pod = await client.CoreV1Api(k8s_emulator.api_client).read_namespaced_pod(
        await _pod_of(k8s_emulator, "exit3"), ns)
    term = pod.status.container_statuses[0].state.terminated
    assert (pod.status.phase, term.exit_code, term.reason) == ("Failed", 3, "Error")


@PROCESS
async def test_env_secrets_projected_token_and_clean_cwd(k8s_emulator):
    ns = k8s_emulator.namespace
    core = client.CoreV1Api(k8s_emulator.api_client)
    batch = client.BatchV1Api(k8s_emulator.api_client)
    await core.create_namespaced_secret(ns, {"metadata": {"name": "wrap"},
                                             "stringData": {"token": "s.wrapped-token"}})
    script = r"""
import json, os, pathlib
root = os.environ["AGENTJOBS_MOUNT_ROOT"]
read = lambda p: pathlib.Path(root + p).read_text()
print(json.dumps({
    "pod": os.environ["POD_NAME"], "ns": os.environ["POD_NS"], "wrap": os.environ["WRAP"],
    "phase": os.environ["PHASE"], "greeting": os.environ["GREETING"],
    "file": read("/var/run/agentjobs/vault/token"),
    "sa_token": read("/var/run/secrets/tokens/vault-token"),
    "default_ns": read("/var/run/secrets/kubernetes.io/serviceaccount/namespace"),
    "cwd_empty": os.listdir(".") == [], "home_leak": "VIRTUAL_ENV" in os.environ,
}))
open("scratch", "w").write("x")
"""
    body = job_body("env", command=["python", "-c", script], pod={"volumes": [
        {"name": "vault", "secret": {"secretName": "wrap", "defaultMode": 0o400}},
        {"name": "sa", "projected": {"sources": [{"serviceAccountToken": {
            "audience": "vault", "expirationSeconds": 600, "path": "vault-token"}}]}}]})
    container = body["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "PHASE", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.labels['job-name']"}}},
        {"name": "WRAP", "valueFrom": {"secretKeyRef": {"name": "wrap", "key": "token"}}},
        {"name": "GREETING", "value": "hi $(POD_NS)"},
    ]
    container["volumeMounts"] = [{"name": "vault", "mountPath": "/var/run/agentjobs/vault"},
                                 {"name": "sa", "mountPath": "/var/run/secrets/tokens"}]
    await batch.create_namespaced_job(ns, body)
    await wait_job(batch, ns, "env", finished)
    pod = await _pod_of(k8s_emulator, "env")
    resp = await core.read_namespaced_pod_log(pod, ns, _preload_content=False)
    seen = json.loads(await resp.text())
    assert seen["pod"] == pod and seen["ns"] == ns and seen["phase"] == "env"
    assert seen["wrap"] == seen["file"] == "s.wrapped-token"
    assert seen["greeting"] == f"hi {ns}" and seen["default_ns"] == ns
    assert seen["cwd_empty"] is True and seen["home_leak"] is False
    # the projected token is a pod-bound ServiceAccount JWT for audience "vault"
    auth = client.AuthenticationV1Api(k8s_emulator.api_client)
    review = await auth.create_token_review({"spec": {"token": seen["sa_token"],
                                                      "audiences": ["vault"]}})
    assert review.status.authenticated is True
    assert review.status.user.extra["authentication.kubernetes.io/pod-name"] == [pod]
    # ... and stops being valid once its pod is gone
    await core.delete_namespaced_pod(pod, ns)
    review = await auth.create_token_review({"spec": {"token": seen["sa_token"],
                                                      "audiences": ["vault"]}})
    assert not review.status.authenticated


@PROCESS
async def test_memory_limit_is_enforced_as_oom_killed(k8s_emulator):
    ns = k8s_emulator.namespace
    batch = client.BatchV1Api(k8s_emulator.api_client)
    body = job_body("oom", backoffLimit=0, command=[
        "python", "-c", "x = bytearray(512 * 1024 * 1024); print('allocated')"])
    body["spec"]["template"]["spec"]["containers"][0]["resources"] = {
        "limits": {"memory": "256Mi"}}
    await batch.create_namespaced_job(ns, body)
    await wait_job(batch, ns, "oom", finished)
    pod = await client.CoreV1Api(k8s_emulator.api_client).read_namespaced_pod(
        await _pod_of(k8s_emulator, "oom"), ns)
    term = pod.status.container_statuses[0].state.terminated
    assert (pod.status.phase, term.reason, term.exit_code) == ("Failed", "OOMKilled", 137)


@PROCESS
async def test_job_deadline_kills_the_running_process(k8s_emulator):
    ns, cluster = k8s_emulator.namespace, k8s_emulator.cluster
    batch = client.BatchV1Api(k8s_emulator.api_client)
    await batch.create_namespaced_job(ns, job_body(
        "stuck", activeDeadlineSeconds=120,
        command=["python", "-c", "import time; print('started', flush=True); time.sleep(600)"]))
    await wait_job(batch, ns, "stuck", lambda j: j.status.ready == 1)
    pod = await _pod_of(k8s_emulator, "stuck")
    # wait for the process to have printed (so it really runs), via a follow stream
    async with asyncio.timeout(10), watch.Watch() as w:
        async for line in w.stream(client.CoreV1Api(k8s_emulator.api_client)
                                   .read_namespaced_pod_log, pod, ns, follow=True):
            assert line == "started\n"
            break
    cluster.clock.advance(121)
    job = await wait_job(batch, ns, "stuck", finished)
    assert condition(job, "Failed").reason == "DeadlineExceeded"
    assert cluster.pods_of_job(ns, "stuck") == []
    assert not any(r.procs and any(p.returncode is None for p in r.procs.values())
                   for r in cluster.kubelet._runs.values())


@PROCESS
async def test_missing_secret_keeps_container_waiting_until_created(k8s_emulator):
    ns, cluster = k8s_emulator.namespace, k8s_emulator.cluster
    batch = client.BatchV1Api(k8s_emulator.api_client)
    core = client.CoreV1Api(k8s_emulator.api_client)
    body = job_body("later", command=["sh", "-c", "echo $WRAP"])
    body["spec"]["template"]["spec"]["containers"][0]["env"] = [
        {"name": "WRAP", "valueFrom": {"secretKeyRef": {"name": "late", "key": "token"}}}]
    await batch.create_namespaced_job(ns, body)
    waiting = await cluster.wait_for(
        PODS, ns, lambda ps: [
            p for p in ps if (p["status"].get("containerStatuses") or [{}])[0].get(
                "state", {}).get("waiting", {}).get("reason") == "CreateContainerConfigError"])
    assert waiting[0]["status"]["containerStatuses"][0]["state"]["waiting"]["message"] == \
        'secret "late" not found'
    await core.create_namespaced_secret(ns, {"metadata": {"name": "late"},
                                             "stringData": {"token": "s.late"}})
    await wait_job(batch, ns, "later", finished)
    assert await core.read_namespaced_pod_log(waiting[0]["metadata"]["name"], ns) == "s.late\n"
