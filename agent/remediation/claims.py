"""Action claims shared by every pod and Job of an investigation, in Vault KV (create-only).

The ledger in the Job's working directory (``protocol.FileLedger``) survives a restarted agent
process, not a retried pod (a new emptyDir) or a relaunched Job of the same investigation. The
claim store that does lives where every attempt of the investigation can reach with its own
credentials: ``agentjobs-kv/data/claims/<investigation>/<digest of the idempotency key>``
(``schemas.vault_paths.kv_claim_path``). ``execute`` consults it besides the local ledger
(``shared=``, or the store the engine installed with ``protocol.shared_claims``):

- ``claim``: a create-only write (``cas=0``) — exactly one attempt creates it; every other one is
  told it exists (``False``: ``already_executed``). Made before acting; if it cannot be made
  (Vault down, 403), ``execute`` does not act (fail closed).
- ``settle``: how it ended, as a second create-only secret ``<claim>/outcome`` — so the policy needs
  no ``update`` and an agent cannot rewrite or undo a claim.
- ``seen``: the claim and, if recorded, its outcome, as a ``protocol.Entry``; a claim whose outcome
  was never recorded (the agent died while acting) counts as done.

What a read or a write means is decided by the pure functions below; the I/O is the agent's
``VaultSession`` (``read_kv``, ``create_kv``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from schemas import utcnow
from schemas import vault_paths as vault_layout
from schemas.logs import get_logger

from ..credentials import AlreadyExists, Created, Denied
from .protocol import Entry, Outcome

log = get_logger("agentjobs.agent.claims")

REASON_CHARS = 500  # the outcome's reason, as stored


class ClaimsUnavailable(Exception):
    """The claim store could not answer: the caller must not act on a guess."""


class KvStore(Protocol):
    async def read_kv(self, path: str) -> dict[str, Any] | None | Denied:
        ...

    async def create_kv(self, path: str, data: Mapping[str, Any]) -> Created | AlreadyExists | Denied:
        ...


# --- decisions (pure) ---------------------------------------------------------------------------

def claim_document(key: str, *, action: str, target: str, at: str, holder: str = "") -> dict[str, str]:
    """What a claim stores (pure): enough for an operator to see who claimed what, and when."""
    doc = {"key": key, "action": action, "target": target[:1000], "claimed_at": at}
    if holder:
        doc["holder"] = holder  # the claiming token's accessor (not a secret)
    return doc


def outcome_document(outcome: Outcome, *, reason: str, at: str) -> dict[str, str]:
    return {"outcome": outcome.value, "reason": reason[:REASON_CHARS], "settled_at": at}


def claimed(answer: Created | AlreadyExists | Denied) -> bool:
    """True: this attempt holds the claim; False: an earlier one does; raises when nobody can tell (pure)."""
    if isinstance(answer, Created):
        return True
    if isinstance(answer, AlreadyExists):
        return False
    raise ClaimsUnavailable(f"cannot claim the action in Vault ({answer.path}): {answer.reason}")


def entry_of(key: str, claim: Mapping[str, Any] | None | Denied,
             outcome: Mapping[str, Any] | None | Denied) -> Entry | None:
    """The ledger entry the two reads describe (pure).

    No claim → None (never claimed). A claim → an ``Entry``; its outcome only when the outcome
    document is readable and names a known outcome (anything else: claimed, outcome unknown —
    which still counts as done). An unreadable claim raises ``ClaimsUnavailable``.
    """
    if isinstance(claim, Denied):
        raise ClaimsUnavailable(f"cannot read the action claim in Vault ({claim.path}): {claim.reason}")
    if claim is None:
        return None
    at = str(claim.get("claimed_at", ""))
    if not isinstance(outcome, Mapping):
        return Entry(key=key, claimed_at=at)
    try:
        settled = Outcome(str(outcome.get("outcome")))
    except ValueError:
        return Entry(key=key, claimed_at=at)
    return Entry(key=key, claimed_at=at, outcome=settled, reason=str(outcome.get("reason", "")))


# --- the store ------------------------------------------------------------------------------------

class VaultClaims:
    """The shared claim store (``protocol.ClaimStore``) on the agent's own Vault session."""

    def __init__(self, session: KvStore, *, holder: str | None = None) -> None:
        self.session = session
        if holder is None:
            identity = getattr(session, "identity", None)
            holder = str(getattr(identity, "accessor", "") or "")
        self.holder = holder

    async def seen(self, key: str) -> Entry | None:
        claim = await self.session.read_kv(vault_layout.kv_claim_path(key))
        outcome = None
        if isinstance(claim, dict):
            outcome = await self.session.read_kv(vault_layout.kv_claim_outcome_path(key))
        return entry_of(key, claim, outcome)

    async def claim(self, key: str, *, action: str = "", target: str = "") -> bool:
        path = vault_layout.kv_claim_path(key)
        answer = await self.session.create_kv(
            path, claim_document(key, action=action, target=target, at=utcnow().isoformat(), holder=self.holder))
        won = claimed(answer)
        log.info("action_claimed" if won else "action_claimed_before", path=path, action=action)
        return won

    async def settle(self, key: str, outcome: Outcome, *, reason: str = "") -> None:
        path = vault_layout.kv_claim_outcome_path(key)
        answer = await self.session.create_kv(path, outcome_document(outcome, reason=reason,
                                                                     at=utcnow().isoformat()))
        if isinstance(answer, Denied):
            raise ClaimsUnavailable(f"cannot record the outcome in Vault ({path}): {answer.reason}")
        if isinstance(answer, AlreadyExists):  # settled before: the first outcome stands
            log.warning("action_outcome_recorded_before", path=path, outcome=outcome.value)
