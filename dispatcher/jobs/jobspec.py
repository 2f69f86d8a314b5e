"""Job manifests: one pure function from an admitted investigation to a batch/v1 Job.

Everything a Job may do is decided here, outside the model: the phase picks
the ServiceAccount (RBAC) and the grants the agent will ask Vault for; the
class picks resources and deadline. Pods run under the ``restricted`` Pod
Security profile, get no ServiceAccount token unless kubernetes auth needs
one (then a projected, audience-bound, short-lived one) or the in-cluster
Kubernetes tool does (then the phase ServiceAccount's short-lived API token,
so the phase's RBAC is what the agent may do in the cluster), and receive their
input (the incident, the wrapped Vault token) as files from a Secret that the
Job owns, so it is deleted with the Job — or, when the input holds nothing secret
(``inline_input``), from an annotation of the Job's own pod template.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec

from schemas import IncidentEvent, Phase
from schemas.identity import Identity
from schemas.k8snames import label_value

from dispatcher.plumbing.settings import InvestigationClass, Settings

GROUP = "agentjobs.dev"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INVESTIGATION = f"{GROUP}/investigation-id"
LABEL_INCIDENT = f"{GROUP}/incident-key"
LABEL_DOMAIN = f"{GROUP}/domain"
LABEL_PHASE = f"{GROUP}/phase"
LABEL_CLASS = f"{GROUP}/class"
LABEL_SEVERITY = f"{GROUP}/severity"
LABEL_ALERTNAME = f"{GROUP}/alertname"
ANN_GROUP_KEY = f"{GROUP}/group-key"
ANN_SOURCE = f"{GROUP}/source"
ANN_EVENT_ID = f"{GROUP}/event-id"
ANN_STARTED_AT = f"{GROUP}/started-at"
ANN_TRACEPARENT = f"{GROUP}/traceparent"
# Accessor of the Job's Vault token (never the token): revoked when the Job ends, also after
# a dispatcher restart, because it travels with the Job.
ANN_TOKEN_ACCESSOR = f"{GROUP}/token-accessor"
ANN_LOGIN_ACCESSOR = f"{GROUP}/login-token-accessor"  # kubernetes auth: reported by the agent
TOKEN_ANNOTATIONS = (ANN_TOKEN_ACCESSOR, ANN_LOGIN_ACCESSOR)
ANN_CANCEL = f"{GROUP}/cancel-reason"  # set before a cancel-delete, so the ending reads "cancelled"
ANN_CLAIM = f"{GROUP}/reporter"  # "<replica>@<unix seconds>": who is reporting the ending
ANN_REPORTED = f"{GROUP}/reported"  # the terminal state, once reported
# Keeps a finished or deleted Job visible until its ending is reported and its credentials
# revoked: no terminal state is missed, whoever deletes the Job and whenever.
FINALIZER = f"{GROUP}/report"
MANAGED_BY = "agentjobs"
# Selects every Job/Pod agentjobs manages (watch, list, quota accounting).
SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY}"

CONTAINER = "agent"
INPUT_VOLUME = "input"
INPUT_DIR = "/var/run/agentjobs/input"  # incident.json, wrapped-token
SCRATCH_DIR = "/tmp"  # the only writable path (readOnlyRootFilesystem)
TOKEN_DIR = "/var/run/secrets/agentjobs/serviceaccount"  # projected token, kubernetes auth only
# Where in-cluster clients look for the API token (tools.kubernetes without a kubeconfig): the
# phase ServiceAccount's RBAC is what the agent may do in the cluster.
API_TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
INCIDENT_FILE = "incident.json"
WRAPPED_TOKEN_FILE = "wrapped-token"
APPROVAL_FILE = "approval.json"  # a follow-up Job's approved action (schemas.actions.ApprovedAction)
VAULT_CA_FILE = "vault-ca.pem"  # vault.ca_cert, when Vault's certificate comes from a private CA
NONROOT_UID = 65532  # distroless "nonroot"


class ActionGrant(msgspec.Struct, frozen=True, kw_only=True):
    """The blast-radius limits a Job is handed (computed by ``dispatcher.intake.actions_log``).

    The default grants nothing: a Job whose limits nobody computed may not act.
    """

    allowance: int = 0  # destructive executions left for this Job of its scope's hourly cap
    max_per_investigation: int = 0
    namespaces: tuple[str, ...] = ()  # the scope's allow-lists
    databases: tuple[str, ...] = ()
    exhausted_targets: tuple[str, ...] = ()  # per-target hourly cap reached


class JobPlan(msgspec.Struct, frozen=True, kw_only=True):
    """What admission decided for one investigation; input to ``build_job``."""

    identity: Identity
    event: IncidentEvent
    class_name: str
    phase: Phase
    domain: str = ""
    token_accessor: str = ""  # per-investigation Vault identity, if any
    traceparent: str = ""  # the trace context the incident arrived with, if any
    actions: ActionGrant = ActionGrant()  # what the Job may still execute, and where


def domain_of(event: IncidentEvent, settings: Settings) -> str:
    """The incident's domain label (routing key part, trust scope)."""
    return event.label(settings.admission.domain_label)


def choose_class(event: IncidentEvent, settings: Settings) -> str:
    """First matching rule, else the class label, else the domain if it names a class, else default."""
    severity = event.severity.value
    domain = domain_of(event, settings)
    for rule in settings.admission.rules:
        if rule.severities and severity not in rule.severities:
            continue
        if rule.domains and domain not in rule.domains:
            continue
        if any(event.label(k) != v for k, v in rule.labels.items()):
            continue
        return rule.use
    named = event.label(settings.admission.class_label)
    if named in settings.classes:
        return named
    if domain in settings.classes:
        return domain
    return "default"


def secret_name(job_name: str) -> str:
    """Name of the Secret holding a Job's input files (owned by the Job)."""
    return f"{job_name}-input"


# An input with nothing secret in it — only the incident (auth modes none and kubernetes: no
# wrapped token, no private CA, no approval) — rides in the Job itself: a pod-template annotation
# mounted as the same file through a downwardAPI volume, so no per-incident Secret is created.
# Bigger incidents keep the Secret (annotations are capped at 256 KiB per object in all).
ANN_INPUT_INCIDENT = f"{GROUP}/input-incident"
INLINE_INPUT_MAX = 64 * 1024  # bytes of incident JSON


def inline_input(job: dict[str, Any], files: dict[str, bytes]) -> tuple[dict[str, Any], dict[str, bytes]]:
    """``(job, files)`` with the incident moved into the Job when nothing secret is to be carried
    (pure: ``job`` is not changed); otherwise both as given."""
    body = files.get(INCIDENT_FILE)
    if set(files) != {INCIDENT_FILE} or body is None or len(body) > INLINE_INPUT_MAX:
        return job, files
    template = job["spec"]["template"]
    volume = {"name": INPUT_VOLUME, "downwardAPI": {"defaultMode": 0o400, "items": [{
        "path": INCIDENT_FILE,
        "fieldRef": {"apiVersion": "v1", "fieldPath": f"metadata.annotations['{ANN_INPUT_INCIDENT}']"}}]}}
    spec = {**template["spec"], "volumes": [volume if v.get("name") == INPUT_VOLUME else v
                                            for v in template["spec"]["volumes"]]}
    meta = {**template["metadata"], "annotations": {**template["metadata"].get("annotations", {}),
                                                    ANN_INPUT_INCIDENT: body.decode()}}
    return {**job, "spec": {**job["spec"], "template": {**template, "metadata": meta, "spec": spec}}}, {}


def reads_input_secret(job: Mapping[str, Any]) -> bool:
    """True if the Job's input volume is its Secret (a Job created with its input in a Secret)."""
    volumes = job.get("spec", {}).get("template", {}).get("spec", {}).get("volumes") or []
    return any(v.get("name") == INPUT_VOLUME and "secret" in v for v in volumes)


_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")


def traceparent(investigation_id: str, incoming: str = "") -> str:
    """The Job's W3C trace context (pure): the incoming incident's trace when it came with a
    valid one (an AMQP ``traceparent`` header), else one derived from the investigation. The
    parent span id is derived from the investigation either way, so every replica agrees."""
    match = _TRACEPARENT.match(incoming.strip().lower())
    trace_id = match.group(1) if match and match.group(1) != "0" * 32 else investigation_id[:32]
    return f"00-{trace_id}-{investigation_id[-16:]}-01"


def service_account(phase: Phase, settings: Settings) -> str:
    """The ServiceAccount (and so the RBAC) of a phase's Jobs."""
    return f"{settings.k8s.service_account_prefix}{phase.value}"


def _labels(plan: JobPlan) -> dict[str, str]:
    return {
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_NAME: "agentjobs-agent",
        LABEL_INVESTIGATION: plan.identity.investigation_id,
        LABEL_INCIDENT: plan.identity.incident_key,
        LABEL_DOMAIN: label_value(plan.domain),
        LABEL_PHASE: plan.phase.value,
        LABEL_CLASS: label_value(plan.class_name),
        LABEL_SEVERITY: plan.event.severity.value,
        LABEL_ALERTNAME: label_value(plan.event.alertname),
    }


def _annotations(plan: JobPlan) -> dict[str, str]:
    return {
        ANN_GROUP_KEY: plan.event.group_key,
        ANN_SOURCE: plan.event.source,
        ANN_EVENT_ID: plan.event.event_id,
        ANN_STARTED_AT: plan.identity.started_at.isoformat(),
        ANN_TRACEPARENT: traceparent(plan.identity.investigation_id, plan.traceparent),
        **({ANN_TOKEN_ACCESSOR: plan.token_accessor} if plan.token_accessor else {}),
    }


# user=… / password=… pairs of a libpq key=value DSN (values may be single-quoted).
_KV_CREDENTIAL = re.compile(r"\b(?:user|password)\s*=\s*(?:'(?:[^'\\]|\\.)*'|\S+)")


def without_credentials(url: str) -> str:
    """``url`` (or a libpq key=value DSN) without user and password (pure).

    Agents get broker and database addresses only; their credentials come from Vault.
    """
    if "://" not in url:
        return " ".join(_KV_CREDENTIAL.sub(" ", url).split())
    parts = urlsplit(url)
    query = "&".join(
        pair for pair in parts.query.split("&") if pair and pair.partition("=")[0] not in ("user", "password")
    )
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], query=query))


def _settings_env(settings: Settings) -> dict[str, str]:
    """The part of every Job's environment that only the settings decide (cached per settings)."""
    for cached, env in _SETTINGS_ENV:
        if cached is settings:
            return env
    env = {
        "AGENTJOBS_INPUT_DIR": INPUT_DIR,
        "AGENTJOBS_VAULT__ADDR": settings.vault.addr,
        "AGENTJOBS_VAULT__AUTH_MODE": settings.vault.auth_mode,
        # Addresses only: the agent inserts its own dynamic (Vault-issued) users.
        "AGENTJOBS_AMQP__URL": without_credentials(settings.amqp.url),
        "AGENTJOBS_POSTGRES__DSN": without_credentials(settings.postgres.dsn),
        **postgres_targets_env(settings),
        "HOME": SCRATCH_DIR,
        "TMPDIR": SCRATCH_DIR,
        **_tool_env(settings),
    }
    _SETTINGS_ENV.appendleft((settings, env))  # frozen settings: the same object, the same env
    return env


_SETTINGS_ENV: deque[tuple[Settings, dict[str, str]]] = deque(maxlen=8)


def _env(plan: JobPlan, settings: Settings) -> list[dict[str, Any]]:
    env = {
        "AGENTJOBS_INVESTIGATION_ID": plan.identity.investigation_id,
        "AGENTJOBS_JOB_NAME": plan.identity.job_name,
        "AGENTJOBS_PHASE": plan.phase.value,
        "AGENTJOBS_CLASS": plan.class_name,
        **_settings_env(settings),
        "TRACEPARENT": traceparent(plan.identity.investigation_id, plan.traceparent),
        # the agent's own time budget: it concludes (and publishes) before the Job's deadline
        "AGENTJOBS_DEADLINE_SECONDS": str(settings.classes[plan.class_name].deadline),
        **_action_env(plan.actions),
    }
    items: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in env.items()]
    items.append({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
    if settings.vault.auth_mode == "kubernetes":
        items.append({"name": "AGENTJOBS_SA_TOKEN_FILE", "value": f"{TOKEN_DIR}/token"})
    return items


def postgres_targets_env(settings: Settings) -> dict[str, str]:
    """The named PostgreSQL targets and what selects the default one (agent/targets.py), addresses only."""
    pg = settings.postgres
    env = {}
    if pg.targets:
        env["AGENTJOBS_POSTGRES__TARGETS"] = msgspec.json.encode(
            {name: {"dsn": without_credentials(t.dsn), "match": t.match} for name, t in pg.targets.items()}).decode()
    if pg.match:
        env["AGENTJOBS_POSTGRES__MATCH"] = msgspec.json.encode(pg.match).decode()
    return env


def _action_env(grant: ActionGrant) -> dict[str, str]:
    """The Job's blast-radius limits (agent/config.py reads them; what is not given allows nothing)."""
    names = msgspec.json.encode
    return {
        "AGENTJOBS_ACTIONS__ALLOWANCE": str(grant.allowance),
        "AGENTJOBS_ACTIONS__MAX_PER_INVESTIGATION": str(grant.max_per_investigation),
        "AGENTJOBS_ACTIONS__NAMESPACES": names(list(grant.namespaces)).decode(),
        "AGENTJOBS_ACTIONS__DATABASES": names(list(grant.databases)).decode(),
        "AGENTJOBS_ACTIONS__EXHAUSTED_TARGETS": names(list(grant.exhausted_targets)).decode(),
    }


def _tool_env(settings: Settings) -> dict[str, str]:
    """Where the agent's tools and reasoner reach their data sources (only what is configured)."""
    tools, llm = settings.tools, settings.llm
    env = {
        "AGENTJOBS_TOOLS__TIMEOUT": f"{tools.timeout:g}",
        "AGENTJOBS_TOOLS__MAX_ROWS": str(tools.max_rows),
        "AGENTJOBS_TOOLS__MAX_TOOL_CALLS": str(tools.max_tool_calls),
        "AGENTJOBS_TOOLS__RABBITMQ": "true" if tools.rabbitmq else "false",
    }
    if tools.prometheus_url:
        env["AGENTJOBS_TOOLS__PROMETHEUS_URL"] = tools.prometheus_url
    if tools.loki_url:
        env["AGENTJOBS_TOOLS__LOKI_URL"] = tools.loki_url
    if tools.rabbitmq and tools.rabbitmq_management_url:
        env["AGENTJOBS_TOOLS__RABBITMQ_MANAGEMENT_URL"] = tools.rabbitmq_management_url
    if tools.http_targets:
        env["AGENTJOBS_TOOLS__HTTP_TARGETS"] = msgspec.json.encode(list(tools.http_targets)).decode()
    if tools.kubernetes:
        env["AGENTJOBS_TOOLS__KUBERNETES"] = "true"
        if tools.kubeconfig:  # absolute: the agent runs in its own working directory
            env["AGENTJOBS_TOOLS__KUBECONFIG"] = str(Path(tools.kubeconfig).expanduser().resolve())
    if llm.base_url:
        env |= {
            "AGENTJOBS_LLM__BASE_URL": llm.base_url,
            "AGENTJOBS_LLM__MODEL": llm.model,
            "AGENTJOBS_LLM__MAX_STEPS": str(llm.max_steps),
            "AGENTJOBS_LLM__MAX_TOKENS": str(llm.max_tokens),
            "AGENTJOBS_LLM__WALL_SECONDS": f"{llm.wall_seconds:g}",
            "AGENTJOBS_LLM__MODE": llm.mode,
            "AGENTJOBS_LLM__STREAM": "true" if llm.stream else "false",
            "AGENTJOBS_LLM__PRICES": msgspec.json.encode(llm.prices).decode(),
        }
    return env


def _resources(cls: InvestigationClass) -> dict[str, Any]:
    # Requests equal limits: an investigation's cost is predictable and it is never
    # the first to be evicted under node pressure (Guaranteed QoS).
    quantities = {"cpu": cls.cpu, "memory": cls.memory}
    return {"requests": dict(quantities), "limits": dict(quantities)}


def _volumes(plan: JobPlan, settings: Settings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {
            "name": INPUT_VOLUME,
            "secret": {"secretName": secret_name(plan.identity.job_name), "defaultMode": 0o400},
        },
        {"name": "scratch", "emptyDir": {"sizeLimit": "256Mi"}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": INPUT_VOLUME, "mountPath": INPUT_DIR, "readOnly": True},
        {"name": "scratch", "mountPath": SCRATCH_DIR},
    ]
    if settings.vault.auth_mode == "kubernetes":
        volumes.append(
            {
                "name": "sa-token",
                "projected": {
                    "defaultMode": 0o400,
                    "sources": [
                        {
                            "serviceAccountToken": {
                                "audience": settings.k8s.token_audience,
                                "expirationSeconds": settings.k8s.token_expiration,
                                "path": "token",
                            }
                        }
                    ],
                },
            }
        )
        mounts.append({"name": "sa-token", "mountPath": TOKEN_DIR, "readOnly": True})
    if settings.tools.kubernetes and not settings.tools.kubeconfig:
        # What automountServiceAccountToken would mount, but only here, short-lived: the
        # API-audience token of the phase's ServiceAccount, the cluster CA and the namespace.
        volumes.append({"name": "kube-api-access", "projected": {"defaultMode": 0o444, "sources": [
            {"serviceAccountToken": {"expirationSeconds": settings.k8s.token_expiration, "path": "token"}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace",
                                        "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
        ]}})
        mounts.append({"name": "kube-api-access", "mountPath": API_TOKEN_DIR, "readOnly": True})
    return volumes, mounts


def build_job(plan: JobPlan, settings: Settings) -> dict[str, Any]:
    """The batch/v1 Job manifest for ``plan`` (pure; same plan → same manifest)."""
    cls = settings.classes[plan.class_name]
    labels = _labels(plan)
    annotations = _annotations(plan)
    volumes, mounts = _volumes(plan, settings)
    container = {
        "name": CONTAINER,
        "image": cls.image or settings.k8s.image,
        "imagePullPolicy": "IfNotPresent",
        "command": list(cls.command or settings.k8s.agent_command),
        "env": _env(plan, settings),
        "resources": _resources(cls),
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": plan.identity.job_name,
            "namespace": settings.k8s.namespace,
            "labels": labels,
            "annotations": annotations,
            "finalizers": [FINALIZER],
        },
        "spec": {
            "activeDeadlineSeconds": cls.deadline,
            "backoffLimit": cls.backoff_limit,
            "ttlSecondsAfterFinished": cls.ttl_after_finished,
            "template": {
                "metadata": {"labels": dict(labels), "annotations": dict(annotations)},
                "spec": {
                    "serviceAccountName": service_account(plan.phase, settings),
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "restartPolicy": "Never",
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": NONROOT_UID,
                        "runAsGroup": NONROOT_UID,
                        "fsGroup": NONROOT_UID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }
