"""The runs namespace's ResourceQuota and LimitRange fit the settings' admission caps.

Sizing rule (also in k8s/base/runs/quota.yaml), with N = admission.max_active:
requests/limits cpu and memory >= N x the largest class's cpu/memory (Jobs
request what they limit), pods >= N, count/jobs.batch >= N (we use 10 x N:
finished Jobs linger until reported and for ttl_after_finished), secrets >=
count/jobs.batch (one input Secret per Job). Checked against the settings each
overlay really deploys (ConfigMap + the dispatcher's environment) and, for the
base, against the built-in defaults.
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from dispatcher.plumbing.settings import Settings
from tests.manifests import render


def _hard(objs, namespace: str) -> dict[str, Decimal]:
    quota = render.one(objs, "ResourceQuota", "agentjobs-runs", namespace)
    return {k: render.quantity(v) for k, v in quota["spec"]["hard"].items()}


def _required(settings: Settings) -> dict[str, Decimal]:
    n = settings.admission.max_active
    cpu = max(render.quantity(c.cpu) for c in settings.classes.values())
    memory = max(render.quantity(c.memory) for c in settings.classes.values())
    return {
        "requests.cpu": n * cpu, "limits.cpu": n * cpu,
        "requests.memory": n * memory, "limits.memory": n * memory,
        "pods": Decimal(n), "count/jobs.batch": Decimal(n),
    }


def test_quota_admits_max_active_investigations_of_the_largest_class(overlay, deployed) -> None:
    hard = _hard(overlay, deployed.k8s.namespace)

    for key, needed in _required(deployed).items():
        assert hard[key] >= needed, f"{key}: {hard[key]} < {needed} needed for max_active investigations"
    assert hard["secrets"] >= hard["count/jobs.batch"]


def test_quota_is_the_documented_rule_exactly(overlay, deployed) -> None:
    # Not just "big enough": the overlay's numbers are the rule's, so they move with the caps.
    hard = _hard(overlay, deployed.k8s.namespace)
    required = _required(deployed)
    n = deployed.admission.max_active

    for key in ("requests.cpu", "limits.cpu", "requests.memory", "limits.memory"):
        assert hard[key] == required[key], key
    assert hard["pods"] == 2 * n
    assert hard["count/jobs.batch"] == 10 * n
    assert hard["secrets"] == hard["count/jobs.batch"] + 10


def test_base_quota_is_sized_from_the_built_in_defaults(tmp_path) -> None:
    objs = render.render(render.K8S / "base")
    deployed = render.deployed_settings(objs, tmp_path)
    defaults = Settings()

    assert _required(deployed) == _required(defaults)
    hard = _hard(objs, defaults.k8s.namespace)
    for key, needed in _required(defaults).items():
        assert hard[key] >= needed, key
    for key in ("requests.cpu", "limits.cpu", "requests.memory", "limits.memory"):
        assert hard[key] == _required(defaults)[key], key


def test_nothing_but_jobs_may_be_created_in_the_runs_namespace(overlay, deployed) -> None:
    hard = _hard(overlay, deployed.k8s.namespace)

    assert hard["services"] == 0
    assert hard["persistentvolumeclaims"] == 0


def test_limit_range_admits_every_class_and_defaults_to_the_default_class(overlay, deployed) -> None:
    limit_range = render.one(overlay, "LimitRange", "agentjobs-runs", deployed.k8s.namespace)
    (container,) = [item for item in limit_range["spec"]["limits"] if item["type"] == "Container"]

    for name, cls in deployed.classes.items():
        for resource, value in (("cpu", cls.cpu), ("memory", cls.memory)):
            assert render.quantity(container["min"][resource]) <= render.quantity(value), (name, resource)
            assert render.quantity(value) <= render.quantity(container["max"][resource]), (name, resource)
    default = deployed.classes["default"]
    for key in ("default", "defaultRequest"):
        assert container[key] == {"cpu": default.cpu, "memory": default.memory}


@pytest.mark.parametrize("class_name", ["default", "database", "kubernetes"])
def test_a_job_of_each_class_fits_the_limit_range(overlay, deployed, class_name) -> None:
    limit_range = render.one(overlay, "LimitRange", "agentjobs-runs", deployed.k8s.namespace)
    (limits,) = [item for item in limit_range["spec"]["limits"] if item["type"] == "Container"]
    job = render.sample_job(deployed, class_name=class_name)

    for c in job["spec"]["template"]["spec"]["containers"]:
        for resource in ("cpu", "memory"):
            request = render.quantity(c["resources"]["requests"][resource])
            limit = render.quantity(c["resources"]["limits"][resource])
            assert render.quantity(limits["min"][resource]) <= request <= limit
            assert limit <= render.quantity(limits["max"][resource])
