"""Where the dispatcher learns a scope's autonomy phase.

One small port so the trust consumer's phase log can replace the static
source without touching the dispatcher: ``phase_for(scope)`` must be cheap and
synchronous (it is called per admitted incident).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from schemas import Phase


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
