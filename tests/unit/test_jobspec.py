"""Job manifests are valid Kubernetes objects that run under the restricted profile."""

from __future__ import annotations

from datetime import UTC, datetime

import kubernetes_validate
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatcher.jobs import jobspec
from dispatcher.plumbing.settings import Settings, load_settings
from schemas import Alert, IncidentEvent, Phase, decode_incident, identify
from schemas.k8snames import is_label_value
from tests.support.payloads import SAMPLE_WEBHOOK, dumps

K8S_VERSION = "1.33"


def _plan(event: IncidentEvent, s: Settings, phase: Phase = Phase.SHADOW) -> jobspec.JobPlan:
    return jobspec.JobPlan(
        identity=identify(event),
        event=event,
        class_name=jobspec.choose_class(event, s),
        phase=phase,
        domain=jobspec.domain_of(event, s),
    )


def _validate(manifest: dict) -> None:
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


SAMPLE = decode_incident(dumps(SAMPLE_WEBHOOK))


@pytest.mark.parametrize("auth_mode", ["per-investigation", "kubernetes", "none"])
@pytest.mark.parametrize("phase", list(Phase))
def test_manifest_validates_strictly_against_the_kubernetes_schema(auth_mode, phase) -> None:
    s = load_settings(None, {"AGENTJOBS_VAULT__AUTH_MODE": auth_mode, "AGENTJOBS_RUNTIME__KIND": "kubernetes"})
    _validate(jobspec.build_job(_plan(SAMPLE, s, phase), s))


def test_pod_runs_restricted_without_a_default_service_account_token() -> None:
    s = Settings()
    pod = jobspec.build_job(_plan(SAMPLE, s), s)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    sc = container["securityContext"]

    assert pod["automountServiceAccountToken"] is False
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert not any("projected" in v for v in pod["volumes"])  # per-investigation mode: no SA token at all
    assert {m["mountPath"] for m in container["volumeMounts"]} == {jobspec.INPUT_DIR, jobspec.SCRATCH_DIR}


def test_kubernetes_auth_gets_a_projected_audience_bound_short_lived_token() -> None:
    s = load_settings(None, {"AGENTJOBS_VAULT__AUTH_MODE": "kubernetes", "AGENTJOBS_RUNTIME__KIND": "kubernetes"})
    pod = jobspec.build_job(_plan(SAMPLE, s), s)["spec"]["template"]["spec"]
    (projected,) = [v["projected"] for v in pod["volumes"] if "projected" in v]
    token = projected["sources"][0]["serviceAccountToken"]
    assert token == {"audience": "vault", "expirationSeconds": 600, "path": "token"}
    assert pod["automountServiceAccountToken"] is False


def test_phase_picks_the_service_account_and_class_picks_limits_and_deadline() -> None:
    s = Settings()
    job = jobspec.build_job(_plan(SAMPLE, s, Phase.LIMITED_REMEDIATION), s)
    pod = job["spec"]["template"]["spec"]
    database = s.classes["database"]  # the sample's domain label is "database"

    assert pod["serviceAccountName"] == "agentjobs-agent-limited-remediation"
    assert job["spec"]["activeDeadlineSeconds"] == database.deadline
    assert job["spec"]["backoffLimit"] == database.backoff_limit
    assert job["spec"]["ttlSecondsAfterFinished"] == database.ttl_after_finished
    assert pod["containers"][0]["resources"]["limits"] == {"cpu": database.cpu, "memory": database.memory}
    assert job["metadata"]["labels"][jobspec.LABEL_PHASE] == "limited-remediation"
    assert job["metadata"]["labels"][jobspec.LABEL_CLASS] == "database"


def test_identity_and_trace_context_travel_on_labels_and_annotations() -> None:
    s = Settings()
    ident = identify(SAMPLE)
    job = jobspec.build_job(_plan(SAMPLE, s), s)
    meta = job["metadata"]

    assert meta["name"] == ident.job_name
    assert meta["labels"][jobspec.LABEL_INVESTIGATION] == ident.investigation_id
    assert meta["labels"][jobspec.LABEL_MANAGED_BY] == "agentjobs"
    assert meta["annotations"][jobspec.ANN_GROUP_KEY] == SAMPLE.group_key
    assert meta["annotations"][jobspec.ANN_TRACEPARENT].startswith(f"00-{ident.investigation_id[:32]}-")
    assert job["spec"]["template"]["metadata"]["labels"] == meta["labels"]


def test_same_plan_same_manifest() -> None:
    s = Settings()
    assert jobspec.build_job(_plan(SAMPLE, s), s) == jobspec.build_job(_plan(SAMPLE, s), s)


@pytest.mark.parametrize(
    ("labels", "env", "expected"),
    [
        ({"domain": "database"}, {}, "database"),
        ({"domain": "payments"}, {}, "default"),
        ({"domain": "payments", "agentjobs_class": "kubernetes"}, {}, "kubernetes"),
        (
            {"domain": "payments", "severity": "critical"},
            {"AGENTJOBS_ADMISSION__RULES": '[{"use": "database", "severities": ["critical"], "domains": ["payments"]}]'},
            "database",
        ),
        (
            {"domain": "payments", "severity": "warning"},
            {"AGENTJOBS_ADMISSION__RULES": '[{"use": "database", "severities": ["critical"]}]'},
            "default",
        ),
    ],
)
def test_class_is_chosen_by_rules_then_label_then_domain(labels, env, expected) -> None:
    s = load_settings(None, env)
    event = IncidentEvent(
        event_id="e",
        source="am",
        group_key="g",
        status="firing",
        alerts=(Alert(status="firing", labels={"alertname": "X", **labels}, starts_at=datetime(2026, 1, 1, tzinfo=UTC)),),
    )
    assert jobspec.choose_class(event, s) == expected


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(alertname=st.text(max_size=120), domain=st.text(max_size=120), severity=st.text(max_size=20))
def test_untrusted_label_text_never_produces_an_invalid_manifest(alertname, domain, severity) -> None:
    s = Settings()
    event = IncidentEvent(
        event_id="e",
        source="am",
        group_key="g",
        status="firing",
        alerts=(
            Alert(
                status="firing",
                labels={"alertname": alertname, "domain": domain, "severity": severity},
                starts_at=datetime(2026, 1, 1, tzinfo=UTC),
            ),
        ),
    )
    job = jobspec.build_job(_plan(event, s), s)
    _validate(job)
    assert all(is_label_value(v) for v in job["metadata"]["labels"].values())


def _env_of(job: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_the_job_learns_where_its_tools_and_model_are_but_never_a_secret() -> None:
    s = load_settings(None, {"AGENTJOBS_TOOLS__PROMETHEUS_URL": "http://prometheus.monitoring:9090",
                             "AGENTJOBS_TOOLS__LOKI_URL": "http://loki.monitoring:3100",
                             "AGENTJOBS_LLM__BASE_URL": "http://vllm.ai:8000/v1", "AGENTJOBS_LLM__MODEL": "qwen",
                             "AGENTJOBS_LLM__API_KEY": "sk-never-in-a-job"})
    job = jobspec.build_job(_plan(SAMPLE, s), s)
    env = _env_of(job)
    assert env["AGENTJOBS_TOOLS__PROMETHEUS_URL"] == "http://prometheus.monitoring:9090"
    assert env["AGENTJOBS_TOOLS__LOKI_URL"] == "http://loki.monitoring:3100"
    assert (env["AGENTJOBS_LLM__BASE_URL"], env["AGENTJOBS_LLM__MODEL"]) == ("http://vllm.ai:8000/v1", "qwen")
    assert env["AGENTJOBS_DEADLINE_SECONDS"] == str(s.classes[_plan(SAMPLE, s).class_name].deadline)
    assert "sk-never-in-a-job" not in str(job)  # the key comes from Vault KV inside the Job
    assert "AGENTJOBS_TOOLS__KUBERNETES" not in env  # not configured: not offered


@pytest.mark.parametrize(("setting", "told"), [(None, "true"), ("false", "false")])
def test_the_queue_tool_is_on_unless_switched_off_and_the_agent_reads_the_same_switch(setting, told) -> None:
    from agent import config

    s = load_settings(None, {} if setting is None else {"AGENTJOBS_TOOLS__RABBITMQ": setting})
    env = _env_of(jobspec.build_job(_plan(SAMPLE, s), s))

    assert env["AGENTJOBS_TOOLS__RABBITMQ"] == told
    assert config._tools(env, None).rabbitmq is (told == "true")


def test_unconfigured_tools_are_not_offered() -> None:
    s = load_settings(None, {})
    env = _env_of(jobspec.build_job(_plan(SAMPLE, s), s))
    assert not [k for k in env if k.endswith(("_URL", "__KUBERNETES")) and k != "AGENTJOBS_AMQP__URL"]


@pytest.mark.parametrize("phase", list(Phase))
def test_the_in_cluster_kubernetes_tool_gets_the_phase_accounts_short_lived_api_token(phase) -> None:
    s = load_settings(None, {"AGENTJOBS_RUNTIME__KIND": "kubernetes", "AGENTJOBS_TOOLS__KUBERNETES": "true"})
    pod = jobspec.build_job(_plan(SAMPLE, s, phase), s)["spec"]["template"]["spec"]
    (projected,) = [v["projected"] for v in pod["volumes"] if "projected" in v]
    token, ca, namespace = projected["sources"]
    # the API server's audience (none given), short-lived, beside the cluster CA and the namespace:
    # exactly what in-cluster config reads, under the phase's own ServiceAccount and RBAC
    assert token == {"serviceAccountToken": {"expirationSeconds": 600, "path": "token"}}
    assert ca["configMap"]["name"] == "kube-root-ca.crt"
    assert namespace["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"] == "metadata.namespace"
    (container,) = pod["containers"]
    assert {"name": "kube-api-access", "mountPath": jobspec.API_TOKEN_DIR, "readOnly": True} in \
        container["volumeMounts"]
    assert pod["serviceAccountName"] == f"agentjobs-agent-{phase.value}"
    assert pod["automountServiceAccountToken"] is False  # nothing else is mounted
    _validate(jobspec.build_job(_plan(SAMPLE, s, phase), s))


def test_a_kubeconfig_for_the_tool_means_no_api_token_in_the_job() -> None:
    s = load_settings(None, {"AGENTJOBS_TOOLS__KUBERNETES": "true", "AGENTJOBS_TOOLS__KUBECONFIG": "/etc/kube.yaml"})
    pod = jobspec.build_job(_plan(SAMPLE, s), s)["spec"]["template"]["spec"]
    assert not any("projected" in v for v in pod["volumes"])
