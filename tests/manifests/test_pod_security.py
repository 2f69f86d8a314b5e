"""Every pod agentjobs creates passes the `restricted` Pod Security Standard.

The runs namespace enforces `restricted` (Pod Security Admission): a Job the
dispatcher builds that broke a control would be rejected at admission and the
investigation lost, so the dispatcher's own manifests are checked here, for
every phase and credential mode, with the settings each overlay deploys.
"""

from __future__ import annotations

import copy

import pytest

from dispatcher.jobs import jobspec
from dispatcher.plumbing.settings import load_settings
from schemas import Phase
from tests.manifests import podsecurity, render

AUTH_MODES = ["per-investigation", "kubernetes", "none"]


def _settings(auth_mode: str):
    env = {"AGENTJOBS_VAULT__AUTH_MODE": auth_mode, "AGENTJOBS_RUNTIME__KIND": "kubernetes"}
    return load_settings(render.K8S / "base" / "config" / "settings.toml", env)


def _pod(job):
    return job["spec"]["template"]["spec"], job["spec"]["template"]["metadata"].get("annotations", {})


@pytest.mark.parametrize("auth_mode", AUTH_MODES)
@pytest.mark.parametrize("phase", list(Phase))
def test_job_built_by_the_dispatcher_passes_restricted(phase, auth_mode) -> None:
    pod, annotations = _pod(render.sample_job(_settings(auth_mode), phase))

    assert podsecurity.violations(pod, annotations) == []


@pytest.mark.parametrize("auth_mode", AUTH_MODES)
def test_job_pod_spec_controls_one_by_one(auth_mode) -> None:
    pod, _ = _pod(render.sample_job(_settings(auth_mode)))
    (container,) = pod["containers"]
    sc = container["securityContext"]

    # Host namespaces, privileged, host ports, hostPath: none.
    assert not any(pod.get(f) for f in ("hostNetwork", "hostPID", "hostIPC"))
    assert not sc.get("privileged")
    assert not any(p.get("hostPort") for p in container.get("ports", []))
    # Non-root, numeric user, no escalation, read-only root filesystem.
    assert pod["securityContext"]["runAsNonRoot"] is True and sc["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == jobspec.NONROOT_UID != 0
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    # Capabilities: drop ALL, add nothing beyond NET_BIND_SERVICE (we add nothing).
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"].get("add", [])) <= {"NET_BIND_SERVICE"}
    # seccomp RuntimeDefault or Localhost.
    assert pod["securityContext"]["seccompProfile"]["type"] in ("RuntimeDefault", "Localhost")
    assert sc["seccompProfile"]["type"] in ("RuntimeDefault", "Localhost")
    # Volumes only of the restricted profile's types (here: secret, emptyDir, projected token).
    for volume in pod["volumes"]:
        assert set(volume) - {"name"} <= {"secret", "emptyDir", "projected"}
    # No default ServiceAccount token; only a projected, audience-bound one in kubernetes mode.
    assert pod["automountServiceAccountToken"] is False


def test_control_plane_pods_pass_restricted(overlay) -> None:
    for deployment in render.find(overlay, "Deployment"):
        template = deployment["spec"]["template"]
        pod = template["spec"]

        assert podsecurity.violations(pod, template["metadata"].get("annotations")) == []
        for c in pod["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert pod["securityContext"]["runAsUser"] == jobspec.NONROOT_UID  # the image's USER


def test_every_agentjobs_namespace_enforces_restricted(overlay) -> None:
    for namespace in render.find(overlay, "Namespace"):
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


# -- the checker catches what it should -------------------------------------------------------


def _set(path: str, value):
    def mutate(pod):
        node = pod
        *parents, last = path.split(".")
        for part in parents:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        node[last] = value

    return mutate


BREAKS = {
    "hostNetwork": _set("hostNetwork", True),
    "hostPID": _set("hostPID", True),
    "hostIPC": _set("hostIPC", True),
    "privileged": _set("containers.0.securityContext.privileged", True),
    "escalation allowed": _set("containers.0.securityContext.allowPrivilegeEscalation", True),
    "escalation unset": lambda pod: pod["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
    "runs as root": _set("containers.0.securityContext.runAsUser", 0),
    "runAsNonRoot false": _set("containers.0.securityContext.runAsNonRoot", False),
    "capability added": _set("containers.0.securityContext.capabilities.add", ["SYS_ADMIN"]),
    "nothing dropped": _set("containers.0.securityContext.capabilities.drop", []),
    "seccomp unconfined": _set("containers.0.securityContext.seccompProfile", {"type": "Unconfined"}),
    "hostPath": lambda pod: pod["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
    "nfs volume": lambda pod: pod["volumes"].append({"name": "n", "nfs": {"server": "x", "path": "/"}}),
    "hostPort": _set("containers.0.ports", [{"containerPort": 80, "hostPort": 80}]),
    "procMount": _set("containers.0.securityContext.procMount", "Unmasked"),
    "unsafe sysctl": _set("securityContext.sysctls", [{"name": "kernel.msgmax", "value": "1"}]),
}


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_checker_rejects_a_pod_that_breaks_a_control(name) -> None:
    pod, _ = _pod(render.sample_job(_settings("per-investigation")))
    broken = copy.deepcopy(pod)
    BREAKS[name](broken)

    assert podsecurity.violations(broken) != []


def test_checker_allows_net_bind_service_only() -> None:
    pod, _ = _pod(render.sample_job(_settings("per-investigation")))
    pod = copy.deepcopy(pod)
    pod["containers"][0]["securityContext"]["capabilities"]["add"] = ["NET_BIND_SERVICE"]

    assert podsecurity.violations(pod) == []
