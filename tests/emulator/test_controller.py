"""The Job controller, TTL and garbage collection, with the kubelet driven by the test."""

from __future__ import annotations

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client import ApiException

from tests.support.k8s.resources import EVENTS, JOBS, PODS, SECRETS

from .helpers import condition, finished, job_body, wait_job


async def test_job_success_sets_conditions_counts_and_completion_time(k8s_emulator):
    ns, cluster = k8s_emulator.namespace, k8s_emulator.cluster
    batch = client.BatchV1Api(k8s_emulator.api_client)
    await batch.create_namespaced_job(ns, job_body("ok"))
    pod = await cluster.wait_for_pod(ns, "ok", phase="Running")
    running = await wait_job(batch, ns, "ok", lambda j: j.status.ready == 1)
    assert running.status.active == 1 and running.status.start_time is not None
    cluster.kubelet.finish(ns, pod["metadata"]["name"])
    job = await wait_job(batch, ns, "ok", finished)
    assert job.status.succeeded == 1 and job.status.active is None
    assert condition(job, "SuccessCriteriaMet").reason == "CompletionsReached"
    assert condition(job, "Complete").reason == "CompletionsReached"
    assert job.status.completion_time is not None
    events = await client.CoreV1Api(k8s_emulator.api_client).list_namespaced_event(
        ns, field_selector="involvedObject.name=ok")
    assert {"SuccessfulCreate", "Completed"} <= {e.reason for e in events.items}


async def test_backoff_limit_exceeded_after_retries_with_backoff(k8s_emulator):
    ns, cluster = k8s_emulator.namespace, k8s_emulator.cluster
    batch = client.BatchV1Api(k8s_emulator.api_client)
    await batch.create_namespaced_job(ns, job_body("flaky", backoffLimit=1))
    first = await cluster.wait_for_pod(ns, "flaky", phase="Running")
    cluster.kubelet.finish(ns, first["metadata"]["name"], exit_code=2)
    await wait_job(batch, ns, "flaky", lambda j: j.status.failed == 1)
    # the retry waits out the 10 s pod backoff on the cluster clock
    assert [p for p in cluster.pods_of_job(ns, "flaky")
            if p["status"]["phase"] == "Running"] == []
    cluster.clock.advance(11)
    second = await cluster.wait_for(PODS, ns, lambda ps: next(
        (p for p in ps if p["status"].get("phase") == "Running"), None))
    assert second["metadata"]["name"] != first["metadata"]["name"]
    cluster.kubelet.finish(ns, second["metadata"]["name"], exit_code=2)
    job = await wait_job(batch, ns, "flaky", finished)
    assert job.status.failed == 2
    assert condition(job, "FailureTarget").reason == "BackoffLimitExceeded"
    assert condition(job, "Failed").reason == "BackoffLimitExceeded"
    assert condition(job, "Failed").message == "Job has reached the specified backoff limit"
    assert job.status.completion_time is None


async def test_active_deadline_fails_job_with_deadline_exceeded(k8s_emulator):
    ns, cluster = k8s_emulator.namespace, k8s_emulator.cluster
    batch = client.BatchV1Api(k8s_emulator.api_client)
    await batch.create_namespaced_job(ns, job_body("slow", activeDeadlineSeconds=30))
    await cluster.wait_for_pod(ns, "slow", phase="Running")
    cluster.clock.advance(31)
    job = await wait_job(batch, ns, "slow", finished)
    assert condition(job, "FailureTarget").reason == "DeadlineExceeded"
    failed = condition(job, "Failed")
    assert (failed.reason, failed.message) == ("DeadlineExceeded",
                                               "Job was active longer than specified deadline")
    assert job.status.active is None and job.status.failed == 1
    assert cluster.pods_of_job(ns, "slow") == []  # the running pod was deleted


async def test_oom_killed_pod_reports_137(k8s_emulator):
    ns, cluster = k8s_emulator.namespace, k8s_emulator.cluster
    batch = client.BatchV1Api(k8s_emulator.api_client)
    await batch.create_namespaced_job(ns, job_body("hungry", backoffLimit=0))
    pod = await cluster.wait_for_pod(ns, "hungry", phase="Running")
    cluster.kubelet.oom(ns, pod["metadata"]["name"])
    await wait_job(batch, ns, "hungry", finished)
    read = await client.CoreV1Api(k8s_emulator.api_client).read_namespaced_pod(
        pod["metadata"]["name"], ns)
    term = read.status.container_statuses[0].state.terminated
    assert (read.status.phase, term.reason, term.exit_code) == ("Failed", "OOMKilled", 137)


async def test_ttl_after_finished_deletes_job_and_pods(k8s_emulator):
    ns, cluster = k8s_emulator.namespace, k8s_emulator.cluster
    batch = client.BatchV1Api(k8s_emulator.api_client)
    await batch.create_namespaced_job(ns, job_body("short-lived", ttlSecondsAfterFinished=60))
    pod = await cluster.wait_for_pod(ns, "short-lived", phase="Running")
    cluster.kubelet.finish(ns, pod["metadata"]["name"])
    await wait_job(batch, ns, "short-lived", finished)
    assert cluster.job(ns, "short-lived") is not None
    cluster.clock.advance(61)
    await cluster.wait_for(JOBS, ns, lambda jobs: not jobs or None)
    await cluster.wait_for(PODS, ns, lambda pods: not pods or None)
    with pytest.raises(ApiException) as err:
        await batch.read_namespaced_job("short-lived", ns)
    assert err.value.status == 404


async def _job_with_secret(k8s_emulator, name: str):
    ns = k8s_emulator.namespace
    batch = client.BatchV1Api(k8s_emulator.api_client)
    core = client.CoreV1Api(k8s_emulator.api_client)
    job = await batch.create_namespaced_job(ns, job_body(name))
    await core.create_namespaced_secret(ns, {
        "metadata": {"name": f"{name}-wrap", "ownerReferences": [{
            "apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": job.metadata.uid}]},
        "stringData": {"token": "s.wrapped"}})
    await k8s_emulator.cluster.wait_for_pod(ns, name, phase="Running")
    return batch, core


@pytest.mark.parametrize("policy", ["Background", "Foreground"])
async def test_deleting_job_deletes_pods_and_owned_secret(k8s_emulator, policy):
    ns, cluster = k8s_emulator.namespace, k8s_emulator.cluster
    batch, core = await _job_with_secret(k8s_emulator, "owned")
    await batch.delete_namespaced_job("owned", ns, propagation_policy=policy)
    await cluster.wait_for(SECRETS, ns, lambda ss: all(
        s["metadata"]["name"] != "owned-wrap" for s in ss))
    await cluster.wait_for(PODS, ns, lambda ps: not ps or None)
    await cluster.wait_for(JOBS, ns, lambda js: not js or None)


async def test_default_job_deletion_orphans_pods_like_the_real_api(k8s_emulator):
    ns, cluster = k8s_emulator.namespace, k8s_emulator.cluster
    batch, core = await _job_with_secret(k8s_emulator, "orphaning")
    resp = await batch.delete_namespaced_job_with_http_info("orphaning", ns)
    assert "child pods are preserved" in resp[2].get("Warning", "")
    pods = cluster.pods_of_job(ns, "orphaning")
    assert len(pods) == 1 and "ownerReferences" not in pods[0]["metadata"]
    secret = await core.read_namespaced_secret("orphaning-wrap", ns)
    assert secret.metadata.owner_references is None


async def test_secret_owned_by_an_already_deleted_job_is_collected(k8s_emulator):
    ns, cluster = k8s_emulator.namespace, k8s_emulator.cluster
    core = client.CoreV1Api(k8s_emulator.api_client)
    await core.create_namespaced_secret(ns, {"metadata": {"name": "dangling", "ownerReferences": [
        {"apiVersion": "batch/v1", "kind": "Job", "name": "gone", "uid": "no-such-uid"}]}})
    await cluster.wait_for(SECRETS, ns, lambda ss: all(
        s["metadata"]["name"] != "dangling" for s in ss))


async def test_missing_service_account_blocks_pods_until_it_exists(k8s_emulator):
    ns, cluster = k8s_emulator.namespace, k8s_emulator.cluster
    batch = client.BatchV1Api(k8s_emulator.api_client)
    await batch.create_namespaced_job(ns, job_body("needs-sa", pod={
        "serviceAccountName": "agent-assist"}))
    events = await cluster.wait_for(
        EVENTS, ns,
        lambda evs: [e for e in evs if e["reason"] == "FailedCreate"])
    assert 'serviceaccount "agent-assist" not found' in events[0]["message"]
    assert cluster.pods_of_job(ns, "needs-sa") == []
    cluster.add_service_account(ns, "agent-assist")
    pod = await cluster.wait_for_pod(ns, "needs-sa", phase="Running")
    assert pod["spec"]["serviceAccountName"] == "agent-assist"
