"""The code and the manifests agree: names, namespaces, labels, settings, images, commands."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from dispatcher.cli import main as cli

from dispatcher.jobs import jobspec

from schemas import vault_paths as vault_layout
from dispatcher.plumbing.settings import Settings, load_settings
from schemas import Phase
from tests.manifests import render

PYPROJECT = tomllib.loads((render.ROOT / "pyproject.toml").read_text())
CONSOLE_SCRIPT = next(iter(PYPROJECT["project"]["scripts"]))  # "agentjobs"
DISPATCHER_SA = ("agentjobs-system", "agentjobs-dispatcher")


def _service_accounts(objs) -> set[tuple[str, str]]:
    return {(o["metadata"]["namespace"], o["metadata"]["name"]) for o in render.find(objs, "ServiceAccount")}


def test_built_in_defaults_and_deployed_settings_name_the_same_runs_namespace_and_accounts(deployed) -> None:
    defaults = Settings()

    assert deployed.k8s.namespace == defaults.k8s.namespace
    assert deployed.k8s.service_account_prefix == defaults.k8s.service_account_prefix
    assert deployed.vault.kubernetes_namespace == deployed.k8s.namespace
    assert deployed.runtime.kind == "kubernetes"


@pytest.mark.parametrize("phase", list(Phase))
def test_every_phase_service_account_the_dispatcher_uses_exists(overlay, deployed, phase) -> None:
    accounts = _service_accounts(overlay)

    for settings in (deployed, Settings()):
        assert (settings.k8s.namespace, jobspec.service_account(phase, settings)) in accounts
    job = render.sample_job(deployed, phase)
    assert (job["metadata"]["namespace"], job["spec"]["template"]["spec"]["serviceAccountName"]) in accounts


def test_agent_service_accounts_are_exactly_one_per_phase(overlay, deployed) -> None:
    prefix = deployed.k8s.service_account_prefix
    agents = {name for ns, name in _service_accounts(overlay) if name.startswith(prefix)}

    assert agents == {jobspec.service_account(p, deployed) for p in Phase}


def test_every_deployment_runs_as_a_service_account_that_exists(overlay) -> None:
    accounts = _service_accounts(overlay)
    assert DISPATCHER_SA in accounts
    for deployment in render.find(overlay, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert (deployment["metadata"]["namespace"], pod["serviceAccountName"]) in accounts


@pytest.mark.parametrize("settings_source", ["defaults", "deployed"])
def test_runs_namespace_exists_and_enforces_restricted(overlay, deployed, settings_source) -> None:
    settings = Settings() if settings_source == "defaults" else deployed
    namespace = render.one(overlay, "Namespace", settings.k8s.namespace)

    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce-version"] == "latest"


def test_labels_selected_by_policies_are_the_ones_jobspec_puts_on_pods(overlay, deployed) -> None:
    pod_labels = render.sample_job(deployed)["spec"]["template"]["metadata"]["labels"]
    selectors = [
        p["spec"]["podSelector"]["matchLabels"]
        for p in render.find(overlay, "NetworkPolicy", namespace=deployed.k8s.namespace)
        if p["spec"]["podSelector"]
    ]

    assert selectors, "no NetworkPolicy selects agent pods"
    for selector in selectors:
        assert selector == {jobspec.LABEL_MANAGED_BY: jobspec.MANAGED_BY, jobspec.LABEL_NAME: "agentjobs-agent"}
        assert selector.items() <= pod_labels.items()
    # ... and the watcher's selector (dispatcher/jobs/jobspec.py SELECTOR) is one of those labels.
    key, _, value = jobspec.SELECTOR.partition("=")
    assert pod_labels[key] == value


def test_admission_policy_matches_the_agent_service_accounts(overlay, deployed) -> None:
    policy = render.one(overlay, "ValidatingAdmissionPolicy", "agentjobs-agent-deployment-patches")
    (condition,) = policy["spec"]["matchConditions"]
    prefix = f"system:serviceaccount:{deployed.k8s.namespace}:{deployed.k8s.service_account_prefix}"

    assert condition["expression"] == f"request.userInfo.username.startsWith('{prefix}')"


def test_settings_config_map_loads_with_load_settings(overlay, tmp_path: Path) -> None:
    config_map = render.settings_config_map(overlay)
    path = tmp_path / "settings.toml"
    path.write_text(config_map["data"]["settings.toml"])

    settings = load_settings(path)

    assert settings.runtime.kind == "kubernetes"
    assert settings.k8s.namespace == "agentjobs-runs"
    assert settings.logging.format == "json"
    # Inside a pod the servers must listen on the pod's address (probes, Service, scrapes).
    assert settings.metrics.host == "0.0.0.0"
    assert settings.bridge.host == "0.0.0.0"
    # No credentials in a ConfigMap.
    assert not settings.vault.token and not settings.bridge.bearer_token and not settings.llm.api_key
    assert "@" not in settings.amqp.url


def test_every_deployment_reads_the_settings_config_map_at_agentjobs_config(overlay) -> None:
    name = render.settings_config_map(overlay)["metadata"]["name"]
    for deployment in render.find(overlay, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        env = {e["name"]: e for e in c["env"]}
        config = Path(env["AGENTJOBS_CONFIG"]["value"])
        volumes = {v["name"]: v for v in pod["volumes"]}
        (mount,) = [m for m in c["volumeMounts"] if Path(m["mountPath"]) == config.parent]

        assert volumes[mount["name"]]["configMap"]["name"] == name
        assert config.name == "settings.toml"


def test_dispatcher_vault_token_file_is_a_mounted_secret(overlay, deployed) -> None:
    pod = render.one(overlay, "Deployment", "agentjobs-dispatcher")["spec"]["template"]["spec"]
    token = Path(deployed.vault.token_file)
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if Path(m["mountPath"]) == token.parent]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]

    assert "secret" in volume
    assert mount["readOnly"] is True


def test_vault_policies_config_map_carries_k8s_vault_files(overlay) -> None:
    config_map = render.one(overlay, "ConfigMap", "agentjobs-vault-policies")
    expected = {f"{vault_layout.policy(p)}.hcl" for p in Phase} | {f"{vault_layout.DISPATCHER_POLICY}.hcl",
                                                                  f"{vault_layout.TICKETS_POLICY}.hcl"}

    assert set(config_map["data"]) == expected
    for name, text in config_map["data"].items():
        assert text == (render.K8S / "vault" / name).read_text()


def test_rabbitmq_definitions_config_map_is_k8s_rabbitmq_definitions(overlay) -> None:
    config_map = render.one(overlay, "ConfigMap", "agentjobs-rabbitmq-definitions")
    text = config_map["data"]["definitions.json"]

    assert text == (render.K8S / "rabbitmq" / "definitions.json").read_text()
    assert json.loads(text)["exchanges"]


def test_agent_image_is_the_same_release_as_the_control_plane_image(overlay, deployed) -> None:
    _, agent_tag, agent_digest = render.split_image(deployed.k8s.image)
    for deployment in render.find(overlay, "Deployment"):
        image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
        _, tag, digest = render.split_image(image)
        assert tag or digest, f"{image}: pin a tag or digest, never :latest implicitly"
        assert tag != "latest"
        assert tag == agent_tag or (digest and agent_digest)
    assert agent_tag == PYPROJECT["project"]["version"] or agent_digest


def test_containers_run_real_subcommands_of_the_console_script(overlay) -> None:
    for deployment in render.find(overlay, "Deployment"):
        (c,) = deployment["spec"]["template"]["spec"]["containers"]
        script, subcommand = c["command"]
        assert script == CONSOLE_SCRIPT
        assert subcommand in cli.app.commands, f"agentjobs {subcommand} does not exist"


def test_job_command_is_the_agent_subcommand(deployed) -> None:
    assert deployed.k8s.agent_command == [CONSOLE_SCRIPT, "agent"]
    assert "agent" in cli.app.commands


def test_kubernetes_auth_rbac_is_present_exactly_when_the_auth_mode_needs_it(overlay, deployed) -> None:
    delegating = [
        b for b in render.find(overlay, "ClusterRoleBinding") if b["roleRef"]["name"] == "system:auth-delegator"
    ]

    assert bool(delegating) == (deployed.vault.auth_mode == "kubernetes")


def test_kubernetes_auth_component_delegates_only_to_the_token_reviewer_not_to_agents() -> None:
    objects = render.render(render.K8S / "base" / "kubernetes-auth")
    (binding,) = [o for o in objects if o["kind"] == "ClusterRoleBinding"]
    settings = Settings()

    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:auth-delegator",
    }
    assert [(s["namespace"], s["name"]) for s in binding["subjects"]] == [
        ("agentjobs-system", "agentjobs-token-reviewer")]
    agent_accounts = {jobspec.service_account(p, settings) for p in Phase}
    assert not agent_accounts & {s["name"] for s in binding["subjects"]}
    (secret,) = [o for o in objects if o["kind"] == "Secret"]
    assert secret["type"] == "kubernetes.io/service-account-token"
    assert secret["metadata"]["annotations"]["kubernetes.io/service-account.name"] == "agentjobs-token-reviewer"
