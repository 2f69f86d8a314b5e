"""Who may do what, computed from the rendered RBAC objects (as the API server would).

For a ServiceAccount, every (Cluster)RoleBinding whose subjects include it —
by name, or through the groups every ServiceAccount is in — contributes its
role's rules: cluster-wide for a ClusterRoleBinding, in the binding's
namespace for a RoleBinding. The tests then assert on the resulting set of
grants, so a new binding anywhere in k8s/ cannot widen a phase unnoticed.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import pytest

from dispatcher.jobs import jobspec
from schemas import Phase
from tests.manifests import render

CLUSTER = "*"  # the namespace of a cluster-wide grant
READ_VERBS = {"get", "list", "watch"}
# Built-in ClusterRoles k8s/ may bind (their rules as of Kubernetes 1.30+).
BUILTIN_CLUSTER_ROLES = {
    "system:auth-delegator": [
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
        {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]},
    ],
}


class Grant(NamedTuple):
    namespace: str  # CLUSTER for cluster-wide
    group: str
    resource: str
    verb: str


def _subject_matches(subject: dict, namespace: str, name: str) -> bool:
    kind = subject["kind"]
    if kind == "ServiceAccount":
        return subject["name"] == name and subject.get("namespace") == namespace
    if kind == "User":
        return subject["name"] == f"system:serviceaccount:{namespace}:{name}"
    if kind == "Group":
        return subject["name"] in {"system:serviceaccounts", f"system:serviceaccounts:{namespace}",
                                   "system:authenticated"}
    raise AssertionError(f"unknown subject kind {kind}")


def _rules(objs, binding: dict) -> list[dict]:
    ref = binding["roleRef"]
    if ref["kind"] == "Role":
        role = render.one(objs, "Role", ref["name"], binding["metadata"]["namespace"])
    else:
        found = render.find(objs, "ClusterRole", ref["name"])
        if not found:
            assert ref["name"] in BUILTIN_CLUSTER_ROLES, f"ClusterRole {ref['name']} unknown: cannot verify it"
            return BUILTIN_CLUSTER_ROLES[ref["name"]]
        (role,) = found
    assert "aggregationRule" not in role, f"{ref['name']}: aggregated roles cannot be verified here"
    return role.get("rules", [])


def grants(objs, namespace: str, name: str) -> set[Grant]:
    """Everything the ServiceAccount ``namespace/name`` may do, one (ns, group, resource, verb) each."""
    found: set[Grant] = set()
    for kind in ("RoleBinding", "ClusterRoleBinding"):
        for binding in render.find(objs, kind):
            if not any(_subject_matches(s, namespace, name) for s in binding.get("subjects", [])):
                continue
            scope = binding["metadata"]["namespace"] if kind == "RoleBinding" else CLUSTER
            for rule in _rules(objs, binding):
                assert "nonResourceURLs" not in rule, "no agentjobs identity needs non-resource URLs"
                assert not rule.get("resourceNames"), "resourceNames would need finer bookkeeping here"
                for group in rule.get("apiGroups", []):
                    for resource in rule.get("resources", []):
                        for verb in rule["verbs"]:
                            found.add(Grant(scope, group, resource, verb))
    return found


def _can(found: set[Grant], verb: str, group: str, resource: str) -> bool:
    return any(
        g.verb in (verb, "*") and g.group in (group, "*") and g.resource in (resource, "*")
        for g in found
    )


def _agent(objs, settings, phase: Phase) -> set[Grant]:
    return grants(objs, settings.k8s.namespace, jobspec.service_account(phase, settings))


def _workload_namespaces(objs) -> set[str]:
    return {b["metadata"]["namespace"] for b in render.find(objs, "RoleBinding")
            if b["roleRef"]["name"] == "agentjobs-agent-read"}


# -- agents ----------------------------------------------------------------------------------


@pytest.mark.parametrize("phase", [Phase.SHADOW, Phase.READ_ONLY])
def test_shadow_and_read_only_have_no_write_verbs(overlay, deployed, phase) -> None:
    found = _agent(overlay, deployed, phase)

    assert found, f"{phase}: no read access at all (the investigation would see nothing)"
    assert {g.verb for g in found} <= READ_VERBS


def test_shadow_and_read_only_have_the_same_rights(overlay, deployed) -> None:
    assert _agent(overlay, deployed, Phase.SHADOW) == _agent(overlay, deployed, Phase.READ_ONLY)


@pytest.mark.parametrize("phase", list(Phase))
def test_no_agent_reads_secrets_runs_code_in_pods_or_touches_rbac(overlay, deployed, phase) -> None:
    found = _agent(overlay, deployed, phase)

    for verb in ("get", "list", "watch"):
        assert not _can(found, verb, "", "secrets")
    assert not _can(found, "create", "", "pods")
    for sub in ("pods/exec", "pods/attach", "pods/portforward", "pods/proxy", "pods/ephemeralcontainers",
                "services/proxy", "nodes/proxy"):
        assert not any(g.resource in (sub, "*") for g in found), sub
    assert not _can(found, "create", "", "serviceaccounts/token")
    assert not any(g.group in ("rbac.authorization.k8s.io", "*") for g in found)
    assert not any(g.verb in ("escalate", "bind", "impersonate", "*") for g in found)
    assert not any("*" in (g.group, g.resource, g.verb) for g in found)
    # ConfigMaps often carry credentials too.
    assert not any(g.resource == "configmaps" for g in found)


def test_phases_only_ever_add_rights(overlay, deployed) -> None:
    ladder = [_agent(overlay, deployed, p) for p in Phase]
    for lower, higher in itertools.pairwise(ladder):
        assert lower <= higher


def test_limited_remediation_adds_only_restarts_and_pod_deletes_in_workload_namespaces(overlay, deployed) -> None:
    added = _agent(overlay, deployed, Phase.LIMITED_REMEDIATION) - _agent(overlay, deployed, Phase.READ_ONLY)
    namespaces = _workload_namespaces(overlay)

    assert namespaces and CLUSTER not in namespaces
    assert added == {Grant(ns, verb_group, resource, verb) for ns in namespaces
                     for verb_group, resource, verb in [("apps", "deployments", "patch"), ("", "pods", "delete")]}


def test_autonomous_adds_only_medium_risk_actions_in_workload_namespaces(overlay, deployed) -> None:
    added = _agent(overlay, deployed, Phase.AUTONOMOUS) - _agent(overlay, deployed, Phase.LIMITED_REMEDIATION)
    namespaces = _workload_namespaces(overlay)

    assert added == {
        Grant(ns, group, resource, verb)
        for ns in namespaces
        for group, resource, verb in [
            ("apps", "deployments/scale", "get"),
            ("apps", "deployments/scale", "patch"),
            ("apps", "deployments/scale", "update"),
        ]
    }


def test_cluster_wide_agent_rights_are_read_only_cluster_scoped_resources(overlay, deployed) -> None:
    for phase in Phase:
        cluster = {g for g in _agent(overlay, deployed, phase) if g.namespace == CLUSTER}
        assert {(g.group, g.resource) for g in cluster} <= {
            ("", "nodes"), ("", "namespaces"), ("", "persistentvolumes"), ("metrics.k8s.io", "nodes"),
        }
        assert {g.verb for g in cluster} <= READ_VERBS


def test_every_agent_with_patch_deployments_is_held_to_restarts_by_admission_policy(overlay, deployed) -> None:
    policy = render.one(overlay, "ValidatingAdmissionPolicy", "agentjobs-agent-deployment-patches")
    binding = render.one(overlay, "ValidatingAdmissionPolicyBinding", "agentjobs-agent-deployment-patches")
    (rule,) = policy["spec"]["matchConstraints"]["resourceRules"]

    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert policy["spec"]["failurePolicy"] == "Fail"
    assert (rule["apiGroups"], rule["resources"], rule["operations"]) == (["apps"], ["deployments"], ["UPDATE"])
    prefix = f"system:serviceaccount:{deployed.k8s.namespace}:{deployed.k8s.service_account_prefix}"
    for phase in Phase:
        if _can(_agent(overlay, deployed, phase), "patch", "apps", "deployments"):
            username = f"system:serviceaccount:{deployed.k8s.namespace}:{jobspec.service_account(phase, deployed)}"
            assert username.startswith(prefix)
            assert prefix in policy["spec"]["matchConditions"][0]["expression"]


# -- the control plane -----------------------------------------------------------------------

DISPATCHER_RIGHTS = {
    # The issue's list, plus `patch` on jobs: jobs/kubernetes.py patches annotations (claim,
    # cancel, reported) and removes the report finalizer with merge patches.
    ("batch", "jobs"): {"create", "get", "list", "watch", "patch", "delete"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "pods/log"): {"get"},
    ("", "secrets"): {"create", "delete"},
    ("", "events"): {"create"},
}


def test_dispatcher_has_exactly_its_verbs_in_the_runs_namespace_only(overlay, deployed) -> None:
    found = grants(overlay, "agentjobs-system", "agentjobs-dispatcher")

    assert {g.namespace for g in found} == {deployed.k8s.namespace}
    by_resource: dict[tuple[str, str], set[str]] = {}
    for g in found:
        by_resource.setdefault((g.group, g.resource), set()).add(g.verb)
    assert by_resource == DISPATCHER_RIGHTS


def test_dispatcher_is_bound_by_no_cluster_role_binding(overlay) -> None:
    for binding in render.find(overlay, "ClusterRoleBinding"):
        assert not any(
            _subject_matches(s, "agentjobs-system", "agentjobs-dispatcher") for s in binding.get("subjects", [])
        ), binding["metadata"]["name"]


def test_dispatcher_never_reads_secrets(overlay) -> None:
    found = grants(overlay, "agentjobs-system", "agentjobs-dispatcher")
    for verb in ("get", "list", "watch"):
        assert not _can(found, verb, "", "secrets")


@pytest.mark.parametrize("name", ["agentjobs-trust", "agentjobs-bridge"])
def test_trust_and_bridge_have_no_kubernetes_rights(overlay, name) -> None:
    assert grants(overlay, "agentjobs-system", name) == set()


def test_nothing_binds_the_groups_every_service_account_is_in(overlay) -> None:
    for kind in ("RoleBinding", "ClusterRoleBinding"):
        for binding in render.find(overlay, kind):
            assert all(s["kind"] == "ServiceAccount" for s in binding["subjects"]), binding["metadata"]["name"]


def test_grants_computation_sees_a_wildcard(overlay) -> None:
    # Given one extra binding of a wildcard role to the shadow account
    objs = [*overlay,
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "x"},
             "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
             "metadata": {"name": "x"}, "roleRef": {"kind": "ClusterRole", "name": "x"},
             "subjects": [{"kind": "Group", "name": "system:serviceaccounts:agentjobs-runs"}]}]

    found = grants(objs, "agentjobs-runs", "agentjobs-agent-shadow")

    assert _can(found, "get", "", "secrets")
