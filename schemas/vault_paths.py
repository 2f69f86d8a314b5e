"""Where agentjobs lives inside Vault/OpenBao: mounts, roles and policy names, in one place.

``agentjobs vault bootstrap`` creates exactly this; the dispatcher mints and
revokes tokens against it; the agent reads credentials from it. Names are
derived from the phase so that the phase — decided outside the model — picks
what a Job may read.
"""

from __future__ import annotations

import hashlib
import re

from schemas import Phase

TOKEN_ROLE_PREFIX = "agentjobs-agent-"  # auth/token/roles/<prefix><phase>
POLICY_PREFIX = "agentjobs-agent-"  # sys/policies/acl/<prefix><phase>
K8S_AUTH_MOUNT = "kubernetes"  # auth/kubernetes, role per phase: <prefix><phase>
DISPATCHER_POLICY = "agentjobs-dispatcher"
TICKETS_POLICY = "agentjobs-tickets"  # `agentjobs tickets`: reads its backend's key, nothing else

DATABASE_MOUNT = "database"
DATABASE_CONNECTION = "agentjobs-postgres"
# One Vault database role per kind of phase (database/roles/<role>, database/creds/<role>); which
# phase gets which is ``database_role_for`` below, and each phase's policy may read its own only.
DATABASE_ROLE = "agentjobs-diagnostics"  # shadow, read-only: pg_read_all_stats, nothing to act with
# limited-remediation, autonomous: the diagnostics grants plus pg_signal_backend (terminate_backend,
# terminate_idle_backends). A second layer besides the action gate: a phase whose gate is bypassed
# still holds a database user that cannot signal anyone's backend.
DATABASE_REMEDIATION_ROLE = "agentjobs-remediation"
DATABASE_ROLES = (DATABASE_ROLE, DATABASE_REMEDIATION_ROLE)  # what the connection allows
RABBITMQ_MOUNT = "rabbitmq"
RABBITMQ_ROLE = "agentjobs-results"  # may only write to agentjobs.results
KV_MOUNT = "agentjobs-kv"  # kv-v2
KV_LLM = "llm"  # agentjobs-kv/data/llm: {"api_key": ...}
# agentjobs-kv/data/rabbitmq-shared: {"username", "password"} — only in `up`'s reduced mode (no
# management API, so no rabbitmq engine): the one broker user every agent then publishes as.
KV_RABBITMQ_SHARED = "rabbitmq-shared"
# agentjobs-kv/data/actions: the global kill switch {"enabled": bool, "by", "reason", "at"}
# (schemas.actions.KillSwitch). Operators write it (`agentjobs actions disable|enable`); every agent
# phase policy may read it and none may write it; each agent reads it right before acting and
# acts on nothing when it says disabled or cannot be read. No document: never disabled.
KV_ACTIONS = "actions"
KV_TICKETS = "tickets"
# agentjobs-kv/data/claims/<investigation>/<digest of the idempotency key>: the claim an acting agent
# creates (create-only, cas=0) right before it acts, and .../outcome once it knows how it ended
# (agent.remediation.claims). Shared by every pod and every Job of the investigation, so a retried pod
# (a new emptyDir, no local ledger) or a relaunched Job finds it. The acting phases' policies may
# create and read them, never update or delete.
KV_CLAIMS = "claims"
OUTCOME = "outcome"

# Token metadata keys: they appear in the audit log of every request the agent makes.
META_INVESTIGATION = "investigation_id"
META_INCIDENT = "incident_key"
META_PHASE = "phase"
META_JOBS_IN = "jobs_in"  # where the Job runs ("kubernetes/<ns>", "local/<dir>"): the sweeper's scope


def token_role(phase: Phase) -> str:
    return f"{TOKEN_ROLE_PREFIX}{phase.value}"


def policy(phase: Phase) -> str:
    return f"{POLICY_PREFIX}{phase.value}"


def kubernetes_role(phase: Phase) -> str:
    return f"{TOKEN_ROLE_PREFIX}{phase.value}"


# A named PostgreSQL target (``postgres.targets.<name>``): lowercase letters, digits and inner
# dashes, so that it can end a Vault role name and a connection name as it is.
TARGET_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?")


def check_target_name(name: str) -> str:
    """``name`` if it may name a PostgreSQL target, else ``ValueError`` saying why (pure)."""
    if not TARGET_NAME.fullmatch(name):
        raise ValueError(f"{name[:60]!r} is not a target name (1-40 of a-z, 0-9 and inner '-')")
    return name


def database_connection_name(target: str = "") -> str:
    """``database/config/<name>`` of a target: ``agentjobs-postgres`` for the default one ("")."""
    return f"{DATABASE_CONNECTION}-{check_target_name(target)}" if target else DATABASE_CONNECTION


def target_roles(target: str = "") -> tuple[str, ...]:
    """The database roles of a target's connection (its ``allowed_roles``), one per kind of phase."""
    return tuple(_for_target(role, target) for role in DATABASE_ROLES)


def _for_target(role: str, target: str) -> str:
    return f"{role}-{check_target_name(target)}" if target else role


def database_role_for(phase: Phase | None, target: str = "") -> str:
    """The Vault database role a Job of ``phase`` gets its PostgreSQL user from, on ``target``.

    Only the phases that may act (limited-remediation, autonomous) get the role that can
    terminate backends; ``None`` (a caller that does not know the phase) gets the read-only
    one, which fails closed in a remediation phase (its policy does not grant it). A named
    target's roles carry its name after the kind's (``agentjobs-diagnostics-ledger``): each
    phase policy's one glob per kind (``database/creds/agentjobs-diagnostics-*``) reaches every
    target's role of that kind, and never the other kind's.
    """
    kind = DATABASE_REMEDIATION_ROLE if phase in (Phase.LIMITED_REMEDIATION, Phase.AUTONOMOUS) else DATABASE_ROLE
    return _for_target(kind, target)


def database_creds_path(phase: Phase | None = None, target: str = "") -> str:
    """``database/creds/<role>`` of ``phase`` on ``target`` ("": the default one; see ``database_role_for``)."""
    return f"{DATABASE_MOUNT}/creds/{database_role_for(phase, target)}"


def database_creds_policy_glob(phase: Phase) -> str:
    """The one glob of ``phase``'s policy on the database mount: every named target's role of its kind."""
    return f"{database_creds_path(phase)}-*"


def rabbitmq_creds_path() -> str:
    return f"{RABBITMQ_MOUNT}/creds/{RABBITMQ_ROLE}"


def kv_llm_path() -> str:
    return f"{KV_MOUNT}/data/{KV_LLM}"


def kv_rabbitmq_shared_path() -> str:
    return f"{KV_MOUNT}/data/{KV_RABBITMQ_SHARED}"


def kv_tickets_path() -> str:
    """``agentjobs-kv/data/tickets``: the ticketing backend's secrets (redmine_api_key, webhook_secret)."""
    return f"{KV_MOUNT}/data/{KV_TICKETS}"


def kv_actions_path() -> str:
    """``agentjobs-kv/data/actions``: the kill switch (kv-v2 data path)."""
    return f"{KV_MOUNT}/data/{KV_ACTIONS}"


def _segment(text: str) -> str:
    """``text`` as one safe path segment: itself if plain, else a digest (pure)."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", text) and ".." not in text:
        return text
    return "x-" + hashlib.sha256(text.encode()).hexdigest()[:32]


def kv_claim_path(key: str) -> str:
    """``agentjobs-kv/data/claims/<investigation>/<digest>`` of an idempotency key (pure).

    The key is ``<investigation>:<action>:<digest>`` (``agent.remediation.protocol.idempotency_key``);
    the investigation groups an investigation's claims (an id that is not a plain path segment, or
    none, becomes a digest of itself), and the last segment is a digest of the whole key.
    """
    parts = key.rsplit(":", 2)
    investigation = parts[0] if len(parts) == 3 and parts[0] else "_"
    digest = hashlib.sha256(key.encode()).hexdigest()[:40]
    return f"{KV_MOUNT}/data/{KV_CLAIMS}/{_segment(investigation)}/{digest}"


def kv_claims_policy_path() -> str:
    """``agentjobs-kv/data/claims/*``: what the acting phases' policies grant (create, read)."""
    return f"{KV_MOUNT}/data/{KV_CLAIMS}/*"


def kv_claim_outcome_path(key: str) -> str:
    """``<claim path>/outcome``: a second create-only secret, so settling needs no update capability."""
    return f"{kv_claim_path(key)}/{OUTCOME}"
