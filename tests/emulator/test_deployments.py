"""Deployments as the agent's executors meet them: generation, the scale subresource, RBAC from Role
objects, and validating admission of UPDATEs (403 from a policy, as a ValidatingAdmissionPolicy denies).

No controller rolls Deployments out here; the tests only check what the API server itself does.
"""

from __future__ import annotations

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client import ApiException

from tests.support.k8s.admission import AdmissionRequest, ValidatingPolicy
from tests.support.k8s.resources import DEPLOYMENTS

from .helpers import status_of

RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"


def deployment(name: str = "web", replicas: int = 2) -> dict:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "app", "image": "nginx:1.27"}]}}},
            "status": {"replicas": 99}}


async def test_generation_counts_spec_changes_and_status_is_a_subresource(k8s_emulator):
    ns, apps = k8s_emulator.namespace, client.AppsV1Api(k8s_emulator.api_client)
    created = await apps.create_namespaced_deployment(ns, deployment())
    assert created.metadata.generation == 1 and not (created.status and created.status.replicas)
    k8s_emulator.cluster.api.patch(DEPLOYMENTS, ns, "web", b'{"status": {"replicas": 2, "observedGeneration": 1}}',
                                   "application/merge-patch+json", "status", None)

    labelled = await apps.patch_namespaced_deployment("web", ns, {"metadata": {"labels": {"tier": "front"}}})
    restarted = await apps.patch_namespaced_deployment(
        "web", ns, {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: "2026-01-01T00:00:00Z"}}}},
                    "status": {"replicas": 7}})

    assert labelled.metadata.generation == 1
    assert restarted.metadata.generation == 2
    assert restarted.spec.template.metadata.annotations == {RESTARTED_AT: "2026-01-01T00:00:00Z"}
    assert (restarted.status.replicas, restarted.status.observed_generation) == (2, 1)  # not the patch's 7


async def test_the_scale_subresource_reads_and_writes_only_the_replica_count(k8s_emulator):
    ns, apps = k8s_emulator.namespace, client.AppsV1Api(k8s_emulator.api_client)
    await apps.create_namespaced_deployment(ns, deployment(replicas=2))

    scale = await apps.read_namespaced_deployment_scale("web", ns)
    patched = await apps.patch_namespaced_deployment_scale("web", ns, {"spec": {"replicas": 4}})
    tested = await apps.patch_namespaced_deployment_scale(
        "web", ns, [{"op": "test", "path": "/spec/replicas", "value": 4},
                    {"op": "replace", "path": "/spec/replicas", "value": 5}])
    with pytest.raises(ApiException) as stale:
        await apps.patch_namespaced_deployment_scale(
            "web", ns, [{"op": "test", "path": "/spec/replicas", "value": 4},
                        {"op": "replace", "path": "/spec/replicas", "value": 1}])
    with pytest.raises(ApiException) as negative:
        await apps.patch_namespaced_deployment_scale("web", ns, {"spec": {"replicas": -1}})
    replaced = await apps.replace_namespaced_deployment_scale(
        "web", ns, {"apiVersion": "autoscaling/v1", "kind": "Scale", "metadata": {"name": "web"},
                    "spec": {"replicas": 3}})
    stored = await apps.read_namespaced_deployment("web", ns)

    assert (scale.kind, scale.api_version, scale.spec.replicas, scale.status.selector) == (
        "Scale", "autoscaling/v1", 2, "app=web")
    assert (patched.spec.replicas, tested.spec.replicas, replaced.spec.replicas) == (4, 5, 3)
    assert stale.value.status == 422 and "testing value /spec/replicas failed" in status_of(stale.value)["message"]
    assert negative.value.status == 422 and "must be greater than or equal to 0" in status_of(negative.value)["message"]
    assert stored.spec.replicas == 3 and stored.metadata.generation == 4
    assert stored.spec.template.spec.containers[0].image == "nginx:1.27"


async def test_discovery_lists_the_scale_subresource(k8s_emulator):
    resources = await client.AppsV1Api(k8s_emulator.api_client).get_api_resources()
    [scale] = [r for r in resources.resources if r.name == "deployments/scale"]
    assert (scale.kind, scale.group, scale.version, sorted(scale.verbs)) == (
        "Scale", "autoscaling", "v1", ["get", "patch", "update"])


def _roles(ns: str) -> list[dict]:
    sa = {"kind": "ServiceAccount", "name": "scaler", "namespace": ns}
    return [
        {"kind": "ClusterRole", "metadata": {"name": "read"},
         "rules": [{"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list"]}]},
        {"kind": "ClusterRole", "metadata": {"name": "scale"},
         "rules": [{"apiGroups": ["apps"], "resources": ["deployments/scale"], "verbs": ["get", "patch"]}]},
        {"kind": "Role", "metadata": {"name": "pods", "namespace": "other"},
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]},
        {"kind": "ClusterRoleBinding", "metadata": {"name": "read"}, "subjects": [sa],
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "read"}},
        {"kind": "RoleBinding", "metadata": {"name": "scale", "namespace": ns}, "subjects": [sa],
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "scale"}},
        {"kind": "RoleBinding", "metadata": {"name": "pods", "namespace": "other"},
         "subjects": [{"kind": "Group", "name": f"system:serviceaccounts:{ns}"}],
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pods"}},
    ]


async def test_rbac_loaded_from_role_and_binding_objects(k8s_emulator):
    ns, cluster = k8s_emulator.namespace, k8s_emulator.cluster
    cluster.create_namespace("other")
    for where in (ns, "other"):
        await client.AppsV1Api(k8s_emulator.api_client).create_namespaced_deployment(where, deployment())
    k8s_emulator.rbac.enable().load(_roles(ns))
    token = cluster.mint_token(ns, "scaler")

    async with k8s_emulator.client_for(token) as api:
        apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
        assert (await apps.read_namespaced_deployment("web", "other")).metadata.name == "web"  # cluster-wide
        assert (await apps.patch_namespaced_deployment_scale("web", ns, {"spec": {"replicas": 3}})).spec.replicas == 3
        with pytest.raises(ApiException) as elsewhere:  # the RoleBinding is in ns only
            await apps.patch_namespaced_deployment_scale("web", "other", {"spec": {"replicas": 3}})
        with pytest.raises(ApiException) as patch:  # deployments/scale is not deployments
            await apps.patch_namespaced_deployment("web", ns, {"spec": {"replicas": 5}})
        assert (await core.list_namespaced_pod("other")).items == []  # through the Group subject
        with pytest.raises(ApiException) as pods:
            await core.list_namespaced_pod(ns)

    assert elsewhere.value.status == patch.value.status == pods.value.status == 403
    assert 'cannot patch resource "deployments/scale" in API group "apps" in the namespace "other"' in \
        status_of(elsewhere.value)["message"]
    assert 'cannot patch resource "deployments" in API group "apps"' in status_of(patch.value)["message"]


def test_rbac_refuses_roles_it_cannot_enforce(k8s_emulator):
    binding = {"kind": "ClusterRoleBinding", "metadata": {"name": "b"}, "subjects": [],
               "roleRef": {"kind": "ClusterRole", "name": "missing"}}
    with pytest.raises(ValueError, match="not among the objects"):
        k8s_emulator.rbac.load([binding])
    with pytest.raises(ValueError, match="nonResourceURLs"):
        k8s_emulator.rbac.load([{**binding, "subjects": [{"kind": "User", "name": "u"}],
                                 "roleRef": {"kind": "ClusterRole", "name": "r"}},
                                {"kind": "ClusterRole", "metadata": {"name": "r"},
                                 "rules": [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]}])


async def test_a_validating_policy_denies_an_update_it_rejects_and_admits_the_rest(k8s_emulator):
    ns, apps = k8s_emulator.namespace, client.AppsV1Api(k8s_emulator.api_client)
    await apps.create_namespaced_deployment(ns, deployment())
    seen: list[AdmissionRequest] = []

    def only_restarts(request: AdmissionRequest) -> str | None:
        seen.append(request)
        if request.object["spec"]["template"]["spec"] != request.old_object["spec"]["template"]["spec"]:
            return "never change its pod spec"
        return None

    k8s_emulator.cluster.policies.append(ValidatingPolicy("only-restarts", only_restarts, binding="only-restarts-b"))
    restart = {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: "2026-01-01T00:00:00Z"}}}}}
    image = {"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "evil:1"}]}}}}

    admitted = await apps.patch_namespaced_deployment("web", ns, restart)
    with pytest.raises(ApiException) as denied:
        await apps.patch_namespaced_deployment("web", ns, image)
    scaled = await apps.patch_namespaced_deployment_scale("web", ns, {"spec": {"replicas": 4}})
    stored = await apps.read_namespaced_deployment("web", ns)

    assert admitted.metadata.generation == 2 and scaled.spec.replicas == 4
    assert denied.value.status == 403 and status_of(denied.value)["reason"] == "Forbidden"
    assert status_of(denied.value)["message"] == (
        "deployments.apps \"web\" is forbidden: ValidatingAdmissionPolicy 'only-restarts' with binding "
        "'only-restarts-b' denied request: never change its pod spec")
    assert stored.spec.template.spec.containers[0].image == "nginx:1.27"
    assert [(r.operation, r.subresource, r.username) for r in seen] == [("UPDATE", None, "kubernetes-admin")] * 2
