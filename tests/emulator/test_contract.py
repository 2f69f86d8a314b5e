"""One test body, two API servers: the emulator and (where Docker answers) a real k3s.

These are the client-level behaviours our dispatcher relies on. Running them
against k3s through testcontainers is how the emulator's assumptions get
checked against a real API server; without a Docker engine that tier is
skipped with the reason.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import pytest
import pytest_asyncio
import yaml
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client import ApiClient, ApiException

from .helpers import condition, finished, job_body, status_of, wait_job


def _docker_unavailable() -> str | None:
    try:
        import docker

        docker.from_env(timeout=2).ping()
    except Exception as exc:  # any failure to reach an engine means: no k3s tier here
        return f"k3s tier needs a Docker engine; none answers ({type(exc).__name__}: {exc})"
    return None


@pytest.fixture(scope="session")
def k3s_kubeconfig():
    reason = _docker_unavailable()
    if reason:
        pytest.skip(reason)
    try:
        from testcontainers.community.k3s import K3SContainer
    except ImportError:  # older testcontainers
        from testcontainers.k3s import K3SContainer
    with K3SContainer() as k3s:
        yield yaml.safe_load(k3s.config_yaml())


@dataclass
class Backend:
    name: str
    api: ApiClient
    namespace: str
    timeout: float  # seconds a Job may take to finish here


@pytest_asyncio.fixture(params=["emulator", "k3s"])
async def backend(request, k8s_emulator_factory):
    if request.param == "emulator":
        handle = await k8s_emulator_factory(kubelet_mode="process")
        yield Backend("emulator", handle.api_client, handle.namespace, 20)
        return
    kubeconfig = request.getfixturevalue("k3s_kubeconfig")
    cfg = client.Configuration()
    await config.load_kube_config_from_dict(kubeconfig, client_configuration=cfg)
    async with ApiClient(cfg) as api:
        ns = f"contract-{uuid.uuid4().hex[:8]}"
        core = client.CoreV1Api(api)
        await core.create_namespace({"metadata": {"name": ns}})
        try:
            yield Backend("k3s", api, ns, 180)
        finally:
            await core.delete_namespace(ns)


async def test_contract_duplicate_create_is_already_exists(backend):
    batch = client.BatchV1Api(backend.api)
    await batch.create_namespaced_job(backend.namespace, job_body("dup"))
    with pytest.raises(ApiException) as err:
        await batch.create_namespaced_job(backend.namespace, job_body("dup"))
    body = status_of(err.value)
    assert (err.value.status, body["reason"], body["message"]) == (
        409, "AlreadyExists", 'jobs.batch "dup" already exists')
    assert body["details"] == {"name": "dup", "group": "batch", "kind": "jobs"}


async def test_contract_not_found_and_invalid(backend):
    batch = client.BatchV1Api(backend.api)
    with pytest.raises(ApiException) as err:
        await batch.read_namespaced_job("missing", backend.namespace)
    assert status_of(err.value)["message"] == 'jobs.batch "missing" not found'
    body = job_body("empty")
    body["spec"]["template"]["spec"]["containers"] = []
    with pytest.raises(ApiException) as err:
        await batch.create_namespaced_job(backend.namespace, body)
    status = status_of(err.value)
    assert err.value.status == 422 and status["reason"] == "Invalid"
    assert "spec.template.spec.containers" in [c["field"] for c in status["details"]["causes"]]


async def test_contract_watch_resume_and_selectors(backend):
    core = client.CoreV1Api(backend.api)
    ns = backend.namespace
    first = await core.create_namespaced_secret(ns, {"metadata": {"name": "c1", "labels": {
        "phase": "shadow"}}})
    await core.create_namespaced_secret(ns, {"metadata": {"name": "c2", "labels": {
        "phase": "assist"}}})
    names = [s.metadata.name for s in (await core.list_namespaced_secret(
        ns, label_selector="phase in (assist)")).items]
    assert names == ["c2"]
    events = []
    async with asyncio.timeout(30), watch.Watch() as w:
        async for ev in w.stream(core.list_namespaced_secret, ns, label_selector="phase",
                                 resource_version=first.metadata.resource_version,
                                 timeout_seconds=20):
            events.append((ev["type"], ev["object"].metadata.name))
            break
    assert events == [("ADDED", "c2")]


async def test_contract_quota_rejects_and_stores_nothing(backend):
    core = client.CoreV1Api(backend.api)
    batch = client.BatchV1Api(backend.api)
    ns = backend.namespace
    await core.create_namespaced_resource_quota(ns, {
        "metadata": {"name": "jobs-cap"}, "spec": {"hard": {"count/jobs.batch": "1"}}})
    # real quota admission needs the quota controller to have filled in status first
    quota = await core.read_namespaced_resource_quota("jobs-cap", ns)
    if not quota.status.hard:  # only on k3s; the emulator fills status at once
        async with asyncio.timeout(30), watch.Watch() as w:
            async for ev in w.stream(core.list_namespaced_resource_quota, ns,
                                     resource_version=quota.metadata.resource_version,
                                     timeout_seconds=30):
                if ev["object"].status and ev["object"].status.hard:
                    break
    await batch.create_namespaced_job(ns, job_body("q1"))
    with pytest.raises(ApiException) as err:
        await batch.create_namespaced_job(ns, job_body("q2"))
    assert err.value.status == 403
    assert "exceeded quota: jobs-cap" in status_of(err.value)["message"]
    assert [j.metadata.name for j in (await batch.list_namespaced_job(ns)).items] == ["q1"]


async def test_contract_job_runs_and_log_is_readable(backend):
    batch = client.BatchV1Api(backend.api)
    ns = backend.namespace
    await batch.create_namespaced_job(ns, job_body(
        "echo", command=["sh", "-c", "echo hello-from-job"], backoffLimit=0))
    job = await wait_job(batch, ns, "echo", finished, timeout=backend.timeout)
    assert condition(job, "Complete") is not None
    assert condition(job, "SuccessCriteriaMet") is not None
    core = client.CoreV1Api(backend.api)
    pods = await core.list_namespaced_pod(ns, label_selector="job-name=echo")
    assert len(pods.items) == 1
    assert await core.read_namespaced_pod_log(pods.items[0].metadata.name, ns) == \
        "hello-from-job\n"


async def test_contract_owned_secret_goes_with_its_job(backend):
    batch = client.BatchV1Api(backend.api)
    core = client.CoreV1Api(backend.api)
    ns = backend.namespace
    job = await batch.create_namespaced_job(ns, job_body("owner"))
    await core.create_namespaced_secret(ns, {"metadata": {"name": "owner-wrap", "ownerReferences": [
        {"apiVersion": "batch/v1", "kind": "Job", "name": "owner", "uid": job.metadata.uid}]}})
    await batch.delete_namespaced_job("owner", ns, propagation_policy="Background")
    async with asyncio.timeout(backend.timeout), watch.Watch() as w:
        current = await core.list_namespaced_secret(ns, field_selector="metadata.name=owner-wrap")
        if current.items:
            async for ev in w.stream(core.list_namespaced_secret, ns,
                                     field_selector="metadata.name=owner-wrap",
                                     resource_version=current.metadata.resource_version,
                                     timeout_seconds=int(backend.timeout)):
                if ev["type"] == "DELETED":
                    break
    assert (await core.list_namespaced_secret(
        ns, field_selector="metadata.name=owner-wrap")).items == []


async def test_contract_token_request_and_review(backend):
    core = client.CoreV1Api(backend.api)
    ns = backend.namespace
    await core.create_namespaced_service_account(ns, {"metadata": {"name": "agent"}})
    sa = await core.read_namespaced_service_account("agent", ns)
    token = (await core.create_namespaced_service_account_token(
        "agent", ns, {"spec": {"audiences": ["vault"], "expirationSeconds": 600}})).status.token
    review = await client.AuthenticationV1Api(backend.api).create_token_review(
        {"spec": {"token": token, "audiences": ["vault"]}})
    assert review.status.authenticated is True
    assert review.status.user.username == f"system:serviceaccount:{ns}:agent"
    assert review.status.user.uid == sa.metadata.uid
    assert review.status.audiences == ["vault"]
    bad = await client.AuthenticationV1Api(backend.api).create_token_review(
        {"spec": {"token": token, "audiences": ["someone-else"]}})
    assert not bad.status.authenticated
