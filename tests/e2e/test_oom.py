"""An OOM-killed workload, through the same pipeline as the "2 AM" scenario.

The checkout service's pods exceed their memory limit: the kernel kills the container
(OOMKilled, exit 137), the kubelet restarts it and backs off (CrashLoopBackOff). The cluster
is the Kubernetes API emulator (a Deployment rolled out days ago, its ReplicaSets, its
crash-looping pods and their BackOff events), which the agent's read-only ``kubernetes``
tool reaches over HTTP through a kubeconfig file, as it would a real API server.

kube-prometheus's ``KubePodCrashLooping`` fires for each pod; Alertmanager's webhook (v4,
one group, the three pods' alerts) is POSTed to the bridge of ``agentjobs up`` with its
bearer token, exactly what Alertmanager sends (no kube-state-metrics runs here, so no
Prometheus rule could fire it). The alert names the crash loop, not its cause, and carries
kube-state-metrics' labels (namespace, pod, container): the workload is read off the pod
name. Then: the dispatcher with the LocalRuntime, real OpenBao, the agent with the ``rules``
reasoner in phase read-only.
"""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode

import pytest

from tests.support.payloads import am_alert, group
from tests.support.pipelines import (
    UpRun,
    no_process,
    no_vault_users,
    oom_killed_workload,
    post_webhook,
    up_env,
)
from tests.support.services import free_port, wait_until

pytestmark = pytest.mark.e2e

TOKEN = "oom-bridge-token"
ALERT = "KubePodCrashLooping"
WORKLOAD = "checkout-api"
IMAGE = f"registry.example/{WORKLOAD}:2.3.1"
EXPR = ('max_over_time(kube_pod_container_status_waiting_reason{reason="CrashLoopBackOff", '
        'job="kube-state-metrics"}[5m]) >= 1')  # kube-prometheus' rule


def _webhook(namespace: str, pods: list[str], starts_at: datetime) -> dict:
    """Alertmanager's webhook for the group {alertname, namespace}: one alert per crash-looping pod."""
    alerts = []
    for pod in pods:
        alert = am_alert(starts_at=starts_at.isoformat().replace("+00:00", "Z"), alertname=ALERT,
                         namespace=namespace, pod=pod, container="app", job="kube-state-metrics",
                         severity="warning", domain="kubernetes")
        alert["annotations"] = {
            "summary": "Pod is crash looping.",
            "description": f'Pod {namespace}/{pod} (app) is in waiting state (reason: "CrashLoopBackOff").',
            "runbook_url": "https://runbooks.prometheus-operator.dev/runbooks/kubernetes/kubepodcrashlooping",
        }
        alert["generatorURL"] = "http://prometheus.monitoring.svc:9090/graph?" + urlencode({"g0.expr": EXPR,
                                                                                            "g0.tab": "1"})
        alerts.append(alert)
    key = f'{{}}:{{alertname="{ALERT}", namespace="{namespace}"}}'
    return group(alerts, group_key=key, receiver="agentjobs", groupLabels={"alertname": ALERT, "namespace": namespace},
                 externalURL="http://alertmanager.monitoring.svc:9093",
                 commonAnnotations={"summary": "Pod is crash looping."},
                 truncatedAlerts=0, version="4")


async def test_oom_killed_pods_the_agent_names_the_memory_limit(amqp_vhost, rabbitmq_management, k8s_emulator,
                                                                tmp_path):
    handle = k8s_emulator
    async with contextlib.AsyncExitStack() as stack:
        # Given a Deployment rolled out days ago whose pods are OOM-killed and crash-looping
        pods = await oom_killed_workload(handle, WORKLOAD, image=IMAGE, memory="256Mi")
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps(handle.kubeconfig))  # JSON is YAML
        # and `agentjobs up` (real OpenBao, LocalRuntime) whose agents read the cluster through that kubeconfig
        bridge_port = free_port()
        env = up_env(tmp_path, amqp_vhost=amqp_vhost, bridge_port=bridge_port, token=TOKEN,
                     AGENTJOBS_TOOLS__KUBERNETES="true", AGENTJOBS_TOOLS__KUBECONFIG=str(kubeconfig),
                     AGENTJOBS_POSTGRES__DSN="", AGENTJOBS_POSTGRES__ADMIN_DSN="",
                     AGENTJOBS_TOOLS__PROMETHEUS_URL="", AGENTJOBS_TOOLS__LOKI_URL="")
        run = await UpRun(env, tmp_path).start(stack)

        # When Alertmanager notifies the bridge: KubePodCrashLooping for each of the pods
        started = datetime.now(UTC) - timedelta(minutes=5)
        await post_webhook(run.bridge_url, TOKEN, _webhook(handle.namespace, pods, started))

        # Then within 60 s one finding arrives: the pods are OOM-killed, the memory limit too low
        finding, report = await run.finding(ALERT, 60)
        assert finding["kind"] == "finding" and finding["reasoner"] == "rules", report
        assert finding["routing_key"] == "finding.warning.kubernetes", report
        assert finding["phase"] == "read-only" and finding["conclusion"] == "conclusive", report
        assert finding["hypotheses"][0]["cause"] == "oom_killed", report
        cause = finding["probable_cause"]
        assert "OOM-killed" in cause and "memory limit" in cause and WORKLOAD in cause, report
        # with evidence from the Kubernetes API: the workload's pods, last terminated OOMKilled
        evidence = [e for e in finding["evidence"] if e["ok"] and e["source"] == "kubernetes"]
        pod_list = [e for e in evidence if f"/namespaces/{handle.namespace}/pods" in e["query"]]
        assert any("last=OOMKilled exit 137" in e["excerpt"] and pods[0] in e["excerpt"] for e in pod_list), report
        assert any(f"deployments/{WORKLOAD}" in e["query"] for e in evidence), report
        assert any("OOMKilled" in e["excerpt"] for e in finding["hypotheses"][0]["evidence_for"]), report
        # and raise_memory_limit proposed for the Deployment, not executed (read-only)
        proposed = [a for a in finding["proposed_actions"] if a["action"] == "raise_memory_limit"]
        assert len(proposed) == 1, report
        params = proposed[0]["params"]
        assert (params.get("deployment"), params.get("namespace"), params.get("container")) == (
            WORKLOAD, handle.namespace, "app"), report
        assert proposed[0]["target"] == f"deployment/{WORKLOAD} in namespace {handle.namespace}", report
        assert proposed[0]["executed"] is False, report
        assert not any(a["executed"] for a in finding["proposed_actions"]), report
        # the agent only read the cluster
        writes = [r for r in handle.cluster.requests if r.method not in ("GET", "HEAD")]
        assert not writes, [(r.method, r.path) for r in writes]
        # One Job for the alert group (three alerts)
        dispatched = run.dispatched()
        assert len(dispatched) == 1 and "(phase read-only)" in dispatched[0], report
        # and the agent's broker credentials did not outlive its Job (OpenBao still running)
        await wait_until(lambda: no_vault_users(rabbitmq_management, amqp_vhost.name), timeout=30,
                         what="the agent's Vault-issued broker user revoked after its Job")

        # When SIGTERM arrives, Then up exits cleanly, one Job only, no process and no credential left
        await run.finish()
        assert await no_vault_users(rabbitmq_management, amqp_vhost.name)
    assert no_process(str(tmp_path)), tmp_path
