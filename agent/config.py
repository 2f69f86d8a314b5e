"""What the Job tells the agent, read once from the environment.

The dispatcher's Job manifest (``dispatcher/jobs/jobspec.py``) is the other side of
this contract: ``AGENTJOBS_*`` variables name the investigation, its phase and
where its input files, Vault, RabbitMQ and PostgreSQL are. Broker and database
addresses arrive *without* credentials — the agent inserts the dynamic users
Vault issues to it. When ``AGENTJOBS_MOUNT_ROOT`` is set (local runtime, the
emulator's kubelet) absolute mount paths are found under it. Nothing else in
``agent/`` reads the environment.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal, cast
from urllib.parse import urlsplit

from schemas import IncidentEvent, Phase

from .remediation.limits import ActionLimits
from .targets import DEFAULT, Choice, PostgresTarget, choose, TargetsError, parse_match, parse_targets

AuthMode = Literal["per-investigation", "kubernetes", "none"]
AUTH_MODES: tuple[AuthMode, ...] = ("per-investigation", "kubernetes", "none")
LOG_LEVELS = ("debug", "info", "warning", "error")

INCIDENT_FILE = "incident.json"  # == dispatcher.jobs.jobspec.INCIDENT_FILE
APPROVAL_FILE = "approval.json"  # == dispatcher.jobs.jobspec.APPROVAL_FILE: only in a follow-up Job
WRAPPED_TOKEN_FILE = "wrapped-token"  # == dispatcher.jobs.jobspec.WRAPPED_TOKEN_FILE
VAULT_CA_FILE = "vault-ca.pem"  # == dispatcher.jobs.jobspec.VAULT_CA_FILE
ACTION_LEDGER_FILE = "agentjobs-actions.jsonl"  # in the work dir: idempotency keys of actions taken


class ConfigError(Exception):
    """The Job's environment is incomplete or invalid; the message names the variable."""


@dataclass(frozen=True, kw_only=True)
class ToolEnv:
    """Which data sources the Job may consult (addresses only)."""

    prometheus_url: str = ""
    loki_url: str = ""
    kubernetes: bool = False  # read-only API tool with the pod's ServiceAccount (or ``kubeconfig``)
    kubeconfig: Path | None = None
    rabbitmq: bool = True  # queue tool on the Job's broker, as the agent's own broker user (when it has one)
    timeout: float = 5.0  # seconds per call
    max_rows: int = 200
    max_tool_calls: int = 40
    # URL prefixes the http probe tool may GET (AGENTJOBS_TOOLS__HTTP_TARGETS, a JSON list); empty: no probe
    http_targets: tuple[str, ...] = ()
    # RabbitMQ management API (AGENTJOBS_TOOLS__RABBITMQ_MANAGEMENT_URL), e.g. http://rabbitmq:15672; empty:
    # the rabbitmq tool offers only its AMQP operation
    rabbitmq_management_url: str = ""


@dataclass(frozen=True, kw_only=True)
class LlmEnv:
    """An OpenAI-compatible endpoint for the llm reasoner (its key comes from Vault KV)."""

    base_url: str
    model: str
    max_steps: int = 8
    max_tokens: int = 40000
    wall_seconds: float = 90.0
    mode: Literal["tools", "hybrid"] = "tools"  # AGENTJOBS_LLM__MODE (agent.reasoning.llm.LlmConfig.mode)
    stream: bool = False  # AGENTJOBS_LLM__STREAM
    prices: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class AgentEnv:
    """Everything the agent takes from its environment (no secrets in here)."""

    investigation_id: str
    job_name: str
    phase: Phase
    class_name: str
    input_dir: Path  # already re-rooted under the mount root
    vault_addr: str
    auth_mode: AuthMode
    sa_token_file: Path | None  # projected ServiceAccount token (kubernetes mode only)
    amqp_url: str  # broker URL incl. vhost, without credentials (except in auth mode none)
    postgres_dsn: str  # diagnostics target without credentials; empty: not configured
    # Named PostgreSQL targets (AGENTJOBS_POSTGRES__TARGETS) and the labels selecting the default one
    # (AGENTJOBS_POSTGRES__MATCH): agent.targets picks one by the incident's labels.
    postgres_targets: tuple[PostgresTarget, ...] = ()
    postgres_match: Mapping[str, str] = field(default_factory=dict)
    # The target this investigation queries (set once the incident is read; DEFAULT: postgres_dsn's),
    # whose Vault role (schemas.vault_paths.database_role_for) its database user comes from.
    postgres_target: str = DEFAULT
    mount_root: Path | None = None
    domain_label: str = "domain"  # incident label naming the domain (routing key part)
    vault_timeout: float = 10.0  # seconds per Vault request
    publish_timeout: float = 10.0  # seconds to wait for the broker's confirm
    query_timeout: float = 5.0  # seconds: PostgreSQL statement_timeout and connect timeout
    log_level: str = "info"
    deadline_seconds: float = 600.0  # the Job's activeDeadlineSeconds: conclude well before it
    tools: ToolEnv = field(default_factory=ToolEnv)
    llm: LlmEnv | None = None  # None: the rules reasoner
    traceparent: str = ""  # W3C trace context of the investigation (the Job's TRACEPARENT)
    # The Job's writable working directory (AGENTJOBS_WORK_DIR, else TMPDIR: the pod's scratch
    # emptyDir): where the action ledger lives, so a restarted agent process does not act twice.
    work_dir: Path | None = None
    # Blast-radius limits the dispatcher computed for this Job (AGENTJOBS_ACTIONS__*); what it did not
    # give allows nothing (no allowance, no allow-list): agent.remediation.limits.
    actions: ActionLimits = field(default_factory=ActionLimits)

    def postgres_choice(self, incident: IncidentEvent) -> Choice:
        """The PostgreSQL target ``incident``'s labels select (agent.targets.choose)."""
        default = PostgresTarget(name=DEFAULT, dsn=self.postgres_dsn, match=dict(self.postgres_match))
        return choose(incident, default=default, targets=self.postgres_targets)

    @property
    def action_ledger_file(self) -> Path | None:
        return self.work_dir / ACTION_LEDGER_FILE if self.work_dir is not None else None

    @property
    def incident_file(self) -> Path:
        return self.input_dir / INCIDENT_FILE

    @property
    def approval_file(self) -> Path:
        return self.input_dir / APPROVAL_FILE

    @property
    def wrapped_token_file(self) -> Path:
        return self.input_dir / WRAPPED_TOKEN_FILE

    @property
    def vault_verify(self) -> str | bool:
        """How to check Vault's certificate: the private CA the dispatcher handed over, else the system's."""
        ca = self.input_dir / VAULT_CA_FILE
        return str(ca) if ca.is_file() else True


def remap(path: str, mount_root: Path | None) -> Path:
    """Where an absolute in-container ``path`` is on this filesystem (pure)."""
    if mount_root is None or not path.startswith("/"):
        return Path(path)
    return mount_root.joinpath(*PurePosixPath(path).parts[1:])


def _required(environ: Mapping[str, str], name: str) -> str:
    value = environ.get(name, "").strip()
    if not value:
        raise ConfigError(f"{name} is not set")
    return value


def _seconds(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise ConfigError(f"{name} must be positive")
    return value


def _count(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) <= 0:
        raise ConfigError(f"{name}={raw!r} is not a positive whole number")
    return int(raw)


def _flag(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} is not true or false")


def _tools(environ: Mapping[str, str], mount_root: Path | None) -> ToolEnv:
    kubeconfig = environ.get("AGENTJOBS_TOOLS__KUBECONFIG", "").strip()
    return ToolEnv(
        prometheus_url=environ.get("AGENTJOBS_TOOLS__PROMETHEUS_URL", "").strip(),
        loki_url=environ.get("AGENTJOBS_TOOLS__LOKI_URL", "").strip(),
        kubernetes=environ.get("AGENTJOBS_TOOLS__KUBERNETES", "").strip().lower() in ("1", "true", "yes"),
        # a path on the node running the agent (local runtime, tests), not a file mounted into a pod
        kubeconfig=Path(kubeconfig) if kubeconfig else None,
        rabbitmq=_flag(environ, "AGENTJOBS_TOOLS__RABBITMQ", True),
        timeout=_seconds(environ, "AGENTJOBS_TOOLS__TIMEOUT", 5.0),
        max_rows=_count(environ, "AGENTJOBS_TOOLS__MAX_ROWS", 200),
        max_tool_calls=_count(environ, "AGENTJOBS_TOOLS__MAX_TOOL_CALLS", 40),
        http_targets=_url_prefixes(environ, "AGENTJOBS_TOOLS__HTTP_TARGETS"),
        rabbitmq_management_url=environ.get("AGENTJOBS_TOOLS__RABBITMQ_MANAGEMENT_URL", "").strip(),
    )


def _url_prefixes(environ: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A JSON list of absolute http(s) URL prefixes, in order; empty when unset (pure)."""
    raw = environ.get(name, "").strip() or "[]"
    try:
        prefixes = json.loads(raw)
    except ValueError:
        prefixes = None
    if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
        raise ConfigError(f"{name}={raw[:80]!r} is not a JSON list of URL prefixes")
    for prefix in prefixes:
        try:
            url = urlsplit(prefix)
        except ValueError:
            url = urlsplit("")
        if url.scheme not in ("http", "https") or not url.hostname or "@" in url.netloc:
            raise ConfigError(f"{name}: {prefix[:80]!r} is not an http(s) URL prefix with a host and no credentials")
    return tuple(prefixes)


def _llm_mode(environ: Mapping[str, str]) -> Literal["tools", "hybrid"]:
    raw = environ.get("AGENTJOBS_LLM__MODE", "").strip().lower() or "tools"
    if raw not in ("tools", "hybrid"):
        raise ConfigError(f"AGENTJOBS_LLM__MODE={raw[:40]!r} is not tools or hybrid")
    return cast(Literal["tools", "hybrid"], raw)


def _llm(environ: Mapping[str, str]) -> LlmEnv | None:
    base_url = environ.get("AGENTJOBS_LLM__BASE_URL", "").strip()
    if not base_url:
        return None
    raw_prices = environ.get("AGENTJOBS_LLM__PRICES", "").strip() or "{}"
    try:
        prices = json.loads(raw_prices)
        assert isinstance(prices, dict)
    except (ValueError, AssertionError):
        raise ConfigError(f"AGENTJOBS_LLM__PRICES={raw_prices[:80]!r} is not a JSON object") from None
    return LlmEnv(
        base_url=base_url,
        model=_required(environ, "AGENTJOBS_LLM__MODEL"),
        max_steps=_count(environ, "AGENTJOBS_LLM__MAX_STEPS", 8),
        max_tokens=_count(environ, "AGENTJOBS_LLM__MAX_TOKENS", 40000),
        wall_seconds=_seconds(environ, "AGENTJOBS_LLM__WALL_SECONDS", 90.0),
        mode=_llm_mode(environ),
        stream=_flag(environ, "AGENTJOBS_LLM__STREAM", False),
        prices=prices,
    )


def _whole(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit():
        raise ConfigError(f"{name}={raw!r} is not a whole number (0 or more)")
    return int(raw)


def _names(environ: Mapping[str, str], name: str) -> frozenset[str] | None:
    """A JSON list of strings; None when the variable is not set at all (pure)."""
    if name not in environ:
        return None
    raw = environ[name].strip() or "[]"
    try:
        names = json.loads(raw)
    except ValueError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{name}={raw[:80]!r} is not a JSON list of strings")
    return frozenset(names)


def _actions(environ: Mapping[str, str]) -> ActionLimits:
    """The limits the dispatcher gave; absent allowance or allow-lists allow nothing (fail closed)."""
    return ActionLimits(
        max_per_investigation=_whole(environ, "AGENTJOBS_ACTIONS__MAX_PER_INVESTIGATION", 1),
        allowance=_whole(environ, "AGENTJOBS_ACTIONS__ALLOWANCE", 0),
        namespaces=_names(environ, "AGENTJOBS_ACTIONS__NAMESPACES"),
        databases=_names(environ, "AGENTJOBS_ACTIONS__DATABASES"),
        exhausted_targets=_names(environ, "AGENTJOBS_ACTIONS__EXHAUSTED_TARGETS") or frozenset(),
    )


def load(environ: Mapping[str, str]) -> AgentEnv:
    """Parse the Job's environment; raises ``ConfigError`` naming the first bad variable."""
    root_raw = environ.get("AGENTJOBS_MOUNT_ROOT", "").strip()
    mount_root = Path(root_raw) if root_raw else None
    phase_raw = _required(environ, "AGENTJOBS_PHASE")
    try:
        phase = Phase(phase_raw)
    except ValueError:
        choices = ", ".join(p.value for p in Phase)
        raise ConfigError(f"AGENTJOBS_PHASE={phase_raw!r} is not one of {choices}") from None
    auth_raw = environ.get("AGENTJOBS_VAULT__AUTH_MODE", "").strip() or "per-investigation"
    if auth_raw not in AUTH_MODES:
        raise ConfigError(f"AGENTJOBS_VAULT__AUTH_MODE={auth_raw!r} is not one of {', '.join(AUTH_MODES)}")
    auth_mode = cast(AuthMode, auth_raw)
    vault_addr = environ.get("AGENTJOBS_VAULT__ADDR", "").strip()
    if auth_mode != "none" and not vault_addr:
        raise ConfigError(f"AGENTJOBS_VAULT__ADDR is not set (needed in auth mode {auth_mode})")
    sa_token_file: Path | None = None
    if auth_mode == "kubernetes":
        sa_token_file = remap(_required(environ, "AGENTJOBS_SA_TOKEN_FILE"), mount_root)
    log_level = environ.get("AGENTJOBS_LOGGING__LEVEL", "").strip().lower() or "info"
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"AGENTJOBS_LOGGING__LEVEL={log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    return AgentEnv(
        investigation_id=_required(environ, "AGENTJOBS_INVESTIGATION_ID"),
        job_name=environ.get("AGENTJOBS_JOB_NAME", "").strip() or environ.get("POD_NAME", "").strip(),
        phase=phase,
        class_name=environ.get("AGENTJOBS_CLASS", "").strip() or "default",
        input_dir=remap(_required(environ, "AGENTJOBS_INPUT_DIR"), mount_root),
        vault_addr=vault_addr,
        auth_mode=auth_mode,
        sa_token_file=sa_token_file,
        amqp_url=_required(environ, "AGENTJOBS_AMQP__URL"),
        postgres_dsn=environ.get("AGENTJOBS_POSTGRES__DSN", "").strip(),
        postgres_targets=_postgres_targets(environ),
        postgres_match=_postgres_match(environ),
        mount_root=mount_root,
        domain_label=environ.get("AGENTJOBS_ADMISSION__DOMAIN_LABEL", "").strip() or "domain",
        vault_timeout=_seconds(environ, "AGENTJOBS_VAULT__REQUEST_TIMEOUT", 10.0),
        publish_timeout=_seconds(environ, "AGENTJOBS_AMQP__PUBLISH_TIMEOUT", 10.0),
        log_level=log_level,
        deadline_seconds=_seconds(environ, "AGENTJOBS_DEADLINE_SECONDS", 600.0),
        tools=_tools(environ, mount_root),
        llm=_llm(environ),
        traceparent=environ.get("TRACEPARENT", "").strip(),
        work_dir=_work_dir(environ, mount_root),
        actions=_actions(environ),
    )


def _postgres_targets(environ: Mapping[str, str]) -> tuple[PostgresTarget, ...]:
    try:
        return parse_targets(environ.get("AGENTJOBS_POSTGRES__TARGETS", "").strip())
    except TargetsError as exc:
        raise ConfigError(f"AGENTJOBS_POSTGRES__TARGETS: {exc}") from None


def _postgres_match(environ: Mapping[str, str]) -> dict[str, str]:
    raw = environ.get("AGENTJOBS_POSTGRES__MATCH", "").strip() or "{}"
    try:
        return parse_match(json.loads(raw), "AGENTJOBS_POSTGRES__MATCH")
    except ValueError as exc:
        raise ConfigError(f"AGENTJOBS_POSTGRES__MATCH={raw[:80]!r} is not a JSON object of labels ({exc})") from None


def _work_dir(environ: Mapping[str, str], mount_root: Path | None) -> Path | None:
    raw = environ.get("AGENTJOBS_WORK_DIR", "").strip() or environ.get("TMPDIR", "").strip()
    return remap(raw, mount_root) if raw else None
