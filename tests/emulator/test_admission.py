"""RBAC allow list (403 Forbidden / 401) and ResourceQuota (403 exceeded quota, nothing stored)."""

from __future__ import annotations

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client import ApiException

from tests.support.k8s.resources import RESOURCEQUOTAS

from .helpers import job_body, status_of


async def test_rbac_allows_listed_verbs_and_forbids_the_rest(k8s_emulator):
    ns = k8s_emulator.namespace
    token = k8s_emulator.cluster.mint_token(ns, "dispatcher")
    k8s_emulator.rbac.enable()
    k8s_emulator.rbac.allow_service_account(ns, "dispatcher", ["get", "list", "watch"],
                                            ["jobs"], group="batch")
    async with k8s_emulator.client_for(token) as api:
        batch = client.BatchV1Api(api)
        assert (await batch.list_namespaced_job(ns)).items == []
        with pytest.raises(ApiException) as err:
            await batch.create_namespaced_job(ns, job_body("nope"))
    body = status_of(err.value)
    assert err.value.status == 403 and body["reason"] == "Forbidden"
    assert body["message"] == (
        f'jobs.batch is forbidden: User "system:serviceaccount:{ns}:dispatcher" cannot create '
        f'resource "jobs" in API group "batch" in the namespace "{ns}"')
    assert body["details"] == {"group": "batch", "kind": "jobs"}
    assert (await client.BatchV1Api(k8s_emulator.api_client).list_namespaced_job(ns)).items == []


async def test_rbac_names_subresources_and_other_namespaces(k8s_emulator):
    ns = k8s_emulator.namespace
    k8s_emulator.cluster.create_namespace("other")
    token = k8s_emulator.cluster.mint_token(ns, "agent")
    k8s_emulator.rbac.enable()
    k8s_emulator.rbac.allow_service_account(ns, "agent", ["get"], ["pods"])
    async with k8s_emulator.client_for(token) as api:
        core = client.CoreV1Api(api)
        with pytest.raises(ApiException) as err:
            await core.read_namespaced_pod_log("p", ns)
        assert 'cannot get resource "pods/log" in API group ""' in status_of(err.value)["message"]
        with pytest.raises(ApiException) as err:
            await core.read_namespaced_pod("p", "other")
        assert status_of(err.value)["message"].startswith('pods "p" is forbidden')
        with pytest.raises(ApiException) as err:  # allowed → reaches the store → 404
            await core.read_namespaced_pod("p", ns)
        assert err.value.status == 404


async def test_rbac_mode_rejects_unknown_tokens_with_401(k8s_emulator):
    k8s_emulator.rbac.enable()
    async with k8s_emulator.client_for("not-a-token") as api:
        with pytest.raises(ApiException) as err:
            await client.CoreV1Api(api).list_namespaced_pod(k8s_emulator.namespace)
    assert err.value.status == 401 and status_of(err.value)["reason"] == "Unauthorized"


async def test_quota_rejects_job_beyond_count_and_stores_nothing(k8s_emulator):
    ns = k8s_emulator.namespace
    core = client.CoreV1Api(k8s_emulator.api_client)
    batch = client.BatchV1Api(k8s_emulator.api_client)
    await core.create_namespaced_resource_quota(ns, {
        "metadata": {"name": "investigations"}, "spec": {"hard": {"count/jobs.batch": "2"}}})
    for name in ("j1", "j2"):
        await batch.create_namespaced_job(ns, job_body(name))
    rv_before = (await batch.list_namespaced_job(ns)).metadata.resource_version
    with pytest.raises(ApiException) as err:
        await batch.create_namespaced_job(ns, job_body("j3"))
    body = status_of(err.value)
    assert err.value.status == 403 and body["reason"] == "Forbidden"
    assert body["message"] == ('jobs.batch "j3" is forbidden: exceeded quota: investigations, '
                               'requested: count/jobs.batch=1, used: count/jobs.batch=2, '
                               'limited: count/jobs.batch=2')
    listing = await batch.list_namespaced_job(ns)
    assert [j.metadata.name for j in listing.items] == ["j1", "j2"]
    with pytest.raises(ApiException):
        await batch.read_namespaced_job("j3", ns)
    # no pod or event was created for the rejected Job either
    assert k8s_emulator.cluster.pods_of_job(ns, "j3") == []
    assert int(listing.metadata.resource_version) >= int(rv_before)
    # once a Job is gone there is room again
    await batch.delete_namespaced_job("j1", ns, propagation_policy="Background")
    await batch.create_namespaced_job(ns, job_body("j3"))


async def test_quota_status_reports_usage(k8s_emulator):
    ns = k8s_emulator.namespace
    k8s_emulator.cluster.set_quota(ns, "q", {"count/jobs.batch": 5})
    await client.BatchV1Api(k8s_emulator.api_client).create_namespaced_job(ns, job_body("one"))
    quota = await k8s_emulator.cluster.wait_for(
        RESOURCEQUOTAS, ns,
        lambda qs: qs and qs[0]["status"]["used"]["count/jobs.batch"] == "1" and qs[0])
    assert quota["status"]["hard"] == {"count/jobs.batch": "5"}
