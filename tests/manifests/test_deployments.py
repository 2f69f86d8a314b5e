"""The control plane's Deployments: replicas, probes on the ports the code serves, resources, PDBs."""

from __future__ import annotations

import pytest

from tests.manifests import render
from tests.manifests.render import selects

DEPLOYMENTS = ("agentjobs-dispatcher", "agentjobs-trust", "agentjobs-bridge", "agentjobs-tickets")
# What each process serves /healthz and /readyz on (dispatcher/intake/service.py: metrics.port;
# dispatcher/bridge/webhook.py: bridge.port; the trust consumer: metrics.port like the dispatcher).
PROBE_PORT = {
    "agentjobs-dispatcher": lambda s: s.metrics.port,
    "agentjobs-trust": lambda s: s.metrics.port,
    "agentjobs-bridge": lambda s: s.bridge.port,
    "agentjobs-tickets": lambda s: s.metrics.port,
}
DRAIN_SECONDS = 30  # DispatcherService.stop(drain_timeout=30.0)


def _container_port(c: dict, port) -> int:
    if isinstance(port, int):
        return port
    (found,) = [p["containerPort"] for p in c["ports"] if p["name"] == port]
    return found


@pytest.fixture
def production(rendered):
    return rendered["production"]


@pytest.fixture
def dev(rendered):
    return rendered["dev"]


def test_production_replicas(production) -> None:
    replicas = {d["metadata"]["name"]: d["spec"]["replicas"] for d in render.find(production, "Deployment")}

    assert replicas["agentjobs-dispatcher"] == 2  # safe side by side (409 on a second create)
    assert replicas["agentjobs-trust"] == 2  # single active consumer: one hot standby
    assert replicas["agentjobs-bridge"] >= 2


def test_dev_runs_one_of_each_without_disruption_budgets(dev) -> None:
    replicas = {d["metadata"]["name"]: d["spec"]["replicas"] for d in render.find(dev, "Deployment")}
    # the tickets connector stays off until [tickets] names a ticketing system (it will not start without)
    assert replicas.pop("agentjobs-tickets") == 0
    assert set(replicas.values()) == {1}
    assert render.find(dev, "PodDisruptionBudget") == []


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_probes_hit_healthz_and_readyz_on_the_port_the_process_serves(overlay, tmp_path, name) -> None:
    settings = render.deployed_settings(overlay, tmp_path, name)
    c = render.container(overlay, name)
    expected = PROBE_PORT[name](settings)

    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        get = c[probe]["httpGet"]
        assert get["path"] == path, (name, probe)
        assert _container_port(c, get["port"]) == expected, (name, probe)
    assert c["readinessProbe"]["httpGet"]["path"] != c["livenessProbe"]["httpGet"]["path"]


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_requests_and_limits_are_set_and_consistent(overlay, name) -> None:
    resources = render.container(overlay, name)["resources"]

    for resource in ("cpu", "memory"):
        request = render.quantity(resources["requests"][resource])
        limit = render.quantity(resources["limits"][resource])
        assert 0 < request <= limit, (name, resource)


def test_production_gets_more_than_dev(rendered) -> None:
    for name in DEPLOYMENTS:
        for resource in ("cpu", "memory"):
            prod = render.container(rendered["production"], name)["resources"]["limits"][resource]
            small = render.container(rendered["dev"], name)["resources"]["limits"][resource]
            assert render.quantity(prod) >= render.quantity(small), (name, resource)


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_disruption_budget_covers_each_deployment_in_production(production, name) -> None:
    deployment = render.one(production, "Deployment", name)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    budgets = [b for b in render.find(production, "PodDisruptionBudget", namespace="agentjobs-system")
               if selects(b["spec"]["selector"], labels)]

    (budget,) = budgets
    assert budget["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]


def test_bridge_service_reaches_the_bridge_port(overlay, tmp_path) -> None:
    settings = render.deployed_settings(overlay, tmp_path, "agentjobs-bridge")
    service = render.one(overlay, "Service", "agentjobs-bridge", "agentjobs-system")
    c = render.container(overlay, "agentjobs-bridge")
    pod_labels = render.one(overlay, "Deployment", "agentjobs-bridge")["spec"]["template"]["metadata"]["labels"]

    assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels)
    (port,) = service["spec"]["ports"]
    assert _container_port(c, port["targetPort"]) == settings.bridge.port
    assert service["spec"]["type"] == "ClusterIP"


def test_only_the_dispatcher_gets_a_kubernetes_api_token(overlay) -> None:
    for name in DEPLOYMENTS:
        pod = render.one(overlay, "Deployment", name)["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is (name == "agentjobs-dispatcher"), name


def test_shutdown_grace_covers_the_dispatchers_drain(overlay) -> None:
    pod = render.one(overlay, "Deployment", "agentjobs-dispatcher")["spec"]["template"]["spec"]

    assert pod["terminationGracePeriodSeconds"] > DRAIN_SECONDS


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_broker_credentials_come_from_a_secret_never_a_literal(overlay, name) -> None:
    env = {e["name"]: e for e in render.container(overlay, name)["env"]}

    assert "secretKeyRef" in env["AGENTJOBS_AMQP__URL"]["valueFrom"]
    for e in env.values():
        if any(word in e["name"] for word in ("TOKEN", "PASSWORD", "API_KEY")):
            assert "value" not in e, e["name"]


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_only_tmp_is_writable(overlay, name) -> None:
    pod = render.one(overlay, "Deployment", name)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (c,) = pod["containers"]

    writable = [m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")]
    assert writable == ["/tmp"]
    (tmp,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in volumes[tmp["name"]]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["HOME"] == env["TMPDIR"] == "/tmp"
