"""Where the dispatcher learns a scope's autonomy phase.

One small port so the trust consumer's phase log can replace the static
source without touching the dispatcher: ``phase_for(scope)`` must be cheap and
synchronous (it is called per admitted incident).
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Callable
from typing import Protocol

from aio_pika.abc import AbstractIncomingMessage

from dispatcher.intake import senders
from schemas import DecodeError, Phase, PhaseChanged, decode
from schemas.logs import get_logger

log = get_logger("agentjobs.phases")


class PhaseSource(Protocol):
    def phase_for(self, scope: str) -> Phase:
        """The phase the next Job in ``scope`` runs with."""
        ...


class StaticPhases:
    """Phases from settings: one default, optional fixed per-scope phases."""

    def __init__(self, default: Phase, per_scope: Mapping[str, Phase] | None = None) -> None:
        self._default = default
        self._per_scope = dict(per_scope or {})

    def phase_for(self, scope: str) -> Phase:
        return self._per_scope.get(scope, self._default)


class LoggedPhases:
    """Phases from the phase log (``agentjobs.phase-log``): the newest ``PhaseChanged`` per scope wins.

    Fed by a ``StreamFollower`` replaying the log from its first offset and then following it;
    duplicates and late repeats of older changes are ignored (the newest ``at`` stands).
    Until a scope has a change, it runs in ``default`` — the least-privileged phase by default.
    """

    def __init__(self, default: Phase, *, trust_user: str, on_refused: Callable[[], None] | None = None) -> None:
        self._default = default
        self._on_refused = on_refused  # e.g. a metric: a refused entry is an attack or a misconfiguration
        self._trust_user = trust_user  # the only sender whose changes count
        self._changes: dict[str, PhaseChanged] = {}
        self.refused = 0  # entries from anyone else (a stream keeps them; they are never applied)

    def apply(self, change: PhaseChanged) -> None:
        known = self._changes.get(change.scope)
        if known is None or change.at >= known.at:
            self._changes[change.scope] = change

    def on_log_entry(self, message: AbstractIncomingMessage) -> None:
        try:
            change = decode(message.body, PhaseChanged)
        except DecodeError:
            return  # markers and foreign messages are not phase changes
        refused = senders.trust_sender_of(self._trust_user, message.user_id or "")
        if refused is not None:
            self.refused += 1
            if self._on_refused is not None:
                self._on_refused()
            log.warning("phase_change_refused", reason=refused.reason, detail=refused.detail, scope=change.scope[:64],
                        to_phase=change.to_phase.value)
            return
        self.apply(change)

    def phase_for(self, scope: str) -> Phase:
        change = self._changes.get(scope)
        return self._default if change is None else change.to_phase

    def phases(self) -> dict[str, Phase]:
        return {scope: c.to_phase for scope, c in sorted(self._changes.items())}
