"""Who may say what: the sender of every message checked against what that sender may say (pure).

RabbitMQ validates the ``user_id`` property against the publishing connection's user, so it is
the one claim about a message a consumer can rely on: a message without it, or from a user not
allowed for its kind, is refused (dead-lettered ``forbidden_sender`` by the caller), never
applied. Agents' users are Vault-issued and carry their Job's name
(``token-<job name>-<uuid>``), which ties an agent's message to its own investigation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dispatcher.plumbing.settings import IdentitySettings

FORBIDDEN = "forbidden_sender"
_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


@dataclass(frozen=True, kw_only=True)
class Refusal:
    """Why a message's sender may not say it (the dead letter's detail)."""

    reason: str  # always FORBIDDEN: one reason code to count and alert on
    detail: str


def _refuse(user_id: str, what: str, allowed: str) -> Refusal:
    who = repr(user_id) if user_id else "a sender without user_id"
    return Refusal(reason=FORBIDDEN, detail=f"{who} may not send {what} (allowed: {allowed})")


def one_of(user_id: str, allowed: list[str] | tuple[str, ...], what: str) -> Refusal | None:
    """None if ``user_id`` is one of ``allowed``."""
    if user_id and user_id in allowed:
        return None
    return _refuse(user_id, what, ", ".join(allowed) or "nobody")


def incident_sender(ids: IdentitySettings, user_id: str) -> Refusal | None:
    return one_of(user_id, [ids.bridge, *ids.operators, *ids.admins], "incidents")


def control_sender(ids: IdentitySettings, user_id: str) -> Refusal | None:
    return one_of(user_id, [*ids.operators, *ids.admins, ids.dispatcher], "control commands")


def feedback_sender(ids: IdentitySettings, user_id: str) -> Refusal | None:
    return one_of(user_id, [*ids.operators, *ids.admins, ids.ticketing], "operator feedback")


def pin_sender(ids: IdentitySettings, user_id: str) -> Refusal | None:
    return one_of(user_id, list(ids.admins), "phase pins")


def trust_sender(ids: IdentitySettings, user_id: str, what: str = "phase changes") -> Refusal | None:
    return trust_sender_of(ids.trust, user_id, what)


def trust_sender_of(trust_user: str, user_id: str, what: str = "phase changes") -> Refusal | None:
    return one_of(user_id, [trust_user], what)


def is_agent_of(ids: IdentitySettings, user_id: str, job_name: str) -> bool:
    """True if ``user_id`` is the Vault-issued broker user of the agent of Job ``job_name``.

    Exact shape, not a prefix: ``token-<job name>-<uuid>``, so one Job's name being the start of
    another's cannot pass. (Agents logged in with kubernetes auth carry their ServiceAccount's
    name instead; for those only the installation's prefix is known — see ``agent_sender``.)
    """
    pattern = re.escape(ids.agent_prefix) + re.escape(job_name) + "-" + _UUID
    return bool(job_name) and re.fullmatch(pattern, user_id) is not None


def agent_sender(ids: IdentitySettings, user_id: str, job_name: str, what: str, *,
                 kubernetes_auth: bool = False) -> Refusal | None:
    """None if the agent user of Job ``job_name`` sent it (kubernetes auth: any agent user)."""
    if is_agent_of(ids, user_id, job_name):
        return None
    if kubernetes_auth and user_id.startswith(ids.kubernetes_agent_prefix) and len(user_id) > len(
            ids.kubernetes_agent_prefix):
        return None
    return _refuse(user_id, f"{what} of Job {job_name or '(none)'}",
                   f"{ids.agent_prefix}{job_name or '<job name>'}-<uuid>")


def dispatcher_or_agent(ids: IdentitySettings, user_id: str, job_name: str, what: str, *,
                        kubernetes_auth: bool = False) -> Refusal | None:
    """Findings: the agent of that Job, or the dispatcher (its failure results)."""
    if user_id and user_id == ids.dispatcher:
        return None
    return agent_sender(ids, user_id, job_name, what, kubernetes_auth=kubernetes_auth)


def any_agent_or_dispatcher(ids: IdentitySettings, user_id: str, what: str) -> Refusal | None:
    """An agent user of this installation (any Job) or the dispatcher: where no Job is named."""
    prefixes = (ids.agent_prefix, ids.kubernetes_agent_prefix)
    if user_id and (user_id == ids.dispatcher
                    or any(user_id.startswith(p) and len(user_id) > len(p) for p in prefixes)):
        return None
    return _refuse(user_id, what, f"{ids.dispatcher} or an agent user ({' / '.join(prefixes)}…)")


def finding_of_investigation(ids: IdentitySettings, user_id: str, investigation_id: str, what: str = "findings", *,
                             kubernetes_auth: bool = False) -> Refusal | None:
    """Findings where only the investigation is known: the dispatcher, or the agent of a Job of that
    investigation (``token-aj-[<slug>-]<first 16 hex of the id>-<uuid>``; see ``schemas.identity.job_name``)."""
    if user_id and user_id == ids.dispatcher:
        return None
    if kubernetes_auth and user_id.startswith(ids.kubernetes_agent_prefix) and len(user_id) > len(
            ids.kubernetes_agent_prefix):
        return None
    digest = re.escape(investigation_id[:16])
    pattern = re.escape(ids.agent_prefix) + r"aj-(?:[a-z0-9-]*-)?" + digest + "-" + _UUID
    if len(investigation_id) >= 16 and re.fullmatch(pattern, user_id) is not None:
        return None
    return _refuse(user_id, f"{what} of investigation {investigation_id[:16]}…",
                   f"{ids.dispatcher} or {ids.agent_prefix}aj-…-{investigation_id[:16]}-<uuid>")
