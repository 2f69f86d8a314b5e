"""What the Job tells the agent, read once from the environment.

The dispatcher's Job manifest (``dispatcher/jobspec.py``) is the other side of
this contract: ``AGENTJOBS_*`` variables name the investigation, its phase and
where its input files, Vault, RabbitMQ and PostgreSQL are. Broker and database
addresses arrive *without* credentials — the agent inserts the dynamic users
Vault issues to it. When ``AGENTJOBS_MOUNT_ROOT`` is set (local runtime, the
emulator's kubelet) absolute mount paths are found under it. Nothing else in
``agent/`` reads the environment.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal, cast

from schemas import Phase

AuthMode = Literal["per-investigation", "kubernetes", "none"]
AUTH_MODES: tuple[AuthMode, ...] = ("per-investigation", "kubernetes", "none")
LOG_LEVELS = ("debug", "info", "warning", "error")

INCIDENT_FILE = "incident.json"  # == dispatcher.jobspec.INCIDENT_FILE
WRAPPED_TOKEN_FILE = "wrapped-token"  # == dispatcher.jobspec.WRAPPED_TOKEN_FILE


class ConfigError(Exception):
    """The Job's environment is incomplete or invalid; the message names the variable."""


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
    mount_root: Path | None = None
    domain_label: str = "domain"  # incident label naming the domain (routing key part)
    vault_timeout: float = 10.0  # seconds per Vault request
    publish_timeout: float = 10.0  # seconds to wait for the broker's confirm
    query_timeout: float = 5.0  # seconds: PostgreSQL statement_timeout and connect timeout
    log_level: str = "info"

    @property
    def incident_file(self) -> Path:
        return self.input_dir / INCIDENT_FILE

    @property
    def wrapped_token_file(self) -> Path:
        return self.input_dir / WRAPPED_TOKEN_FILE


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
        mount_root=mount_root,
        domain_label=environ.get("AGENTJOBS_ADMISSION__DOMAIN_LABEL", "").strip() or "domain",
        vault_timeout=_seconds(environ, "AGENTJOBS_VAULT__REQUEST_TIMEOUT", 10.0),
        publish_timeout=_seconds(environ, "AGENTJOBS_AMQP__PUBLISH_TIMEOUT", 10.0),
        log_level=log_level,
    )
