"""How KubernetesRuntime sets up its HTTP client: no per-request environment lookups."""

from __future__ import annotations

import pytest
from kubernetes_asyncio.client import ApiClient, Configuration

from dispatcher.jobs.kubernetes import KubernetesRuntime, env_proxy_for


async def test_the_runtime_session_does_not_consult_netrc_or_proxy_variables_per_request() -> None:
    api = ApiClient(Configuration(host="http://127.0.0.1:1"))
    assert api.rest_client.pool_manager.trust_env  # what kubernetes_asyncio opens with
    runtime = KubernetesRuntime(api, namespace="runs", owns_client=True)
    try:
        assert runtime.api.rest_client.pool_manager.trust_env is False
    finally:
        await runtime.close()


def test_the_api_servers_proxy_comes_from_the_environment_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("https_proxy", "http://proxy.corp:3128")
    monkeypatch.setenv("no_proxy", "10.0.0.1,.svc")
    assert env_proxy_for("https://k8s.example:6443") == "http://proxy.corp:3128"
    assert env_proxy_for("https://10.0.0.1:443") is None
    assert env_proxy_for("https://kubernetes.default.svc") is None


def test_no_proxy_variables_means_no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert env_proxy_for("https://k8s.example:6443") is None


async def test_the_runtime_takes_its_timeouts_from_settings(tmp_path) -> None:
    import json

    from dispatcher.jobs.kubernetes import KubernetesRuntime
    from dispatcher.plumbing.settings import load_settings
    from tests.support.k8s.fixtures import kubeconfig

    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(kubeconfig("http://127.0.0.1:1")))
    settings = load_settings(None, {"AGENTJOBS_K8S__KUBECONFIG": str(path), "AGENTJOBS_K8S__NAMESPACE": "ns-a",
                                    "AGENTJOBS_K8S__CLAIM_TIMEOUT": "15", "AGENTJOBS_K8S__WATCH_IDLE_TIMEOUT": "45",
                                    "AGENTJOBS_K8S__WATCH_TIMEOUT": "120", "AGENTJOBS_K8S__REQUEST_TIMEOUT": "3"})
    runtime = await KubernetesRuntime.from_settings(settings.k8s)
    try:
        assert (runtime.namespace, runtime.where) == ("ns-a", "kubernetes/ns-a")
        assert (runtime.claim_timeout, runtime.watch_idle_timeout, runtime.watch_timeout,
                runtime.request_timeout) == (15, 45, 120, 3)
    finally:
        await runtime.close()
