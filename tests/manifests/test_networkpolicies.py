"""Network policy: agent pods talk to DNS, Vault, RabbitMQ and their tools — and nothing else.

Policies are evaluated against the labels the dispatcher really puts on a
Job's pods (dispatcher/jobs/jobspec.py), so a renamed label cannot silently leave
agent pods unselected (which would mean: default deny, no investigation) or
selected by the wrong rules.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from tests.manifests import render
from tests.manifests.render import selects

# Each allowed destination of agent pods: its policy's name and exact ports.
AGENT_EGRESS = {
    "agent-egress-dns": {("UDP", 53), ("TCP", 53)},
    "agent-egress-vault": {("TCP", 8200)},
    "agent-egress-rabbitmq": {("TCP", 5672)},
    "agent-egress-rabbitmq-management": {("TCP", 15672)},
    "agent-egress-http-targets": {("TCP", 80), ("TCP", 8080), ("TCP", 443)},
    "agent-egress-prometheus": {("TCP", 9090)},
    "agent-egress-loki": {("TCP", 3100)},
    "agent-egress-postgres": {("TCP", 5432)},
    "agent-egress-kube-api": {("TCP", 443), ("TCP", 6443)},
    "agent-egress-llm": {("TCP", 443)},
}
NAMESPACE_LABEL = "kubernetes.io/metadata.name"


def _agent_labels(settings) -> dict[str, str]:
    return render.sample_job(settings)["spec"]["template"]["metadata"]["labels"]


def _policies_for(objs, namespace: str, labels: dict[str, str]) -> list[dict]:
    return [p for p in render.find(objs, "NetworkPolicy", namespace=namespace)
            if selects(p["spec"]["podSelector"], labels)]


def _ports(rule: dict) -> set[tuple[str, int]]:
    return {(p.get("protocol", "TCP"), p["port"]) for p in rule.get("ports", [])}


def _is_default_deny(policy: dict) -> bool:
    spec = policy["spec"]
    return (spec["podSelector"] == {} and set(spec["policyTypes"]) == {"Ingress", "Egress"}
            and not spec.get("ingress") and not spec.get("egress"))


def _assert_narrow_peer(peer: dict) -> None:
    """A peer names one namespace (optionally pods in it) or a bounded address range."""
    if "ipBlock" in peer:
        network = ipaddress.ip_network(peer["ipBlock"]["cidr"])
        assert network.prefixlen >= 16, f"{network}: too wide for an allow rule"
        assert set(peer) == {"ipBlock"}
        return
    assert "namespaceSelector" in peer, f"{peer}: a bare podSelector means other agent pods"
    assert set(peer["namespaceSelector"]["matchLabels"]) == {NAMESPACE_LABEL}, peer
    assert not peer["namespaceSelector"].get("matchExpressions")


def _egress_namespace(objs, namespace: str, policy: str) -> tuple[str, set[int]]:
    (rule,) = render.one(objs, "NetworkPolicy", policy, namespace)["spec"]["egress"]
    (peer,) = rule["to"]
    return peer["namespaceSelector"]["matchLabels"][NAMESPACE_LABEL], {p for _, p in _ports(rule)}


def _service_namespace_and_port(url: str) -> tuple[str, int]:
    """(namespace, port) of an in-cluster Service URL such as http://vault.vault.svc:8200."""
    parts = urlsplit(url)
    labels = (parts.hostname or "").split(".")
    assert len(labels) >= 3 and labels[2] == "svc", f"{url}: not a <service>.<namespace>.svc address"
    return labels[1], parts.port or {"http": 80, "https": 443, "amqp": 5672, "amqps": 5671}[parts.scheme]


# -- the runs namespace ----------------------------------------------------------------------


def test_runs_namespace_denies_all_ingress_and_egress_by_default(overlay, deployed) -> None:
    policies = render.find(overlay, "NetworkPolicy", namespace=deployed.k8s.namespace)

    assert any(_is_default_deny(p) for p in policies)


def test_agent_pods_accept_no_ingress(overlay, deployed) -> None:
    labels = _agent_labels(deployed)
    for policy in _policies_for(overlay, deployed.k8s.namespace, labels):
        assert not policy["spec"].get("ingress"), policy["metadata"]["name"]


def test_agent_egress_goes_only_to_dns_vault_rabbitmq_and_tools(overlay, deployed) -> None:
    labels = _agent_labels(deployed)
    egress = {
        p["metadata"]["name"]: p for p in _policies_for(overlay, deployed.k8s.namespace, labels)
        if p["spec"].get("egress")
    }

    assert set(egress) == set(AGENT_EGRESS)
    for name, policy in egress.items():
        assert policy["spec"]["policyTypes"] == ["Egress"], name
        for rule in policy["spec"]["egress"]:
            assert rule.get("to"), f"{name}: a rule without `to` allows every destination"
            assert rule.get("ports"), f"{name}: a rule without `ports` allows every port"
            assert _ports(rule) == AGENT_EGRESS[name], name
            for peer in rule["to"]:
                _assert_narrow_peer(peer)


def test_agent_egress_reaches_the_vault_and_broker_the_settings_name(overlay, deployed) -> None:
    for url, policy in ((deployed.vault.addr, "agent-egress-vault"), (deployed.amqp.url, "agent-egress-rabbitmq")):
        namespace, port = _service_namespace_and_port(url)
        assert _egress_namespace(overlay, deployed.k8s.namespace, policy) == (namespace, {port}), url


def test_policy_for_pods_without_agent_labels_is_just_default_deny(overlay, deployed) -> None:
    # A pod that is not an agent (say, someone's debug pod) gets no egress at all.
    policies = _policies_for(overlay, deployed.k8s.namespace, {"app": "debug"})

    assert [p["metadata"]["name"] for p in policies] == ["default-deny"]


# -- the control plane's namespace -----------------------------------------------------------


def _pod_labels(objs, deployment: str) -> dict[str, str]:
    return render.one(objs, "Deployment", deployment)["spec"]["template"]["metadata"]["labels"]


def test_control_plane_namespace_denies_by_default(overlay) -> None:
    assert any(_is_default_deny(p) for p in render.find(overlay, "NetworkPolicy", namespace="agentjobs-system"))


def test_only_the_bridge_port_takes_alertmanager_traffic_and_only_metrics_are_scraped(overlay, deployed) -> None:
    ingress_ports: dict[str, set[tuple[str, int]]] = {}
    for deployment in ("agentjobs-dispatcher", "agentjobs-trust", "agentjobs-bridge"):
        labels = _pod_labels(overlay, deployment)
        for policy in _policies_for(overlay, "agentjobs-system", labels):
            for rule in policy["spec"].get("ingress", []):
                assert rule.get("from") and rule.get("ports"), policy["metadata"]["name"]
                for peer in rule["from"]:
                    _assert_narrow_peer(peer)
                ingress_ports.setdefault(deployment, set()).update(_ports(rule))

    assert ingress_ports == {
        "agentjobs-dispatcher": {("TCP", deployed.metrics.port)},
        "agentjobs-trust": {("TCP", deployed.metrics.port)},
        "agentjobs-bridge": {("TCP", deployed.bridge.port)},
    }


def test_control_plane_egress_matches_what_each_component_talks_to(overlay, deployed) -> None:
    vault_ns, vault_port = _service_namespace_and_port(deployed.vault.addr)
    broker_ns, broker_port = _service_namespace_and_port(deployed.amqp.url)
    for deployment, needs_vault in (("agentjobs-dispatcher", True), ("agentjobs-trust", False),
                                    ("agentjobs-bridge", False)):
        peers: set[tuple[str, int]] = set()
        for policy in _policies_for(overlay, "agentjobs-system", _pod_labels(overlay, deployment)):
            for rule in policy["spec"].get("egress", []):
                for peer in rule["to"]:
                    _assert_narrow_peer(peer)
                    where = (peer.get("namespaceSelector") or {}).get("matchLabels", {}).get(NAMESPACE_LABEL, "ip")
                    peers |= {(where, port) for _, port in _ports(rule)}
        assert (broker_ns, broker_port) in peers
        assert ("kube-system", 53) in peers
        assert ((vault_ns, vault_port) in peers) == needs_vault
        assert any(where == "ip" for where, _ in peers) == needs_vault  # the Kubernetes API


def test_selector_evaluation() -> None:
    assert selects({}, {"a": "b"})
    assert selects({"matchLabels": {"a": "b"}}, {"a": "b", "c": "d"})
    assert not selects({"matchLabels": {"a": "b"}}, {"a": "x"})
    assert selects({"matchExpressions": [{"key": "a", "operator": "In", "values": ["b"]}]}, {"a": "b"})
    assert not selects({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {})
