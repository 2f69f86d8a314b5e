"""The global kill switch, outside the model: read from Vault right before every action.

Operators flip it with ``agentjobs actions disable|enable`` (a document at
``agentjobs-kv/data/actions``, ``schemas.actions.KillSwitch``); every agent phase's
Vault policy may read it and none may write it. ``VaultKillSwitch`` is the execution
protocol's ``Guard``: the engine installs it for the conclusion, so each action the gate
allows is checked after its precondition and before it is claimed — in a Job that started
before the switch was flipped too. What a read means is decided by pure functions:

- no document at all: never disabled, go ahead;
- ``enabled: true``: go ahead; ``enabled: false``: refused (``refused_kill_switch``);
- anything else — Vault down, a 403, a document that is not a kill switch, no Vault identity
  at all — refused with reason "kill switch unreadable (...)": fail closed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from schemas import ProposedAction
from schemas import vault_paths as vault_layout
from schemas.actions import KillSwitch, KillSwitchUnreadable, parse_kill_switch
from schemas.logs import get_logger

from ..credentials import Denied
from .protocol import Guard, Refusal

log = get_logger("agentjobs.agent.killswitch")


class KvReader(Protocol):
    async def read_kv(self, path: str) -> dict[str, Any] | None | Denied:
        ...


def unreadable(why: str) -> Refusal:
    """The refusal when the switch cannot be read (pure): nobody could stop us, so we do not act."""
    return Refusal(reason=f"kill switch unreadable ({why}): not acting")


def decide(state: KillSwitch) -> Refusal | None:
    """None when actions are enabled, else the refusal naming who disabled them and why (pure)."""
    if state.enabled:
        return None
    return Refusal(reason=f"refused by the kill switch: {state.describe()}")


def judge(read: Mapping[str, Any] | None | Denied) -> Refusal | None:
    """What one read of ``agentjobs-kv/data/actions`` means for an action about to run (pure)."""
    if isinstance(read, Denied):
        return unreadable(read.reason)
    try:
        state = parse_kill_switch(read)
    except KillSwitchUnreadable as exc:
        return unreadable(f"not a kill switch document: {exc}")
    return decide(state)


class VaultKillSwitch:
    """The ``Guard`` reading the switch with the agent's own Vault session, fresh for every action."""

    def __init__(self, session: KvReader, *, path: str | None = None) -> None:
        self.session = session
        self.path = path or vault_layout.kv_actions_path()

    async def __call__(self, action: ProposedAction) -> Refusal | None:
        try:
            read = await self.session.read_kv(self.path)
        except Exception as exc:  # noqa: BLE001 - the session reports its failures; anything else fails closed
            read = Denied(path=self.path, reason=f"{type(exc).__name__}")
        refusal = judge(read)
        if refusal is not None:
            log.warning("action_refused_by_kill_switch", action=action.action, target=action.target,
                        reason=refusal.reason[:300])
        return refusal


def without_vault(why: str) -> Guard:
    """The guard of a Job with no Vault identity (auth mode none): the switch cannot be read, so never act."""

    async def refuse(action: ProposedAction) -> Refusal | None:
        return unreadable(why)

    return refuse
